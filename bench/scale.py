"""One full-size LLaMA-2-7B decoder layer: a DKM training step's memory and time, and a 7B plan.

    python -m bench.scale                         # CPU: plain, DKM per_tensor, DKM grouped, coremltools
    python -m bench.scale --device cuda --bits 3 4
    python -m bench.scale --quick                 # CI: tiny shapes, seconds
    python -m bench.scale --shrink 4 --caps 6 --cap-resolution 0.25 --timeout 900   # coremltools' cap

A random-init ``LlamaDecoderLayer`` at LLaMA-2-7B shapes (hidden 4096, MLP 11008, 32 heads,
no GQA) with fp32 master weights takes one training step (forward, backward, AdamW) on a
1 x 512 batch of random hidden states (loss: mean square of the output). Cases: the plain
layer; edkm with its 7 projections clustered as bf16 (``cluster_dtype="bfloat16"``) at
``per_tensor`` and ``per_grouped_channel`` (16 output channels per LUT); coremltools'
DKMPalettizer on the same layer (fp32, per_tensor, its defaults otherwise) under a cap on
the child's address space (``resource.setrlimit(RLIMIT_AS)``), tried at each ``--caps``
value until one fits (or all fail), then (``--cap-resolution``) bisected down to the smallest
cap that fits. ``--shrink F`` divides hidden, MLP and heads by F (head dim 128 and the
1 x 512 batch kept), for coremltools, whose full-size step did not finish in 47 minutes
on the shared 2-core CI machine; the 7B plan is only computed at full size.

Every case runs in its own fresh interpreter (`bench.harness.run_isolated`), so peaks do
not mix. Memory per case, in bytes:
- ``held_after_forward``: what the forward leaves alive for backward (saved activations
  and DKM's saved state): RSS growth on CPU, ``memory_allocated`` growth on CUDA. This is
  the term a whole model holds once per layer at the end of its forward.
- ``peak_backward`` / ``peak_step``: peak growth over the built layer during backward, and
  during the whole step (optimizer state is allocated by the first AdamW step).
- ``peak_process``: the child's absolute peak (``ru_maxrss`` on CPU,
  ``max_memory_allocated`` on CUDA), interpreter and libraries included on CPU;
  ``vm_peak`` (CPU): its peak address space (``VmPeak``), the quantity the cap limits.
Seconds are wall-clock of one step on a shared machine: context, not quiet-machine
figures. `bench.scale_plan` turns the per-layer rows into the 7B memory plan. Output: one
JSON file (rows + plan, tagged by `bench.harness.env_info`) under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from bench.harness import REPO, coreml_dkm_palettizer, env_info, format_table, run_isolated
from bench.scale_plan import memory_plan

LLAMA7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "seq": 512}
QUICK = {"hidden": 64, "intermediate": 176, "heads": 4, "seq": 32}
CASES = ("plain", "per_tensor", "per_grouped_channel", "coremltools")
GROUP_SIZE = 16
GIB = 2**30


def build_layer(dims: dict, device: torch.device):
    """A random-init fp32 ``LlamaDecoderLayer`` at ``dims`` and its rotary (cos, sin) for ``dims["seq"]``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                      num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"],
                      num_hidden_layers=1, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device)
    for p in layer.parameters():  # transformers leaves init to the model; LLaMA's std 0.02
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    layer.train()
    x = torch.randn(1, dims["seq"], dims["hidden"], device=device)
    cos_sin = LlamaRotaryEmbedding(cfg).to(device)(x, torch.arange(dims["seq"], device=device)[None])
    return layer, x, cos_sin


def _prepare(layer, name: str, bits: int, iters: int) -> None:
    if name in ("per_tensor", "per_grouped_channel"):
        import edkm

        edkm.prepare(layer, edkm.DKMConfig(bits=bits, granularity=name, group_size=GROUP_SIZE, max_iters=iters,
                                           cluster_dtype="bfloat16", min_weight_numel=0))
    elif name == "coremltools":
        DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig = coreml_dkm_palettizer()
        module_cfg = ModuleDKMPalettizerConfig(n_bits=bits, granularity="per_tensor", kmeans_max_iter=iters,
                                               weight_threshold=0, milestone=0)
        DKMPalettizer(layer, DKMPalettizerConfig(global_config=module_cfg)).prepare(inplace=True)


class _Meter:
    """Live bytes and peak growth: CUDA allocator counters, or RSS / VmHWM on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def live(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        import psutil

        return psutil.Process().memory_info().rss

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from bench.harness import _reset_rss_peak

            _reset_rss_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        from bench.harness import _proc_kb

        return (_proc_kb("VmHWM") or 0) * 1024

    def process_peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def layer_dims(quick: bool, shrink: int) -> dict:
    """The layer's shapes: LLaMA-2-7B (or QUICK) with hidden, MLP and heads divided by
    ``shrink`` (head dim and sequence kept). Raises ``ValueError`` naming a shape it does not divide."""
    base = QUICK if quick else LLAMA7B
    if shrink == 1:
        return dict(base)
    bad = {k: base[k] for k in ("hidden", "intermediate", "heads") if base[k] % shrink}
    if bad:
        raise ValueError(f"--shrink {shrink} does not divide {bad}")
    return {**base, "hidden": base["hidden"] // shrink, "intermediate": base["intermediate"] // shrink,
            "heads": base["heads"] // shrink, "shrink": shrink}


def run_case(name: str, dims: dict, bits: int, iters: int, device: torch.device) -> dict:
    """One case in this process: build, prepare, one training step. Returns the row."""
    meter = _Meter(device)
    layer, x, cos_sin = build_layer(dims, device)
    n_params = sum(p.numel() for p in layer.parameters())
    t0 = time.perf_counter()
    _prepare(layer, name, bits, iters)
    prepare_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-5)
    built = meter.live()
    meter.reset_peak()
    t0 = time.perf_counter()
    out = layer(x, position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    loss = out.float().square().mean()
    held = meter.live() - built
    peak_fwd = meter.peak() - built
    meter.reset_peak()
    loss.backward()
    peak_bwd = meter.peak() - built
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak_step = max(peak_fwd, meter.peak() - built)
    return {"case": name, "bits": None if name == "plain" else bits, "n_params": n_params,
            "held_after_forward": held, "peak_forward": peak_fwd, "peak_backward": peak_bwd, "peak_step": peak_step,
            "built_bytes": built, "peak_process": meter.process_peak(), "seconds": seconds, "prepare_s": prepare_s,
            "loss": loss.item(), "memory_method": "cuda_allocated" if device.type == "cuda" else "cpu_rss_vmhwm"}


def _child(args: argparse.Namespace) -> int:
    if args.cap_gib:
        cap = int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = layer_dims(args.quick, args.shrink)
    try:
        row = run_case(args.case, dims, args.bits[0], args.iters, torch.device(args.device))
    except (MemoryError, RuntimeError) as e:  # RuntimeError: torch's "DefaultCPUAllocator: can't allocate"
        out_of_memory = isinstance(e, MemoryError) or "alloc" in str(e).lower()
        if args.cap_gib is None or not out_of_memory:
            raise
        row = {"case": args.case, "bits": args.bits[0], "error": f"out of memory under cap: {type(e).__name__}"}
    row["cap_gib"] = args.cap_gib
    if args.device == "cpu":  # peak address space: what RLIMIT_AS (the cap) limits
        from bench.harness import _proc_kb

        row["vm_peak"] = (_proc_kb("VmPeak") or 0) * 1024
    print(json.dumps(row))
    return 0


def _child_argv(args: argparse.Namespace, case: str, bits: int, cap: float | None = None) -> list[str]:
    argv = ["-m", "bench.scale", "--case", case, "--bits", str(bits), "--iters", str(args.iters),
            "--device", args.device]
    if args.quick:
        argv.append("--quick")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.shrink != 1:
        argv += ["--shrink", str(args.shrink)]
    if cap is not None:
        argv += ["--cap-gib", str(cap)]
    return argv


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every (case, bits) in its own interpreter; coremltools over the cap ladder."""
    rows = []
    for bits in args.bits:
        for case in args.cases:
            if case == "plain" and bits != args.bits[0]:
                continue
            if case == "coremltools":
                if args.device != "cpu":
                    rows.append({"case": case, "bits": bits, "error": "skipped: the cap ladder runs on CPU only"})
                    continue
                row = _cap_search(args, case, bits)
            else:
                row = run_isolated(_child_argv(args, case, bits), timeout_s=args.timeout)
                row.setdefault("case", case)
                row.setdefault("bits", None if case == "plain" else bits)
            rows.append(row)
            print(f"  {case} {bits}-bit: {row.get('error') or 'done'}", flush=True)
    return rows


def _try_cap(args: argparse.Namespace, case: str, bits: int, cap: float) -> dict:
    row = run_isolated(_child_argv(args, case, bits, cap), timeout_s=args.timeout)
    log = {"cap_gib": cap, "outcome": "ok" if "error" not in row else row["error"]}
    if "error" in row and "timed out" in row["error"]:
        log["outcome"] = f"timed out after {args.timeout:g} s (not a memory failure)"
    print(f"    cap {cap:g} GiB: {log['outcome']}", flush=True)
    return row | {"_try": log}


def _cap_search(args: argparse.Namespace, case: str, bits: int) -> dict:
    """The smallest address-space cap (``RLIMIT_AS``) under which ``case`` finishes its step.

    ``--caps`` are tried in order until one fits (the upper bound); with ``--cap-resolution``
    R > 0 the cap is then bisected between the largest failing cap below it (or 0) and it,
    until the interval is at most R GiB. A try that times out (``--timeout``) ends the search:
    it says nothing about memory. The row is the smallest passing try's, with every try.
    """
    tries, best, lo = [], None, 0.0
    for cap in args.caps:
        row = _try_cap(args, case, bits, cap)
        tries.append(row.pop("_try"))
        if "error" not in row:
            best = row
            break
        if "timed out" in row["error"]:
            break
        lo = max(lo, cap)
    hi = best["cap_gib"] if best else None
    while best is not None and args.cap_resolution > 0 and hi - lo > args.cap_resolution:
        cap = round((lo + hi) / 2, 3)
        row = _try_cap(args, case, bits, cap)
        tries.append(row.pop("_try"))
        if "error" not in row:
            best, hi = row, cap
        elif "timed out" in row["error"]:
            break
        else:
            lo = cap
    caps = [t["cap_gib"] for t in tries]
    why = "no cap found" if "timed out" in tries[-1]["outcome"] else "failed under every cap tried"
    row = dict(best) if best else {"error": f"{why} ({caps} GiB): {tries[-1]['outcome']}"}
    row.update(case=case, bits=bits, cap_tries=tries, caps_tried_gib=[t["cap_gib"] for t in tries])
    if best:
        row["needed_cap_gib"] = {"fails_at": lo or None, "fits_at": hi}
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--bits", type=int, nargs="+", default=[3], help="LUT bits, one run per value (default 3)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations per forward (default 3)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default all)")
    p.add_argument("--caps", type=float, nargs="+", default=[8.0, 12.0],
                   help="address-space caps in GiB tried in order for coremltools (default 8 12)")
    p.add_argument("--cap-resolution", type=float, default=0.0,
                   help="bisect the coremltools cap below the first --caps value that fits, to this many GiB "
                        "(default 0: no bisection)")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide hidden, MLP and heads by this (head dim and sequence kept; default 1: full size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case (default 1800)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes (hidden 64), seconds")
    p.add_argument("--out", default=None, help="JSON file to write (default bench/results/scale-DEVICE[-quick].json)")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    p.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [f"--bits {b}" for b in args.bits if not 1 <= b <= 8]
    bad += [f"--iters {args.iters}"] if args.iters < 1 else []
    bad += [f"--caps {c}" for c in args.caps if not c > 0]
    bad += [f"--shrink {args.shrink}"] if args.shrink < 1 else []
    bad += [f"--cap-resolution {args.cap_resolution}"] if args.cap_resolution < 0 else []
    if bad:
        p.error(f"out of range: {', '.join(bad)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        return _child(args)
    try:
        dims = layer_dims(args.quick, args.shrink)
    except ValueError as err:
        print(f"bench.scale: {err}", file=sys.stderr)
        return 2
    print(f"bench.scale: one LLaMA decoder layer {dims} on {args.device}, bits {args.bits}"
          + (" (QUICK: tiny shapes)" if args.quick else ""), flush=True)
    rows = run_all(args)
    for r in rows:
        for key in ("held_after_forward", "peak_backward", "peak_step", "peak_process"):
            r[key.replace("peak_", "pk_") + "_mib"] = None if r.get(key) is None else r[key] / 2**20
    print(format_table(rows, ["case", "bits", "held_after_forward_mib", "pk_backward_mib", "pk_step_mib",
                              "pk_process_mib", "seconds", "error"]))
    plan = memory_plan(rows, dims, scaled_from_quick=args.quick) if args.shrink == 1 else []  # 7B plan: full size
    print(format_table(plan, ["setup", "per_gpu_gib", "fits_80gb", "host_gib", "measured", "scaled"]))
    device = torch.device(args.device)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        f"scale-{device.type}" + ("-quick" if args.quick else "") + (f"-shrink{args.shrink}" if args.shrink > 1 else "")
        + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"dims": dims, "quick": args.quick, "iters": args.iters, "group_size": GROUP_SIZE,
               "batch": [1, dims["seq"]], "env": env_info(device), "rows": rows, "plan": plan}
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {out}", flush=True)
    return 0 if all("error" not in r or r["case"] == "coremltools" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

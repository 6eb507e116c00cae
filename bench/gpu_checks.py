"""Two device checks the other benchmarks do not cover: DKM under FSDP2 on one rank, and the
CUDA offload path.

    python -m bench.gpu_checks fsdp --device cuda      # one NCCL rank (gloo on CPU)
    python -m bench.gpu_checks offload --device cuda   # saved tensors -> pinned host memory

``fsdp``: a random LLaMA (hidden ``--hidden``, 2 layers) prepared for 3-bit grouped DKM,
sharded by `edkm.distributed.fully_shard_dkm` over a world of one rank (NCCL on CUDA,
gloo on CPU), trains ``--steps`` AdamW steps next to an unsharded copy on the same device
and batches; the losses and final LUTs must agree within one bf16 ulp (2**-8 relative,
the rule of tests/test_fsdp.py); then the sharded model is saved as a sharded checkpoint
(`edkm.train.sharded`, DCP) and loaded into a fresh sharded copy: the gathered states must be
equal and one more step from each give the same loss (within the rule). ``offload``: one
``--size`` x ``--size`` bf16 weight through naive DKM (its (N, K) maps make real traffic) with and without
`edkm.offload_saved_tensors` (pinned, non-blocking on CUDA; ``copy_same_device`` on CPU so
the copy path runs there too): bytes moved each way, pinned bytes, seconds of each
forward+backward, the gradients bitwise equal. Each prints one JSON line (and writes it to
``--out``); exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fsdp_check(device: torch.device, hidden: int, steps: int) -> dict:
    """DKM + FSDP2 on one rank vs the same model unsharded; returns the row."""
    import torch.distributed as dist

    import edkm
    from edkm.distributed import fully_shard_dkm
    from edkm.hub.models import tiny_llama

    backend = "nccl" if device.type == "cuda" else "gloo"
    cfg = edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=16, cluster_dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            models = []
            for shard in (False, True):
                m = edkm.prepare(tiny_llama(hidden=hidden, heads=8, kv_heads=4, seed=0).to(device).train(), cfg)
                models.append(fully_shard_dkm(m) if shard else m)
            gen = torch.Generator().manual_seed(1)
            batches = [torch.randint(0, 256, (2, 64), generator=gen).to(device) for _ in range(steps + 1)]
            losses, seconds, opts = [], [], []
            for m in models:
                opts.append(_adamw(m))
                _sync(device)
                t0 = time.perf_counter()
                run = [_step(m, opts[-1], ids) for ids in batches[:steps]]
                _sync(device)
                seconds.append((time.perf_counter() - t0) / steps)
                losses.append(run)
            luts = [{n: p.centroids.clone() for n, _, p in edkm.clustered_layers(m)} for m in models]
            ckpt = _checkpoint_round_trip(Path(tmp) / "run", models[1], opts[1], steps, batches[steps],
                                          lambda: fully_shard_dkm(edkm.prepare(
                                              tiny_llama(hidden=hidden, heads=8, kv_heads=4, seed=0).to(device).train(),
                                              cfg)))
        finally:
            dist.destroy_process_group()
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses[1], losses[0]))
    lut_err = max(((luts[1][n] - c).abs().max() / c.abs().max()).item() for n, c in luts[0].items())
    tol = 2**-8
    return {"check": "fsdp", "backend": backend, "device": str(device), "hidden": hidden, "steps": steps,
            "losses_plain": losses[0], "losses_fsdp": losses[1], "max_loss_rel_err": loss_err,
            "max_lut_rel_err": lut_err, "tolerance": tol, "step_s_plain": seconds[0], "step_s_fsdp": seconds[1],
            **ckpt, "ok": loss_err <= tol and lut_err <= tol and ckpt["ckpt_state_equal"]
            and ckpt["ckpt_next_loss_rel_err"] <= tol}


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _checkpoint_round_trip(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                           ids: torch.Tensor, build) -> dict:
    """Save ``model`` / ``opt`` as a sharded checkpoint, load it into a fresh ``build()``:
    the gathered states must be equal and one more step from each give the same loss
    (within the rule: the Triton segment sums use atomics on CUDA)."""
    from edkm.train.sharded import gather_full_state, load_sharded_checkpoint, save_sharded_checkpoint

    _sync(ids.device)
    t0 = time.perf_counter()
    path = save_sharded_checkpoint(out, step, model, opt, {"step": step}, {"check": "bench.gpu_checks fsdp"})
    _sync(ids.device)
    save_s = time.perf_counter() - t0
    fresh = build()
    fresh_opt = _adamw(fresh)
    t0 = time.perf_counter()
    extra, _ = load_sharded_checkpoint(path, fresh, fresh_opt)
    _sync(ids.device)
    load_s = time.perf_counter() - t0
    a, b = gather_full_state(model), gather_full_state(fresh)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and extra == {"step": step}
    want, got = _step(model, opt, ids), _step(fresh, fresh_opt, ids)
    return {"ckpt_state_equal": equal, "ckpt_next_loss": [want, got], "ckpt_next_loss_rel_err": abs(got - want) / abs(want),
            "ckpt_save_s": save_s, "ckpt_load_s": load_s}


def offload_check(device: torch.device, size: int) -> dict:
    """Naive DKM forward+backward with and without offloading its saved tensors; returns the row."""
    import edkm

    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(size, size, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    g = torch.randn(size, size, generator=gen).to(torch.bfloat16).to(device)
    c0 = edkm.kmeans_init(w0.view(1, -1, 1), 8, iters=5)[0]  # (K, 1)

    def step(offload: bool):
        w = w0.clone().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        stats = None
        if offload:
            with edkm.offload_saved_tensors("cpu", min_bytes=4096, pin_memory=True,
                                            copy_same_device=device.type == "cpu") as stats:
                out, _ = edkm.dkm(w.view(-1, 1), c0, tau=1e-4, max_iters=3, uniquify=False)
        else:
            out, _ = edkm.dkm(w.view(-1, 1), c0, tau=1e-4, max_iters=3, uniquify=False)
        t_fwd = time.perf_counter() - t0
        out.view_as(w).backward(g)
        _sync(device)
        return w.grad, time.perf_counter() - t0, t_fwd, stats

    step(False)  # warm-up
    grad_plain, s_plain, _, _ = step(False)
    grad_off, s_off, fwd_off, stats = step(True)
    d = stats.to_dict()
    moved = d["bytes_copied"]["to_offload"] + d["bytes_copied"]["back"]
    return {"check": "offload", "device": str(device), "size": size, "seconds_plain": s_plain,
            "seconds_offload": s_off, "forward_s_offload": fwd_off, "bytes_to_host": d["bytes_copied"]["to_offload"],
            "bytes_back": d["bytes_copied"]["back"], "bytes_pinned": d["bytes_pinned"],
            "gb_per_s_moved": moved / max(s_off, 1e-9) / 1e9, "tensors_offloaded": d["tensors_offloaded"],
            "peak_bytes_held": d["peak_bytes_held"], "grads_bitwise_equal": bool(torch.equal(grad_plain, grad_off)),
            "ok": bool(torch.equal(grad_plain, grad_off)) and d["bytes_copied"]["to_offload"] > 0
            and (device.type != "cuda" or d["bytes_pinned"] > 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.split("\n")[0])
    p.add_argument("check", choices=("fsdp", "offload"), help="which check")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--hidden", type=int, default=1024, help="fsdp: hidden size of the random LLaMA (default 1024)")
    p.add_argument("--steps", type=int, default=3, help="fsdp: training steps (default 3)")
    p.add_argument("--size", type=int, default=2048, help="offload: weight side (default 2048)")
    p.add_argument("--out", default=None, help="also write the JSON row to this file")
    args = p.parse_args(argv)
    for name in ("hidden", "steps", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % 16:
        p.error(f"--hidden must be a multiple of 16 (8 heads, 16-row LUT groups), got {args.hidden}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    row = fsdp_check(device, args.hidden, args.steps) if args.check == "fsdp" else offload_check(device, args.size)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

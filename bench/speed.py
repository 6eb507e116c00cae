"""Speed of clustering one linear weight: edkm (table) vs edkm naive vs coremltools.

What is timed, for every case, is the clustering alone, forward and backward:

    W (size x size, --dtype) -> W~ = DKM(W)  -> loss = (W~ * G).sum()  -> dL/dW

with a fixed random fp32 G, K = 2**bits centroids, --iters iterations, tau = --tau, and
the same starting centroids C0 (hard k-means of W, per LUT) in every case. One LUT per
tensor by default; ``--granularity per_grouped_channel --group-size 16`` gives one LUT per
16 output rows (the presets' setting), W viewed as (size / 16, 16 * size, 1) points. No
matmul with activations is included. The cases:

- ``edkm``: `edkm.functional.dkm(uniquify=True)`, the exact table path (backend ``auto``: the
  C kernels of `edkm.ckernels` on the CPU, Triton on CUDA).
- ``edkm_torch``: the same with ``backend="torch"`` (the torch passes, the kernels' spec).
- ``edkm_naive``: `dkm(uniquify=False)`, plain autograd over (N, K) maps.
- ``coremltools``: the ``weight_fake_quant`` (FakePalettize) module that
  ``DKMPalettizer.prepare()`` puts on an ``nn.Linear(size, size)``, called on the layer's
  own weight, which is exactly what the prepared layer's forward does before its matmul.
  Config: ``n_bits=bits``, ``granularity`` and ``group_size`` as ours (its
  ``per_grouped_channel`` groups output channels too), ``kmeans_max_iter=iters``, ``palett_tau=tau``,
  ``milestone=0`` (fake palettization on from the start), ``weight_threshold=0``, and,
  so that its math is the same DKM as ours, ``palett_epsilon=0`` (its default 1e-4 can
  stop after fewer iterations) and ``prune_threshold=0`` (its default shifts the distance
  to centroid 0). With groups it keeps its default ``palett_batch_mode=False`` (one DKM
  per group, a Python loop); ``--coreml-batch`` runs its batched mode instead (all
  equal-sized groups in one DKM; not faster at 512 x 512 under load, and it differs
  from the loop in the last bf16 bits). Its k-means initialisation (tens of seconds, once)
  is bypassed: its LUTs are set to C0 before every call, as a warm start. It keeps its LUT in the weight
  dtype and runs the iterations in that dtype (bf16 math for bf16 weights); we run fp32
  math. Its memory options (``palett_max_mem``, ``palett_unique``) need CUDA and an
  initialised process group in coremltools 9.0, so the defaults (off) are used.

All cases run in one process, warmed up, then timed round-robin (`bench.harness`), so
load from other processes hits them alike. speedup_vs_X = t_X / t_case, of the medians
and (``_min``) of the minima, the samples least disturbed by other load; > 1 means the
case is faster than X. ``max_abs_diff_rel`` is max |W~_case - W~_ref| / max |W| after
one forward from the same C0, ref being the first case run (``edkm`` by default). ``peak_mb`` is the peak
memory growth of one call, each
case measured alone in a fresh interpreter (`bench.harness.peak_memory`).

CPU runs use one intra-op thread unless --threads says otherwise (the measurement behind
that is at `CPU_THREADS`).

Limits: one tensor, d = 1. On a shared CPU absolute seconds swing with the load
(the rows record load1 and threads); compare the ratios of one run.

Usage:
    python -m bench.speed                       # 2048 x 2048, 3 bits, bf16, one LUT
    python -m bench.speed --granularity per_grouped_channel --group-size 16
    python bench/speed.py --dtype fp32 --out bench/results/speed.jsonl
    python -m bench.speed --quick               # small shape for CI
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as `python bench/speed.py`
    # the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
    sys.path[:] = [str(Path(__file__).resolve().parents[1]),
                   *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

from bench.harness import (
    Case,
    coreml_dkm_palettizer,
    env_info,
    format_table,
    peak_memory,
    run_interleaved,
    run_isolated,
    write_rows,
)
from edkm.config import GRANULARITIES
from edkm.functional import dkm, kmeans_init

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK_SIZE = 256
# One intra-op thread on CPU by default. On the shared 2-core dev box (load1 ~9), 2 threads
# gave edkm samples of 1.0-13.6 s (its many small ops stall on OpenMP barriers whenever a
# worker is descheduled) against 0.32-0.43 s with 1 thread, while the naive and
# coremltools cases (few large, memory-bound ops) moved 5-12%: 2 threads made the ratios
# measure the load, not the algorithms.
CPU_THREADS = 1
CASE_NAMES = ("edkm", "edkm_torch", "edkm_naive", "coremltools")
COLUMNS = ["case", "median_s", "min_s", "n", "speedup_vs_coreml", "speedup_vs_coreml_min", "speedup_vs_naive",
           "speedup_vs_naive_min", "peak_mb", "max_abs_diff_rel", "status"]

Forward = Callable[[], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2048, help="weight is size x size (default 2048)")
    p.add_argument("--bits", type=int, default=3, help="LUT bits, K = 2**bits centroids (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations (default 3, as coremltools)")
    p.add_argument("--tau", type=float, default=1e-4, help="softmax temperature (default 1e-4, as coremltools)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="per_tensor",
                   help="one LUT per tensor (default) or per --group-size output rows, for every case")
    p.add_argument("--group-size", type=int, default=16,
                   help="output rows per LUT with per_grouped_channel (default 16, as the presets)")
    p.add_argument("--coreml-batch", action=argparse.BooleanOptionalAction, default=False,
                   help="coremltools' palett_batch_mode with groups (default off, its default; see the module header)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; one sample per case per round (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of W and G (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default: {CPU_THREADS} on CPU, see the module header; untouched on GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=list(CASE_NAMES), help="cases to run (default all)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory of one call per case, each in a fresh process (default on)")
    p.add_argument("--memory-case", choices=CASE_NAMES, default=None,
                   help="internal: only measure this case's peak memory here and print it as one JSON line")
    p.add_argument("--quick", action="store_true", help=f"CI smoke run: size {QUICK_SIZE}, 1 repeat")
    p.add_argument("--out", default=None, help="append one JSON line per case to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats = QUICK_SIZE, 1
    bad = {"size": args.size < 2, "bits": args.bits < 1, "iters": args.iters < 1, "repeats": args.repeats < 1,
           "warmup": args.warmup < 0, "tau": not args.tau > 0, "threads": args.threads is not None and args.threads < 1,
           "group_size": args.group_size < 1}
    for name, is_bad in bad.items():
        if is_bad:
            p.error(f"--{name} out of range: {getattr(args, name)!r}")
    if args.granularity == "per_grouped_channel" and args.size % args.group_size:
        p.error(f"--group-size {args.group_size} does not divide the weight's {args.size} rows")
    if args.size * args.size // groups(args) < 2**args.bits:
        p.error(f"size {args.size} with {groups(args)} LUT group(s) gives {args.size**2 // groups(args)} weights per "
                f"LUT, fewer than 2**bits = {2**args.bits} centroids")
    return args


def groups(args: argparse.Namespace) -> int:
    """LUT groups G of the (size, size) weight: 1, or size / group_size."""
    return args.size // args.group_size if args.granularity == "per_grouped_channel" else 1


def edkm_case(name: str, w: torch.Tensor, g: torch.Tensor, c0: torch.Tensor, uniquify: bool,
              args: argparse.Namespace, backend: str = "auto") -> tuple[Case, Forward]:
    """Case for `edkm.functional.dkm` on the leaf weight ``w`` (size, size); ``c0`` is (G, K, 1)."""
    G = c0.shape[0]

    def forward() -> torch.Tensor:
        out, _ = dkm(w.view(G, -1, 1), c0, tau=args.tau, max_iters=args.iters, uniquify=uniquify,
                     backend=backend)  # (G, N / G, 1)
        return out.view_as(w)

    def step() -> None:
        torch.autograd.grad((forward() * g).sum(), w)

    return Case(name, step, info={"uniquify": uniquify}), forward


def coreml_case(w: torch.Tensor, g: torch.Tensor, c0: torch.Tensor, args: argparse.Namespace) -> tuple[Case, Forward | None]:
    """Case for coremltools' FakePalettize on a prepared ``nn.Linear``; skipped with the reason if unusable.

    ``c0`` is (G, K, 1): one warm-start LUT per coremltools partition (group_size rows each).
    """
    try:
        DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig = coreml_dkm_palettizer()
    except Exception as e:  # ImportError, or a coremltools that breaks on this torch
        return Case("coremltools", skip=f"coremltools unusable ({type(e).__name__}: {e})"), None
    try:
        grouped = args.granularity == "per_grouped_channel"
        module_cfg = ModuleDKMPalettizerConfig(
            n_bits=args.bits, granularity=args.granularity, group_size=args.group_size if grouped else None,
            kmeans_max_iter=args.iters, palett_tau=args.tau, weight_threshold=0, milestone=0, palett_epsilon=0.0,
            prune_threshold=0.0, palett_batch_mode=grouped and args.coreml_batch,
        )
        linear = torch.nn.Linear(args.size, args.size, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        model = torch.nn.Sequential(linear).to(device=w.device, dtype=w.dtype)
        model = DKMPalettizer(model, DKMPalettizerConfig(global_config=module_cfg)).prepare(inplace=True)
        weight, fq = model[0].weight, model[0].weight_fake_quant
        if int(fq.fake_palett_enabled[0]) != 1:
            raise RuntimeError("fake palettization is not enabled after prepare() with milestone=0")
        fq.create_partitions(weight.detach())
        if len(fq.partitions) != c0.shape[0]:
            raise RuntimeError(f"coremltools made {len(fq.partitions)} partitions, we cluster {c0.shape[0]} groups")
        luts = list(c0.to(w.dtype))  # G x (K, 1); coremltools keeps its LUTs in the weight dtype
    except Exception as e:
        return Case("coremltools", skip=f"coremltools setup failed ({type(e).__name__}: {e})"), None

    def forward() -> torch.Tensor:
        fq.centroids = [lut.clone() for lut in luts]  # same warm start every call; skips its k-means init
        return fq(weight)

    def step() -> None:
        torch.autograd.grad((forward() * g).sum(), weight)

    config = (f"{args.granularity}" + (f", group_size={args.group_size}, palett_batch_mode={module_cfg.palett_batch_mode}"
                                       if grouped else "") + ", palett_epsilon=0, prune_threshold=0")
    return Case("coremltools", step, info={"coremltools_config": config}), forward


def make_problem(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf weight W (size, size), upstream gradient G (fp32) and starting centroids C0 (G, K, 1)."""
    gen = torch.Generator().manual_seed(args.seed)
    w = torch.randn(args.size, args.size, generator=gen) * 0.02  # LLaMA-like init scale
    w = w.to(device=device, dtype=DTYPES[args.dtype]).requires_grad_(True)
    g = torch.randn(args.size, args.size, generator=gen).to(device)
    c0 = kmeans_init(w.detach().view(groups(args), -1, 1), 2**args.bits, iters=30, seed=args.seed).float()
    return w, g, c0


def build_case(name: str, w: torch.Tensor, g: torch.Tensor, c0: torch.Tensor,
               args: argparse.Namespace) -> tuple[Case, Forward | None]:
    if name == "coremltools":
        return coreml_case(w, g, c0, args)
    return edkm_case(name, w, g, c0, name != "edkm_naive", args, backend="torch" if name == "edkm_torch" else "auto")


def measure_memory(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory of one call of case ``name``, measured alone in a fresh interpreter."""
    argv = ["-m", "bench.speed", "--memory-case", name, "--size", str(args.size), "--bits", str(args.bits),
            "--dtype", args.dtype, "--iters", str(args.iters), "--tau", repr(args.tau), "--seed", str(args.seed),
            "--granularity", args.granularity, "--group-size", str(args.group_size),
            "--coreml-batch" if args.coreml_batch else "--no-coreml-batch", "--device", str(device)]
    argv += ["--threads", str(args.threads)] if args.threads is not None else []
    res = run_isolated(argv)
    if "error" in res:
        return {"peak_bytes": None, "memory_method": f"failed: {res['error']}"}
    return {"peak_bytes": res["peak_bytes"], "memory_method": f"{res['memory_method']}, isolated process"}


def memory_child(args: argparse.Namespace, device: torch.device) -> int:
    """``--memory-case``: print the case's `peak_memory` as one JSON line (first call, nothing cached)."""
    w, g, c0 = make_problem(args, device)
    case, _ = build_case(args.memory_case, w, g, c0, args)
    if case.skip is not None:
        print(case.skip, file=sys.stderr)
        return 1
    print(json.dumps(peak_memory(case.fn, device)))
    return 0


def ratio(base: float | None, x: float | None) -> float | None:
    return base / x if base and x else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is None and device.type == "cpu":
        args.threads = CPU_THREADS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        return memory_child(args, device)
    w, g, c0 = make_problem(args, device)
    built = [build_case(name, w, g, c0, args) for name in args.cases]
    cases = [c for c, _ in built]

    ref, ref_name = None, None
    for case, forward in built:  # numerics first: one forward each from the same C0; reference = first case
        if forward is None or case.skip is not None:
            continue
        try:
            with torch.no_grad():
                out = forward().float()
        except Exception as e:  # a broken baseline is reported, not fatal
            case.skip = f"forward failed ({type(e).__name__}: {e})"
            continue
        if ref is None:
            ref, ref_name = out, case.name
        case.info["max_abs_diff_rel"] = ((out - ref).abs().max() / w.detach().float().abs().max()).item()
        case.info["diff_reference"] = ref_name
        del out

    run_interleaved(cases, device, warmup=args.warmup, repeats=args.repeats)
    if args.memory:
        for c in cases:
            if c.skip is None:
                c.info.update(measure_memory(c.name, args, device))

    env = env_info(device)
    stats = {c.name: c.stats() for c in cases}
    rows = []
    for c in cases:
        st = stats[c.name]
        row = {"bench": "speed", "case": c.name, **st, "status": f"skipped: {c.skip}" if c.skip else "ok",
               "size": args.size, "n_weights": args.size**2, "bits": args.bits, "k": 2**args.bits,
               "dtype": args.dtype, "iters": args.iters, "tau": args.tau, "repeats": args.repeats,
               "granularity": args.granularity, "groups": groups(args),
               "group_size": args.group_size if args.granularity == "per_grouped_channel" else None,
               "warmup": args.warmup, "peak_bytes": None, "memory_method": None, "max_abs_diff_rel": None}
        row.update(c.info, times_s=c.times_s)
        for base, col in (("coremltools", "speedup_vs_coreml"), ("edkm_naive", "speedup_vs_naive")):
            b = stats.get(base, {})
            row[col] = ratio(b.get("median_s"), st["median_s"])
            row[col + "_min"] = ratio(b.get("min_s"), st["min_s"])
        row["peak_mb"] = row["peak_bytes"] / 2**20 if row["peak_bytes"] is not None else None
        rows.append({**row, **env})

    lut = "one LUT" if groups(args) == 1 else f"{groups(args)} LUTs of {args.group_size} rows"
    print(f"DKM forward+backward of one {args.size}x{args.size} {args.dtype} weight, {lut}, {args.bits} bits "
          f"(K={2**args.bits}), {args.iters} iters, tau={args.tau:g}; {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up; speedup = t_baseline / t_case (median, and min)")
    print(f"device: {env['device_name']} ({env['threads']} threads, load1 {env['load1']}); torch {env['torch']}, "
          f"coremltools {env['coremltools']}, commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}")
    print(format_table(rows, COLUMNS))
    if args.out:
        write_rows(args.out, rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

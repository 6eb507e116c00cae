"""GPU speed of the Triton DKM kernels: whole forward+backward, and every kernel alone.

For each weight shape (default LLaMA-7B's 4096x4096 and 4096x11008) and bits (3, 4), one
LUT per tensor, bf16 weights, tau 1e-4, 3 iterations, the cases are:

- ``dkm_triton`` / ``dkm_torch`` / ``dkm_naive``: `edkm.functional.dkm` forward +
  backward (``backend="triton"``, the torch table path, and ``uniquify=False``; naive is
  skipped with the reason when it runs out of memory).
- one case per kernel, ``triton_x`` next to its torch twin ``torch_x``, on the same inputs.

Bytes model (what a pass must move per weight; table lookups hit L1/L2 and are not
counted): build (histogram) reads the 2 B pattern; gather reads 2 B, writes 2 B; segment sum reads
2 B pattern + 2 B gradient; element grad reads 2 B + 2 B, writes 2 B; assign_pack reads
2 B, writes bits/8 B. A whole forward+backward is then at least 2 + 4 + 4 + 6 = 16 B per
weight. ``gbps`` = bytes / median time; ``pct_copy`` compares it with the bandwidth of a
1 GiB device-to-device copy measured in the same run (read + write), the practical peak.
Table kernels (iterate, rows, bwd) move O(U) bytes; only their time is reported.

Without CUDA it prints that the GPU numbers are owed and exits 0. Under TRITON_INTERPRET=1
with ``--device cpu`` it runs tiny shapes in the interpreter, to check the script only.

Usage:
    python -m bench.kernels --out bench/results/kernels.jsonl
    python -m bench.kernels --shapes 4096x4096 --bits 4 --no-naive
    TRITON_INTERPRET=1 python -m bench.kernels --device cpu --shapes 64x96 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/kernels.py`
    # the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
    sys.path[:] = [str(Path(__file__).resolve().parents[1]),
                   *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

from bench.harness import Case, env_info, format_table, peak_memory, run_interleaved, time_call, write_rows
from edkm.functional import dkm, kmeans_init

COLUMNS = ["shape", "bits", "case", "median_s", "min_s", "bytes_per_weight", "gbps", "pct_copy", "speedup_vs_torch",
           "speedup_vs_naive", "peak_mb", "status"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TAU, ITERS = 1e-4, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"],
                   help="weights as OUTxIN (default LLaMA-7B's)")
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4], help="LUT bits (default 3 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first (default 1)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="include naive (N, K) DKM where it fits (default on)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="time every kernel and its twin alone (default on)")
    p.add_argument("--device", default=None, help="torch device (default cuda; cpu only under TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None, help="append one JSON line per case to this file")
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        p.error(f"--shapes must look like 4096x11008, got {args.shapes}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes) or any(not 1 <= b <= 8 for b in args.bits):
        p.error(f"bad --shapes {args.shapes} or --bits {args.bits}")
    return args


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), the practical peak."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_call(lambda: dst.copy_(src), device)


def dkm_cases(w: torch.Tensor, g: torch.Tensor, c0: torch.Tensor, naive: bool) -> list[Case]:
    """Whole forward + backward of one weight per way of running DKM."""

    def step(**kw):
        def fn() -> None:
            out, _ = dkm(w.view(-1, 1), c0, tau=TAU, max_iters=ITERS, **kw)
            torch.autograd.grad(out, w, g.view(-1, 1))

        return fn

    cases = [Case("dkm_triton", step(backend="triton")), Case("dkm_torch", step(backend="torch"))]
    cases.append(Case("dkm_naive", step(uniquify=False)) if naive else Case("dkm_naive", skip="--no-naive"))
    for c in cases:
        c.info["bytes_per_weight"] = 16.0
    return cases


def kernel_cases(w: torch.Tensor, g: torch.Tensor, c0: torch.Tensor, bits: int) -> list[Case]:
    """Every table pass through the Triton kernels and through torch (`edkm.functional.table`),
    on the same inputs (w, g as (1, N, 1)), with the signatures the autograd Function calls."""
    from edkm.functional import assign_codes, triton_ops
    from edkm.functional.autograd import TORCH_OPS

    x, gx = w.detach().view(1, -1, 1), g.view(1, -1, 1)
    tri = triton_ops()
    table = tri.build(x)
    v, n, index = table.values, table.counts, tri.index(table)
    c = c0.view(1, -1, 1)
    c_hist, den_hist = tri.table_iterate(v, n, c, TAU, ITERS)
    rows = tri.table_rows(v, c_hist[:, -2], c_hist[:, -1], TAU)
    seg = tri.segment_sum(x, gx, index, v.shape[1])
    jac, shared = tri.table_bwd(v, n, seg, c_hist, den_hist, TAU)
    calls = {
        "build": ((x,), 2.0),
        "gather_rows": ((x, index, rows), 4.0),
        "segment_sum": ((x, gx, index, v.shape[1]), 4.0),
        "element_grad": ((x, gx, index, jac, shared), 6.0),
        "table_iterate": ((v, n, c, TAU, ITERS), None),
        "table_rows": ((v, c_hist[:, -2], c_hist[:, -1], TAU), None),
        "table_bwd": ((v, n, seg, c_hist, den_hist, TAU), None),
    }
    cases = []
    for name, (call_args, nbytes) in calls.items():
        for impl, ops in (("triton", tri), ("torch", TORCH_OPS)):
            fn = getattr(ops, name)
            cases.append(Case(f"{impl}_{name}", lambda fn=fn, a=call_args: fn(*a),
                              info={"bytes_per_weight": nbytes, "table_rows": v.shape[1]}))
    for impl in ("triton", "torch"):
        cases.append(Case(f"{impl}_assign_pack", lambda impl=impl: assign_codes(x, c, bits, backend=impl),
                          info={"bytes_per_weight": 2.0 + bits / 8, "table_rows": v.shape[1]}))
    return cases


def run_shape(shape: tuple[int, int], bits: int, args: argparse.Namespace, device: torch.device,
              copy_bps: float) -> list[dict]:
    """Time all cases for one weight shape and bit width; one row per case."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=DTYPES[args.dtype]).requires_grad_(True)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=w.dtype)
    c0 = kmeans_init(w.detach().view(1, -1, 1), 2**bits, iters=10)[0].float()
    cases = dkm_cases(w, g, c0, args.naive) + (kernel_cases(w, g, c0, bits) if args.kernels else [])
    run_interleaved(cases, device, warmup=args.warmup, repeats=args.repeats)
    for c in cases:
        if c.name.startswith("dkm_") and c.skip is None:
            try:
                c.info.update(peak_memory(c.fn, device))
            except torch.cuda.OutOfMemoryError as e:  # timed fine, but no room left to measure
                c.info["memory_method"] = f"failed: {type(e).__name__}"
        if device.type == "cuda":
            torch.cuda.empty_cache()  # an OOM'd naive case must not crowd the next shape
    stats = {c.name: c.stats() for c in cases}
    n_weights = shape[0] * shape[1]
    rows = []
    for c in cases:
        st = stats[c.name]
        row = {"bench": "kernels", "case": c.name, "shape": f"{shape[0]}x{shape[1]}", "bits": bits, "dtype": args.dtype,
               "n_weights": n_weights, "iters": ITERS, "tau": TAU, **st, **c.info, "times_s": c.times_s,
               "status": f"skipped: {c.skip}" if c.skip else "ok"}
        t, nbytes = st["median_s"], c.info.get("bytes_per_weight")
        row["gbps"] = nbytes * n_weights / t / 1e9 if t and nbytes else None
        row["pct_copy"] = 100 * row["gbps"] * 1e9 / copy_bps if row["gbps"] else None
        row["copy_gbps"] = copy_bps / 1e9
        if c.name.startswith("dkm_") and t:
            for base, col in (("dkm_torch", "speedup_vs_torch"), ("dkm_naive", "speedup_vs_naive")):
                b = stats[base]["median_s"]
                row[col] = b / t if b else None
        if c.name.startswith("triton_") and t:
            b = stats.get("torch_" + c.name[len("triton_"):], {}).get("median_s")
            row["speedup_vs_torch"] = b / t if b else None
        if row.get("peak_bytes") is not None:
            row["peak_mb"] = row["peak_bytes"] / 2**20
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or "cuda")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda" and not torch.cuda.is_available() or device.type == "cpu" and not interpret:
        print("bench/kernels.py: no CUDA device here, so the GPU numbers are owed: run `python -m bench.kernels` on a "
              "GPU (TRITON_INTERPRET=1 ... --device cpu only checks the script on tiny shapes).")
        return 0
    copy_bps = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 24)
    env = env_info(device)
    rows = []
    for shape in args.shapes:
        for bits in args.bits:
            rows += [{**r, **env} for r in run_shape(shape, bits, args, device, copy_bps)]
    print(f"DKM kernels, {args.dtype} weights, per-tensor LUT, {ITERS} iterations, tau {TAU:g}; {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up; copy bandwidth {copy_bps / 1e9:.0f} GB/s")
    print(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}"
          f"{' (dirty)' if env['git_dirty'] else ''}")
    print(format_table(rows, COLUMNS))
    if args.out:
        write_rows(args.out, rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

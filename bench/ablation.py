"""eDKM memory ablation: bytes held for backward by DKM, technique by technique.

Workload: one LLaMA-7B attention block -- q, k, v, o, each a 4096 x 4096 bf16 weight --
clustered to 3 bits (K = 8, tau = 1e-4, 3 iterations), forward of all four then one
backward of the four soft weights with fixed random upstream gradients G_l. ``--small`` scales every
matrix down to 1024 x 1024 (16x fewer weights) so the naive row fits a CPU run, and says
so in its output. One LUT per matrix by default; ``--granularity per_grouped_channel
--group-size 16`` gives one LUT per 16 output rows in every row of the table (coremltools
configured the same way: its ``per_grouped_channel`` with that ``group_size``).

Rows:
    naive               plain autograd DKM, (N, K) maps saved per iteration
    +orchestration      naive under `edkm.offload_saved_tensors` (saved tensors -> CPU)
    +uniquification     the exact table path (`uniquify=True`)
    +rebuild            the table path holding only the centroid history; backward
                        rebuilds the table from the weight (`rebuild=True`)
    +sharding           naive with the work and saved maps split over R ranks
    all                 uniquify + orchestration + sharding
    coremltools         DKMPalettizer on the same weights (CPU: plain DKM; its eDKM
                        options need CUDA), where it runs

Columns: ``device_bytes`` / ``host_bytes``: bytes of distinct storages that autograd
holds for backward at the end of the forward, on the compute device / on the host
(counted by the orchestration tracker; the weights themselves, resident anyway, are not
counted); ``peak_bytes``: peak memory growth over one forward+backward (CUDA
max_memory_allocated; CPU: VmHWM, see bench/harness.py); ``seconds`` per
forward+backward; ``reduction`` = naive device_bytes / row device_bytes;
``weight_fraction`` = (device + host) bytes held / the four weights' own bytes. With ranks, a
row shows rank 0's numbers (every rank holds the same share). On a CPU-only machine the
"device" is the CPU and orchestration copies into a separate CPU pool, so the two
columns still separate what the technique moved.

    python -m bench.ablation --small [--ranks 2] [--out results.jsonl]
    python -m bench.ablation --small --granularity per_grouped_channel --group-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
sys.path[:] = [str(Path(__file__).resolve().parents[1]),
               *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

from bench.harness import env_info, format_table, peak_memory, run_isolated, write_rows  # noqa: E402
from edkm.config import GRANULARITIES  # noqa: E402

ROWS = {
    "naive": dict(uniquify=False, offload=False, shard=False),
    "+orchestration": dict(uniquify=False, offload=True, shard=False),
    "+uniquification": dict(uniquify=True, offload=False, shard=False),
    "+rebuild": dict(uniquify=True, offload=False, shard=False, rebuild=True),
    "+sharding": dict(uniquify=False, offload=False, shard=True),
    "all": dict(uniquify=True, offload=True, shard=True),
}
BITS, TAU, ITERS = 3, 1e-4, 3
WARMUP_ROWS = 64  # rows of each matrix in the untimed warm-up step (rounded to whole LUT groups)


def lut_groups(size: int, group_size: int | None) -> int:
    """LUT groups of one (size, size) matrix: 1 per tensor (``group_size`` None), else size / group_size."""
    if group_size is None:
        return 1
    if group_size < 1 or size % group_size:
        raise ValueError(f"group_size {group_size!r} must be >= 1 and divide the matrix side {size}")
    return size // group_size


def _weights(size: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    ws, gs = [], []
    for _ in range(4):  # q, k, v, o
        ws.append(torch.nn.Parameter((torch.randn(size, size, generator=gen) * 0.02).to(torch.bfloat16).to(device)))
        gs.append(torch.randn(size, size, generator=gen).to(torch.bfloat16).to(device))
    return ws, gs


def _step(ws, gs, c0s, technique: dict, stats_out: dict | None) -> None:
    """Forward of every weight (as c0's G groups of points), then one backward with ``gs``."""
    from edkm import dkm, offload_saved_tensors

    device = ws[0].device
    copy = technique["offload"]
    ctx = offload_saved_tensors(device="cpu", min_bytes=1 << 20 if copy else 1 << 62,
                                copy_same_device=copy and device.type == "cpu")
    outs = []
    with ctx as stats:
        for w, c0 in zip(ws, c0s):
            out, _ = dkm(w.view(c0.shape[0], -1, 1), c0, tau=TAU, max_iters=ITERS, uniquify=technique["uniquify"],
                         shard=technique["shard"], backend="torch",
                         rebuild=technique.get("rebuild", False))  # (G, N / G, 1)
            outs.append(out.view_as(w))
    if stats_out is not None:
        snap = stats.to_dict()
        host = snap["bytes_copied"]["to_offload"]
        held = snap["bytes_held"].get(str(device) if device.type != "cuda" else f"cuda:{device.index or 0}", 0)
        stats_out.update(device_bytes=held - (host if device.type == "cpu" else 0), host_bytes=host,
                         offload_summary=snap)
    torch.autograd.backward(outs, gs)  # no loss graph: only DKM saves tensors


def measure(technique: dict, size: int, device: torch.device, repeats: int, group_size: int | None = None) -> dict:
    """One row in this process (or this rank): bytes held for backward, peak, seconds."""
    from edkm import kmeans_init

    G = lut_groups(size, group_size)
    ws, gs = _weights(size, device)
    c0s = [kmeans_init(w.detach().view(G, -1, 1), 2**BITS) for w in ws]  # (G, K, 1)
    g_small = max(1, G * WARMUP_ROWS // size)  # whole groups of rows for the warm-up
    rows = g_small * (size // G)
    small = [w.detach()[:rows].clone().requires_grad_(True) for w in ws]  # warm-up: lazy init, kernels
    _step(small, [g[:rows] for g in gs], [c[:g_small] for c in c0s], technique, None)
    row: dict = {}
    row.update(peak_memory(lambda: _step(ws, gs, c0s, technique, row), device))
    times = []
    for _ in range(repeats):
        for w in ws:
            w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _step(ws, gs, c0s, technique, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    row["seconds"] = sorted(times)[len(times) // 2]
    row.pop("offload_summary", None)
    return row


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, technique: dict, size: int, repeats: int,
               group_size: int | None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        row = measure(technique, size, torch.device("cpu"), repeats, group_size)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def run_case(name: str, size: int, ranks: int, repeats: int, group_size: int | None = None) -> dict:
    """Measure one row (called in a fresh interpreter by `main`); ``group_size`` None = one LUT per matrix."""
    if name == "coremltools":
        return _coremltools_row(size, repeats, group_size)
    technique = ROWS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not technique["shard"]:
        return measure(technique, size, device, repeats, group_size)
    if device.type == "cuda":
        return {"error": "sharding rows run gloo ranks on CPU; launch under torchrun for NCCL (not wired yet)"}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(ranks, os.path.join(tmp, "init"), tmp, technique, size, repeats, group_size),
                 nprocs=ranks, join=True)
        rows = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]
    row = rows[0]
    row["device_bytes_max_rank"] = max(r["device_bytes"] for r in rows)
    return row


def _coremltools_row(size: int, repeats: int, group_size: int | None = None) -> dict:
    """coremltools' DKMPalettizer on the same four weights, counted by the same tracker."""
    from bench.speed import coreml_case
    from edkm import kmeans_init, offload_saved_tensors

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G = lut_groups(size, group_size)
    args = argparse.Namespace(bits=BITS, iters=ITERS, tau=TAU, size=size, coreml_batch=False,
                              granularity="per_tensor" if group_size is None else "per_grouped_channel",
                              group_size=group_size or 16)
    ws, gs = _weights(size, device)
    forwards = []
    for w in ws:
        c0 = kmeans_init(w.detach().view(G, -1, 1), 2**BITS).float()  # (G, K, 1)
        case, forward = coreml_case(w.detach(), gs[0], c0, args)
        if forward is None:
            return {"error": case.skip}
        forwards.append(forward)
    row: dict = {}

    def step(record: bool) -> None:
        with offload_saved_tensors(min_bytes=1 << 62) as stats:  # count only, move nothing
            outs = [f() for f in forwards]
        if record:
            row.update(device_bytes=stats.to_dict()["bytes_held"].get(str(device) if device.type == "cpu"
                                                                      else f"cuda:{device.index or 0}", 0),
                       host_bytes=0)
        torch.autograd.backward(outs, gs)

    row.update(peak_memory(lambda: step(True), device))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(False)
        times.append(time.perf_counter() - t0)
    row["seconds"] = sorted(times)[len(times) // 2]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU-sized matrices (1024x1024 instead of 4096x4096).")
    p.add_argument("--size", type=int, help="Override the matrix side (default 4096, or 1024 with --small).")
    p.add_argument("--ranks", type=int, default=2, help="Data-parallel ranks for the sharding rows (gloo on CPU).")
    p.add_argument("--repeats", type=int, default=3, help="Timed forward+backward repeats per row (median).")
    p.add_argument("--rows", default=",".join([*ROWS, "coremltools"]), help="Comma-separated rows to run.")
    p.add_argument("--granularity", choices=GRANULARITIES, default="per_tensor",
                   help="One LUT per matrix (default) or one per --group-size output rows, in every row.")
    p.add_argument("--group-size", type=int, default=16, help="Output rows per LUT with per_grouped_channel (default 16).")
    p.add_argument("--out", help="Write the rows as JSON (a list) to this file.")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args(argv)
    size = args.size or (1024 if args.small else 4096)
    group_size = args.group_size if args.granularity == "per_grouped_channel" else None
    try:
        G = lut_groups(size, group_size)
    except ValueError as e:
        p.error(f"--group-size: {e}")
    if args.case:
        print(json.dumps(run_case(args.case, size, args.ranks, args.repeats, group_size)))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scaled = size != 4096
    lut = "one LUT each" if G == 1 else f"{G} LUTs of {group_size} rows each"
    print(f"eDKM ablation: 4 x {size}x{size} bf16 weights, {lut}, {BITS}-bit, tau {TAU}, {ITERS} iterations, "
          f"{args.ranks} ranks, on {device.type}" + (" (SCALED DOWN from 4096x4096)" if scaled else ""), flush=True)
    rows = []
    for name in args.rows.split(","):
        if name not in ROWS and name != "coremltools":
            p.error(f"unknown row {name!r}; choose from {list(ROWS) + ['coremltools']}")
        res = run_isolated(["-m", "bench.ablation", "--case", name, "--size", str(size), "--ranks", str(args.ranks),
                            "--repeats", str(args.repeats), "--granularity", args.granularity,
                            "--group-size", str(args.group_size)], timeout_s=3600)
        res["technique"] = name
        rows.append(res)
        print(f"  {name}: {res.get('error') or 'done'}", flush=True)
    base = next((r.get("device_bytes") for r in rows if r["technique"] == "naive"), None)
    for r in rows:
        db = r.get("device_bytes")
        r["reduction"] = (base / db) if base and db else (float("inf") if base and db == 0 else None)
        r["device_mib"] = None if db is None else db / 2**20
        r["host_mib"] = None if r.get("host_bytes") is None else r["host_bytes"] / 2**20
        r["peak_mib"] = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
        held = None if db is None else db + (r.get("host_bytes") or 0)
        r["weight_fraction"] = None if held is None else held / (4 * size * size * 2)  # four bf16 weights
    print(format_table(rows, ["technique", "device_mib", "host_mib", "peak_mib", "seconds", "reduction",
                              "weight_fraction", "error"]))
    if args.out:
        env = env_info(device)
        meta = {"shapes": [[size, size]] * 4, "bits": BITS, "ranks": args.ranks, "scaled_down": scaled,
                "granularity": args.granularity, "group_size": group_size, "lut_groups": G, **env}
        payload = [{**{k: r.get(k) for k in ("technique", "device_bytes", "host_bytes", "peak_bytes", "seconds",
                                             "reduction", "weight_fraction", "error")}, **meta} for r in rows]
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
        write_rows(Path(args.out).with_suffix(".jsonl"), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

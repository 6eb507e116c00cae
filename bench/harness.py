"""Shared benchmark harness: interleaved timing, peak memory, tables, tagged JSON rows.

Every benchmark script (speed, memory ablation, accuracy, kernels) builds a list of
`Case`s and hands them to `run_interleaved`, which times them round-robin in one process
so that background load hits every case alike; ratios between cases of one run are the
result, absolute seconds only context.

Timing per sample:
- CUDA: `triton.testing.do_bench` (its own warm-up, L2 flush, CUDA events; the sample is
  its median over ``rep_ms``), or CUDA events with synchronisation when Triton is missing
  or the caller asks for one call per sample (``single=True``: a call with side effects
  such as a whole training step, which do_bench would repeat a data-dependent number of
  times).
- CPU: `time.perf_counter` around one call (CPU ops are synchronous).

Peak memory (`peak_memory`, growth over what the process held before the call):
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
- CPU (Linux): the kernel's resident high-water mark VmHWM, reset by writing 5 to
  /proc/self/clear_refs after `malloc_trim(0)`; exact, no sampling (None elsewhere: an
  RSS poller would miss short spikes). In-process this is a lower bound, as heap freed
  earlier and still mapped is reused without growing RSS; `run_isolated` runs a
  measurement in a fresh interpreter (one case alone, nothing cached) to compare cases.

Rows written by `write_rows` are JSON lines tagged by `env_info`: device, versions of
torch / triton / coremltools / transformers, git commit (and whether the tree was dirty), host, date,
thread count and the 1-minute load average.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One benchmarked callable.

    Attributes:
        name: Row label.
        fn: Zero-argument callable doing the measured work; None when skipped.
        skip: Why the case did not run (set by the caller, or when ``fn`` raised); None if it ran.
        info: Extra columns copied into the case's row.
        times_s: Seconds per sample, filled by `run_interleaved`.
    """

    name: str
    fn: Callable[[], object] | None = None
    skip: str | None = None
    info: dict = field(default_factory=dict)
    times_s: list[float] = field(default_factory=list)

    def stats(self) -> dict:
        """``median_s``, ``min_s`` and ``n`` of the samples (None values when skipped)."""
        if self.skip is not None or not self.times_s:
            return {"median_s": None, "min_s": None, "n": 0}
        return {"median_s": statistics.median(self.times_s), "min_s": min(self.times_s), "n": len(self.times_s)}


def time_call(fn: Callable[[], object], device: torch.device, rep_ms: int = 50, single: bool = False) -> float:
    """Seconds for one sample of ``fn`` on ``device`` (see the module header for how).

    Args:
        fn: The measured work.
        device: Where it runs (picks the timer).
        rep_ms: do_bench's measuring time per sample on CUDA.
        single: Exactly one call per sample (CUDA events around it) instead of do_bench.
    """
    if device.type == "cuda":
        do_bench = None
        if not single:
            try:
                from triton.testing import do_bench
            except ImportError:
                pass
        if do_bench is not None:
            return do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median") / 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_interleaved(cases: Sequence[Case], device: torch.device, *, warmup: int = 1, repeats: int = 5,
                    single: bool = False) -> None:
    """Warm every case up, then time them round-robin, rotating the order each round.

    A case whose ``fn`` raises (in warm-up or later) is marked skipped with the error as
    the reason; the others go on.

    Args:
        cases: Cases to time; their ``times_s`` are filled in place.
        device: Where the work runs (picks the timer).
        warmup: Untimed calls per case before the first round.
        repeats: Timed rounds; every case gets one sample per round.
        single: One call per sample on CUDA (see `time_call`).
    """
    live = [c for c in cases if c.skip is None and c.fn is not None]
    for c in live:
        try:
            for _ in range(warmup):
                c.fn()
        except Exception as e:  # a failing baseline must not take the others down
            c.skip = f"failed in warm-up: {type(e).__name__}: {e}"
    for r in range(repeats):
        live = [c for c in live if c.skip is None]
        k = r % max(1, len(live))
        for c in live[k:] + live[:k]:
            try:
                c.times_s.append(time_call(c.fn, device, single=single))
            except Exception as e:
                c.skip = f"failed while timed: {type(e).__name__}: {e}"


def _proc_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    """Return freed heap to the OS and reset VmHWM; False where that is not possible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_kb("VmHWM") is not None


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Run ``fn`` once; return ``{"peak_bytes": int | None, "memory_method": str}``.

    ``peak_bytes`` is the peak growth over what was held before the call (None if no
    method works). See the module header for the method on each device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "memory_method": "cuda_max_allocated"}
    if _reset_rss_peak():
        base = _proc_kb("VmRSS")
        fn()
        return {"peak_bytes": (_proc_kb("VmHWM") - base) * 1024, "memory_method": "cpu_vmhwm"}
    return {"peak_bytes": None, "memory_method": "unavailable (needs Linux /proc/self/clear_refs)"}


def run_isolated(argv: Sequence[str], timeout_s: float = 600) -> dict:
    """Run ``python *argv`` from the repo root in a fresh interpreter; parse its last stdout line as JSON.

    Returns the parsed dict, or ``{"error": reason}`` when the child failed.
    """
    try:
        out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {tail}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"last line is not JSON: {lines[-1][:200]}"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU model, or the CPU model string)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device) -> dict:
    """Tags for every row: device, versions, git commit, host, date, threads, load."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "triton": _version("triton"), "coremltools": _version("coremltools"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Aligned text table of ``columns`` from ``rows``; floats get 4 significant digits."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_rows(path: str | os.PathLike, rows: Sequence[dict], *, append: bool = True) -> None:
    """Write ``rows`` as JSON lines (one object per line) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def coreml_dkm_palettizer():
    """coremltools' ``(DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig)``, imported
    with its import-time warnings and INFO logs silenced (the peer every DKM bench compares to).
    Raises whatever the import raises (ImportError, or a coremltools that breaks on this torch)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    return DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig

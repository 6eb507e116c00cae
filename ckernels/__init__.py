"""C kernels of the DKM table passes for the CPU (imported as `edkm.ckernels`).

`table.c` holds the math (its header has it in torch form); this module compiles it once
per machine with the system C compiler, loads it with ctypes and launches it. Each
``c_x`` has a torch twin in `edkm.functional.passes` (the spec the tests hold it to):

    c_table_forward(values, mass, c0, tau, n_iters)   -> (c_hist, den_hist, rows)
    c_table_iterate(values, mass, c0, tau, n_iters)   -> (c_hist, den_hist)
    c_table_bwd(values, mass, seg, c_hist, den_hist, tau) -> (jac, shared)

Shapes (d = 1): values, mass, seg, rows, jac, shared (G, U); c0 (G, K); c_hist
(G, T+1, K); den_hist (G, T, K); fp32 CPU tensors, K <= 256. Groups are spread over
``torch.get_num_threads()`` Python threads (ctypes releases the GIL during the call).

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native``, cached under
``$EDKM_CACHE_DIR/ckernels`` (default ``~/.cache/edkm/ckernels``) keyed by the source,
the flags and the CPU; written atomically, so concurrent processes are safe. `available`
says whether it built; `build_error` says why not. Nothing here imports triton.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("table.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c99")
KMAX = 256  # table.c's KMAX
# Groups per thread task: enough work (~1 ms at SmolLM2 shapes) to amortise a ctypes call.
MIN_GROUPS_PER_TASK = 4

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_key() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.system()} {flags}"


def library_path() -> Path:
    """Where the compiled kernels are (or will be) cached for this source, compiler and CPU."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc, FLAGS, _cpu_key())).encode()).hexdigest()[:16]
    root = Path(os.environ.get("EDKM_CACHE_DIR", "~/.cache/edkm")).expanduser()
    return root / "ckernels" / f"table-{key}.so"


def _compile(dest: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH (set $CC, or install gcc / clang)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.stem, suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, dest)  # atomic: another process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        try:
            path = library_path()
            if not path.exists():
                log.info("compiling the C table kernels into %s", path)
                _compile(path)
            lib = ctypes.CDLL(str(path))
            for name, n_ptr in (("edkm_table_forward", 6), ("edkm_table_bwd", 7)):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_void_p] * n_ptr + [ctypes.c_long] * 5 + [ctypes.c_float]
                fn.restype = ctypes.c_int
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _state["error"] = str(err)
            log.warning("C table kernels unavailable (%s); the torch table passes run instead", err)
            lib = None
        _state["lib"] = lib
        return lib


def available() -> bool:
    """Whether the C kernels are built and loaded (compiles them on first call)."""
    return _library() is not None


def build_error() -> str | None:
    """Why `available` is False (None when it is True or was not asked yet)."""
    _library()
    return _state.get("error")  # type: ignore[return-value]


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the C table kernels are unavailable: {_state.get('error')}; use backend='torch' or 'auto'")
    return lib


def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name}: want a contiguous fp32 CPU tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _run(fn, ptrs: list[Tensor | None], G: int, dims: tuple[int, int, int], tau: float) -> None:
    """Call ``fn(ptrs..., g0, g1, U, K, T, tau)`` over slices of the G groups, in threads."""
    threads = max(1, min(torch.get_num_threads(), G // MIN_GROUPS_PER_TASK))
    step = -(-G // threads)
    args = [_ptr(t) for t in ptrs]

    def call(g0: int) -> int:
        return fn(*args, g0, min(g0 + step, G), *dims, ctypes.c_float(tau))

    if threads == 1:
        codes = [call(0)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(call, range(0, G, step)))
    if any(c == -1 for c in codes):
        raise MemoryError("C table kernels: could not allocate the per-group map scratch")
    if any(c != 0 for c in codes):
        raise ValueError(f"C table kernels rejected the shapes (U, K, T) = {dims} (K <= {KMAX}, T >= 1)")


def _forward(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, rows: bool
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    G, U = values.shape
    K = c0.shape[1]
    _check("values", values, (G, U))
    _check("mass", mass, (G, U))
    _check("c0", c0, (G, K))
    if not 1 <= K <= KMAX or n_iters < 1:
        raise ValueError(f"C table kernels take 1 <= K <= {KMAX} centroids and n_iters >= 1, got K={K}, n_iters={n_iters}")
    lib = _require()
    c_hist = torch.empty(G, n_iters + 1, K, dtype=torch.float32)
    den_hist = torch.empty(G, n_iters, K, dtype=torch.float32)
    out = torch.empty(G, U, dtype=torch.float32) if rows else None
    _run(lib.edkm_table_forward, [values, mass, c0, c_hist, den_hist, out], G, (U, K, n_iters), tau)
    return c_hist, den_hist, out


def c_table_forward(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n_iters`` mass-weighted soft k-means iterations on the table, then the row values.

    Args:
        values, mass: (G, U) fp32 table rows and their masses. c0: (G, K) start centroids.
        tau: Softmax temperature. n_iters: Iterations, >= 1.
    Returns:
        ``(c_hist, den_hist, rows)``: (G, T+1, K) centroids (c_hist[:, 0] = c0), (G, T, K)
        denominators, and (G, U) row values ``a(v; C_{T-1}) @ C_T``.
    """
    c_hist, den_hist, out = _forward(values, mass, c0, tau, n_iters, rows=True)
    return c_hist, den_hist, out


def c_table_iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int) -> tuple[Tensor, Tensor]:
    """`c_table_forward` without the row values: ``(c_hist, den_hist)``."""
    c_hist, den_hist, _ = _forward(values, mass, c0, tau, n_iters, rows=False)
    return c_hist, den_hist


def c_table_bwd(values: Tensor, mass: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float
                ) -> tuple[Tensor, Tensor]:
    """Backward of the table through the final map and every iteration.

    Args:
        values, mass: (G, U) fp32 table. seg: (G, U) per-row sums of the upstream gradient.
        c_hist: (G, T+1, K), den_hist: (G, T, K) from the forward. tau: temperature.
    Returns:
        ``(jac, shared)``, both (G, U) fp32: dh/dv per row (last two centroid sets fixed)
        and ``R / mass`` (R where the mass is 0), the gradient shared by a row's points.
    """
    G, U = values.shape
    T, K = den_hist.shape[1], den_hist.shape[2]
    for name, t, shape in (("values", values, (G, U)), ("mass", mass, (G, U)), ("seg", seg, (G, U)),
                           ("c_hist", c_hist, (G, T + 1, K)), ("den_hist", den_hist, (G, T, K))):
        _check(name, t, shape)
    if not 1 <= K <= KMAX or T < 1:
        raise ValueError(f"C table kernels take 1 <= K <= {KMAX} centroids and >= 1 iteration, got K={K}, T={T}")
    lib = _require()
    jac, shared = (torch.empty(G, U, dtype=torch.float32) for _ in range(2))
    _run(lib.edkm_table_bwd, [values, mass, seg, c_hist, den_hist, jac, shared], G, (U, K, T), tau)
    return jac, shared


__all__ = ["available", "build_error", "c_table_bwd", "c_table_forward", "c_table_iterate", "library_path"]

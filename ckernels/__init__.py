"""C kernels of the DKM table passes for the CPU (imported as `edkm.ckernels`).

`table.c` holds the math (its header has it in torch form); this module compiles it once
per machine with the system C compiler, loads it with ctypes and launches it. Each
``c_x`` has a torch twin in `edkm.functional.passes` (the spec the tests hold it to):

    c_table_forward(values, mass, c0, tau, n_iters)   -> (c_hist, den_hist, rows)
    c_table_iterate(values, mass, c0, tau, n_iters)   -> (c_hist, den_hist)
    c_table_bwd(values, mass, seg, c_hist, den_hist, tau) -> (jac, shared)

and `patterns.c` the per-element passes of 16-bit points keyed by their bit pattern (twins in
`edkm.functional.table`; no per-element index is stored, each pass maps patterns to rows):

    c_unique_patterns(points)                 -> (keys, counts, values)   the table build
    c_segment_sum(points, keys, src)          -> (G, U) sums
    c_gather_rows(points, keys, rows)         -> (G, N) 16-bit
    c_element_grad(points, keys, grad, jac, shared, scale) -> (G, N) fp32
    c_nearest(points, centroids)              -> (G, N) int64 nearest-centroid codes

and one block of `edkm.compensate`'s column sweep (its torch loop is the spec):

    c_obs_block(Wt, U, Ct, Qt, b0, b1, round_bf16) -> (B, b1 - b0, out) errors

Shapes (d = 1): values, mass, seg, rows, jac, shared (G, U); c0 (G, K); c_hist
(G, T+1, K); den_hist (G, T, K); fp32 CPU tensors, K <= 256. Groups are spread over
``torch.get_num_threads()`` Python threads (ctypes releases the GIL during the call).

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native -ffp-contract=off`` (no fused
multiply-adds, so a kernel that promises torch's fp32 rounding keeps it; GCC's ISO C mode
implies it, clang's does not), on x86-64 also
``-mprefer-vector-width=512`` (each dropped in turn if the compiler refuses it: `FLAG_SETS`), cached under
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

SOURCES = tuple(Path(__file__).with_name(f) for f in ("table.c", "patterns.c"))
HEADERS = tuple(Path(__file__).with_name(f) for f in ("scratch.h",))  # part of the cache key
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off")
# Tried when FLAGS fail (a compiler without -march=native, e.g. some clang on arm64): the
# kernels vectorise for the baseline ISA only.
PORTABLE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off")
# x86-64: GCC 12 tunes an AVX-512 Xeon as rocketlake, which prefers 256-bit vectors: the
# kernels' 16-lane blocks then run as two ymm halves (no zmm instruction in table.c's
# assembly; 2054 with this flag). 512-bit vectors make a whole SmolLM2 DKM training step 6%
# faster (12.75 s against 13.61 s, median of 6 interleaved rounds, both builds loaded in one
# process, 2 threads, 2-core Intel Xeon) with every loss, gradient and centroid bit the same
# (no sum is reordered: lanes are independent rows). A CPU without AVX-512 ignores it.
WIDE_FLAGS = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
# Tried in order until one compiles.
FLAG_SETS = tuple(dict.fromkeys(((*FLAGS, *WIDE_FLAGS), FLAGS, PORTABLE_FLAGS)))
KMAX = 256  # table.c's KMAX
OBS_ROWS = 64  # rows per task of edkm_obs_block (patterns.c)
# Groups per thread task: enough work (~1 ms at SmolLM2 shapes) to amortise a ctypes call.
MIN_GROUPS_PER_TASK = 4
# Largest scratch buffer kept between calls, in elements (16M: 96 MB for the table build's
# two (G, N) lists; every SmolLM2 and LLaMA-7B attention matrix fits).
SCRATCH_KEEP = 1 << 24

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {  # argument types of the exported functions (table.c, patterns.c)
    "edkm_table_forward": [_P] * 6 + [_L] * 5 + [ctypes.c_float],
    "edkm_table_bwd": [_P] * 7 + [_L] * 5 + [ctypes.c_float],
    "edkm_unique_patterns": [_P, _L, _L, _P, _P, _P, _L, _L],
    "edkm_segment_sum": [_P, _P, _P, _I, _P] + [_L] * 5,
    "edkm_gather_rows": [_P] * 4 + [_L] * 5,
    "edkm_fill_table": [_P, _P, _P, _L, _L, _I, _P, _P, _P, _L, _L],
    "edkm_element_grad": [_P, _P, _P, _I, _P, _P, _P, _I, _P, _I] + [_L] * 5,
    "edkm_nearest": [_P, _I, _P, _P] + [_L] * 5,
    "edkm_obs_block": [_P] * 5 + [_L] * 6 + [_I, _L, _L],
}
# Value kinds of patterns.c.
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_scratch_local = threading.local()
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
    text = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    key = hashlib.sha256(text + repr((cc, FLAG_SETS, _cpu_key())).encode()).hexdigest()[:16]
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
        for i, flags in enumerate(FLAG_SETS):
            done = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                break
            log.info("%s %s failed (exit %d)%s", cc, " ".join(flags), done.returncode,
                     f"; retrying with {' '.join(FLAG_SETS[i + 1])}" if i + 1 < len(FLAG_SETS) else "")
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {[f.name for f in SOURCES]} (exit {done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
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
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:  # AttributeError: no such symbol
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


FP32 = (torch.float32,)
HALF = (torch.bfloat16, torch.float16)  # 16-bit points, keyed by their bit pattern
VALUES = (torch.float32, *HALF)  # the value kinds patterns.c reads (_KINDS)


def _check(name: str, t: Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = FP32) -> None:
    """Raise ``ValueError`` naming ``t``'s dtype, shape, device and layout unless it is a
    contiguous CPU tensor of ``shape`` in one of ``dtypes``."""
    if t.device.type != "cpu" or t.dtype not in dtypes or tuple(t.shape) != shape or not t.is_contiguous():
        want = " / ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: want a contiguous {want} CPU tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's worker threads for the kernels (grown to ``threads``, kept: a DKM step
    calls the kernels ~8 times per layer, too often to start threads every call)."""
    with _lock:
        pool = _state.get("pool")
        if pool is None or pool._max_workers < threads:  # type: ignore[union-attr]
            if pool is not None:
                pool.shutdown(wait=False)  # type: ignore[union-attr]
            pool = _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="edkm-ckernels")
        return pool  # type: ignore[return-value]


def _run(fn, G: int, args) -> None:
    """Call ``fn(*args(g0, g1))`` over slices [g0, g1) of the G groups, in threads."""
    threads = max(1, min(torch.get_num_threads(), G // MIN_GROUPS_PER_TASK))
    step = -(-G // threads)

    def call(g0: int) -> int:
        return fn(*args(g0, min(g0 + step, G)))

    codes = [call(0)] if threads == 1 else list(_pool(threads).map(call, range(0, G, step)))
    if any(c == -1 for c in codes):
        raise MemoryError(f"C kernel {fn.__name__}: could not allocate its scratch memory")
    if any(c == -3 for c in codes):
        raise ValueError(f"C kernel {fn.__name__}: a non-finite value")
    if any(c != 0 for c in codes):
        raise ValueError(f"C kernel {fn.__name__} rejected its arguments (K <= {KMAX}, T >= 1)")


def _table_args(tensors: list[Tensor | None], dims: tuple[int, int, int], tau: float):
    """Arguments of the table kernels: pointers, g0, g1, U, K, T, tau."""
    ptrs = [_ptr(t) for t in tensors]
    return lambda g0, g1: (*ptrs, g0, g1, *dims, ctypes.c_float(tau))


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
    _run(lib.edkm_table_forward, G, _table_args([values, mass, c0, c_hist, den_hist, out], (U, K, n_iters), tau))
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
    _run(lib.edkm_table_bwd, G, _table_args([values, mass, seg, c_hist, den_hist, jac, shared], (U, K, T), tau))
    return jac, shared


def _check_keys(keys: Tensor, G: int) -> int:
    if keys.dtype != torch.int64 or keys.dim() != 2 or keys.shape[0] != G or not keys.is_contiguous():
        raise ValueError(f"keys: want contiguous (G={G}, U) int64 row patterns, got {keys.dtype} {tuple(keys.shape)}")
    return keys.shape[1]


def _scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A reusable per-thread buffer of at least ``numel`` elements (fresh allocations of a few
    MB per call cost more in page faults than the pass); buffers above `SCRATCH_KEEP` elements
    are not kept."""
    if numel > SCRATCH_KEEP:
        return torch.empty(numel, dtype=dtype)
    buf = getattr(_scratch_local, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch_local, name, buf)
    return buf[:numel]


def c_unique_patterns(points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The table of distinct 16-bit values of every group.

    Args:
        points: (G, N) bf16 / fp16.
    Returns:
        ``(keys, counts, values)``: (G, U) int64 patterns in increasing order, padded with -1
        to the largest group's U; (G, U) fp32 counts (0 on padding); (G, U) fp32 values of
        the patterns (0 on padding). Raises ``ValueError`` if a value is NaN or Inf.
    """
    G, N = points.shape
    _check("points", points, (G, N), HALF)
    lib = _require()
    ukeys = _scratch("ukeys", G * N, torch.int16)
    ucount = _scratch("ucount", G * N, torch.int32)
    n_rows = torch.empty(G, dtype=torch.int64)
    ptrs = [_ptr(t) for t in (points, ukeys, ucount, n_rows)]
    _run(lib.edkm_unique_patterns, G, lambda g0, g1: (ptrs[0], G, N, *ptrs[1:], g0, g1))
    U = int(n_rows.max())
    keys = torch.empty(G, U, dtype=torch.int64)
    counts, values = (torch.empty(G, U, dtype=torch.float32) for _ in range(2))
    kind = _KINDS[points.dtype]
    out = [_ptr(t) for t in (keys, counts, values)]
    try:
        _run(lib.edkm_fill_table, G, lambda g0, g1: (*ptrs[1:], N, U, kind, *out, g0, g1))
    except ValueError:
        bad = points[~torch.isfinite(points)][0].item()
        raise ValueError(f"DKM got a non-finite weight value ({bad}); clean NaN/Inf weights first") from None
    return keys, counts, values


def c_segment_sum(points: Tensor, keys: Tensor, src: Tensor) -> Tensor:
    """``S[g, j] = sum of src[g, i] over the points i of group g whose pattern is keys[g, j]``.

    Args:
        points: (G, N) bf16 / fp16. keys: (G, U) int64 sorted row patterns (-1 padding).
        src: (G, N) fp32 / bf16 / fp16 values.
    Returns:
        (G, U) fp32 sums (0 on padding rows).
    """
    G, N = points.shape
    _check("points", points, (G, N), HALF)
    U = _check_keys(keys, G)
    _check("src", src, (G, N), VALUES)
    lib = _require()
    out = torch.empty(G, U, dtype=torch.float32)
    ptrs = [_ptr(t) for t in (points, keys, src)]
    _run(lib.edkm_segment_sum, G, lambda g0, g1: (*ptrs, _KINDS[src.dtype], _ptr(out), G, N, U, g0, g1))
    return out


def c_gather_rows(points: Tensor, keys: Tensor, rows: Tensor) -> Tensor:
    """``out[g, i] = rows[g, j]`` for the row j of point i, in ``points.dtype``.

    Args:
        points: (G, N) bf16 / fp16. keys: (G, U) int64 row patterns. rows: (G, U) any float
            dtype (cast to ``points.dtype`` first: U casts, not N).
    Returns:
        (G, N) in ``points.dtype``.
    """
    G, N = points.shape
    _check("points", points, (G, N), HALF)
    U = _check_keys(keys, G)
    if tuple(rows.shape) != (G, U):
        raise ValueError(f"rows: want shape (G, U) = {(G, U)}, got {tuple(rows.shape)}")
    lib = _require()
    rows16 = rows.to(points.dtype).contiguous()
    out = torch.empty_like(points)
    ptrs = [_ptr(t) for t in (points, keys, rows16, out)]
    _run(lib.edkm_gather_rows, G, lambda g0, g1: (*ptrs, G, N, U, g0, g1))
    return out


def c_element_grad(points: Tensor, keys: Tensor, grad: Tensor, jac: Tensor, shared: Tensor,
                   scale: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``dW[g, i] = grad[g, i] * jac[g, j] + s[g, i] * shared[g, j]`` for the row j of point i.

    Args:
        points: (G, N) bf16 / fp16. keys: (G, U) int64 row patterns. grad: (G, N) fp32 /
            bf16 / fp16. jac, shared: (G, U) fp32. scale: (G, N) fp32 / bf16 / fp16
            importance or None (1).
        out_dtype: fp32, or bf16 (the fp32 value rounded once to nearest even, as torch casts).
    Returns:
        (G, N) in ``out_dtype``.
    """
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    G, N = points.shape
    _check("points", points, (G, N), HALF)
    U = _check_keys(keys, G)
    _check("grad", grad, (G, N), VALUES)
    for name, t in (("jac", jac), ("shared", shared)):
        _check(name, t, (G, U))
    if scale is not None:
        _check("scale", scale, (G, N), VALUES)
    lib = _require()
    out = torch.empty(G, N, dtype=out_dtype)
    ptrs = [_ptr(t) for t in (points, keys, grad)]
    table = [_ptr(t) for t in (jac, shared, scale)]
    kinds = (_KINDS[scale.dtype] if scale is not None else 0, _ptr(out), _KINDS[out_dtype])
    _run(lib.edkm_element_grad, G, lambda g0, g1: (*ptrs, _KINDS[grad.dtype], *table, *kinds, G, N, U, g0, g1))
    return out


def c_nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """The index of the nearest centroid of every point (the first of equal distances).

    Args:
        points: (G, N) fp32 / bf16 / fp16 (compared in fp32, exactly converted).
        centroids: (G, K) fp32, 1 <= K <= 256.
    Returns:
        (G, N) int64: the argmin over k of ``(points - centroids[:, k]) ** 2`` in fp32, as
        `edkm.functional.packing.nearest`'s torch path (a NaN distance never wins here).
    """
    G, N = points.shape
    K = centroids.shape[1] if centroids.dim() == 2 else 0
    _check("points", points, (G, N), VALUES)
    _check("centroids", centroids, (G, K))
    if not 1 <= K <= KMAX:
        raise ValueError(f"c_nearest takes 1 <= K <= {KMAX} centroids, got K={K}")
    lib = _require()
    out = torch.empty(G, N, dtype=torch.int64)
    ptrs = [_ptr(t) for t in (points, centroids, out)]
    _run(lib.edkm_nearest, G, lambda g0, g1: (ptrs[0], _KINDS[points.dtype], *ptrs[1:], G, N, K, g0, g1))
    return out


def c_obs_block(Wt: Tensor, U: Tensor, Ct: Tensor, Qt: Tensor, b0: int, b1: int, round_bf16: bool) -> Tensor:
    """One lazy block [b0, b1) of `edkm.compensate`'s column sweep, in place (its torch loop,
    ``_block``, is the spec: the same fp32 operations in the same order; tests hold the
    chosen values equal).

    Args:
        Wt: (B, n, out) fp32 weights, column-major per problem (updated over the block's columns).
        U: (B, n, n) fp32 upper Cholesky factor of each inverse Hessian.
        Ct: (B, K, out) fp32: row r's LUT in Ct[b, :, r], 1 <= K <= 256.
        Qt: (B, n, out) fp32: the block's columns receive the chosen LUT values.
        b0, b1: The block's columns. round_bf16: Round each weight to bf16 before choosing.
    Returns:
        (B, b1 - b0, out) fp32 errors ``(w - q) / U[j, j]`` of the block.
    """
    B, n, out = Wt.shape
    K = Ct.shape[1] if Ct.dim() == 3 else 0
    _check("Wt", Wt, (B, n, out))
    _check("U", U, (B, n, n))
    _check("Ct", Ct, (B, K, out))
    _check("Qt", Qt, (B, n, out))
    if not 1 <= K <= KMAX or not 0 <= b0 < b1 <= n:
        raise ValueError(f"c_obs_block takes 1 <= K <= {KMAX} and 0 <= b0 < b1 <= n={n}, got K={K}, b0={b0}, b1={b1}")
    lib = _require()
    E = torch.empty(B, b1 - b0, out, dtype=torch.float32)
    tasks = B * -(-out // OBS_ROWS)
    ptrs = [_ptr(t) for t in (Wt, U, Ct, Qt, E)]
    _run(lib.edkm_obs_block, tasks, lambda t0, t1: (*ptrs, B, n, out, K, b0, b1, int(round_bf16), t0, t1))
    return E


__all__ = ["available", "build_error", "c_element_grad", "c_gather_rows", "c_nearest", "c_obs_block", "c_segment_sum",
           "c_table_bwd", "c_table_forward", "c_table_iterate", "c_unique_patterns", "library_path"]

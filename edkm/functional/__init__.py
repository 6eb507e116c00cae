"""Functional differentiable k-means (DKM): the dispatch.

`dkm` is the one entry point; `uniquify` picks the exact table path (`autograd.py` over
the passes of `table.py`) or the naive (N, K) autograd path (`naive.py`, the spec).
`backend` picks who runs the table passes: torch (`passes.py`), the Triton kernels of
`edkm.kernels` (`triton_backend.py`; bf16 / fp16 points with cluster_dim 1 only, CUDA), or
the C kernels of `edkm.ckernels` (`c_backend.py`; cluster_dim 1, fp32 math, CPU). Triton is
imported only when that backend is chosen, so ``import edkm`` works without it.
`kmeans_init` gives the step-0 centroids; `packing.py` the finalized codes.

    __init__.py   dispatch: dkm, resolve_backend, assign_codes
    iterations.py the shared iteration math (soft assignment, centroid update, Jacobian)
    naive.py      the (N, K) autograd spec
    table.py      the table path in torch: table build, per-element and table passes
    autograd.py   the autograd Function of the table path (forward and backward)
    triton_backend.py  the Triton kernels behind the same signatures
    c_backend.py  the C table kernels behind the same signatures (CPU)
    kmeans.py     hard k-means init;  shard.py  data-parallel sharding
    packing.py    nearest-centroid codes and their one packing layout
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from edkm import ckernels
from edkm._checks import check_int, check_number
from edkm.config import BACKENDS
from edkm.functional import packing
from edkm.functional.autograd import TORCH_OPS, TableOps, dkm_table
from edkm.functional.c_backend import c_ops
from edkm.functional.kmeans import kmeans_init
from edkm.functional.naive import dkm_naive
from edkm.functional.shard import dkm_sharded, sharding_active
from edkm.functional.table import uses_bit_patterns

__all__ = ["BACKENDS", "assign_codes", "check_importance", "dkm", "kmeans_init", "resolve_backend", "triton_ops"]


def dkm(
    points: Tensor,
    centroids: Tensor,
    *,
    tau: float,
    max_iters: int,
    eps: float = 0.0,
    uniquify: bool = True,
    backend: str = "auto",
    shard: bool = False,
    importance: Tensor | None = None,
    cast: torch.dtype | None = None,
    rebuild: bool = False,
) -> tuple[Tensor, Tensor]:
    """Soft-cluster ``points`` with differentiable k-means.

    Iteration t computes ``A_t = softmax(-||x - C_{t-1}||^2 / tau)`` and
    ``C_t = A_t^T X / A_t^T 1``; the result is ``A_T C_T``. Math runs in fp32. Gradients
    reach ``points`` through every iteration; ``centroids`` is a warm start only.

    Args:
        points: (N, d) or grouped (G, N, d) weights, any float dtype.
        centroids: (K, d) or (G, K, d) starting centroids.
        tau: Softmax temperature, > 0.
        max_iters: Iterations, >= 1.
        eps: Stop early once no centroid moves more than ``eps`` (0 = always
            ``max_iters``).
        uniquify: Table path (exact, never allocates N x K) instead of the naive one.
        backend: Who runs the table path: ``"torch"``, ``"triton"`` (bf16 / fp16 points
            with d = 1; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"c"``
            (the C table kernels: CPU points with d = 1 and fp32 math, i.e. not fp64; one
            process), or ``"auto"`` (Triton when it applies, the points are on CUDA and
            triton is installed; C for CPU points it covers when a C compiler built the
            kernels; torch otherwise). See `resolve_backend`.
        shard: With torch.distributed initialised and several ranks, each rank runs
            DKM on its slice of the points and the centroid sums are all-reduced (exact;
            see `edkm.functional.shard`). Ignored in a single process.
        importance: Optional (N,) / (G, N) non-negative per-point weights s_i of the
            centroid updates, ``C_t = A_t^T (s X) / A_t^T s`` (sensitivity-weighted
            DKM, e.g. a diagonal Fisher; see `edkm.fisher_importance`). Constants: no
            gradient flows into them. Scale them to mean ~1 (a centroid whose mass is
            below 1e-6 is frozen). Runs on the torch backend (``"auto"`` picks it; an
            explicit ``"triton"`` is an error) and not with active sharding.
        cast: Cluster ``points.to(cast)`` (e.g. bf16 of fp32 master weights); the soft
            points come out in ``cast`` and the gradient reaches ``points`` in its own
            dtype, as if the caller had cast first. None: the points' own dtype.
        rebuild: Table path only: hold nothing for backward but ``points`` (with
            ``cast``, the caller's tensor, not the cast copy) and the centroid history;
            backward rebuilds the table. Bitwise the same results, one more table build.
    Returns:
        ``(soft_points, new_centroids)``: soft points shaped like ``points`` (typed like
        them, or ``cast``), and fp32 detached centroids shaped like ``centroids``.
    """
    _check(points, centroids, tau, max_iters, eps)
    if rebuild and not uniquify:
        raise ValueError("rebuild=True rebuilds the table in backward; it needs uniquify=True")
    if rebuild and shard and sharding_active():
        raise ValueError("rebuild=True runs in one process; use shard=False (or rebuild=False) with sharding")
    if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
        raise ValueError(f"cast must be a floating-point torch dtype or None, got {cast!r}")
    if cast is not None and ((not uniquify or (shard and sharding_active())) or cast == points.dtype):
        points, cast = points.to(cast), None  # cast outside: the naive and sharded paths take 16-bit points
    grouped = points.dim() == 3
    p = points if grouped else points.unsqueeze(0)
    c = centroids if grouped else centroids.unsqueeze(0)
    if not uniquify and not torch.isfinite(points).all():
        raise ValueError("DKM got non-finite weights (NaN or Inf); clean them first")
    if importance is not None:
        imp = _check_importance(importance, p, grouped)
        if shard and sharding_active():
            raise ValueError("importance-weighted DKM does not support sharding yet; use shard=False")
        if backend == "triton":
            raise ValueError("importance-weighted DKM runs on the torch or C backend; use backend='torch', 'c' or 'auto'")
        if uniquify:
            ops = c_ops() if resolve_backend(backend, p, uniquify, dtype=cast) == "c" else TORCH_OPS
            out, new_c = dkm_table(p, c, float(tau), int(max_iters), float(eps), None, imp, ops, cast=cast,
                                   rebuild=rebuild)
        else:
            out, new_c = dkm_naive(p, c, float(tau), int(max_iters), float(eps), None, imp)
    elif shard and sharding_active():
        if backend == "c":
            raise ValueError("the C table passes run in one process; sharded DKM uses backend='torch' or 'auto'")
        out, new_c = dkm_sharded(p, c, float(tau), int(max_iters), float(eps), uniquify)
    elif (chosen := resolve_backend(backend, p, uniquify, dtype=cast)) == "triton":
        ops = triton_ops(deterministic=torch.are_deterministic_algorithms_enabled())
        out, new_c = dkm_table(p, c, float(tau), int(max_iters), float(eps), ops=ops, cast=cast, rebuild=rebuild)
    elif uniquify:
        ops = c_ops() if chosen == "c" else TORCH_OPS
        out, new_c = dkm_table(p, c, float(tau), int(max_iters), float(eps), ops=ops, cast=cast, rebuild=rebuild)
    else:
        out, new_c = dkm_naive(p, c, float(tau), int(max_iters), float(eps))
    return (out, new_c) if grouped else (out[0], new_c[0])


def resolve_backend(backend: str, points: Tensor, uniquify: bool = True, dtype: torch.dtype | None = None) -> str:
    """``"torch"``, ``"triton"`` or ``"c"``: who runs DKM on ``points`` (G, N, d), clustered
    in ``dtype`` (None: their own dtype; `dkm`'s ``cast``).

    ``"auto"`` picks Triton for the table path on bf16 / fp16 CUDA points with d = 1 when
    triton is installed; the C table kernels for CPU points with d = 1 and fp32 math when
    they built (`edkm.ckernels.available`); torch otherwise. An explicit ``"triton"`` or
    ``"c"`` never falls back: ``ValueError`` for a case its kernels do not cover (naive path;
    Triton: fp32 / fp64 points or d > 1; C: fp64 math, d > 1 or non-CPU points) and
    ``RuntimeError`` when they cannot run (triton missing, CPU points without
    ``TRITON_INTERPRET=1``; no C compiler).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    fp32_math = (dtype or points.dtype) != torch.float64
    c_covered = uniquify and points.device.type == "cpu" and points.shape[-1] == 1 and fp32_math
    if backend == "c":
        if not c_covered:
            raise ValueError(
                f"backend='c' covers the table path (uniquify=True) on CPU points with cluster_dim 1 and fp32 math, got "
                f"{dtype or points.dtype} points on {points.device} with cluster_dim {points.shape[-1]} and "
                f"uniquify={uniquify}; use backend='torch' or 'auto'"
            )
        if not ckernels.available():
            raise RuntimeError(f"backend='c' could not build the C table kernels: {ckernels.build_error()}; "
                               "use backend='torch' or 'auto'")
        return "c"
    covered = uniquify and uses_bit_patterns(points, dtype)
    if backend == "auto":
        if covered and points.is_cuda and _triton_installed():
            return "triton"
        return "c" if c_covered and ckernels.available() else "torch"
    if not uniquify:
        raise ValueError("backend='triton' runs the uniquified table path; uniquify=False is the torch reference")
    if not covered:
        raise ValueError(
            f"backend='triton' covers bf16/fp16 points with cluster_dim 1, got {dtype or points.dtype} with "
            f"cluster_dim {points.shape[-1]}; use backend='torch' or 'auto' (or cluster_dtype='bfloat16')"
        )
    if not _triton_installed():
        raise RuntimeError(
            "backend='triton' needs the triton package (pip install triton); use backend='torch' or 'auto'"
        )
    if not points.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"backend='triton' got points on {points.device}: Triton runs CUDA tensors, or CPU tensors only under "
            "TRITON_INTERPRET=1 (the slow interpreter, for tests); use backend='torch' or 'auto'"
        )
    return "triton"


@lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_ops(deterministic: bool = False) -> TableOps:
    """The Triton launchers of `edkm.kernels` as `TableOps` (imports triton); see
    `edkm.functional.triton_backend.triton_ops`."""
    from edkm.functional.triton_backend import triton_ops as ops

    return ops(deterministic)


def _check(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float) -> None:
    if not isinstance(points, Tensor) or not points.is_floating_point():
        raise TypeError(f"points must be a floating-point tensor, got {getattr(points, 'dtype', type(points))}")
    if points.dim() not in (2, 3) or centroids.dim() != points.dim():
        raise ValueError(
            f"points (N, d) / (G, N, d) and centroids (K, d) / (G, K, d) must have the same rank, "
            f"got points {tuple(points.shape)} and centroids {tuple(centroids.shape)}"
        )
    if points.numel() == 0:
        raise ValueError(f"points is empty (shape {tuple(points.shape)}); nothing to cluster")
    if centroids.shape[-2] < 1 or centroids.shape[-1] != points.shape[-1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match points {tuple(points.shape)}")
    if points.dim() == 3 and centroids.shape[0] != points.shape[0]:
        raise ValueError(f"group count differs: points {tuple(points.shape)}, centroids {tuple(centroids.shape)}")
    check_number("tau", tau)
    check_int("max_iters", max_iters)
    check_number("eps", eps, inclusive=True)
    if not torch.isfinite(centroids).all():
        raise ValueError("centroids contain NaN or Inf")


def check_importance(importance: Tensor) -> None:
    """Raise ``TypeError`` / ``ValueError`` (with the bad values) unless ``importance`` is a
    floating-point tensor of finite, non-negative weights."""
    if not isinstance(importance, Tensor) or not importance.is_floating_point():
        raise TypeError(f"importance must be a floating-point tensor, got {getattr(importance, 'dtype', type(importance))}")
    if importance.numel() == 0:
        return
    lo, hi = torch.aminmax(importance)  # one pass (dkm checks its importance every step); NaN propagates
    if not (lo.item() >= 0 and hi.item() < float("inf")):
        raise ValueError(f"importance must be finite and >= 0, got min {importance.nan_to_num(0.0).min().item():.3g} "
                         f"and {int((~torch.isfinite(importance)).sum())} non-finite entries")


def _check_importance(importance: Tensor, points: Tensor, grouped: bool) -> Tensor:
    """(G, N) importance matching ``points`` (G, N, d); raises ``ValueError`` naming the problem."""
    check_importance(importance)
    imp = importance if grouped else importance.unsqueeze(0)
    if tuple(imp.shape) != tuple(points.shape[:2]):
        raise ValueError(f"importance must have one entry per point, shape {tuple(points.shape[:2])} "
                         f"(without the group dim for ungrouped points), got {tuple(importance.shape)}")
    return imp.detach()


def assign_codes(points: Tensor, centroids: Tensor, bits: int, backend: str = "auto") -> Tensor:
    """Nearest centroid of every point as packed ``bits``-bit codes (finalize, export).

    Every 8 consecutive points of a group become ``bits`` bytes, least significant bits
    first (`edkm.functional.packing.pack_codes`; `unpack_codes` inverts it); ``bits=8``
    gives plain uint8 indices. Ties go to the lowest centroid index.

    Args:
        points: (G, N, d) weights. centroids: (G, K, d) with K <= 2**bits.
        bits: Code width, 1..8.
        backend: As in `dkm`; Triton covers bf16 / fp16 points with d = 1.
    Returns:
        (G, ceil(N / 8) * bits) uint8.
    """
    if points.dim() != 3 or centroids.dim() != 3 or points.shape[-1] != centroids.shape[-1]:
        raise ValueError(
            f"assign_codes takes (G, N, d) points and (G, K, d) centroids, got "
            f"{tuple(points.shape)} and {tuple(centroids.shape)}"
        )
    return packing.assign_codes(points, centroids, bits, resolve_backend(backend, points))

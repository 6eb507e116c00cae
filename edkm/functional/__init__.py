"""Functional differentiable k-means (DKM).

`dkm` is the one entry point; `uniquify` picks the exact table path (`unique.py`) or the
naive (N, K) autograd path (`naive.py`, the reference). `kmeans_init` gives the step-0
centroids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edkm.functional.kmeans import kmeans_init
from edkm.functional.naive import dkm_naive
from edkm.functional.unique import dkm_unique

__all__ = ["dkm", "kmeans_init"]


def dkm(
    points: Tensor,
    centroids: Tensor,
    *,
    tau: float,
    max_iters: int,
    eps: float = 0.0,
    uniquify: bool = True,
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
    Returns:
        ``(soft_points, new_centroids)``: soft points shaped and typed like ``points``,
        and fp32 detached centroids shaped like ``centroids``.
    """
    _check(points, centroids, tau, max_iters, eps)
    grouped = points.dim() == 3
    p = points if grouped else points.unsqueeze(0)
    c = centroids if grouped else centroids.unsqueeze(0)
    if not uniquify and not torch.isfinite(points).all():
        raise ValueError("DKM got non-finite weights (NaN or Inf); clean them first")
    fn = dkm_unique if uniquify else dkm_naive
    out, new_c = fn(p, c, float(tau), int(max_iters), float(eps))
    return (out, new_c) if grouped else (out[0], new_c[0])


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
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if not torch.isfinite(centroids).all():
        raise ValueError("centroids contain NaN or Inf")

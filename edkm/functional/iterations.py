"""The DKM iteration math, shared by every path.

`dkm_iterations` runs soft k-means iterations on weighted points: the naive path calls it
on all N points with unit weights (autograd keeps every (N, K) intermediate); the table
path (`autograd.py`) calls it on the table of distinct values with their counts (or
importance masses) as weights. Shapes carry a leading group dimension G (one LUT per group):

    points   (G, N, d)      centroids (G, K, d)      weights (G, N) or None
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]

# Soft mass below which a centroid counts as empty (see `update_centroids`).
MIN_MASS = 1e-6


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """DKM math runs in fp32, or in fp64 for fp64 inputs (used for references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distance, computed as a sum of squared differences.

    The difference form (not ||x||^2 - 2 x.c + ||c||^2) avoids cancellation: weights and
    centroids are ~1e-2 and tau ~1e-4, so distance errors are amplified 1e4 times.

    Args:
        x: (G, U, d) points.
        c: (G, K, d) centroids.
    Returns:
        (G, U, K) distances.
    """
    if x.shape[-1] == 1:
        return (x - c.transpose(1, 2)).square()  # (G, U, 1) - (G, 1, K) -> (G, U, K)
    return (x.unsqueeze(2) - c.unsqueeze(1)).square().sum(-1)  # (G, U, K, d) -> (G, U, K)


def soft_assign(x: Tensor, c: Tensor, tau: float) -> Tensor:
    """Soft assignment map ``softmax(-||x - c||^2 / tau)`` over centroids, (G, U, K)."""
    return torch.softmax(sq_dist(x, c) / -tau, dim=-1)


def centroid_sums(x: Tensor, a: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Numerators ``A^T (n x)`` (G, K, d) and denominators ``A^T n`` (G, K, 1) of the update.

    Args:
        x: (G, U, d) points. a: (G, U, K) assignment. weights: (G, U) counts or None.
    """
    w = a if weights is None else a * weights.unsqueeze(-1)  # (G, U, K)
    return torch.einsum("guk,gud->gkd", w, x), w.sum(1).unsqueeze(-1)


def centroids_from_sums(num: Tensor, den: Tensor, c_prev: Tensor, reduce: Reduce | None = None
                        ) -> tuple[Tensor, Tensor]:
    """New centroids ``num / den`` from `centroid_sums` (summed over ranks by ``reduce``).

    A centroid whose soft mass ``den`` is below `MIN_MASS` (a millionth of one weight:
    every weight sits near another centroid and tau is small) keeps its previous value and
    passes no gradient. Dividing by such a mass gives 0/0 at exact 0, and at tiny positive
    masses (denormals, as exp(-D/tau) underflows) a backward of 1/mass^2 that overflows
    fp32 to inf and then NaN: seen training SmolLM2 with 16-row LUT groups, where
    range-seeded centroids sit in gaps between weights.

    Args:
        num: (G, K, d). den: (G, K, 1). c_prev: (G, K, d) centroids the map was computed with.
        reduce: Sums the (G, K, d + 1) numerator/denominator over the ranks that each
            hold a shard of the points (`edkm.functional.shard`); None for one process.
    Returns:
        ``(c, den)``: (G, K, d) new centroids and the (G, K, 1) denominators after ``reduce``.
    """
    if reduce is not None:
        both = reduce(torch.cat([num, den], dim=-1))  # one collective per iteration
        num, den = both[..., :-1], both[..., -1:]
    empty = den < MIN_MASS
    return torch.where(empty, c_prev, num / torch.where(empty, torch.ones_like(den), den)), den


def update_centroids(x: Tensor, a: Tensor, weights: Tensor | None, c_prev: Tensor,
                     reduce: Reduce | None = None) -> Tensor:
    """Weighted centroid update ``C = (A^T (n x)) / (A^T n)``: `centroid_sums` then
    `centroids_from_sums` (which says how empty centroids are kept).

    Args:
        x: (G, U, d) points. a: (G, U, K) assignment. weights: (G, U) counts or None.
        c_prev: (G, K, d) centroids the map was computed with.
        reduce: See `centroids_from_sums`.
    Returns:
        (G, K, d) new centroids.
    """
    return centroids_from_sums(*centroid_sums(x, a, weights), c_prev, reduce)[0]


def dkm_iterations(
    x: Tensor,
    weights: Tensor | None,
    c0: Tensor,
    tau: float,
    max_iters: int,
    eps: float,
    n_iters: int | None = None,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Run the soft k-means iterations (differentiable when ``x`` requires grad).

    Args:
        x: (G, U, d) fp32 points. weights: (G, U) counts or None for unit weights.
        c0: (G, K, d) warm-start centroids (treated as constants).
        tau, max_iters, eps: see `edkm.functional.dkm`.
        n_iters: run exactly this many iterations (the backward replays the forward's
            count so early stopping is decided once).
        reduce: see `update_centroids` (sharded points).
    Returns:
        ``(a_last, c_prev, c_last, iters)``: the last map (G, U, K), the centroids it
        was computed with, the last centroids, and the number of iterations run.
    """
    c = c0
    iters = max_iters if n_iters is None else n_iters
    for t in range(iters):
        a = soft_assign(x, c, tau)
        c_prev, c = c, update_centroids(x, a, weights, c, reduce)
        if n_iters is None and eps > 0 and t + 1 < max_iters:
            moved = (c - c_prev).detach().norm(dim=-1).max()
            if moved.item() <= eps:
                return a, c_prev, c, t + 1
    return a, c_prev, c, iters

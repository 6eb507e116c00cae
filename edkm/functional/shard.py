"""Sharding DKM over data-parallel ranks (DESIGN section 4), exact.

Every rank holds the same weight. Rank r takes the slice ``[lo_r, hi_r)`` of the N points
of every group and runs DKM on it alone, except that each iteration's centroid update
sums its numerator and denominator over all ranks (one all-reduce of (G, K, d + 1)
floats), so every rank computes the same global centroids. The soft points of the slices
are all-gathered into the full soft weight.

Both collectives are differentiable (`torch.distributed.nn.functional`): the backward of
the all-gather sums the ranks' upstream gradients for a slice, and the backward of the
all-reduce carries every slice's centroid-path gradient to every rank. A rank's weight
gradient is therefore the gradient of the *sum of all ranks' losses* on its own slice and
zero elsewhere; DDP's gradient averaging then yields exactly the unsharded mean gradient.

What a rank stores for backward shrinks by R: the naive path's (N/R, K) maps (the
eDKM-faithful mode) or the uniquified path's table of its slice; the per-element passes
run on N/R points. Works with any process group (gloo on CPU, NCCL on GPUs) set up by
torchrun or accelerate.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor

from edkm.functional.autograd import dkm_table
from edkm.functional.naive import dkm_naive


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank`` when n points are split into ``world`` near-equal slices."""
    per = math.ceil(n / world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def sharding_active(group=None) -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def dkm_sharded(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float,
                uniquify: bool, group=None) -> tuple[Tensor, Tensor]:
    """DKM on this rank's slice of ``points`` with globally reduced centroids.

    Args:
        points: (G, N, d) the full weight (identical on every rank).
        centroids: (G, K, d) warm start (identical on every rank).
        group: Process group (None = the default group).
    Returns:
        ``(soft_points, new_centroids)`` as `edkm.functional.dkm`, identical on all ranks.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    G, N, d = points.shape
    if N < world:  # nothing to split: every rank runs the whole (tiny) weight
        fn = dkm_table if uniquify else dkm_naive
        return fn(points, centroids, tau, max_iters, eps)
    lo, hi = shard_bounds(N, world, rank)

    def reduce(t: Tensor) -> Tensor:
        with warnings.catch_warnings():  # torch 2.13 marks these deprecated; they still
            warnings.simplefilter("ignore", FutureWarning)  # work and are differentiable
            return dist_nn.all_reduce(t, group=group)

    fn = dkm_table if uniquify else dkm_naive
    out, c = fn(points[:, lo:hi], centroids, tau, max_iters, eps, reduce=reduce)
    per = math.ceil(N / world)
    padded = torch.nn.functional.pad(out, (0, 0, 0, per - (hi - lo)))  # (G, per, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(padded, group=group)
    full = torch.cat([p[:, : shard_bounds(N, world, r)[1] - shard_bounds(N, world, r)[0]]
                      for r, p in enumerate(parts)], dim=1)  # (G, N, d)
    return full, c

"""One-off hard k-means that initialises the centroids of a LUT.

Runs on the table of distinct values (weighted by counts), so its cost does not grow
with N beyond one histogram. d = 1 starts from weighted quantiles (the K equal-mass bins
of the value distribution), d > 1 from weighted k-means++; both then run Lloyd steps.
Deterministic for a given seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional.naive import sq_dist
from edkm.functional.table import build_table


def kmeans_init(points: Tensor, k: int, iters: int = 30, seed: int = 0) -> Tensor:
    """Hard k-means centroids for every group.

    Args:
        points: (G, N, d) weights (any float dtype; NaN/Inf raise ``ValueError``).
        k: Number of centroids.
        iters: Lloyd iterations after the seeding.
        seed: Seed of the k-means++ sampling (d > 1).
    Returns:
        (G, k, d) centroids in the math dtype (fp32; fp64 for fp64 points). With fewer than k distinct values in a group, the
        distinct values are repeated to fill the LUT.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    with torch.no_grad():
        table = build_table(points.detach())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out = []
        for g in range(points.shape[0]):
            present = table.counts[g] > 0
            v, n = table.values[g][present], table.counts[g][present]  # (U, d), (U,)
            c = _seed(v, n, k, gen)
            for _ in range(iters):
                c = _lloyd_step(v, n, c)
            out.append(c)
        return torch.stack(out)


def _seed(v: Tensor, n: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Initial centroids (k, d) from distinct values v (U, d) with counts n (U,)."""
    u, d = v.shape
    if u <= k:
        return v[torch.arange(k, device=v.device) % u].clone()
    if d == 1:
        order = torch.argsort(v[:, 0])
        mass = torch.cumsum(n[order], 0) / n.sum()  # (U,) cumulative share
        targets = (torch.arange(k, device=v.device, dtype=mass.dtype) + 0.5) / k
        idx = torch.searchsorted(mass, targets).clamp_max(u - 1)
        return v[order[idx]].clone()
    first = torch.multinomial(n.cpu(), 1, generator=gen).to(v.device)
    chosen = [v[first[0]]]
    dist = sq_dist(v.unsqueeze(0), chosen[0].view(1, 1, d))[0, :, 0]  # (U,)
    for _ in range(1, k):
        w = (n * dist).cpu()
        pick = torch.multinomial(w, 1, generator=gen) if w.sum() > 0 else torch.tensor([0])
        chosen.append(v[pick.to(v.device)[0]])
        dist = torch.minimum(dist, sq_dist(v.unsqueeze(0), chosen[-1].view(1, 1, d))[0, :, 0])
    return torch.stack(chosen)


def _lloyd_step(v: Tensor, n: Tensor, c: Tensor) -> Tensor:
    """One weighted Lloyd step; an empty cluster keeps its centroid."""
    assign = sq_dist(v.unsqueeze(0), c.unsqueeze(0))[0].argmin(-1)  # (U,)
    k, d = c.shape
    mass = torch.zeros(k, dtype=v.dtype, device=v.device).index_add_(0, assign, n)
    num = torch.zeros(k, d, dtype=v.dtype, device=v.device).index_add_(0, assign, v * n.unsqueeze(1))
    return torch.where(mass.unsqueeze(1) > 0, num / mass.clamp_min(1e-30).unsqueeze(1), c)

"""One-off hard k-means that initialises the centroids of a LUT.

Runs on the table of distinct values (weighted by counts), batched over all LUT groups,
so its cost does not grow with N beyond one histogram. d = 1 starts from K evenly spaced
values over each group's range (see `_range_seed` for why), d > 1 from
weighted k-means++; both then run Lloyd steps. Deterministic for a given seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional.autograd import TORCH_OPS, importance_mass
from edkm.functional.iterations import sq_dist
from edkm.functional.table import build_table


def kmeans_init(points: Tensor, k: int, iters: int = 30, seed: int = 0, importance: Tensor | None = None) -> Tensor:
    """Hard k-means centroids for every group.

    Args:
        points: (G, N, d) weights (any float dtype; NaN/Inf raise ``ValueError``).
        k: Number of centroids.
        iters: Lloyd iterations after the seeding.
        seed: Seed of the k-means++ sampling (d > 1).
        importance: Optional (G, N) non-negative per-point weights (sensitivity-weighted
            k-means, as SqueezeLLM): ``iters`` more Lloyd steps minimise
            ``sum_i s_i ||w_i - c||^2``, starting from the unweighted solution. Measured on
            SmolLM2-135M (4 bits, 16-row LUTs, Fisher of 32 windows): starting the weighted
            steps from the range seed instead stalls at a 39% higher weighted error and
            held-out perplexity (16 windows) 57.4 instead of 47.5, even with 100 steps.
    Returns:
        (G, k, d) centroids in the math dtype (fp32; fp64 for fp64 points). A group with
        fewer than k distinct values gets those values, repeated to fill the LUT.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    with torch.no_grad():
        table = build_table(points.detach())
        v, n = table.values, table.counts  # (G, U, d), (G, U); padding rows have n = 0
        gen = torch.Generator(device="cpu").manual_seed(seed)
        c = _range_seed(v, n, k) if v.shape[-1] == 1 else _kmeanspp_seed(v, n, k, gen)
        for _ in range(iters):
            c = _lloyd_step(v, n, c)
        if importance is not None:  # then weighted steps from the unweighted solution (see docstring)
            m = importance_mass(TORCH_OPS, points.detach(), table.index(), v.shape[1], importance.detach())
            for _ in range(iters):
                c = _lloyd_step(v, m, c)
        distinct = (n > 0).sum(1)  # (G,)
        for g in (distinct < k).nonzero().flatten().tolist():
            present = v[g][n[g] > 0]  # every distinct value becomes a centroid
            c[g] = present[torch.arange(k, device=v.device) % present.shape[0]]
        return c


def _range_seed(v: Tensor, n: Tensor, k: int) -> Tensor:
    """(G, k, 1): k evenly spaced values from each group's min to max.

    Spanning the range keeps centroids on the outlier weights that LLMs depend on; Lloyd
    steps then pull the inner ones to the mass. Measured on SmolLM2-135M, 4-bit LUTs per
    16 output channels, 30 Lloyd steps, held-out perplexity (fp: 34.6) after rounding to
    the nearest centroid: 95 with this seed, 2710 with equal-mass quantile seeds.
    """
    present = n > 0
    lo = torch.where(present, v[..., 0], torch.full_like(v[..., 0], float("inf"))).min(1).values  # (G,)
    hi = torch.where(present, v[..., 0], torch.full_like(v[..., 0], float("-inf"))).max(1).values
    t = torch.linspace(0, 1, k, dtype=v.dtype, device=v.device)
    return (lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * t).unsqueeze(-1)


def _kmeanspp_seed(v: Tensor, n: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """(G, k, d) weighted k-means++ seeds, sampled for all groups at once."""
    G, U, d = v.shape
    rows = torch.arange(G, device=v.device)

    def pick(weights: Tensor) -> Tensor:
        w = torch.where(weights.sum(1, keepdim=True) > 0, weights, n)  # all-zero rows: by count
        return torch.multinomial(w.cpu().double(), 1, generator=gen).squeeze(1).to(v.device)

    chosen = [v[rows, pick(n)]]  # (G, d)
    dist = sq_dist(v, chosen[0].unsqueeze(1))[..., 0]  # (G, U)
    for _ in range(1, k):
        chosen.append(v[rows, pick(n * dist)])
        dist = torch.minimum(dist, sq_dist(v, chosen[-1].unsqueeze(1))[..., 0])
    return torch.stack(chosen, 1)


def _lloyd_step(v: Tensor, n: Tensor, c: Tensor) -> Tensor:
    """One weighted Lloyd step for all groups; an empty cluster keeps its centroid."""
    G, k, d = c.shape
    if d == 1:  # nearest of sorted centroids = bucket between midpoints: O(U log k), no (G, U, k)
        cs, order = torch.sort(c[..., 0], dim=1)
        mids = ((cs[:, 1:] + cs[:, :-1]) / 2).contiguous()  # (G, k - 1)
        assign = torch.gather(order, 1, torch.searchsorted(mids, v[..., 0].contiguous()))  # (G, U)
    else:
        assign = sq_dist(v, c).argmin(-1)  # (G, U)
    mass = torch.zeros(G, k, dtype=v.dtype, device=v.device).scatter_add_(1, assign, n)
    num = torch.zeros(G, k, d, dtype=v.dtype, device=v.device)
    num.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), v * n.unsqueeze(-1))
    return torch.where(mass.unsqueeze(-1) > 0, num / mass.clamp_min(1e-30).unsqueeze(-1), c)

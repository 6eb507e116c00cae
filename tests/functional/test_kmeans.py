"""edkm.functional.kmeans: the d = 1 Lloyd step by prefix sums against a naive weighted Lloyd step."""

from __future__ import annotations

import torch

from edkm.functional.kmeans import _Sorted1D, kmeans_init
from edkm.functional.table import build_table


def _naive_step(v: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Each value to its nearest centroid, weighted mean per cluster in float64; empty keeps."""
    out = c.clone().double()
    for g in range(v.shape[0]):
        assign = (v[g, :, 0:1].double() - c[g, :, 0].double()).abs().argmin(1)  # (U,)
        for j in range(c.shape[1]):
            sel = assign == j
            mass = w[g, sel].double().sum()
            if mass > 0:
                out[g, j, 0] = (w[g, sel].double() * v[g, sel, 0].double()).sum() / mass
    return out.to(c.dtype)


def test_sorted_step_is_the_naive_weighted_lloyd_step():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(5, 40, 1, generator=gen)
    n = torch.randint(1, 5, (5, 40), generator=gen).float()
    n[1, 30:] = 0  # a group with padding rows (their values must not count)
    v[1, 30:] = -100.0
    w = n * torch.rand(5, 40, generator=gen)  # sensitivity weights, zero on padding
    c = torch.randn(5, 6, 1, generator=gen)
    c[2, 3] = 50.0  # an empty cluster keeps its centroid
    line = _Sorted1D(v)
    for weights in (n, w, n):  # the prefix sums follow the weights passed
        got = line.step(weights, c)
        torch.testing.assert_close(got, _naive_step(v, weights, c), rtol=1e-6, atol=1e-6)
        assert got[2, 3, 0] == 50.0
        c = got


def test_bf16_init_matches_naive_lloyd_iterations():
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(3, 300, 1, generator=gen) * 0.02).to(torch.bfloat16)
    s = torch.rand(3, 300, generator=gen)
    got = kmeans_init(w, 8, iters=6, importance=s)
    table = build_table(w)
    v, n = table.values, table.counts
    lo, hi = v[..., 0].where(n > 0, torch.inf).min(1).values, v[..., 0].where(n > 0, -torch.inf).max(1).values
    c = (lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 8)).unsqueeze(-1)
    for _ in range(6):
        c = _naive_step(v, n, c)
    mass = torch.zeros_like(n)  # importance summed per distinct value
    for g in range(3):
        for i in range(300):
            mass[g, (v[g, :, 0] == w[g, i, 0].float()) & (n[g] > 0)] += s[g, i]
    for _ in range(6):
        c = _naive_step(v, mass, c)
    torch.testing.assert_close(got, c, rtol=1e-5, atol=1e-7)

"""Uniquified DKM: forward and backward on the table of distinct values.

Forward (no autograd graph): build the table (`table.py`), run the iterations on its U
rows weighted by the counts, evaluate the soft value of every row
``h(v) = softmax(-||v - C_{T-1}||^2 / tau) C_T`` and gather it back to the N points.

Backward, with G_i the upstream gradient of point i and j(i) its row (DESIGN section 2):

    S_j     = sum_{i: j(i)=j} G_i                              # segment sum, (U, d)
    R_j     = d/dv_j of sum_j <S_j, a(stop_grad(v_j); C_{T-1}) C_T>
              (autograd replay of the iterations on the table: the path through the
               centroids, with all n_j copies of v_j moving together)
    J_j     = d h / d v at v_j with C_{T-1}, C_T fixed          # the per-element path
    dW_i    = G_i J_{j(i)} + R_{j(i)} / n_{j(i)}

The first term uses each point's own G_i; only the centroid path is shared by equal
values. Nothing of N x K elements is allocated in either direction: the autograd replay
holds O(iters * U * K) floats and the per-element passes stream in chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional import table as tbl
from edkm.functional.naive import dkm_iterations, soft_assign


def soft_value_jacobian(v: Tensor, c_prev: Tensor, c_last: Tensor, tau: float) -> Tensor:
    """Jacobian of ``h(v) = softmax(-||v - c_prev||^2 / tau) c_last`` w.r.t. ``v``.

    With z_k = -||v - c_k||^2 / tau, a = softmax(z) and g_k = dz_k/dv = -2 (v - c_k) / tau:
    ``J[e, f] = sum_k c_last[k, e] a_k (g_k[f] - sum_m a_m g_m[f])``.

    Args:
        v: (G, U, d) rows. c_prev, c_last: (G, K, d).
    Returns:
        (G, U) for d = 1, else (G, U, d, d) with J[..., e, f] = d h_e / d v_f.
    """
    a = soft_assign(v, c_prev, tau)  # (G, U, K)
    if v.shape[-1] == 1:
        g = (v - c_prev.transpose(1, 2)) * (-2.0 / tau)  # (G, U, K)
        centred = g - (a * g).sum(-1, keepdim=True)
        return torch.einsum("guk,gk->gu", a * centred, c_last[..., 0])
    g = (v.unsqueeze(2) - c_prev.unsqueeze(1)) * (-2.0 / tau)  # (G, U, K, d)
    centred = g - torch.einsum("guk,gukf->guf", a, g).unsqueeze(2)
    return torch.einsum("gke,guk,gukf->guef", c_last, a, centred)


class _UniqueDKM(torch.autograd.Function):
    """Autograd Function of the table path; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float):
        table = tbl.build_table(points)
        c0 = centroids.detach().to(table.values.dtype, copy=True)  # the caller may update it in place
        with torch.no_grad():
            a_last, _, c_last, iters = dkm_iterations(table.values, table.counts, c0, tau, max_iters, eps)
            rows = torch.einsum("guk,gkd->gud", a_last, c_last)  # (G, U, d)
        out = tbl.gather(table, points, rows, points.dtype)
        ctx.save_for_backward(points, c0)
        ctx.table, ctx.tau, ctx.iters = table, tau, iters
        ctx.mark_non_differentiable(c_last)
        return out, c_last

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_centroids: Tensor):
        points, c0 = ctx.saved_tensors
        table, tau = ctx.table, ctx.tau
        s = tbl.segment_sum(table, points, grad_out)  # (G, U, d)
        with torch.enable_grad():
            v = table.values.detach().requires_grad_(True)
            _, c_prev, c_last, _ = dkm_iterations(v, table.counts, c0, tau, ctx.iters, 0.0, n_iters=ctx.iters)
            rows = torch.einsum("guk,gkd->gud", soft_assign(v.detach(), c_prev, tau), c_last)
            (r,) = torch.autograd.grad((rows * s).sum(), v)  # (G, U, d)
        shared = r / table.counts.clamp_min(1.0).unsqueeze(-1)  # padding rows: r = 0
        jac = soft_value_jacobian(table.values, c_prev.detach(), c_last.detach(), tau)
        grad_points = tbl.element_grad(table, points, grad_out, jac, shared)
        return grad_points, None, None, None, None


def dkm_unique(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float) -> tuple[Tensor, Tensor]:
    """Uniquified DKM; same contract as `edkm.functional.naive.dkm_naive`."""
    out, c_last = _UniqueDKM.apply(points, centroids, tau, max_iters, eps)
    return out, c_last

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

With per-point importance s_i (sensitivity-weighted DKM) the rows weigh their mass
m_j = sum_{i: j(i)=j} s_i instead of n_j in the centroid sums, and the shared term
becomes s_i R_{j(i)} / m_{j(i)}.

The first term uses each point's own G_i; only the centroid path is shared by equal
values. Nothing of N x K elements is allocated in either direction: the autograd replay
holds O(iters * U * K) floats and the per-element passes stream in chunks.

`dkm_pattern` is the same math for bf16 / fp16 points with d = 1, written as a sequence of
plain-tensor passes (`PatternOps`): the Triton kernels of `edkm.kernels`, or their torch
twins (`twins.py`). The table backward there is the hand-derived one of the kernels, not
an autograd replay, and nothing per element is saved for backward but the weight itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from edkm.functional import table as tbl
from edkm.functional.iterations import dkm_iterations, soft_assign, soft_value_jacobian


class _UniqueDKM(torch.autograd.Function):
    """Autograd Function of the table path; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float, reduce=None,
                importance: Tensor | None = None):
        table = tbl.build_table(points)
        c0 = centroids.detach().to(table.values.dtype, copy=True)  # the caller may update it in place
        with torch.no_grad():
            mass = table.counts if importance is None else importance_mass(table, points, importance)
            a_last, _, c_last, iters = dkm_iterations(table.values, mass, c0, tau, max_iters, eps, reduce=reduce)
            rows = torch.einsum("guk,gkd->gud", a_last, c_last)  # (G, U, d)
        out = tbl.gather(table, points, rows, points.dtype)
        ctx.save_for_backward(points, c0, table.values, table.counts, table.patterns, table.inverse, mass)  # via hooks
        # importance: a constant the caller keeps (DKMWeight's buffer); held by reference so
        # saved-tensor offload does not copy it every step
        ctx.tau, ctx.iters, ctx.reduce, ctx.importance = tau, iters, reduce, importance
        ctx.mark_non_differentiable(c_last)
        return out, c_last

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_centroids: Tensor):
        points, c0, values, counts, patterns, inverse, mass = ctx.saved_tensors
        importance = ctx.importance
        table = tbl.Table(values, counts, patterns, inverse)
        tau = ctx.tau
        s = tbl.segment_sum(table, points, grad_out)  # (G, U, d)
        with torch.enable_grad():
            v = table.values.detach().requires_grad_(True)
            _, c_prev, c_last, _ = dkm_iterations(v, mass, c0, tau, ctx.iters, 0.0, n_iters=ctx.iters,
                                                  reduce=ctx.reduce)
            rows = torch.einsum("guk,gkd->gud", soft_assign(v.detach(), c_prev, tau), c_last)
            (r,) = torch.autograd.grad((rows * s).sum(), v)  # (G, U, d)
        # point i carries s_i / m_j of its row's weight in the centroid sums (s_i = 1, m_j = n_j
        # unweighted); rows of zero mass (padding, all-zero importance) have r = 0
        shared = r / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(-1)
        jac = soft_value_jacobian(table.values, c_prev.detach(), c_last.detach(), tau)
        grad_points = tbl.element_grad(table, points, grad_out, jac, shared, scale=importance)
        return grad_points, None, None, None, None, None, None


def dkm_unique(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float,
               reduce=None, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Uniquified DKM; same contract as `edkm.functional.naive.dkm_naive`."""
    out, c_last = _UniqueDKM.apply(points, centroids, tau, max_iters, eps, reduce, importance)
    return out, c_last


def importance_mass(table: tbl.Table, points: Tensor, importance: Tensor) -> Tensor:
    """``m_j = sum_{i: j(i)=j} s_i``: the importance mass of every table row, (G, U).

    With importance weights the rows weigh ``m_j`` in the centroid sums instead of their
    count ``n_j``; the table stays the table of distinct values.
    """
    s = importance.unsqueeze(-1).expand(*importance.shape, table.values.shape[-1])  # one weight per point
    return tbl.segment_sum(table, points, s)[..., 0]


@dataclass(frozen=True)
class PatternOps:
    """The passes of the 16-bit pattern path; see `twins.py` for their shapes and math.

    ``twins.TORCH_OPS`` fills it with the torch twins and `edkm.functional.triton_ops()`
    with the Triton launchers of `edkm.kernels` (same signatures), so `_PatternDKM` runs
    either unchanged.
    """

    histogram: Callable[..., Tensor]
    table_iterate: Callable[..., tuple[Tensor, Tensor]]
    table_rows: Callable[..., Tensor]
    gather_rows: Callable[..., Tensor]
    segment_sum: Callable[..., Tensor]
    table_bwd: Callable[..., tuple[Tensor, Tensor]]
    element_grad: Callable[..., Tensor]


class _PatternDKM(torch.autograd.Function):
    """Table path for bf16 / fp16 points with d = 1, as plain-tensor passes (`PatternOps`).

    Saved for backward: the points (the weight itself) and the O(U + iters * K) table;
    the (G, 65536) pattern -> row map is rebuilt in backward rather than held.
    """

    @staticmethod
    def forward(ctx, points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float, ops: PatternOps):
        x = points[..., 0]  # (G, N) view, d = 1
        table = tbl.table_from_histogram(ops.histogram(x), points.dtype)
        v, n = table.values[..., 0], table.counts  # (G, U), (G, U)
        c0 = centroids.detach()[..., 0].to(torch.float32)  # (G, K)
        if eps == 0.0:
            c_hist, den_hist = ops.table_iterate(v, n, c0, tau, max_iters)
        else:  # one launch per iteration, so the host can stop as `dkm_iterations` does
            cs, dens = [c0], []
            for t in range(max_iters):
                ch, dh = ops.table_iterate(v, n, cs[-1], tau, 1)
                cs.append(ch[:, 1])
                dens.append(dh[:, 0])
                if t + 1 < max_iters and (cs[-1] - cs[-2]).abs().max().item() <= eps:
                    break
            c_hist, den_hist = torch.stack(cs, 1), torch.stack(dens, 1)
        rows = ops.table_rows(v, c_hist[:, -2], c_hist[:, -1], tau)  # (G, U)
        out = ops.gather_rows(x, tbl.pattern_rowmap(table.patterns), rows)  # (G, N)
        c_last = c_hist[:, -1].unsqueeze(-1).clone()  # (G, K, 1)
        ctx.save_for_backward(points, v, n, table.patterns, c_hist, den_hist)
        ctx.tau, ctx.ops = tau, ops
        ctx.mark_non_differentiable(c_last)
        return out.unsqueeze(-1), c_last

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_centroids: Tensor):
        points, v, n, patterns, c_hist, den_hist = ctx.saved_tensors
        ops, x, g = ctx.ops, points[..., 0], grad_out[..., 0]  # (G, N) views
        rowmap = tbl.pattern_rowmap(patterns)
        seg = ops.segment_sum(x, g, rowmap, v.shape[1])  # (G, U)
        jac, shared = ops.table_bwd(v, n, seg, c_hist, den_hist, ctx.tau)
        grad_points = ops.element_grad(x, g, rowmap, jac, shared).unsqueeze(-1)  # (G, N, 1)
        return grad_points, None, None, None, None, None


def dkm_pattern(
    points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float, ops: PatternOps
) -> tuple[Tensor, Tensor]:
    """Uniquified DKM on bf16 / fp16 points with d = 1 through ``ops``.

    Same contract as `dkm_unique`; ``points`` (G, N, 1) must be bf16 or fp16.
    """
    if not tbl.uses_bit_patterns(points):
        raise ValueError(
            f"the pattern path needs bf16/fp16 points with d = 1, got {points.dtype} {tuple(points.shape)}"
        )
    out, c_last = _PatternDKM.apply(points, centroids, tau, max_iters, eps, ops)
    return out, c_last

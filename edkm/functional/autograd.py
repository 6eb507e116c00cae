"""The autograd Function of uniquified DKM: forward and backward on the table of distinct values.

Forward (no autograd graph): build the table, run the iterations on its U rows weighted
by their mass, evaluate the soft value of every row
``h(v) = softmax(-||v - C_{T-1}||^2 / tau) C_T`` and gather it back to the N points.

Backward, with G_i the upstream gradient of point i and j(i) its row (DESIGN section 2):

    S_j     = sum_{i: j(i)=j} G_i                              # segment sum, (U, d)
    R_j     = d/dv_j of sum_j <S_j, a(stop_grad(v_j); C_{T-1}) C_T>
              (back through the iterations on the table: the path through the
               centroids, with all n_j copies of v_j moving together)
    J_j     = d h / d v at v_j with C_{T-1}, C_T fixed          # the per-element path
    dW_i    = G_i J_{j(i)} + R_{j(i)} / n_{j(i)}

With per-point importance s_i (sensitivity-weighted DKM) the rows weigh their mass
m_j = sum_{i: j(i)=j} s_i instead of n_j in the centroid sums, and the shared term
becomes s_i R_{j(i)} / m_{j(i)}.

The first term uses each point's own G_i; only the centroid path is shared by equal
values. Nothing of N x K elements is allocated in either direction. Saved for backward:
the points DKM ran on (the weight itself, or with ``cast`` its 16-bit copy), the table's
values, counts and keys, and the centroid history; the index (pattern -> row lookup) is
rebuilt in backward rather than held. In ``rebuild`` mode only the caller's points (with
``cast``, the fp32 weight, resident anyway) and the centroid history are held, and
backward rebuilds the table. The ``cast`` and its backward run under ``edkm::cast``.

Who runs the passes is a `TableOps`: `TORCH_OPS` (the torch implementation in
`table.py`, the CPU path and the spec) or `edkm.functional.triton_ops()` (the Triton
kernels, same signatures). Each phase runs under a ``torch.profiler.record_function``
label (``edkm::table_build``, ``edkm::iterations``, ``edkm::soft_weights``,
``edkm::backward_replay``, ``edkm::element_grad``) that `bench/phases.py` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from edkm.functional import passes
from edkm.functional import table as tbl
from edkm.functional.iterations import Reduce


@dataclass(frozen=True)
class TableOps:
    """The passes of the table path (signatures and shapes: `edkm.functional.table`)."""

    build: Callable[[Tensor], tbl.Table]
    index: Callable[[tbl.Table], object]
    segment_sum: Callable[..., Tensor]
    gather_rows: Callable[..., Tensor]
    element_grad: Callable[..., Tensor]
    table_iterate: Callable[..., tuple[Tensor, Tensor]]
    table_forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    table_rows: Callable[..., Tensor]
    table_bwd: Callable[..., tuple[Tensor, Tensor]]


TORCH_OPS = TableOps(
    build=tbl.build_table,
    index=tbl.Table.index,
    segment_sum=tbl.segment_sum,
    gather_rows=tbl.gather_rows,
    element_grad=tbl.element_grad,
    table_iterate=passes.table_iterate,
    table_forward=passes.table_forward,
    table_rows=passes.table_rows,
    table_bwd=passes.table_bwd,
)


def _iterate(ops: TableOps, values: Tensor, mass: Tensor, c0: Tensor, tau: float, max_iters: int, eps: float,
             reduce: Reduce | None) -> tuple[Tensor, Tensor, Tensor]:
    """(c_hist, den_hist, rows) of up to ``max_iters`` iterations; with ``eps`` > 0, stop
    once no centroid moves more than ``eps`` (one pass per iteration, so the host can
    decide, then one pass for the rows)."""
    if eps == 0.0:
        return ops.table_forward(values, mass, c0, tau, max_iters, reduce)
    cs, dens = [c0], []
    for t in range(max_iters):
        ch, dh = ops.table_iterate(values, mass, cs[-1], tau, 1, reduce)
        cs.append(ch[:, 1])
        dens.append(dh[:, 0])
        if t + 1 < max_iters and (cs[-1] - cs[-2]).norm(dim=-1).max().item() <= eps:
            break
    rows = ops.table_rows(values, cs[-2], cs[-1], tau)
    return torch.stack(cs, 1), torch.stack(dens, 1), rows


class _TableDKM(torch.autograd.Function):
    """Autograd Function of the table path; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float, ops: TableOps,
                reduce: Reduce | None, importance: Tensor | None, cast: torch.dtype | None, rebuild: bool):
        with record_function("edkm::cast"):
            pts = points if cast is None else points.to(cast)
        with record_function("edkm::table_build"):
            table, index, mass = _build(ops, pts, importance)
        c0 = centroids.detach().to(table.values.dtype, copy=True)  # the caller may update it in place
        with record_function("edkm::iterations"):  # and the soft value of every row, (G, U, d)
            c_hist, den_hist, rows = _iterate(ops, table.values, mass, c0, tau, max_iters, eps, reduce)
        with record_function("edkm::soft_weights"):
            out = ops.gather_rows(pts, index, rows)
        c_last = c_hist[:, -1].clone()
        if rebuild:  # the caller's points (a view of the weight) and the centroid history only
            ctx.save_for_backward(points, c_hist, den_hist)
        else:  # via hooks
            ctx.save_for_backward(pts, table.values, table.counts, table.keys, mass, c_hist, den_hist)
        # importance: a constant the caller keeps (DKMWeight's buffer); held by reference so
        # saved-tensor offload does not copy it every step
        ctx.tau, ctx.ops, ctx.reduce, ctx.importance = tau, ops, reduce, importance
        ctx.bit_pattern, ctx.cast, ctx.rebuild, ctx.dtype = table.bit_pattern, cast, rebuild, points.dtype
        ctx.mark_non_differentiable(c_last)
        return out, c_last

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_centroids: Tensor):
        ops = ctx.ops
        with record_function("edkm::table_build"):
            if ctx.rebuild:
                points, c_hist, den_hist = ctx.saved_tensors
                pts = points if ctx.cast is None else points.to(ctx.cast)
                table, index, mass = _build(ops, pts, ctx.importance)
                values = table.values
            else:
                pts, values, counts, keys, mass, c_hist, den_hist = ctx.saved_tensors
                index = ops.index(tbl.Table(values, counts, keys, ctx.bit_pattern))
        with record_function("edkm::backward_replay"):
            seg = ops.segment_sum(pts, grad_out, index, values.shape[1])  # (G, U, d)
            jac, shared = ops.table_bwd(values, mass, seg, c_hist, den_hist, ctx.tau, ctx.reduce)
        with record_function("edkm::element_grad"):
            grad_points = ops.element_grad(pts, grad_out, index, jac, shared, ctx.importance)
        if ctx.cast is not None:  # the backward of the cast
            with record_function("edkm::cast"):
                grad_points = grad_points.to(ctx.dtype)
        return grad_points, None, None, None, None, None, None, None, None, None


def _build(ops: TableOps, points: Tensor, importance: Tensor | None
           ) -> tuple[tbl.Table, tbl.PatternIndex | Tensor, Tensor]:
    """``(table, index, mass)`` of ``points``: mass is the counts, or the importance mass."""
    table = ops.build(points)
    index = ops.index(table)
    U = table.values.shape[1]
    mass = table.counts if importance is None else importance_mass(ops, points, index, U, importance)
    return table, index, mass


def dkm_table(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float,
              reduce: Reduce | None = None, importance: Tensor | None = None,
              ops: TableOps = TORCH_OPS, cast: torch.dtype | None = None,
              rebuild: bool = False) -> tuple[Tensor, Tensor]:
    """Uniquified DKM; same contract as `edkm.functional.naive.dkm_naive`.

    Args:
        ops: Who runs the passes (`TORCH_OPS`, or `edkm.functional.triton_ops()` for bf16 /
            fp16 points with d = 1, without ``reduce`` or ``importance``).
        cast: Cluster ``points.to(cast)``; the gradient returns in ``points.dtype``.
        rebuild: Hold only ``points`` and the centroid history; rebuild the table in
            backward (see `edkm.functional.dkm`).
    """
    out, c_last = _TableDKM.apply(points, centroids, tau, max_iters, eps, ops, reduce, importance, cast, rebuild)
    return out, c_last


def importance_mass(ops: TableOps, points: Tensor, index: Tensor, n_rows: int, importance: Tensor) -> Tensor:
    """``m_j = sum_{i: j(i)=j} s_i``: the importance mass of every table row, (G, U).

    With importance weights the rows weigh ``m_j`` in the centroid sums instead of their
    count ``n_j``; the table stays the table of distinct values.
    """
    s = importance.unsqueeze(-1).expand(points.shape)  # one weight per point (G, N, d)
    return ops.segment_sum(points, s, index, n_rows)[..., 0]

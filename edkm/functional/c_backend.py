"""The C kernels of `edkm.ckernels` as `TableOps` (the CPU backend ``"c"``).

The table passes (iterations, row values, table backward: the O(U K) work) run in C for
d = 1 with fp32 math; for 16-bit points the per-element passes (table build, segment sum,
gather, element gradient: streams over the N weights) run in C too, keyed by the bit
pattern through a `CKeys` index (the table's own keys; nothing per element is held).
fp32 points keep the torch table build (``torch.unique``, an int32 inverse index) and the
torch per-element passes. The adapters add and drop the trailing d = 1 axis, so the
autograd Function runs every backend unchanged. Covers counted or importance-weighted
tables, one process (no ``reduce``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from edkm import ckernels
from edkm.functional import table as tbl
from edkm.functional.autograd import TORCH_OPS, TableOps


@dataclass
class CKeys:
    """The index of the C per-element passes: the table's (G, U) int64 row patterns."""

    keys: Tensor


def _build(points: Tensor) -> tbl.Table:
    """`table.build_table`: the C pattern table for 16-bit scalars (the same Table, bit for
    bit: sorted patterns, counts, fp32 values, -1 / 0 padding), torch otherwise."""
    if not tbl.uses_bit_patterns(points):
        return TORCH_OPS.build(points)
    keys, counts, values = ckernels.c_unique_patterns(points[..., 0].contiguous())
    return tbl.Table(values.unsqueeze(-1), counts, keys, True)


def _index(table: tbl.Table):
    return CKeys(table.keys) if table.bit_pattern else TORCH_OPS.index(table)


def _segment_sum(points: Tensor, grad: Tensor, index, n_rows: int) -> Tensor:
    if not isinstance(index, CKeys):
        return TORCH_OPS.segment_sum(points, grad, index, n_rows)
    return ckernels.c_segment_sum(points[..., 0].contiguous(), index.keys, grad[..., 0].contiguous()).unsqueeze(-1)


def _gather_rows(points: Tensor, index, rows: Tensor) -> Tensor:
    if not isinstance(index, CKeys):
        return TORCH_OPS.gather_rows(points, index, rows)
    return ckernels.c_gather_rows(points[..., 0].contiguous(), index.keys, rows[..., 0]).unsqueeze(-1)


def _element_grad(points: Tensor, grad: Tensor, index, jac: Tensor, shared: Tensor,
                  scale: Tensor | None = None) -> Tensor:
    if not isinstance(index, CKeys):
        return TORCH_OPS.element_grad(points, grad, index, jac, shared, scale)
    bf16 = points.dtype == torch.bfloat16  # the kernel rounds to bf16 itself; fp16 is cast here
    out = ckernels.c_element_grad(points[..., 0].contiguous(), index.keys, grad[..., 0].contiguous(),
                                  jac.contiguous(), shared[..., 0].contiguous(),
                                  None if scale is None else scale.contiguous(),
                                  out_dtype=torch.bfloat16 if bf16 else torch.float32)
    return out.to(points.dtype).unsqueeze(-1)  # one rounding of the fp32 value, as the torch pass


def _no_reduce(reduce) -> None:
    if reduce is not None:
        raise ValueError("the C table passes run in one process; sharded DKM uses backend='torch'")


def _table_forward(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce=None):
    _no_reduce(reduce)
    c_hist, den_hist, rows = ckernels.c_table_forward(values[..., 0].contiguous(), mass.contiguous(),
                                                      c0[..., 0].contiguous(), tau, n_iters)
    return c_hist.unsqueeze(-1), den_hist, rows.unsqueeze(-1)


def _table_iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce=None):
    _no_reduce(reduce)
    c_hist, den_hist = ckernels.c_table_iterate(values[..., 0].contiguous(), mass.contiguous(),
                                                c0[..., 0].contiguous(), tau, n_iters)
    return c_hist.unsqueeze(-1), den_hist


def _table_bwd(values: Tensor, mass: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float,
               reduce=None) -> tuple[Tensor, Tensor]:
    _no_reduce(reduce)
    jac, shared = ckernels.c_table_bwd(values[..., 0].contiguous(), mass.contiguous(), seg[..., 0].contiguous(),
                                       c_hist[..., 0].contiguous(), den_hist.contiguous(), tau)
    return jac, shared.unsqueeze(-1)


@lru_cache(maxsize=None)
def c_ops() -> TableOps:
    """The C passes as `TableOps` (per-element passes in C for 16-bit points only).

    ``table_rows`` (used only with early stopping, ``eps`` > 0) stays the torch pass: it is
    one map evaluation after the iterations.
    """
    return TableOps(
        build=_build,
        index=_index,
        segment_sum=_segment_sum,
        gather_rows=_gather_rows,
        element_grad=_element_grad,
        table_iterate=_table_iterate,
        table_forward=_table_forward,
        table_rows=TORCH_OPS.table_rows,
        table_bwd=_table_bwd,
    )

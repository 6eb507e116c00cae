"""The C table kernels of `edkm.ckernels` as `TableOps` (the CPU backend ``"c"``).

The table passes (iterations, row values, table backward: the O(U K) work that dominates a
DKM step on the CPU) run in C; the per-element passes (table build, segment sum, gather,
element gradient: memory-bound streams over the N weights) stay the torch ones of
`edkm.functional.table`. The adapters add and drop the trailing d = 1 axis, so the
autograd Function runs either backend unchanged. Covers d = 1 with fp32 math (bf16 / fp16 /
fp32 points; fp64 stays on torch), counted or importance-weighted tables, one process (no
``reduce``).
"""

from __future__ import annotations

from functools import lru_cache

from torch import Tensor

from edkm import ckernels
from edkm.functional.autograd import TORCH_OPS, TableOps


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
    """The C table passes with the torch per-element passes, as `TableOps`.

    ``table_rows`` (used only with early stopping, ``eps`` > 0) stays the torch pass: it is
    one map evaluation after the iterations.
    """
    return TableOps(
        build=TORCH_OPS.build,
        index=TORCH_OPS.index,
        segment_sum=TORCH_OPS.segment_sum,
        gather_rows=TORCH_OPS.gather_rows,
        element_grad=TORCH_OPS.element_grad,
        table_iterate=_table_iterate,
        table_forward=_table_forward,
        table_rows=TORCH_OPS.table_rows,
        table_bwd=_table_bwd,
    )

"""The Triton kernels of `edkm.kernels` as `TableOps`, with the torch signatures of `table.py`.

The launchers take (G, N) / (G, U) / (G, K) tensors (d = 1); these adapters add and drop
the trailing d = 1 axis so the autograd Function runs either backend unchanged. The
kernels cover bf16 / fp16 points with d = 1, counted (not importance-weighted) tables and
one process (no ``reduce``). Importing this module imports triton.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from edkm import kernels
from edkm.functional import table as tbl
from edkm.functional.autograd import TableOps


def _index(table: tbl.Table) -> Tensor:
    """The (G, 65536) int32 pattern -> row map the kernels read (built once per direction)."""
    return tbl.pattern_rowmap(table.keys)


def _torch_segment_sum(points: Tensor, grad: Tensor, index: Tensor, n_rows: int) -> Tensor:
    """`table.segment_sum` (deterministic ``index_add_``) reading the kernels' row map."""
    identity = torch.arange(tbl.N_PATTERNS, dtype=torch.int32, device=index.device)
    return tbl.segment_sum(points, grad, tbl.PatternIndex(identity, index), n_rows)


def _build(points: Tensor) -> tbl.Table:
    return tbl.table_from_histogram(kernels.triton_histogram(points[..., 0]), points.dtype)


def _segment_sum(points: Tensor, grad: Tensor, index: Tensor, n_rows: int) -> Tensor:
    return kernels.triton_segment_sum(points[..., 0], grad[..., 0], index, n_rows).unsqueeze(-1)


def _gather_rows(points: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    return kernels.triton_gather_rows(points[..., 0], index, rows[..., 0]).unsqueeze(-1)


def _element_grad(points: Tensor, grad: Tensor, index: Tensor, jac: Tensor, shared: Tensor,
                  scale: Tensor | None = None) -> Tensor:
    if scale is not None:
        raise ValueError("the Triton element gradient takes no importance scale; use backend='torch'")
    return kernels.triton_element_grad(points[..., 0], grad[..., 0], index, jac, shared[..., 0]).unsqueeze(-1)


def _no_reduce(reduce) -> None:
    if reduce is not None:
        raise ValueError("the Triton table passes run in one process; sharded DKM uses backend='torch'")


def _table_iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce=None):
    _no_reduce(reduce)
    c_hist, den_hist = kernels.triton_table_iterate(values[..., 0], mass, c0[..., 0], tau, n_iters)
    return c_hist.unsqueeze(-1), den_hist


def _table_forward(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce=None):
    c_hist, den_hist = _table_iterate(values, mass, c0, tau, n_iters, reduce)
    return c_hist, den_hist, _table_rows(values, c_hist[:, -2], c_hist[:, -1], tau)


def _table_rows(values: Tensor, c_prev: Tensor, c_last: Tensor, tau: float) -> Tensor:
    return kernels.triton_table_rows(values[..., 0], c_prev[..., 0], c_last[..., 0], tau).unsqueeze(-1)


def _table_bwd(values: Tensor, mass: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float,
               reduce=None) -> tuple[Tensor, Tensor]:
    _no_reduce(reduce)
    jac, shared = kernels.triton_table_bwd(values[..., 0], mass, seg[..., 0], c_hist[..., 0], den_hist, tau)
    return jac, shared.unsqueeze(-1)


@lru_cache(maxsize=None)
def triton_ops(deterministic: bool = False) -> TableOps:
    """The Triton passes as `TableOps`.

    Args:
        deterministic: Run the segment sum in torch (``index_add_``, deterministic under
            ``torch.use_deterministic_algorithms(True)``) instead of the kernel, whose fp32
            atomics can change the last bits of the gradient from run to run on a GPU.
            Every other pass is deterministic already.
    """
    return TableOps(
        build=_build,
        index=_index,
        segment_sum=_torch_segment_sum if deterministic else _segment_sum,
        gather_rows=_gather_rows,
        element_grad=_element_grad,
        table_iterate=_table_iterate,
        table_forward=_table_forward,
        table_rows=_table_rows,
        table_bwd=_table_bwd,
    )

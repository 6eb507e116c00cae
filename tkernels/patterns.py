"""Per-element passes of uniquified DKM, keyed by each weight's own 16-bit pattern.

Points are bf16 / fp16 (G, N) (d = 1). A point's table row is ``rowmap[g, pattern]``,
where rowmap (G, 65536) int32 is built from the table (`edkm.functional.table.pattern_rowmap`, via `triton_backend`); no
per-element index is ever stored. In torch form (twins in `edkm.functional.table`):

    p = points.view(torch.int16).int() & 0xFFFF                     # (G, N) keys
    hist[g].index_add_(0, p[g], ones)           # histogram     -> (G, 65536) int32
    seg[g].index_add_(0, rowmap[g, p[g]], grad[g].float())   # segment sum -> (G, U) fp32
    out = rows.gather(1, rowmap.gather(1, p)).to(points.dtype)        # gather (forward)
    dW  = (grad.float() * jac[g, r] + shared[g, r]).to(points.dtype)  # element grad, r = row

Two kernels, each with a constexpr variant flag:
- `_scatter_add_kernel` (WEIGHTED=False: histogram keyed by pattern, +1 int32;
  WEIGHTED=True: segment sum keyed by row, +grad fp32). Atomics: integer counts are
  exact and deterministic; fp32 segment sums are exact to rounding but their order, and
  so their last bits, can change from run to run on a GPU.
- `_row_gather_kernel` (GRAD=False: out = rows[r]; GRAD=True: out = grad * jac[r] +
  shared[r]).

Grid (cdiv(N, BLOCK_N), G): blocks on axis 0 (up to 2**31 - 1), groups on axis 1 (up to
65,535), so all LUT groups go in one launch. Bytes per point: histogram reads 2; segment
sum reads 2 + 2; gather reads 2, writes 2; element grad reads 2 + 2, writes 2. Table
lookups hit cache: the present patterns of a weight tensor form a few contiguous pattern
ranges (~4K entries, a few tens of KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels.common import N_PATTERNS, _from_f32, _pattern, _to_f32, check_device, check_points, check_shape

# Points per program: 1024 x 2 B loads per tensor keep 4 warps streaming (8 elements per
# thread). GPU tuning owed (bench/kernels.py).
BLOCK_N = 1024


@triton.jit
def _scatter_add_kernel(
    points_ptr, grad_ptr, rowmap_ptr, out_ptr,
    N,
    stride_pg, stride_pn,
    stride_gg, stride_gn,
    stride_mg, stride_mp,
    stride_og, stride_ou,
    WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    x = tl.load(points_ptr + g * stride_pg + offs.to(tl.int64) * stride_pn, mask=ok, other=0.0)
    key = _pattern(x)
    if WEIGHTED:
        row = tl.load(rowmap_ptr + g * stride_mg + key * stride_mp, mask=ok, other=0)
        val = _to_f32(tl.load(grad_ptr + g * stride_gg + offs.to(tl.int64) * stride_gn, mask=ok, other=0.0))
        tl.atomic_add(out_ptr + g * stride_og + row * stride_ou, val, mask=ok, sem="relaxed")
    else:
        ones = tl.full([BLOCK_N], 1, dtype=tl.int32)
        tl.atomic_add(out_ptr + g * stride_og + key * stride_ou, ones, mask=ok, sem="relaxed")


@triton.jit
def _row_gather_kernel(
    points_ptr, grad_ptr, rowmap_ptr, rows_ptr, shared_ptr, out_ptr,
    N,
    stride_pg, stride_pn,
    stride_gg, stride_gn,
    stride_mg, stride_mp,
    stride_rg, stride_ru,
    stride_sg, stride_su,
    stride_og, stride_on,
    GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = offs < N
    x = tl.load(points_ptr + g * stride_pg + offs * stride_pn, mask=ok, other=0.0)
    row = tl.load(rowmap_ptr + g * stride_mg + _pattern(x) * stride_mp, mask=ok, other=0)
    val = tl.load(rows_ptr + g * stride_rg + row * stride_ru, mask=ok, other=0.0)  # fp32
    if GRAD:
        gi = _to_f32(tl.load(grad_ptr + g * stride_gg + offs * stride_gn, mask=ok, other=0.0))
        val = gi * val + tl.load(shared_ptr + g * stride_sg + row * stride_su, mask=ok, other=0.0)
    # The one cast: fp32 result -> the points' 16-bit dtype (round to nearest even).
    tl.store(out_ptr + g * stride_og + offs * stride_on, _from_f32(val, out_ptr.dtype.element_ty), mask=ok)


def _check_rowmap(name: str, points: torch.Tensor, rowmap: torch.Tensor) -> None:
    check_shape(f"{name}: rowmap", rowmap, (points.shape[0], N_PATTERNS), torch.int32)


def triton_histogram(points: torch.Tensor) -> torch.Tensor:
    """Counts of every 16-bit pattern per group.

    Args:
        points: (G, N) bf16 / fp16.
    Returns:
        (G, 65536) int32.
    """
    check_points("triton_histogram", points)
    check_device("triton_histogram", points)
    G, N = points.shape
    hist = torch.zeros(G, N_PATTERNS, dtype=torch.int32, device=points.device)
    _scatter_add_kernel[(triton.cdiv(N, BLOCK_N), G)](
        points, points, hist, hist,  # grad / rowmap unused (WEIGHTED=False)
        N,
        points.stride(0), points.stride(1),
        0, 0,
        0, 0,
        hist.stride(0), hist.stride(1),
        WEIGHTED=False, BLOCK_N=BLOCK_N,
    )
    return hist


def triton_segment_sum(points: torch.Tensor, grad: torch.Tensor, rowmap: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row sums of the upstream gradient, ``S[g, rowmap[g, p_i]] += grad[g, i]``.

    Args:
        points: (G, N) bf16 / fp16. grad: (G, N) any float dtype, any strides (an
            expanded gradient with stride 0 works). rowmap: (G, 65536) int32.
        n_rows: U, the table length.
    Returns:
        (G, U) fp32 (summation order, and so the last bits, can vary on a GPU).
    """
    check_points("triton_segment_sum", points)
    check_device("triton_segment_sum", points, grad, rowmap)
    check_shape("triton_segment_sum: grad", grad, tuple(points.shape))
    _check_rowmap("triton_segment_sum", points, rowmap)
    G, N = points.shape
    seg = torch.zeros(G, n_rows, dtype=torch.float32, device=points.device)
    _scatter_add_kernel[(triton.cdiv(N, BLOCK_N), G)](
        points, grad, rowmap, seg,
        N,
        points.stride(0), points.stride(1),
        grad.stride(0), grad.stride(1),
        rowmap.stride(0), rowmap.stride(1),
        seg.stride(0), seg.stride(1),
        WEIGHTED=True, BLOCK_N=BLOCK_N,
    )
    return seg


def _row_gather(
    name: str,
    points: torch.Tensor,
    grad: torch.Tensor | None,
    rowmap: torch.Tensor,
    rows: torch.Tensor,
    shared: torch.Tensor | None,
) -> torch.Tensor:
    check_points(name, points)
    tensors = [t for t in (points, grad, rowmap, rows, shared) if t is not None]
    check_device(name, *tensors)
    _check_rowmap(name, points, rowmap)
    G, N = points.shape
    check_shape(f"{name}: table", rows, (G, rows.shape[1]), torch.float32)
    if grad is not None:
        check_shape(f"{name}: grad", grad, (G, N))
        check_shape(f"{name}: shared", shared, tuple(rows.shape), torch.float32)
    out = torch.empty(G, N, dtype=points.dtype, device=points.device)
    gr = grad if grad is not None else points
    sh = shared if shared is not None else rows
    _row_gather_kernel[(triton.cdiv(N, BLOCK_N), G)](
        points, gr, rowmap, rows, sh, out,
        N,
        points.stride(0), points.stride(1),
        gr.stride(0), gr.stride(1),
        rowmap.stride(0), rowmap.stride(1),
        rows.stride(0), rows.stride(1),
        sh.stride(0), sh.stride(1),
        out.stride(0), out.stride(1),
        GRAD=grad is not None, BLOCK_N=BLOCK_N,
    )
    return out


def triton_gather_rows(points: torch.Tensor, rowmap: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[g, i] = rows[g, rowmap[g, p_i]]`` in ``points.dtype`` (the forward output).

    Args:
        points: (G, N) bf16 / fp16. rowmap: (G, 65536) int32. rows: (G, U) fp32.
    Returns:
        (G, N) in ``points.dtype``.
    """
    return _row_gather("triton_gather_rows", points, None, rowmap, rows, None)


def triton_element_grad(
    points: torch.Tensor, grad: torch.Tensor, rowmap: torch.Tensor, jac: torch.Tensor, shared: torch.Tensor
) -> torch.Tensor:
    """``dW[g, i] = grad[g, i] * jac[g, r] + shared[g, r]`` with ``r = rowmap[g, p_i]``.

    Args:
        points: (G, N) bf16 / fp16. grad: (G, N), any strides. rowmap: (G, 65536) int32.
        jac, shared: (G, U) fp32 from `triton_table_bwd`.
    Returns:
        (G, N) in ``points.dtype``.
    """
    return _row_gather("triton_element_grad", points, grad, rowmap, jac, shared)

"""Table forward of uniquified DKM (d = 1): the k-means iterations and the row values.

The table holds U distinct values v (G, U) with counts n (G, U) per LUT group; padding
rows have n = 0. In torch form (twins: `edkm.functional.passes.table_iterate`,
`table_rows`):

    for t in range(T):                                   # _table_iterate_kernel
        a = softmax(-(v[:, :, None] - c[:, None, :])**2 / tau, dim=-1)   # (G, U, K)
        den = (n[:, :, None] * a).sum(1)                                 # (G, K)
        num = (n[:, :, None] * a * v[:, :, None]).sum(1)                 # (G, K)
        c = torch.where(den >= MIN_MASS, num / den, c)  # a centroid with (almost) no mass stays
        c_hist[:, t + 1], den_hist[:, t] = c, den
    h = softmax(-(v[:, :, None] - c_hist[:, T-1, None, :])**2 / tau) @ c_hist[:, T]   # _table_rows_kernel

Grids: iterations (G,), one program per group running all T iterations over the table in
BLOCK_U tiles (a group's reduction stays in one program: deterministic, no atomics, one
launch for all iterations, or one per iteration when the caller stops early on eps; the
table is small, U <= 65,536 and a few thousand for bf16 LLaMA weights). With one group
this runs on one SM: an (G, splits) grid with a second reduction is the follow-up if GPU
timings show the table passes matter next to the per-element ones.
Rows: (cdiv(U, BLOCK_U), G), no reduction across rows.

Limits: d = 1, K <= 256, fp32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels.common import MIN_MASS, _soft_assign, block_k, block_u, check_device, check_shape


@triton.jit
def _table_iterate_kernel(
    values_ptr, counts_ptr, c0_ptr, c_hist_ptr, den_hist_ptr,
    U, K, n_iters, tau,
    stride_vg, stride_vu,
    stride_ng, stride_nu,
    stride_cg, stride_ck,
    stride_hg, stride_ht, stride_hk,
    stride_dg, stride_dt, stride_dk,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c = tl.load(c0_ptr + g * stride_cg + ks * stride_ck, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(c_hist_ptr + g * stride_hg + ks * stride_hk, c, mask=k_ok)
    for t in range(n_iters):
        num = tl.zeros([BLOCK_K], dtype=tl.float32)
        den = tl.zeros([BLOCK_K], dtype=tl.float32)
        for u0 in range(0, U, BLOCK_U):
            us = u0 + tl.arange(0, BLOCK_U)
            u_ok = us < U
            v = tl.load(values_ptr + g * stride_vg + us * stride_vu, mask=u_ok, other=0.0)
            n = tl.load(counts_ptr + g * stride_ng + us * stride_nu, mask=u_ok, other=0.0)
            a, _ = _soft_assign(v, c, k_ok, tau)
            w = a * n[:, None]  # (BLOCK_U, BLOCK_K) count-weighted map
            num += tl.sum(w * v[:, None], axis=0)
            den += tl.sum(w, axis=0)
        live = den >= MIN_MASS
        c = tl.where(live, num / tl.where(live, den, 1.0), c)
        tl.store(c_hist_ptr + g * stride_hg + (t + 1) * stride_ht + ks * stride_hk, c, mask=k_ok)
        tl.store(den_hist_ptr + g * stride_dg + t * stride_dt + ks * stride_dk, den, mask=k_ok)


@triton.jit
def _table_rows_kernel(
    values_ptr, c_prev_ptr, c_last_ptr, rows_ptr,
    U, K, tau,
    stride_vg, stride_vu,
    stride_pg, stride_pk,
    stride_lg, stride_lk,
    stride_rg, stride_ru,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_u = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c_prev = tl.load(c_prev_ptr + g * stride_pg + ks * stride_pk, mask=k_ok, other=0.0)
    c_last = tl.load(c_last_ptr + g * stride_lg + ks * stride_lk, mask=k_ok, other=0.0)
    us = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = us < U
    v = tl.load(values_ptr + g * stride_vg + us * stride_vu, mask=u_ok, other=0.0)
    a, _ = _soft_assign(v, c_prev, k_ok, tau)
    h = tl.sum(a * c_last[None, :], axis=1)  # (BLOCK_U,)
    tl.store(rows_ptr + g * stride_rg + us * stride_ru, h, mask=u_ok)


def triton_table_iterate(
    values: torch.Tensor, counts: torch.Tensor, c0: torch.Tensor, tau: float, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``n_iters`` count-weighted soft k-means iterations on the table, one launch.

    Args:
        values, counts: (G, U) fp32 table rows and multiplicities.
        c0: (G, K) starting centroids.
        tau: Softmax temperature. n_iters: Iterations, >= 1.
    Returns:
        ``(c_hist, den_hist)``: (G, n_iters + 1, K) fp32 centroids (c_hist[:, 0] = c0)
        and (G, n_iters, K) fp32 denominators.
    """
    G, U = values.shape
    K = c0.shape[1]
    check_device("triton_table_iterate", values, counts, c0)
    check_shape("triton_table_iterate: values", values, (G, U), torch.float32)
    check_shape("triton_table_iterate: counts", counts, (G, U), torch.float32)
    check_shape("triton_table_iterate: c0", c0, (G, K))
    if n_iters < 1:
        raise ValueError(f"triton_table_iterate: n_iters must be >= 1, got {n_iters}")
    c_hist = torch.empty(G, n_iters + 1, K, dtype=torch.float32, device=values.device)
    den_hist = torch.empty(G, n_iters, K, dtype=torch.float32, device=values.device)
    _table_iterate_kernel[(G,)](
        values, counts, c0, c_hist, den_hist,
        U, K, n_iters, float(tau),
        values.stride(0), values.stride(1),
        counts.stride(0), counts.stride(1),
        c0.stride(0), c0.stride(1),
        c_hist.stride(0), c_hist.stride(1), c_hist.stride(2),
        den_hist.stride(0), den_hist.stride(1), den_hist.stride(2),
        BLOCK_U=block_u(K), BLOCK_K=block_k(K),
    )
    return c_hist, den_hist


def triton_table_rows(values: torch.Tensor, c_prev: torch.Tensor, c_last: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft value of every table row, ``softmax(-(v - c_prev)**2 / tau) . c_last``.

    Args:
        values: (G, U) fp32. c_prev, c_last: (G, K) fp32 (views are fine).
    Returns:
        (G, U) fp32.
    """
    G, U = values.shape
    K = c_prev.shape[1]
    check_device("triton_table_rows", values, c_prev, c_last)
    check_shape("triton_table_rows: values", values, (G, U), torch.float32)
    check_shape("triton_table_rows: c_prev", c_prev, (G, K), torch.float32)
    check_shape("triton_table_rows: c_last", c_last, (G, K), torch.float32)
    rows = torch.empty(G, U, dtype=torch.float32, device=values.device)
    grid = (triton.cdiv(U, block_u(K)), G)
    _table_rows_kernel[grid](
        values, c_prev, c_last, rows,
        U, K, float(tau),
        values.stride(0), values.stride(1),
        c_prev.stride(0), c_prev.stride(1),
        c_last.stride(0), c_last.stride(1),
        rows.stride(0), rows.stride(1),
        BLOCK_U=block_u(K), BLOCK_K=block_k(K),
    )
    return rows

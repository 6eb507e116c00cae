"""Table backward of uniquified DKM (d = 1): back through the final map and every iteration.

Given S (G, U), the upstream gradient summed per table row, and the forward's history
(c_hist (G, T+1, K), den_hist (G, T, K)), with L = sum_j S_j h_j and
h_j = a(v_j; C_{T-1}) . C_T. In torch form (twin: `edkm.functional.passes.table_bwd`, the same
math a block of groups at a time):

    # final map (a from C_{T-1}); its map is held fixed for the per-element path
    a = softmax(-(v[..., None] - C[T-1])**2 / tau); h = a @ C[T]; diff = v[..., None] - C[T-1]
    gC[T]    = (S[..., None] * a).sum(U)
    gC[T-1]  = (S[..., None] * a * (C[T] - h[..., None]) * 2 * diff / tau).sum(U)
    gk       = -2 * diff / tau
    jac      = (a * (gk - (a * gk).sum(K, keepdim)) * C[T]).sum(K)     # dh/dv per element
    # iteration t = T..1 maps C[t-1] -> C[t] = num / den (num = (n a v).sum(U), den = (n a).sum(U))
    e        = where(den[t] >= MIN_MASS, gC[t] / den[t], 0)
    a, diff  = softmax(-(v[..., None] - C[t-1])**2 / tau), v[..., None] - C[t-1]
    ga       = n[..., None] * e * (v[..., None] - C[t])                  # dL/da
    gz       = a * (ga - (a * ga).sum(K, keepdim))                      # softmax backward
    R       += n * (a * e).sum(K) - 2 / tau * (gz * diff).sum(K)
    gC[t-1] += 2 / tau * (gz * diff).sum(U) + where(den[t] >= MIN_MASS, 0, gC[t])  # empty passes through
    shared   = R / max(n, 1)

Grid (G,): one program per group walks the table in BLOCK_U tiles once for the final map
and once per iteration, in one launch; the K-vectors gC stay in registers and R is
accumulated in the output (each row is owned by one program, so no atomics, and the
result is deterministic). This replaces an autograd replay of ~10 small torch kernels per
iteration with one launch.

Limits: d = 1, K <= 256, fp32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels.common import MIN_MASS, _soft_assign, block_k, block_u, check_device, check_shape


@triton.jit
def _table_bwd_kernel(
    values_ptr, counts_ptr, seg_ptr, c_hist_ptr, den_hist_ptr, jac_ptr, shared_ptr,
    U, K, n_iters, tau,
    stride_vg, stride_vu,
    stride_ng, stride_nu,
    stride_sg, stride_su,
    stride_hg, stride_ht, stride_hk,
    stride_dg, stride_dt, stride_dk,
    stride_jg, stride_ju,
    stride_rg, stride_ru,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c_hist_g = c_hist_ptr + g * stride_hg
    two_over_tau = 2.0 / tau

    # Final map: gradients to C_T and C_{T-1}, and the per-element Jacobian.
    c_prev = tl.load(c_hist_g + (n_iters - 1) * stride_ht + ks * stride_hk, mask=k_ok, other=0.0)
    c_last = tl.load(c_hist_g + n_iters * stride_ht + ks * stride_hk, mask=k_ok, other=0.0)
    g_last = tl.zeros([BLOCK_K], dtype=tl.float32)
    g_prev_map = tl.zeros([BLOCK_K], dtype=tl.float32)
    for u0 in range(0, U, BLOCK_U):
        us = u0 + tl.arange(0, BLOCK_U)
        u_ok = us < U
        v = tl.load(values_ptr + g * stride_vg + us * stride_vu, mask=u_ok, other=0.0)
        s = tl.load(seg_ptr + g * stride_sg + us * stride_su, mask=u_ok, other=0.0)
        a, diff = _soft_assign(v, c_prev, k_ok, tau)
        h = tl.sum(a * c_last[None, :], axis=1)  # (BLOCK_U,)
        sa = s[:, None] * a
        g_last += tl.sum(sa, axis=0)
        g_prev_map += tl.sum(sa * (c_last[None, :] - h[:, None]) * diff, axis=0) * two_over_tau
        gk = diff * -two_over_tau  # dz/dv
        centred = gk - tl.sum(a * gk, axis=1)[:, None]
        jac = tl.sum(a * centred * c_last[None, :], axis=1)
        tl.store(jac_ptr + g * stride_jg + us * stride_ju, jac, mask=u_ok)

    # Iterations T..1, each one pass over the table; R accumulates in shared_ptr.
    g_c = g_last
    for i in range(n_iters):
        t = n_iters - i  # iteration t maps C_{t-1} -> C_t
        c_prev = tl.load(c_hist_g + (t - 1) * stride_ht + ks * stride_hk, mask=k_ok, other=0.0)
        c_new = tl.load(c_hist_g + t * stride_ht + ks * stride_hk, mask=k_ok, other=0.0)
        den = tl.load(den_hist_ptr + g * stride_dg + (t - 1) * stride_dt + ks * stride_dk, mask=k_ok, other=0.0)
        live = den >= MIN_MASS
        e = tl.where(live, g_c / tl.where(live, den, 1.0), 0.0)  # dL/dnum; dL/dden = -e * c_new
        g_prev = tl.zeros([BLOCK_K], dtype=tl.float32)
        for u0 in range(0, U, BLOCK_U):
            us = u0 + tl.arange(0, BLOCK_U)
            u_ok = us < U
            v = tl.load(values_ptr + g * stride_vg + us * stride_vu, mask=u_ok, other=0.0)
            n = tl.load(counts_ptr + g * stride_ng + us * stride_nu, mask=u_ok, other=0.0)
            a, diff = _soft_assign(v, c_prev, k_ok, tau)
            ga = n[:, None] * e[None, :] * (v[:, None] - c_new[None, :])  # dL/da
            gz = a * (ga - tl.sum(a * ga, axis=1)[:, None])  # dL/dz
            gzd = gz * diff
            r = n * tl.sum(a * e[None, :], axis=1) - tl.sum(gzd, axis=1) * two_over_tau
            g_prev += tl.sum(gzd, axis=0) * two_over_tau
            r_ptrs = shared_ptr + g * stride_rg + us * stride_ru
            r += tl.load(r_ptrs, mask=u_ok & (i > 0), other=0.0)
            r = tl.where(i == n_iters - 1, r / tl.maximum(n, 1.0), r)  # last pass: R / n
            tl.store(r_ptrs, r, mask=u_ok)
        g_c = g_prev + tl.where(live, 0.0, g_c) + tl.where(i == 0, g_prev_map, 0.0)  # C_{T-1} also feeds the map
        tl.debug_barrier()  # this pass's R stores before the next pass's loads


def triton_table_bwd(
    values: torch.Tensor,
    counts: torch.Tensor,
    seg: torch.Tensor,
    c_hist: torch.Tensor,
    den_hist: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the table through the final map and all iterations, one launch.

    Args:
        values, counts: (G, U) fp32 table. seg: (G, U) fp32 per-row sums of the upstream
            gradient. c_hist: (G, T + 1, K), den_hist: (G, T, K) from the forward.
        tau: Softmax temperature.
    Returns:
        ``(jac, shared)``, both (G, U) fp32: the per-element Jacobian dh/dv and
        ``R / max(n, 1)``, the gradient shared by the copies of a row.
    """
    G, U = values.shape
    T, K = den_hist.shape[1], den_hist.shape[2]
    check_device("triton_table_bwd", values, counts, seg, c_hist, den_hist)
    for name, t in (("values", values), ("counts", counts), ("seg", seg)):
        check_shape(f"triton_table_bwd: {name}", t, (G, U), torch.float32)
    check_shape("triton_table_bwd: c_hist", c_hist, (G, T + 1, K), torch.float32)
    check_shape("triton_table_bwd: den_hist", den_hist, (G, T, K), torch.float32)
    if T < 1:
        raise ValueError("triton_table_bwd: den_hist holds no iteration")
    jac = torch.empty(G, U, dtype=torch.float32, device=values.device)
    shared = torch.empty(G, U, dtype=torch.float32, device=values.device)
    _table_bwd_kernel[(G,)](
        values, counts, seg, c_hist, den_hist, jac, shared,
        U, K, T, float(tau),
        values.stride(0), values.stride(1),
        counts.stride(0), counts.stride(1),
        seg.stride(0), seg.stride(1),
        c_hist.stride(0), c_hist.stride(1), c_hist.stride(2),
        den_hist.stride(0), den_hist.stride(1), den_hist.stride(2),
        jac.stride(0), jac.stride(1),
        shared.stride(0), shared.stride(1),
        BLOCK_U=block_u(K), BLOCK_K=block_k(K),
    )
    return jac, shared

"""The passes of uniquified DKM on the table of distinct values (torch; O(U K) each, no N).

    table_iterate  the T soft k-means iterations, weighted by the rows' mass
    table_rows     h(v_j) = softmax(-||v_j - C_{T-1}||^2 / tau) C_T
    table_forward  both, sharing the last iteration's map (it is the final map)
    table_bwd      J_j = dh/dv(v_j) and r_j = R_j / m_j, R derived by hand back through
                   the iterations (the path through the centroids, DESIGN section 2)

Shapes as in `edkm.functional.table`: values (G, U, d), mass (G, U), c0 (G, K, d),
c_hist (G, T+1, K, d), den_hist (G, T, K). With the per-element passes of `table.py`
this is the one torch implementation, the CPU path and the spec of the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional.iterations import MIN_MASS, Reduce, centroids_from_sums

# Elements of one (b, U, K, d) temporary of the table passes (1 MB of fp32), see `_group_blocks`.
TABLE_BLOCK = 1 << 18
# A pass keeps its maps for the next pass that needs the same map if they hold at most this
# many elements (64 MB of fp32, twice that in backward, which keeps the differences too);
# larger tables recompute the map. Every SmolLM2 matrix with 16-row groups keeps them.
KEEP_MAPS = 1 << 24

# Layout: a block of b groups at a time (`_group_blocks`), maps stored centroid-major as
# (b, K, U) so the reductions over K (softmax, Jacobian sums) run along a strided axis,
# vectorised over the U rows, and the sums over U along the contiguous one:
#
#     vt (b, 1, U, d) rows     ct (b, K, 1, d) centroids     diff = vt - ct (b, K, U, d)
#     a  (b, K, U)    softmax over K of -||diff||^2 / tau      n (b, 1, U) masses


def _group_blocks(G: int, U: int, K: int, d: int) -> list[slice]:
    """Slices of groups whose (b, K, U, d) temporaries hold about `TABLE_BLOCK` elements.

    Groups are independent, so running a block at a time gives the same numbers as one
    pass over all of them (bitwise for d = 1; for d > 1 the einsums may order their sums
    by batch size, within the rule); it keeps each temporary in cache and below the allocator's
    mmap threshold (a fresh 100 MB temporary per op costs more in page faults than the op).
    """
    step = max(1, TABLE_BLOCK // max(1, U * K * d))
    return [slice(g, min(g + step, G)) for g in range(0, G, step)]


def _assign(vt: Tensor, c: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(a, diff)`` of rows vt (b, 1, U, d) and centroids c (b, K, d): the (b, K, U) map
    and ``diff = v - c`` (b, K, U, d); the distance is the difference form (`sq_dist`)."""
    diff = vt - c.unsqueeze(2)
    dist = diff.square()[..., 0] if diff.shape[-1] == 1 else diff.square().sum(-1)
    return torch.softmax(dist / -tau, dim=1), diff


def _soft_values(a: Tensor, c: Tensor) -> Tensor:
    """``h = sum_k a_k c_k``: (b, U, d) soft values of rows from their (b, K, U) map and (b, K, d) centroids."""
    return (a.unsqueeze(-1) * c.unsqueeze(2)).sum(1)


def _keeps_maps(G: int, U: int, K: int, d: int = 1) -> bool:
    """Whether one pass's (G, K, U) maps (and (G, K, U, d) differences) are kept for the
    next pass that needs the same map (the last iteration's map is the final map) instead
    of being recomputed."""
    return G * U * K * d <= KEEP_MAPS


def _iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce: Reduce | None,
             rows: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """`table_iterate`, and with ``rows`` also `table_rows` of its last two centroid sets
    (the final map is the last iteration's map, reused when `_keeps_maps`)."""
    G, U, d = values.shape
    K = c0.shape[1]
    blocks = _group_blocks(G, U, K, d)
    keep = rows and _keeps_maps(G, U, K, d)
    c = c0.to(values.dtype)
    hist, dens, maps = [c], [], []
    for t in range(n_iters):
        num, den = values.new_empty(G, K, d), values.new_empty(G, K, 1)
        for b in blocks:
            vt = values[b].unsqueeze(1)
            a, _ = _assign(vt, c[b], tau)
            w = a * mass[b].unsqueeze(1)  # (b, K, U)
            num[b] = (w.unsqueeze(-1) * vt).sum(2)
            den[b] = w.sum(2, keepdim=True)
            if keep and t == n_iters - 1:
                maps.append(a)
        c, den = centroids_from_sums(num, den, c, reduce)
        hist.append(c)
        dens.append(den[..., 0])
    c_hist, den_hist = torch.stack(hist, 1), torch.stack(dens, 1)
    if not rows:
        return c_hist, den_hist, None
    if not keep:
        return c_hist, den_hist, table_rows(values, c_hist[:, -2], c_hist[:, -1], tau)
    out = torch.empty_like(values)
    for a, b in zip(maps, blocks):
        out[b] = _soft_values(a, c_hist[b, -1])
    return c_hist, den_hist, out


def table_iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int,
                  reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Run ``n_iters`` mass-weighted soft k-means iterations on the table.

    Args:
        values: (G, U, d). mass: (G, U) counts (or importance masses). c0: (G, K, d).
        reduce: Sums centroid numerators/denominators over ranks (`edkm.functional.shard`).
    Returns:
        ``(c_hist, den_hist)``: (G, n_iters + 1, K, d) centroids (c_hist[:, 0] = c0) and
        (G, n_iters, K) denominators ``sum_j m_j a_jk``.
    """
    c_hist, den_hist, _ = _iterate(values, mass, c0, tau, n_iters, reduce, rows=False)
    return c_hist, den_hist


def table_forward(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int,
                  reduce: Reduce | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`table_iterate` then `table_rows` of its last two centroid sets, sharing the map they
    have in common: ``(c_hist, den_hist, rows)``, rows (G, U, d). ``n_iters`` >= 1."""
    c_hist, den_hist, rows = _iterate(values, mass, c0, tau, n_iters, reduce, rows=True)
    return c_hist, den_hist, rows


def table_rows(values: Tensor, c_prev: Tensor, c_last: Tensor, tau: float) -> Tensor:
    """Soft value of every row, ``h(v) = softmax(-||v - c_prev||^2 / tau) c_last``: (G, U, d)."""
    G, U, d = values.shape
    out = torch.empty_like(values)
    for b in _group_blocks(G, U, c_prev.shape[1], d):
        out[b] = _soft_values(_assign(values[b].unsqueeze(1), c_prev[b], tau)[0], c_last[b])
    return out


def _jacobian(a: Tensor, diff: Tensor, c_last: Tensor, k2: float) -> Tensor:
    """``dh/dv`` with the centroids fixed: with g_k = -k2 (v - c_k) and h = sum_k a_k c_k,
    ``J[e, f] = sum_k a_k c_k[e] g_k[f] - h[e] sum_k a_k g_k[f]``.

    Args: a (b, K, U), diff (b, K, U, d), c_last (b, K, d). Returns (b, U) for d = 1,
    else (b, U, d, d).
    """
    if diff.shape[-1] == 1:
        d1, c = diff[..., 0], c_last  # (b, K, U), (b, K, 1)
        h = (a * c).sum(1)
        return -k2 * ((a * c * d1).sum(1) - h * (a * d1).sum(1))
    h = torch.einsum("gku,gke->gue", a, c_last)
    mean_g = torch.einsum("gku,gkuf->guf", a, diff)
    return -k2 * (torch.einsum("gku,gke,gkuf->guef", a, c_last, diff) - h.unsqueeze(-1) * mean_g.unsqueeze(-2))


def table_bwd(values: Tensor, mass: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float,
              reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Backward of the table: the per-element Jacobian and the gradient shared by a row.

    With ``L = sum_j <seg_j, h_j>`` and the map of ``h`` held fixed (the per-element path is
    ``jac``), ``R_j = dL/dv_j`` through the centroids of every iteration, derived by hand
    (the formulas are in `edkm.kernels.table_bwd`, which runs the same math fused), one
    pass over the table for the final map and one per iteration, a block of groups at a
    time. With ``reduce`` (sharded points) the centroid gradient of each iteration is
    summed over the ranks before it is used, as the backward of the forward's all-reduce.

    Returns:
        ``(jac, shared)``: jac (G, U) for d = 1 else (G, U, d, d), ``dh/dv (v_j)`` with
        the last two centroid sets fixed; shared (G, U, d) ``R_j / m_j`` (0 on rows of
        zero mass: padding, all-zero importance).
    """
    G, U, d = values.shape
    T, K = den_hist.shape[1], den_hist.shape[2]
    blocks = _group_blocks(G, U, K, d)
    keep = _keeps_maps(G, U, K, d)
    k2 = 2.0 / tau
    jac = values.new_empty((G, U) if d == 1 else (G, U, d, d))
    g_c = values.new_empty(G, K, d)  # dL/dC_T, then dL/dC_t going back
    g_map = values.new_empty(G, K, d)  # dL/dC_{T-1} through the final map
    maps = []
    for b in blocks:  # final map h = a(v; C_{T-1}) C_T, the map of iteration T too
        a, diff = _assign(values[b].unsqueeze(1), c_hist[b, T - 1], tau)
        st, c_last = seg[b].unsqueeze(1), c_hist[b, T]  # (b, 1, U, d), (b, K, d)
        g_c[b] = (a.unsqueeze(-1) * st).sum(2)
        ga = (st * c_last.unsqueeze(2)).sum(-1)  # dL/da (b, K, U)
        gz = a * (ga - (a * ga).sum(1, keepdim=True))  # dL/dz (softmax backward)
        g_map[b] = k2 * (gz.unsqueeze(-1) * diff).sum(2)
        jac[b] = _jacobian(a, diff, c_last, k2)
        if keep:
            maps.append((a, diff))
    r = torch.zeros_like(values)
    for t in range(T, 0, -1):  # iteration t: C_t = num / den of the map a(v; C_{t-1})
        den = den_hist[:, t - 1].unsqueeze(-1)  # (G, K, 1)
        live = den >= MIN_MASS
        total = g_c if reduce is None else reduce(g_c.contiguous())
        e = torch.where(live, total / torch.where(live, den, torch.ones_like(den)), torch.zeros_like(total))
        ce = (c_hist[:, t] * e).sum(-1, keepdim=True)  # (G, K, 1) <C_t, e>
        g_prev = values.new_empty(G, K, d)
        for i, b in enumerate(blocks):
            v, n = values[b], mass[b].unsqueeze(1)  # (b, U, d), (b, 1, U)
            a, diff = maps[i] if keep and t == T else _assign(v.unsqueeze(1), c_hist[b, t - 1], tau)
            ve = torch.einsum("gud,gkd->gku", v, e[b]) if d > 1 else v[..., 0].unsqueeze(1) * e[b]
            ga = n * (ve - ce[b])  # dL/da = n <e, v - C_t>
            gz = a * (ga - (a * ga).sum(1, keepdim=True))
            gzd = gz.unsqueeze(-1) * diff  # (b, K, U, d)
            r[b] += n.squeeze(1).unsqueeze(-1) * (a.unsqueeze(-1) * e[b].unsqueeze(2)).sum(1) - k2 * gzd.sum(1)
            g_prev[b] = k2 * gzd.sum(2)
        g_c = g_prev + torch.where(live, torch.zeros_like(g_c), g_c)  # an empty centroid passes through
        if t == T:
            g_c = g_c + g_map  # C_{T-1} also feeds the final map
        maps = []
    shared = r / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(-1)
    return jac, shared

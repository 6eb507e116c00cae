"""Pure-PyTorch twins of the Triton kernels in `edkm.kernels` (the spec they are tested against).

Each ``torch_x`` here has the signature of ``triton_x`` in `edkm.kernels`. They cover the
16-bit pattern path (bf16 / fp16 points, cluster_dim 1), where a weight's table row is
found from its own bit pattern through a (G, 65536) pattern -> row map. Shapes:

    points, grad      (G, N)        16-bit weights and their upstream gradient
    hist, rowmap      (G, 65536)    int32 counts per pattern, row of every pattern
    values, counts    (G, U)        fp32 table rows (distinct values) and multiplicities
    c0, c_prev/c_last (G, K)        fp32 centroids
    c_hist            (G, T+1, K)   centroids before / after each of T iterations
    den_hist          (G, T, K)     sum_j n_j a_jk of each iteration (its denominator)

The table-side twins are the existing DKM math (`naive.py`), and the table backward is the
autograd replay the torch path (`unique.py`) runs. Per-element twins stream in chunks of
`table.CHUNK` points so their temporaries stay small whatever N is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional.iterations import dkm_iterations, soft_assign, soft_value_jacobian, sq_dist, update_centroids
from edkm.functional.table import CHUNK, N_PATTERNS, _pattern
from edkm.functional.autograd import PatternOps


def torch_histogram(points: Tensor) -> Tensor:
    """Counts of every 16-bit pattern per group: (G, N) -> (G, 65536) int32."""
    G, N = points.shape
    out = torch.zeros(G, N_PATTERNS, dtype=torch.int64, device=points.device)
    for g in range(G):
        for s in range(0, N, CHUNK):
            out[g] += torch.bincount(_pattern(points[g, s : s + CHUNK]), minlength=N_PATTERNS)
    return out.to(torch.int32)


def _rows(points: Tensor, rowmap: Tensor, g: int, sl: slice) -> Tensor:
    return rowmap[g][_pattern(points[g, sl])].to(torch.int64)  # (n,) table rows


def torch_segment_sum(points: Tensor, grad: Tensor, rowmap: Tensor, n_rows: int) -> Tensor:
    """``S[g, j] = sum over points i of group g in row j of grad[g, i]``, (G, n_rows) fp32."""
    G, N = points.shape
    out = torch.zeros(G, n_rows, dtype=torch.float32, device=points.device)
    for g in range(G):
        for s in range(0, N, CHUNK):
            sl = slice(s, s + CHUNK)
            out[g].index_add_(0, _rows(points, rowmap, g, sl), grad[g, sl].to(torch.float32))
    return out


def torch_gather_rows(points: Tensor, rowmap: Tensor, rows: Tensor) -> Tensor:
    """``out[g, i] = rows[g, row(i)]`` cast to ``points.dtype``: (G, N)."""
    G, N = points.shape
    cast = rows.to(points.dtype)  # (G, U): cast U values, not N
    out = torch.empty_like(points)
    for g in range(G):
        for s in range(0, N, CHUNK):
            sl = slice(s, s + CHUNK)
            out[g, sl] = cast[g][_rows(points, rowmap, g, sl)]
    return out


def torch_element_grad(points: Tensor, grad: Tensor, rowmap: Tensor, jac: Tensor, shared: Tensor) -> Tensor:
    """``dW[g, i] = grad[g, i] * jac[g, row(i)] + shared[g, row(i)]`` in ``points.dtype``."""
    G, N = points.shape
    out = torch.empty_like(points)
    for g in range(G):
        for s in range(0, N, CHUNK):
            sl = slice(s, s + CHUNK)
            rows = _rows(points, rowmap, g, sl)
            out[g, sl] = (grad[g, sl].to(torch.float32) * jac[g][rows] + shared[g][rows]).to(points.dtype)
    return out


def torch_table_iterate(values: Tensor, counts: Tensor, c0: Tensor, tau: float, n_iters: int) -> tuple[Tensor, Tensor]:
    """Run ``n_iters`` count-weighted soft k-means iterations on the table.

    Returns:
        ``(c_hist, den_hist)``: (G, n_iters + 1, K) centroids (c_hist[:, 0] = c0) and
        (G, n_iters, K) denominators ``sum_j n_j a_jk``.
    """
    x = values.unsqueeze(-1)  # (G, U, 1)
    c = c0.to(torch.float32).unsqueeze(-1)  # (G, K, 1)
    hist, dens = [c[..., 0]], []
    for _ in range(n_iters):
        a = soft_assign(x, c, tau)  # (G, U, K)
        dens.append((a * counts.unsqueeze(-1)).sum(1))  # (G, K)
        c = update_centroids(x, a, counts, c)
        hist.append(c[..., 0])
    return torch.stack(hist, 1), torch.stack(dens, 1)


def torch_table_rows(values: Tensor, c_prev: Tensor, c_last: Tensor, tau: float) -> Tensor:
    """Soft value of every row, ``h(v) = softmax(-(v - c_prev)^2 / tau) . c_last``: (G, U)."""
    a = soft_assign(values.unsqueeze(-1), c_prev.unsqueeze(-1), tau)  # (G, U, K)
    return torch.einsum("guk,gk->gu", a, c_last)


def torch_table_bwd(
    values: Tensor, counts: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """Backward of the table: the per-element Jacobian and the gradient shared by a row.

    With ``L = sum_j seg_j h_j`` and the map of ``h`` held fixed (the per-element path is
    ``jac``), ``R_j = dL/dv_j`` through the centroids of every iteration, by autograd
    replay from ``c_hist[:, 0]`` (``den_hist`` only gives T; the replay recomputes it).

    Returns:
        ``(jac, shared)``, both (G, U) fp32: ``jac_j = dh/dv (v_j)`` with the last two
        centroid sets fixed, ``shared_j = R_j / max(n_j, 1)``.
    """
    T = den_hist.shape[1]
    x = values.unsqueeze(-1)  # (G, U, 1)
    with torch.enable_grad():
        v = x.detach().requires_grad_(True)
        _, c_prev, c_last, _ = dkm_iterations(v, counts, c_hist[:, 0].unsqueeze(-1), tau, T, 0.0, n_iters=T)
        rows = torch.einsum("guk,gkd->gud", soft_assign(x, c_prev, tau), c_last)  # (G, U, 1)
        (r,) = torch.autograd.grad((rows[..., 0] * seg).sum(), v)
    shared = r[..., 0] / counts.clamp_min(1.0)
    jac = soft_value_jacobian(x, c_prev.detach(), c_last.detach(), tau)  # (G, U)
    return jac, shared


def torch_assign_pack(points: Tensor, centroids: Tensor, bits: int) -> Tensor:
    """Nearest centroid of every point, packed ``bits`` per code (see `pack_codes`).

    Args:
        points: (G, N) 16-bit weights. centroids: (G, K) with K <= 2**bits.
    Returns:
        (G, ceil(N / 8) * bits) uint8.
    """
    G, N = points.shape
    c = centroids.to(torch.float32).unsqueeze(-1)  # (G, K, 1)
    codes = torch.zeros(G, -(-N // 8) * 8, dtype=torch.int64, device=points.device)
    step = max(1, CHUNK // G)
    for s in range(0, N, step):
        x = points[:, s : s + step].to(torch.float32).unsqueeze(-1)  # (G, n, 1)
        codes[:, s : s + x.shape[1]] = sq_dist(x, c).argmin(-1)  # first minimum on ties
    return pack_codes(codes, bits)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes < 2**bits densely, least significant bits first.

    Every 8 consecutive codes of a group form one ``8 * bits``-bit little-endian word
    (code m in bits [m * bits, (m + 1) * bits)), stored as ``bits`` bytes. So 4-bit codes
    are two per byte (low nibble first), 3-bit codes 8 per 3 bytes, 8-bit codes one per
    byte.

    Args:
        codes: (G, M) integers with M a multiple of 8.
    Returns:
        (G, M / 8 * bits) uint8.
    """
    G, M = codes.shape
    shifts = torch.arange(8, device=codes.device) * bits
    word = (codes.to(torch.int64).view(G, M // 8, 8) << shifts).sum(-1)  # (G, M / 8), codes do not overlap
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(G, M // 8 * bits)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_codes`: (G, ceil(n / 8) * bits) uint8 -> (G, n) uint8 codes."""
    G = packed.shape[0]
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (packed.to(torch.int64).view(G, -1, bits) << byte_shifts).sum(-1)  # (G, M / 8)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (G, M / 8, 8)
    return codes.reshape(G, -1)[:, :n].to(torch.uint8)


TORCH_OPS = PatternOps(
    histogram=torch_histogram,
    table_iterate=torch_table_iterate,
    table_rows=torch_table_rows,
    gather_rows=torch_gather_rows,
    segment_sum=torch_segment_sum,
    table_bwd=torch_table_bwd,
    element_grad=torch_element_grad,
)

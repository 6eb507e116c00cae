"""The table path in torch: build the table of distinct values, then every pass of DKM on it.

This file is the one torch implementation of each pass of uniquified DKM. It is the CPU
path (``backend="torch"``) and the spec the Triton kernels of `edkm.kernels` are tested
against (`edkm.functional.triton_backend` adapts their launchers to these signatures). The
naive (N, K) path (`naive.py`) is the independent spec both are tested against.

A table row j holds a distinct value v_j (a d-vector) of one LUT group and its count n_j.
Everything DKM computes per weight depends only on the weight's value, so the k-means
iterations run on the U table rows instead of the N weights (U <= 65,536 per group for
16-bit scalars). Shapes (G groups, N points, U rows, K centroids, T iterations, d dims):

    points, grad   (G, N, d)      values (G, U, d)    counts, mass (G, U)
    c0             (G, K, d)      c_hist (G, T+1, K, d)   den_hist (G, T, K)
    index          (G, 65536) int32 pattern -> row map (16-bit scalars), or
                   (G, N) int32 row of every point (any other dtype, or d > 1)

Per-element passes (streamed in chunks of `CHUNK` points, so temporaries stay a few MB):

    histogram      n[g, p]    = #{i : pattern(w_i) = p}            (16-bit scalars)
    segment_sum    S_j        = sum_{i : j(i) = j} G_i
    gather_rows    out_i      = h[j(i)]                            (forward values)
    element_grad   dW_i       = G_i J[j(i)] + s_i r[j(i)]          (backward)

Table passes (O(U K) each, no N anywhere):

    table_iterate  the T soft k-means iterations, weighted by the rows' mass
    table_rows     h(v_j) = softmax(-||v_j - C_{T-1}||^2 / tau) C_T
    table_bwd      J_j = dh/dv(v_j) and r_j = R_j / m_j, R by autograd replay of the
                   iterations (the path through the centroids, DESIGN section 2)

How j(i) is found (the choice DESIGN section 2 asks for): bf16 / fp16 scalars are keyed
by their own 16-bit pattern through a (G, 65536) map rebuilt from the (G, U) row patterns
whenever needed, so nothing per element is stored. fp32 / fp64 or d > 1 use
``torch.unique`` (exact value equality, no change of dtype, so no change of results) and
keep an int32 inverse index (4 bytes per point); cast weights to bf16 to get the 16-bit
bound (``DKMConfig(cluster_dtype="bfloat16")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from edkm.functional.iterations import (
    Reduce,
    math_dtype,
    soft_assign,
    soft_value_jacobian,
    update_centroids,
)

# 2**18 points per chunk: ~2 MB int64 temporaries per pass. Measured on a 2-core CPU, N = 4M
# bf16: peak RSS 50 MB (2**18) vs 108 MB (2**20) at the same speed (0.1 s fwd+bwd).
CHUNK = 1 << 18
N_PATTERNS = 1 << 16
BIT_PATTERN_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class Table:
    """Distinct values of each LUT group, padded to a common length U.

    Attributes:
        values: (G, U, d) distinct values in the math dtype (fp32; fp64 for fp64
            points), padding rows 0.
        counts: (G, U) multiplicities in the same dtype (padding rows 0: they weigh nothing).
        keys: (G, U) int64 16-bit patterns of the rows (bit-pattern mode, padding -1), or
            (G, N) int32 row of every point (unique mode).
        bit_pattern: Which of the two ``keys`` holds.
    """

    values: Tensor
    counts: Tensor
    keys: Tensor
    bit_pattern: bool

    def index(self) -> Tensor:
        """The ``index`` of the per-element passes: (G, 65536) int32 pattern -> row map
        (bit-pattern mode, rebuilt from ``keys``), or the (G, N) int32 inverse."""
        return pattern_rowmap(self.keys) if self.bit_pattern else self.keys

    def nbytes(self) -> int:
        """Bytes held by the table (what uniquification keeps instead of (N, K) maps)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.counts, self.keys))


def uses_bit_patterns(points: Tensor) -> bool:
    """Whether ``points`` (G, N, d) are keyed by their 16-bit pattern (no index list)."""
    return points.dtype in BIT_PATTERN_DTYPES and points.shape[-1] == 1


def _pattern(x: Tensor) -> Tensor:
    """16-bit patterns of a bf16/fp16 tensor as int64 in [0, 65535]."""
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


def _pattern_values(patterns: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `_pattern`: int64 patterns in [0, 65535] -> values in ``dtype``."""
    signed = torch.where(patterns >= 1 << 15, patterns - (1 << 16), patterns)
    return signed.to(torch.int16).view(dtype)


def _check_finite(values: Tensor) -> None:
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise ValueError(f"DKM got a non-finite weight value ({bad}); clean NaN/Inf weights first")


# ------------------------------------------------------------------------- building


def histogram(points: Tensor) -> Tensor:
    """Counts of every 16-bit pattern per group: (G, N, 1) bf16 / fp16 -> (G, 65536) int32.

    One ``bincount`` of ``g * 65536 + pattern`` keys per block of about `CHUNK` points (a
    block of small groups, or a slice of one large group), so the work is
    O(N + G * 65536) with no sort and the temporaries stay a few MB.
    """
    G, N, _ = points.shape
    out = torch.zeros(G, N_PATTERNS, dtype=torch.int32, device=points.device)
    if N >= CHUNK:  # large groups (per-tensor LUTs): slices of one group
        for g in range(G):
            for s in range(0, N, CHUNK):
                out[g] += torch.bincount(_pattern(points[g, s : s + CHUNK, 0]), minlength=N_PATTERNS).to(torch.int32)
        return out
    step = CHUNK // N  # groups per block
    for g0 in range(0, G, step):
        x = points[g0 : g0 + step, :, 0]  # (b, N)
        b = x.shape[0]
        keys = _pattern(x) + (torch.arange(b, device=x.device) * N_PATTERNS).unsqueeze(1)
        out[g0 : g0 + b] = torch.bincount(keys.reshape(-1), minlength=b * N_PATTERNS).view(b, N_PATTERNS)
    return out


def table_from_histogram(hist: Tensor, dtype: torch.dtype) -> Table:
    """Compact per-group pattern histograms into a `Table` (bit-pattern mode).

    Rows are the present patterns of each group in increasing order, padded to the
    largest group.

    Args:
        hist: (G, 65536) integer counts per 16-bit pattern (`histogram`, or the Triton kernel).
        dtype: The 16-bit dtype the patterns encode (bf16 or fp16).
    Returns:
        The `Table`. Raises ``ValueError`` if a present pattern is NaN or infinite.
    """
    G = hist.shape[0]
    flat = hist.reshape(-1)
    ukeys = flat.nonzero().squeeze(1)  # (M,) g * 65536 + pattern, sorted by group then pattern
    group, pattern = ukeys // N_PATTERNS, ukeys % N_PATTERNS
    per_group = torch.bincount(group, minlength=G)
    col = torch.arange(ukeys.numel(), device=ukeys.device) - (torch.cumsum(per_group, 0) - per_group)[group]
    U = int(per_group.max().item())
    patterns = torch.full((G, U), -1, dtype=torch.int64, device=ukeys.device)
    counts = torch.zeros(G, U, dtype=torch.float32, device=ukeys.device)
    values = torch.zeros(G, U, 1, dtype=torch.float32, device=ukeys.device)
    patterns[group, col] = pattern
    counts[group, col] = flat[ukeys].to(torch.float32)
    values[group, col, 0] = _pattern_values(pattern, dtype).to(torch.float32)
    _check_finite(values)
    return Table(values, counts, patterns, True)


def pattern_rowmap(patterns: Tensor) -> Tensor:
    """Pattern -> table row map of every group, the ``index`` of 16-bit points.

    Args:
        patterns: (G, U) int64 patterns of the table rows (padding -1).
    Returns:
        (G, 65536) int32; entry [g, p] is the row of pattern p in group g (0 for patterns
        that do not occur, which no point reads).
    """
    G, U = patterns.shape
    rowmap = torch.zeros(G, N_PATTERNS, dtype=torch.int32, device=patterns.device)
    g_idx, r_idx = (patterns >= 0).nonzero(as_tuple=True)
    rowmap[g_idx, patterns[g_idx, r_idx]] = r_idx.to(torch.int32)
    return rowmap


def build_table(points: Tensor) -> Table:
    """The table of distinct values of every group of ``points`` (G, N, d).

    16-bit scalars: `histogram` then `table_from_histogram`. Anything else: one
    ``torch.unique`` over ``(group, value...)`` keys. Raises ``ValueError`` if a value is
    NaN or infinite.
    """
    if uses_bit_patterns(points):
        return table_from_histogram(histogram(points), points.dtype)
    G, N, d = points.shape
    device, mdt = points.device, math_dtype(points.dtype)
    if d == 1 and points.dtype == torch.float32:  # one int64 sort key: group << 32 | fp32 bits
        bits = points[..., 0].view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (G, N)
        keys = (bits + (torch.arange(G, device=device) << 32).unsqueeze(1)).reshape(-1)
        ukeys, inv, cnt = torch.unique(keys, return_inverse=True, return_counts=True)
        low = ukeys & 0xFFFFFFFF
        vals = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32).view(torch.float32)
        uniq = torch.stack([(ukeys >> 32).to(mdt), vals.to(mdt)], dim=1)  # (M, 2): group, value
    else:  # rows (group, value...): exact, but torch.unique(dim=0) is slow on CPU
        gid = torch.arange(G, device=device, dtype=mdt).view(G, 1, 1).expand(G, N, 1)
        keyed = torch.cat([gid, points.to(mdt)], dim=2).reshape(G * N, d + 1)  # (G*N, 1+d)
        uniq, inv, cnt = torch.unique(keyed, dim=0, return_inverse=True, return_counts=True)
    _check_finite(uniq)
    group = uniq[:, 0].to(torch.int64)  # (M,) sorted: groups are contiguous
    per_group = torch.bincount(group, minlength=G)
    start = torch.cumsum(per_group, 0) - per_group
    col = torch.arange(uniq.shape[0], device=device) - start[group]  # row within its group
    U = int(per_group.max().item())
    values = torch.zeros(G, U, d, dtype=mdt, device=device)
    counts = torch.zeros(G, U, dtype=mdt, device=device)
    values[group, col] = uniq[:, 1:]
    counts[group, col] = cnt.to(mdt)
    inverse = (inv - start[group[inv]]).to(torch.int32).view(G, N)
    return Table(values, counts, inverse, False)


# --------------------------------------------------------------------- per-element passes


def _chunks(points: Tensor, index: Tensor, n_rows: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice of points, rows)``: rows (G * n,) int64 index the flattened
    (G * n_rows) table for every group's points in the slice."""
    G, N, _ = points.shape
    offset = (torch.arange(G, device=points.device) * n_rows).unsqueeze(1)  # (G, 1)
    by_pattern = uses_bit_patterns(points)
    if by_pattern:
        flat_map = index.reshape(-1)  # (G * 65536,)
        poff = (torch.arange(G, device=points.device) * N_PATTERNS).unsqueeze(1)  # (G, 1)
    step = max(1, CHUNK // G)
    for s in range(0, N, step):
        sl = slice(s, min(s + step, N))
        rows = flat_map[_pattern(points[:, sl, 0]) + poff] if by_pattern else index[:, sl]
        yield sl, (rows.to(torch.int64) + offset).reshape(-1)


def segment_sum(points: Tensor, grad: Tensor, index: Tensor, n_rows: int) -> Tensor:
    """``S[g, j] = sum over the points i of group g in row j of grad[g, i]``.

    Args:
        points: (G, N, d) the weights that built the table. grad: (G, N, d) per-point values.
        index: See the module docstring. n_rows: U.
    Returns:
        (G, U, d) sums in fp32 (fp64 for fp64 ``grad``).
    """
    G, _, d = points.shape
    out = torch.zeros(G * n_rows, d, dtype=math_dtype(grad.dtype), device=points.device)
    for sl, rows in _chunks(points, index, n_rows):
        out.index_add_(0, rows, grad[:, sl].reshape(-1, d).to(out.dtype))
    return out.view(G, n_rows, d)


def gather_rows(points: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``out_i = rows[j(i)]`` cast to ``points.dtype`` (the cast is done U times, not N times).

    Args:
        points: (G, N, d). index: See the module docstring. rows: (G, U, d) per-row values.
    Returns:
        (G, N, d) in ``points.dtype``.
    """
    G, U, d = rows.shape
    cast = rows.to(points.dtype).reshape(G * U, d)
    out = torch.empty_like(points)
    for sl, r in _chunks(points, index, U):
        out[:, sl] = cast[r].view(G, -1, d)
    return out


def element_grad(points: Tensor, grad: Tensor, index: Tensor, jac: Tensor, shared: Tensor,
                 scale: Tensor | None = None) -> Tensor:
    """``dW_i = G_i J[j(i)] + s_i r[j(i)]``, the per-element DKM gradient, in ``points.dtype``.

    Args:
        points: (G, N, d). grad: (G, N, d) upstream gradient G_i. index: See the module docstring.
        jac: (G, U) for d = 1, else (G, U, d, d) with ``J[e, f] = d h_e / d v_f``.
        shared: (G, U, d) the gradient shared by equal values, already divided by the
            row's mass.
        scale: (G, N) per-point importance s_i (None: 1), for importance-weighted DKM.
    Returns:
        (G, N, d) gradient in ``points.dtype``.
    """
    G, U, d = shared.shape
    out = torch.empty_like(points)
    jac_flat = jac.reshape(G * U, *jac.shape[2:])
    shared_flat = shared.reshape(G * U, d)
    for sl, rows in _chunks(points, index, U):
        gi = grad[:, sl].reshape(-1, d).to(jac.dtype)  # (G * n, d)
        sh = shared_flat[rows]
        if scale is not None:
            sh = sh * scale[:, sl].reshape(-1, 1).to(sh.dtype)
        if jac.dim() == 2:
            val = gi * jac_flat[rows].unsqueeze(1) + sh
        else:
            val = torch.einsum("ne,nef->nf", gi, jac_flat[rows]) + sh
        out[:, sl] = val.to(points.dtype).view(G, -1, d)
    return out


# ----------------------------------------------------------------------------- table passes


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
    c = c0.to(values.dtype)
    hist, dens = [c], []
    for _ in range(n_iters):
        a = soft_assign(values, c, tau)  # (G, U, K)
        c, den = update_centroids(values, a, mass, c, reduce, return_den=True)
        hist.append(c)
        dens.append(den[..., 0])
    return torch.stack(hist, 1), torch.stack(dens, 1)


def table_rows(values: Tensor, c_prev: Tensor, c_last: Tensor, tau: float) -> Tensor:
    """Soft value of every row, ``h(v) = softmax(-||v - c_prev||^2 / tau) c_last``: (G, U, d)."""
    return torch.einsum("guk,gkd->gud", soft_assign(values, c_prev, tau), c_last)


def table_bwd(values: Tensor, mass: Tensor, seg: Tensor, c_hist: Tensor, den_hist: Tensor, tau: float,
              reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Backward of the table: the per-element Jacobian and the gradient shared by a row.

    With ``L = sum_j <seg_j, h_j>`` and the map of ``h`` held fixed (the per-element path is
    ``jac``), ``R_j = dL/dv_j`` through the centroids of every iteration, by autograd
    replay from ``c_hist[:, 0]`` (``den_hist`` only gives T; the replay recomputes it).

    Returns:
        ``(jac, shared)``: jac (G, U) for d = 1 else (G, U, d, d), ``dh/dv (v_j)`` with
        the last two centroid sets fixed; shared (G, U, d) ``R_j / m_j`` (0 on rows of
        zero mass: padding, all-zero importance).
    """
    T = den_hist.shape[1]
    with torch.enable_grad():
        v = values.detach().requires_grad_(True)
        c_hist_r, _ = table_iterate(v, mass, c_hist[:, 0], tau, T, reduce)
        c_prev, c_last = c_hist_r[:, -2], c_hist_r[:, -1]
        rows = torch.einsum("guk,gkd->gud", soft_assign(values, c_prev, tau), c_last)
        (r,) = torch.autograd.grad((rows * seg).sum(), v)  # (G, U, d)
    shared = r / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(-1)
    jac = soft_value_jacobian(values, c_prev.detach(), c_last.detach(), tau)
    return jac, shared

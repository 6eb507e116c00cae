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
    index          `PatternIndex`: pattern -> row lookup (16-bit scalars), or
                   (G, N) int32 row of every point (any other dtype, or d > 1)

Per-element passes (streamed in chunks of `CHUNK` points, so temporaries stay a few MB):

    histogram      n[g, p]    = #{i : pattern(w_i) = p}            (16-bit scalars;
                                                                     `pattern_histogram`)
    segment_sum    S_j        = sum_{i : j(i) = j} G_i
    gather_rows    out_i      = h[j(i)]                            (forward values)
    element_grad   dW_i       = G_i J[j(i)] + s_i r[j(i)]          (backward)

Table passes (O(U K) each, no N anywhere; a block of groups at a time, see below):

    table_iterate  the T soft k-means iterations, weighted by the rows' mass
    table_rows     h(v_j) = softmax(-||v_j - C_{T-1}||^2 / tau) C_T
    table_forward  both, sharing the last iteration's map (it is the final map)
    table_bwd      J_j = dh/dv(v_j) and r_j = R_j / m_j, R derived by hand back through
                   the iterations (the path through the centroids, DESIGN section 2)

How j(i) is found (the choice DESIGN section 2 asks for): bf16 / fp16 scalars are keyed
by their own 16-bit pattern through a `PatternIndex` rebuilt from the (G, U) row patterns
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
    MIN_MASS,
    Reduce,
    centroids_from_sums,
    math_dtype,
)

# 2**18 points per chunk: ~2 MB int64 temporaries per pass. Measured on a 2-core CPU, N = 4M
# bf16: peak RSS 50 MB (2**18) vs 108 MB (2**20) at the same speed (0.1 s fwd+bwd).
CHUNK = 1 << 18
# Elements of one (b, U, K, d) temporary of the table passes (1 MB of fp32), see `_group_blocks`.
TABLE_BLOCK = 1 << 18
# A pass keeps its maps for the next pass that needs the same map if they hold at most this
# many elements (64 MB of fp32, twice that in backward, which keeps the differences too);
# larger tables recompute the map. Every SmolLM2 matrix with 16-row groups keeps them.
KEEP_MAPS = 1 << 24
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

    def index(self) -> PatternIndex | Tensor:
        """The ``index`` of the torch per-element passes: a `PatternIndex` (bit-pattern
        mode, rebuilt from ``keys``), or the (G, N) int32 inverse."""
        return pattern_index(self.keys) if self.bit_pattern else self.keys

    def nbytes(self) -> int:
        """Bytes held by the table (what uniquification keeps instead of (N, K) maps)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.counts, self.keys))


@dataclass
class PatternIndex:
    """Pattern -> table row lookup of 16-bit points, compacted to the patterns present.

    A point's row is ``rows[g, col[pattern]]``. ``col`` (65536,) maps each of the M
    patterns present anywhere in the tensor to its rank among them (-1 elsewhere), and
    ``rows`` (G, M) gives, per group, the table row of each present pattern (0 where the
    group lacks it: no point reads those). Both stay small enough to sit in cache, where
    a (G, 65536) map would not (its size is 7 times the weight's for 576-wide 16-row groups).
    """

    col: Tensor
    rows: Tensor


def uses_bit_patterns(points: Tensor) -> bool:
    """Whether ``points`` (G, N, d) are keyed by their 16-bit pattern (no index list)."""
    return points.dtype in BIT_PATTERN_DTYPES and points.shape[-1] == 1


def _pattern(x: Tensor) -> Tensor:
    """16-bit patterns of a bf16/fp16 tensor as int64 in [0, 65535]."""
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


def _take(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 1-D ``table`` through ``index_select`` (4x faster than advanced
    indexing on CPU, measured on 2**18 points), shaped like ``idx``."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _pattern_values(patterns: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `_pattern`: int64 patterns in [0, 65535] -> values in ``dtype``."""
    signed = torch.where(patterns >= 1 << 15, patterns - (1 << 16), patterns)
    return signed.to(torch.int16).view(dtype)


def _check_finite(values: Tensor) -> None:
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise ValueError(f"DKM got a non-finite weight value ({bad}); clean NaN/Inf weights first")


# ------------------------------------------------------------------------- building


def _present_patterns(points: Tensor) -> Tensor:
    """(M,) int64 sorted 16-bit patterns present anywhere in ``points`` (G, N, 1)."""
    flat = points.reshape(-1)
    seen = torch.zeros(N_PATTERNS, dtype=torch.int64, device=points.device)
    for s in range(0, flat.numel(), CHUNK):
        seen += torch.bincount(_pattern(flat[s : s + CHUNK]), minlength=N_PATTERNS)
    return seen.nonzero().squeeze(1)


def _columns(present: Tensor) -> Tensor:
    """(65536,) int64 rank of every present pattern among ``present`` (M,), -1 elsewhere."""
    col = torch.full((N_PATTERNS,), -1, dtype=torch.int64, device=present.device)
    col[present] = torch.arange(present.numel(), device=present.device)
    return col


def pattern_histogram(points: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of every present 16-bit pattern per group, without a sort.

    Args:
        points: (G, N, 1) bf16 / fp16.
    Returns:
        ``(hist, present)``: (G, M) int32 counts of the (M,) int64 sorted patterns present
        anywhere in ``points``. Work O(N + G M) in blocks of about `CHUNK` points (a block
        of small groups, or a slice of one large group), keyed ``g * M + column``.
    """
    G, N, _ = points.shape
    present = _present_patterns(points)
    col, M = _columns(present), present.numel()
    out = torch.zeros(G, M, dtype=torch.int32, device=points.device)
    if N >= CHUNK:  # large groups (per-tensor LUTs): slices of one group
        for g in range(G):
            for s in range(0, N, CHUNK):
                out[g] += torch.bincount(_take(col, _pattern(points[g, s : s + CHUNK, 0])), minlength=M).to(torch.int32)
        return out, present
    step = max(1, CHUNK // N)  # groups per block
    for g0 in range(0, G, step):
        x = points[g0 : g0 + step, :, 0]  # (b, N)
        b = x.shape[0]
        keys = _take(col, _pattern(x)) + (torch.arange(b, device=x.device) * M).unsqueeze(1)
        out[g0 : g0 + b] = torch.bincount(keys.reshape(-1), minlength=b * M).view(b, M)
    return out, present


def histogram(points: Tensor) -> Tensor:
    """Counts of every 16-bit pattern per group: (G, N, 1) bf16 / fp16 -> (G, 65536) int32.

    `pattern_histogram` spread over all 65536 patterns (the layout of the Triton kernel).
    """
    hist, present = pattern_histogram(points)
    out = torch.zeros(points.shape[0], N_PATTERNS, dtype=torch.int32, device=points.device)
    out[:, present] = hist
    return out


def table_from_histogram(hist: Tensor, dtype: torch.dtype, patterns: Tensor | None = None) -> Table:
    """Compact per-group pattern histograms into a `Table` (bit-pattern mode).

    Rows are the present patterns of each group in increasing order, padded to the
    largest group.

    Args:
        hist: (G, M) integer counts; column c counts pattern ``patterns[c]``
            (`pattern_histogram`), or (G, 65536) counts of every pattern (`histogram`, or
            the Triton kernel) with ``patterns`` None.
        dtype: The 16-bit dtype the patterns encode (bf16 or fp16).
        patterns: (M,) int64 increasing patterns of the columns (None: all 65536).
    Returns:
        The `Table`. Raises ``ValueError`` if a present pattern is NaN or infinite.
    """
    G, M = hist.shape
    flat = hist.reshape(-1)
    ukeys = flat.nonzero().squeeze(1)  # (R,) g * M + column, sorted by group then pattern
    group, column = ukeys // M, ukeys % M
    pattern = column if patterns is None else patterns[column]
    per_group = torch.bincount(group, minlength=G)
    col = torch.arange(ukeys.numel(), device=ukeys.device) - (torch.cumsum(per_group, 0) - per_group)[group]
    U = int(per_group.max().item())
    keys = torch.full((G, U), -1, dtype=torch.int64, device=ukeys.device)
    counts = torch.zeros(G, U, dtype=torch.float32, device=ukeys.device)
    values = torch.zeros(G, U, 1, dtype=torch.float32, device=ukeys.device)
    keys[group, col] = pattern
    counts[group, col] = flat[ukeys].to(torch.float32)
    values[group, col, 0] = _pattern_values(pattern, dtype).to(torch.float32)
    _check_finite(values)
    return Table(values, counts, keys, True)


def pattern_rowmap(patterns: Tensor) -> Tensor:
    """Pattern -> table row map of every group over all 65536 patterns (the ``index`` of
    the Triton kernels; the torch passes use the compact `pattern_index`).

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


def pattern_index(patterns: Tensor) -> PatternIndex:
    """The compact `PatternIndex` of a table's (G, U) int64 row patterns (padding -1)."""
    G, U = patterns.shape
    g_idx, r_idx = (patterns >= 0).nonzero(as_tuple=True)
    p = patterns[g_idx, r_idx]
    present = torch.zeros(N_PATTERNS, dtype=torch.bool, device=patterns.device)
    present[p] = True
    present = present.nonzero().squeeze(1)
    col = _columns(present)
    rows = torch.zeros(G, present.numel(), dtype=torch.int32, device=patterns.device)
    rows[g_idx, col[p]] = r_idx.to(torch.int32)
    return PatternIndex(col.to(torch.int32), rows)


def build_table(points: Tensor) -> Table:
    """The table of distinct values of every group of ``points`` (G, N, d).

    16-bit scalars: `histogram` then `table_from_histogram`. Anything else: one
    ``torch.unique`` over ``(group, value...)`` keys. Raises ``ValueError`` if a value is
    NaN or infinite.
    """
    if uses_bit_patterns(points):
        hist, present = pattern_histogram(points)
        return table_from_histogram(hist, points.dtype, present)
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


def _chunks(points: Tensor, index: PatternIndex | Tensor, n_rows: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice of points, rows)``: rows (G * n,) int64 index the flattened
    (G * n_rows) table for every group's points in the slice."""
    G, N, _ = points.shape
    offset = (torch.arange(G, device=points.device) * n_rows).unsqueeze(1)  # (G, 1)
    by_pattern = isinstance(index, PatternIndex)
    if by_pattern:
        col, flat_rows = index.col, index.rows.reshape(-1)  # (65536,), (G * M,)
        coff = (torch.arange(G, device=points.device, dtype=torch.int32) * index.rows.shape[1]).unsqueeze(1)
    step = max(1, CHUNK // G)
    for s in range(0, N, step):
        sl = slice(s, min(s + step, N))
        if by_pattern:
            p = points[:, sl, 0].view(torch.int16).to(torch.int32) & 0xFFFF
            rows = _take(flat_rows, _take(col, p) + coff)
        else:
            rows = index[:, sl]
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
        src = grad[:, sl].reshape(-1, d).to(out.dtype)
        if d == 1:  # scatter_add_ on 1-D: the same sums in the same order, faster on CPU
            out[:, 0].scatter_add_(0, rows, src[:, 0])
        else:
            out.index_add_(0, rows, src)
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
        out[:, sl] = cast.index_select(0, r).view(G, -1, d)
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
        sh = shared_flat.index_select(0, rows)
        if scale is not None:
            sh = sh * scale[:, sl].reshape(-1, 1).to(sh.dtype)
        if jac.dim() == 2:
            val = gi * jac_flat.index_select(0, rows).unsqueeze(1) + sh
        else:
            val = torch.einsum("ne,nef->nf", gi, jac_flat.index_select(0, rows)) + sh
        out[:, sl] = val.to(points.dtype).view(G, -1, d)
    return out


# ----------------------------------------------------------------------------- table passes
#
# Layout: a block of b groups at a time (`_group_blocks`), maps stored centroid-major as
# (b, K, U) so the reductions over K (softmax, Jacobian sums) run along a strided axis,
# vectorised over the U rows, and the sums over U along the contiguous one:
#
#     vt (b, 1, U, d) rows     ct (b, K, 1, d) centroids     diff = vt - ct (b, K, U, d)
#     a  (b, K, U)    softmax over K of -||diff||^2 / tau      n (b, 1, U) masses


def _group_blocks(G: int, U: int, K: int, d: int) -> list[slice]:
    """Slices of groups whose (b, K, U, d) temporaries hold about `TABLE_BLOCK` elements.

    Groups are independent, so running a block at a time gives the same numbers as one
    pass over all of them; it keeps each temporary in cache and below the allocator's
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


def _keeps_maps(G: int, U: int, K: int) -> bool:
    """Whether one pass's (G, K, U) maps are kept for the next pass that needs the same map
    (the last iteration's map is the final map) instead of being recomputed."""
    return G * U * K <= KEEP_MAPS


def _iterate(values: Tensor, mass: Tensor, c0: Tensor, tau: float, n_iters: int, reduce: Reduce | None,
             rows: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """`table_iterate`, and with ``rows`` also `table_rows` of its last two centroid sets
    (the final map is the last iteration's map, reused when `_keeps_maps`)."""
    G, U, d = values.shape
    K = c0.shape[1]
    blocks = _group_blocks(G, U, K, d)
    keep = rows and _keeps_maps(G, U, K)
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
    out = torch.empty_like(values)
    for i, b in enumerate(blocks):
        a = maps[i] if keep else _assign(values[b].unsqueeze(1), c_hist[b, -2], tau)[0]
        out[b] = (a.unsqueeze(-1) * c_hist[b, -1].unsqueeze(2)).sum(1)
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
        a, _ = _assign(values[b].unsqueeze(1), c_prev[b], tau)
        out[b] = (a.unsqueeze(-1) * c_last[b].unsqueeze(2)).sum(1)
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
    keep = _keeps_maps(G, U, K)
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

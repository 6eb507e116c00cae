"""Uniquification: the table of distinct weight values, and the per-element passes.

A table row j holds a distinct value v_j (a d-vector) of one LUT group and its count n_j.
Everything DKM computes per weight depends only on the weight's value, so the k-means
iterations run on the U table rows instead of the N weights (U <= 65,536 per group for
16-bit scalars). What stays per element is a handful of streaming passes, written here as
plain torch (the spec twins of the Triton kernels):

    histogram       n_j                    = #{i : j(i) = j}
    segment sum     S_j                    = sum_{i : j(i) = j} G_i
    gather          out_i                  = T[j(i)]               (forward values)
    element grad    dW_i                   = G_i J[j(i)] + r[j(i)]  (backward)

How j(i) is found (the explicit choice DESIGN section 2 asks for):

- bf16 / fp16 with d = 1: j(i) is the weight's own 16-bit pattern. Groups of >= 16K
  points (per-tensor LUTs) store nothing per element: a 65,536-entry pattern -> row map
  is rebuilt when needed. Small groups (per_grouped_channel) sort ``g * 65536 + pattern``
  keys instead and keep the sort's int32 inverse (2 bytes per bf16 byte) so backward
  does not search again.
- fp32 / fp64, or d > 1: ``torch.unique`` (exact value equality, no change of dtype and
  so no change of results) gives an inverse index, kept as int32 (4 bytes per point, the
  size of an fp32 weight). fp32 weights of a trained model are mostly distinct, so this
  path saves little memory; cast weights to bf16 to get the 16-bit bound.

Per-element passes run in chunks of `CHUNK` points so their temporaries stay a few MB
whatever N is. Limits: the group loop is Python; hundreds of groups cost hundreds of
small launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from edkm.functional.iterations import math_dtype

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
        counts: (G, U) multiplicities in the same dtype (padding rows are 0, so they weigh nothing).
        patterns: (G, U) int64 16-bit patterns of the rows (bit-pattern mode, padding
            -1), or None.
        inverse: (G, N) int32 row of every point (unique mode, and bit-pattern mode with
            small LUT groups, where the sort that finds the rows yields it for free), or
            None (per-element passes then look rows up by pattern).
    """

    values: Tensor
    counts: Tensor
    patterns: Tensor | None
    inverse: Tensor | None

    @property
    def bit_pattern(self) -> bool:
        return self.patterns is not None

    def nbytes(self) -> int:
        """Bytes held by the table (what uniquification keeps instead of (N, K) maps)."""
        ts = [self.values, self.counts, self.patterns, self.inverse]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


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


def build_table(points: Tensor) -> Table:
    """Histogram the points of every group into a table of distinct values.

    All groups at once: bit-pattern mode histograms ``g * 65536 + pattern`` (chunked over
    N) and compacts with `table_from_histogram`; unique mode runs one ``torch.unique``
    over rows ``(g, value...)``.

    Args:
        points: (G, N, d) weights, any float dtype.
    Returns:
        The `Table`. Raises ``ValueError`` if a value is NaN or infinite.
    """
    G, N, d = points.shape
    device, mdt = points.device, math_dtype(points.dtype)
    if uses_bit_patterns(points):
        offset = (torch.arange(G, device=device) * N_PATTERNS).unsqueeze(1)  # (G, 1)
        if not _dense_patterns(points):
            keys = (_pattern(points[..., 0]) + offset).reshape(-1)  # (G * N,) int64
            ukeys, inv, cnt = torch.unique(keys, return_inverse=True, return_counts=True)  # sorted (g, pattern)
            table = _table_from_keys(ukeys, cnt, G, points.dtype)
            start = torch.cumsum(torch.bincount(ukeys // N_PATTERNS, minlength=G), 0)[:-1]  # first row of group g
            table.inverse = (inv.view(G, N) - torch.cat([start.new_zeros(1), start]).unsqueeze(1)).to(torch.int32)
            return table
        hist = torch.zeros(G * N_PATTERNS, dtype=torch.int64, device=device)
        step = max(1, CHUNK // G)
        for s in range(0, N, step):
            keys = _pattern(points[:, s : s + step, 0]) + offset  # (G, n)
            hist += torch.bincount(keys.reshape(-1), minlength=G * N_PATTERNS)
        return table_from_histogram(hist.view(G, N_PATTERNS), points.dtype)
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
    return Table(values, counts, None, inverse)


def _check_finite(values: Tensor) -> None:
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise ValueError(f"DKM got a non-finite weight value ({bad}); clean NaN/Inf weights first")


def _dense_patterns(points: Tensor) -> bool:
    """Dense (G, 65536) histograms pay when groups hold >= 16K points; smaller groups
    (per_grouped_channel) sort their ``g * 65536 + pattern`` keys instead. Measured on
    SmolLM2's 1536x576 MLP with 16-row groups: 1.2 s dense vs 0.1 s sorted per table."""
    return points.shape[1] * 4 >= N_PATTERNS


def _table_from_keys(ukeys: Tensor, cnt: Tensor, G: int, dtype: torch.dtype) -> Table:
    """Table from sorted distinct keys ``g * 65536 + pattern`` and their counts."""
    group, pattern = ukeys // N_PATTERNS, ukeys % N_PATTERNS
    per_group = torch.bincount(group, minlength=G)
    col = torch.arange(ukeys.numel(), device=ukeys.device) - (torch.cumsum(per_group, 0) - per_group)[group]
    U = int(per_group.max().item())
    patterns = torch.full((G, U), -1, dtype=torch.int64, device=ukeys.device)
    counts = torch.zeros(G, U, dtype=torch.float32, device=ukeys.device)
    values = torch.zeros(G, U, 1, dtype=torch.float32, device=ukeys.device)
    patterns[group, col] = pattern
    counts[group, col] = cnt.to(torch.float32)
    values[group, col, 0] = _pattern_values(pattern, dtype).to(torch.float32)
    _check_finite(values)
    return Table(values, counts, patterns, None)


def table_from_histogram(hist: Tensor, dtype: torch.dtype) -> Table:
    """Compact the per-group pattern histograms into a `Table` (bit-pattern mode).

    The same table `build_table` makes for bf16/fp16 points with d = 1, from counts that
    were computed elsewhere (the Triton histogram kernel, or `torch_histogram`). Rows are
    the present patterns in increasing order, padded to the largest group.

    Args:
        hist: (G, 65536) integer counts per 16-bit pattern.
        dtype: The 16-bit dtype the patterns encode (bf16 or fp16).
    Returns:
        The `Table` (values (G, U, 1) fp32, counts (G, U), patterns (G, U) int64, padding
        -1). Raises ``ValueError`` if a present pattern is NaN or infinite.
    """
    flat = hist.reshape(-1)
    ukeys = flat.nonzero().squeeze(1)  # (M,) g * 65536 + pattern, sorted by group then pattern
    return _table_from_keys(ukeys, flat[ukeys], hist.shape[0], dtype)


def pattern_rowmap(patterns: Tensor) -> Tensor:
    """Pattern -> table row map of every group, the key of the per-element passes.

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


def _chunks(table: Table, points: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice of points, rows)``: rows (G * n,) int64 indexes the flattened
    (G * U) table for every group's points in the slice."""
    G, N, _ = points.shape
    U = table.values.shape[1]
    offset = (torch.arange(G, device=points.device) * U).unsqueeze(1)  # (G, 1)
    poff = (torch.arange(G, device=points.device) * N_PATTERNS).unsqueeze(1)  # (G, 1)
    dense = table.bit_pattern and table.inverse is None and _dense_patterns(points)
    if dense:
        rowmap = pattern_rowmap(table.patterns).view(-1)  # (G * 65536,)
    elif table.inverse is None:  # sorted keys of the table rows and their flat (G * U) position
        valid = (table.patterns >= 0).view(-1)
        flatpos = valid.nonzero().squeeze(1)  # (M,)
        ukeys = (table.patterns + poff).view(-1)[flatpos]  # (M,) ascending
    step = max(1, CHUNK // G)
    for s in range(0, N, step):
        sl = slice(s, min(s + step, N))
        if dense:
            rows = rowmap[_pattern(points[:, sl, 0]) + poff].to(torch.int64) + offset
        elif table.inverse is None:
            rows = flatpos[torch.searchsorted(ukeys, _pattern(points[:, sl, 0]) + poff)]
        else:
            rows = table.inverse[:, sl].to(torch.int64) + offset
        yield sl, rows.reshape(-1)


def segment_sum(table: Table, points: Tensor, grad: Tensor) -> Tensor:
    """``S_j = sum_{i: j(i)=j} G_i`` in the table's math dtype.

    Args:
        points: (G, N, d) the weights that built ``table``. grad: (G, N, d) per-point values.
    Returns:
        (G, U, d) sums.
    """
    G, U, d = table.values.shape
    out = torch.zeros(G * U, d, dtype=table.values.dtype, device=points.device)
    for sl, rows in _chunks(table, points):
        out.index_add_(0, rows, grad[:, sl].reshape(-1, d).to(out.dtype))
    return out.view(G, U, d)


def gather(table: Table, points: Tensor, rows_values: Tensor, dtype: torch.dtype) -> Tensor:
    """``out_i = T[j(i)]``: expand per-row values back to the points.

    Args:
        rows_values: (G, U, d) values per table row, cast to ``dtype`` before the gather
            (so the cast is done U times, not N times).
    Returns:
        (G, N, d) tensor in ``dtype``.
    """
    G, U, d = rows_values.shape
    cast = rows_values.to(dtype).reshape(G * U, d)
    out = torch.empty(points.shape, dtype=dtype, device=points.device)
    for sl, rows in _chunks(table, points):
        out[:, sl] = cast[rows].view(G, -1, d)
    return out


def element_grad(table: Table, points: Tensor, grad: Tensor, jac: Tensor, shared: Tensor,
                 scale: Tensor | None = None) -> Tensor:
    """``dW_i = G_i J[j(i)] + s_i r[j(i)]``, the per-element DKM gradient, in ``points.dtype``.

    Args:
        grad: (G, N, d) upstream gradient G_i.
        jac: (G, U, d, d) Jacobian of the row's soft value w.r.t. the row's value
            (``J[e, f] = d out_e / d v_f``), or (G, U) for d = 1.
        shared: (G, U, d) the gradient shared by equal values, already divided by n_j
            (by the row's importance mass with ``scale``).
        scale: (G, N) per-point importance s_i (None: 1), for importance-weighted DKM.
    Returns:
        (G, N, d) gradient in ``points.dtype``.
    """
    G, U, d = shared.shape
    out = torch.empty(points.shape, dtype=points.dtype, device=points.device)
    jac_flat = jac.reshape(G * U, *jac.shape[2:])
    shared_flat = shared.reshape(G * U, d)
    for sl, rows in _chunks(table, points):
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

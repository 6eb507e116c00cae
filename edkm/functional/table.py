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

- bf16 / fp16 with d = 1: j(i) is the weight's own 16-bit pattern. Nothing per element
  is stored; a 65,536-entry pattern -> row map is rebuilt per group when needed.
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

from edkm.functional.naive import math_dtype

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
        inverse: (G, N) int32 row of every point (unique mode), or None.
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

    Args:
        points: (G, N, d) weights, any float dtype.
    Returns:
        The `Table`. Raises ``ValueError`` if a value is NaN or infinite.
    """
    G, N, d = points.shape
    device, mdt = points.device, math_dtype(points.dtype)
    rows_v, rows_n, rows_p, inverses = [], [], [], []
    for g in range(G):
        if uses_bit_patterns(points):
            hist = torch.zeros(N_PATTERNS, dtype=torch.int64, device=device)
            for s in range(0, N, CHUNK):
                hist += torch.bincount(_pattern(points[g, s : s + CHUNK, 0]), minlength=N_PATTERNS)
            present = hist.nonzero().squeeze(1)  # (U_g,)
            rows_p.append(present)
            rows_v.append(_pattern_values(present, points.dtype).to(mdt).unsqueeze(1))
            rows_n.append(hist[present])
        else:
            flat = points[g] if d > 1 else points[g, :, 0]
            uniq, inv, cnt = torch.unique(flat, dim=0 if d > 1 else None, return_inverse=True, return_counts=True)
            rows_v.append(uniq.to(mdt).reshape(-1, d))
            rows_n.append(cnt)
            inverses.append(inv.to(torch.int32))
    U = max(v.shape[0] for v in rows_v)
    values = torch.zeros(G, U, d, dtype=mdt, device=device)
    counts = torch.zeros(G, U, dtype=mdt, device=device)
    patterns = torch.full((G, U), -1, dtype=torch.int64, device=device) if rows_p else None
    for g in range(G):
        u = rows_v[g].shape[0]
        values[g, :u] = rows_v[g]
        counts[g, :u] = rows_n[g].to(mdt)
        if patterns is not None:
            patterns[g, :u] = rows_p[g]
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise ValueError(f"DKM got a non-finite weight value ({bad}); clean NaN/Inf weights first")
    inverse = torch.stack(inverses) if inverses else None
    return Table(values, counts, patterns, inverse)


def _chunks(table: Table, points: Tensor) -> Iterator[tuple[int, slice, Tensor]]:
    """Yield ``(group, slice of points, rows)`` with rows the int64 table row per point."""
    G, N, _ = points.shape
    for g in range(G):
        if table.bit_pattern:
            lut = torch.zeros(N_PATTERNS, dtype=torch.int64, device=points.device)
            present = table.patterns[g]
            present = present[present >= 0]
            lut[present] = torch.arange(present.numel(), device=points.device)
        for s in range(0, N, CHUNK):
            sl = slice(s, min(s + CHUNK, N))
            if table.bit_pattern:
                rows = lut[_pattern(points[g, sl, 0])]
            else:
                rows = table.inverse[g, sl].to(torch.int64)
            yield g, sl, rows


def segment_sum(table: Table, points: Tensor, grad: Tensor) -> Tensor:
    """``S_j = sum_{i: j(i)=j} G_i`` in the table's math dtype.

    Args:
        points: (G, N, d) the weights that built ``table``. grad: (G, N, d) per-point values.
    Returns:
        (G, U, d) sums.
    """
    out = torch.zeros_like(table.values)
    for g, sl, rows in _chunks(table, points):
        out[g].index_add_(0, rows, grad[g, sl].to(out.dtype))
    return out


def gather(table: Table, points: Tensor, rows_values: Tensor, dtype: torch.dtype) -> Tensor:
    """``out_i = T[j(i)]``: expand per-row values back to the points.

    Args:
        rows_values: (G, U, d) values per table row, cast to ``dtype`` before the gather
            (so the cast is done U times, not N times).
    Returns:
        (G, N, d) tensor in ``dtype``.
    """
    cast = rows_values.to(dtype)
    out = torch.empty(points.shape, dtype=dtype, device=points.device)
    for g, sl, rows in _chunks(table, points):
        out[g, sl] = cast[g][rows]
    return out


def element_grad(table: Table, points: Tensor, grad: Tensor, jac: Tensor, shared: Tensor) -> Tensor:
    """``dW_i = G_i J[j(i)] + r[j(i)]``, the per-element DKM gradient, in ``points.dtype``.

    Args:
        grad: (G, N, d) upstream gradient G_i.
        jac: (G, U, d, d) Jacobian of the row's soft value w.r.t. the row's value
            (``J[e, f] = d out_e / d v_f``), or (G, U) for d = 1.
        shared: (G, U, d) the gradient shared by equal values, already divided by n_j.
    Returns:
        (G, N, d) gradient in ``points.dtype``.
    """
    out = torch.empty(points.shape, dtype=points.dtype, device=points.device)
    scalar = jac.dim() == 2
    for g, sl, rows in _chunks(table, points):
        gi = grad[g, sl].to(jac.dtype)  # (n, d)
        if scalar:
            val = gi * jac[g][rows].unsqueeze(1) + shared[g][rows]
        else:
            val = torch.einsum("ne,nef->nf", gi, jac[g][rows]) + shared[g][rows]
        out[g, sl] = val.to(points.dtype)
    return out

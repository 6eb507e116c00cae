"""Nearest-centroid codes and the one packing layout for them.

Layout (`pack_codes`): the codes of a row form one little-endian bit stream, code m in
bits ``[m * bits, (m + 1) * bits)``, stored 8 codes per ``bits`` bytes; the last word of a
row is padded with zero codes. So 4-bit codes are two per byte (low nibble first), 3-bit
codes 8 per 3 bytes, 8-bit codes one per byte (plain uint8 indices). The export flattens a
layer's codes into one row and drops the padding bytes past ``ceil(numel * bits / 8)``,
which hold only zero bits; the Triton assign kernel writes the same layout per LUT group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edkm.functional.iterations import sq_dist
from edkm.functional.table import CHUNK


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every point, (G, N) int64; ties go to the lowest index.

    The argmin of the squared differences in the centroids' dtype. On the CPU with d = 1,
    fp32 centroids and the C kernels built, `edkm.ckernels.c_nearest` computes the same
    argmin without the (G, N, K) distances (7 s -> under 1 s for SmolLM2's 106M clustered
    weights, 2 threads); elsewhere torch does, in chunks.

    Args:
        points: (G, N, d) any float dtype (compared in the centroids' dtype).
        centroids: (G, K, d).
    """
    G, N, d = points.shape
    if _c_nearest_applies(points, centroids):
        from edkm import ckernels

        return ckernels.c_nearest(points[..., 0].contiguous(), centroids[..., 0].contiguous())
    out = torch.empty(G, N, dtype=torch.int64, device=points.device)
    step = max(1, CHUNK // (4 * G))  # (G, step, K) distances stay a few MB
    for s in range(0, N, step):
        out[:, s : s + step] = sq_dist(points[:, s : s + step].to(centroids.dtype), centroids).argmin(-1)
    return out


def _c_nearest_applies(points: Tensor, centroids: Tensor) -> bool:
    if points.shape[-1] != 1 or points.device.type != "cpu" or centroids.device.type != "cpu":
        return False
    if centroids.dtype != torch.float32 or points.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not 1 <= centroids.shape[1] <= 256:
        return False
    from edkm import ckernels

    return ckernels.available()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` densely, row by row (layout: module docstring).

    Args:
        codes: (G, M) integers. bits: 1..8.
    Returns:
        (G, ceil(M / 8) * bits) uint8. Raises ``ValueError`` for bad ``bits`` or codes out of range.
    """
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be (G, M), got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes must be in [0, {(1 << bits) - 1}] for {bits} bits, "
                         f"got [{c.min().item()}, {c.max().item()}]")
    G, M = c.shape
    c = torch.nn.functional.pad(c, (0, -M % 8))  # (G, 8 * words)
    shifts = torch.arange(8, device=c.device) * bits
    word = (c.view(G, -1, 8) << shifts).sum(-1)  # (G, words): the codes' bits do not overlap
    byte_shifts = torch.arange(bits, device=c.device) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(G, -1)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_codes`: (G, B) uint8 -> (G, n) uint8 codes.

    ``B`` may be shorter than ``ceil(n / 8) * bits`` by the trailing zero bytes the export
    drops (it must hold at least ``ceil(n * bits / 8)`` bytes).
    """
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    G, B = packed.shape
    need, full = math.ceil(n * bits / 8), math.ceil(n / 8) * bits
    if not need <= B <= full:
        raise ValueError(f"{n} codes of {bits} bits need {need} to {full} bytes per row, got {B}")
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, full - B))
    byte_shifts = torch.arange(bits, device=p.device) * 8
    word = (p.view(G, -1, bits) << byte_shifts).sum(-1)  # (G, words)
    shifts = torch.arange(8, device=p.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (G, words, 8)
    return codes.reshape(G, -1)[:, :n].to(torch.uint8)


def assign_codes(points: Tensor, centroids: Tensor, bits: int, backend: str = "torch") -> Tensor:
    """Nearest centroid of every point as packed ``bits``-bit codes (``bits=8``: uint8 indices).

    Args:
        points: (G, N, d) weights. centroids: (G, K, d) with K <= 2**bits.
        bits: Code width, 1..8.
        backend: ``"torch"``, or ``"triton"`` (the fused assign-and-pack kernel; bf16 /
            fp16 points with d = 1, as resolved by `edkm.functional.resolve_backend`).
    Returns:
        (G, ceil(N / 8) * bits) uint8 in the layout of `pack_codes`.
    """
    if not (isinstance(bits, int) and 1 <= bits <= 8) or centroids.shape[1] > 2**bits:
        raise ValueError(f"assign_codes needs bits in 1..8 and K <= 2**bits, got bits={bits!r}, K={centroids.shape[1]}")
    if backend == "triton":
        if points.shape[-1] != 1:
            raise ValueError(f"the Triton assign kernel takes cluster_dim 1, got {points.shape[-1]}")
        from edkm import kernels

        return kernels.triton_assign_pack(points[..., 0], centroids[..., 0].float(), bits)
    return pack_codes(nearest(points, centroids), bits)

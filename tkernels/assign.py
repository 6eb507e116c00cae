"""Hard nearest-centroid assignment with dense index packing (finalize), d = 1.

In torch form (twin: `edkm.functional.packing.assign_codes`):

    idx = ((points.float()[:, :, None] - c[:, None, :])**2).argmin(-1)   # (G, N), first min on ties
    idx = F.pad(idx, (0, -N % 8))                                        # (G, M), M = 8 * ceil(N / 8)
    word = (idx.view(G, M // 8, 8) << (BITS * torch.arange(8))).sum(-1)  # 8 codes -> 8*BITS bits
    out = (word[..., None] >> (8 * torch.arange(BITS))) & 0xFF           # -> BITS bytes
    out = out.reshape(G, M // 8 * BITS).to(torch.uint8)

So every 8 consecutive points of a group become BITS bytes, least significant bits
first: 4-bit codes are two per byte (low nibble first), 3-bit codes 8 per 3 bytes, 2-bit
four per byte, 8-bit one per byte (plain uint8 indices).

Grid (cdiv(M / 8, BLOCK_R), G): a program packs BLOCK_R words of 8 points. The distance
loop runs over the K centroids with a strict ``<``, so ties go to the lowest index like
``torch.argmin``; distances are the same fp32 ops as the twin, so codes are bit-exact.

Limits: d = 1, K <= 2**BITS, BITS in 1..8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels.common import _to_f32, check_device, check_points

# Words (8 points each) per program: 128 x 8 = 1024 points, as the other per-element passes.
BLOCK_R = 128


@triton.jit
def _assign_pack_kernel(
    points_ptr, centroids_ptr, out_ptr,
    N, K,
    stride_pg, stride_pn,
    stride_cg, stride_ck,
    stride_og, stride_ob,
    BITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rs = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # word index
    ms = tl.arange(0, 8)  # code slot in the word, and byte slot in the output
    i = rs[:, None] * 8 + ms[None, :]  # (BLOCK_R, 8) point index
    ok = i < N
    x = _to_f32(tl.load(points_ptr + g * stride_pg + i * stride_pn, mask=ok, other=0.0))
    best = tl.full([BLOCK_R, 8], float("inf"), dtype=tl.float32)
    idx = tl.zeros([BLOCK_R, 8], dtype=tl.int64)
    for k in range(K):
        c = _to_f32(tl.load(centroids_ptr + g * stride_cg + k * stride_ck))
        d = (x - c) * (x - c)
        closer = d < best  # strict: the first of equal distances wins, as torch.argmin
        best = tl.where(closer, d, best)
        idx = tl.where(closer, k, idx)
    idx = tl.where(ok, idx, 0)
    word = tl.sum(idx << (ms[None, :] * BITS).to(tl.int64), axis=1)  # (BLOCK_R,), codes do not overlap
    byte = (word[:, None] >> (ms[None, :] * 8).to(tl.int64)) & 0xFF  # (BLOCK_R, 8), first BITS used
    n_words = (N + 7) // 8
    keep = (rs[:, None] < n_words) & (ms[None, :] < BITS)
    out_ptrs = out_ptr + g * stride_og + (rs[:, None] * BITS + ms[None, :]) * stride_ob
    tl.store(out_ptrs, byte.to(tl.uint8), mask=keep)


def triton_assign_pack(points: torch.Tensor, centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest centroid of every point, packed ``bits`` per code.

    Args:
        points: (G, N) bf16 / fp16. centroids: (G, K) with K <= 2**bits.
        bits: Code width, 1..8.
    Returns:
        (G, ceil(N / 8) * bits) uint8 (layout in the module header).
    """
    check_points("triton_assign_pack", points)
    check_device("triton_assign_pack", points, centroids)
    G, N = points.shape
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"triton_assign_pack: bits must be an integer in 1..8, got {bits!r}")
    if centroids.dim() != 2 or centroids.shape[0] != G or not 1 <= centroids.shape[1] <= 2**bits:
        raise ValueError(
            f"triton_assign_pack: centroids must be (G={G}, K) with 1 <= K <= 2**bits = {2**bits}, "
            f"got {tuple(centroids.shape)}"
        )
    n_words = triton.cdiv(N, 8)
    out = torch.empty(G, n_words * bits, dtype=torch.uint8, device=points.device)
    _assign_pack_kernel[(triton.cdiv(n_words, BLOCK_R), G)](
        points, centroids, out,
        N, centroids.shape[1],
        points.stride(0), points.stride(1),
        centroids.stride(0), centroids.stride(1),
        out.stride(0), out.stride(1),
        BITS=bits, BLOCK_R=BLOCK_R,
    )
    return out

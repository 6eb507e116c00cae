"""Pieces shared by the DKM kernels: two @triton.jit helpers and the launchers' checks.

    _pattern(x)                  x.view(int16) & 0xFFFF, as int32        (16-bit key)
    _to_f32(x), _from_f32(x, dt) exact upcast; round-to-nearest-even downcast
    _soft_assign(v, c, ...)      softmax(-(v[:, None] - c[None, :])**2 / tau, dim=1)

The distance is the difference form (v - c)**2, never v*v - 2vc + c*c: weights and
centroids are ~1e-2 and tau ~1e-4, so cancellation would be amplified 1e4 times.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

N_PATTERNS = 1 << 16  # distinct 16-bit patterns: the size of a pattern-keyed table
MAX_GRID_Y = 65535  # CUDA limit of grid dimensions 1 and 2 (the group axis)
# A centroid whose soft mass is below this keeps its value and passes no gradient; the
# same constant as edkm.functional.iterations.MIN_MASS (tests/kernels/test_kernels.py checks it).
MIN_MASS = tl.constexpr(1e-6)


@triton.jit
def _pattern(x):
    """16-bit pattern of a bf16 / fp16 tile as int32 in [0, 65535]."""
    return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _to_f32(x):
    """Exact bf16 / fp16 / fp32 -> fp32 (bf16 by its bits: exact in the interpreter too)."""
    if x.dtype == tl.bfloat16:  # static: dtypes are known at compile time
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _from_f32(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` (bf16 / fp16 / fp32), rounding to nearest even, as torch does.

    bf16 is rounded on the bits (finite inputs): the Triton CPU interpreter truncates in
    ``.to(tl.bfloat16)``, and this form is the same on GPU. fp16 uses the native cast
    (round to nearest even on GPU and in the interpreter).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))  # round half to even on the low 16 bits
        y = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _soft_assign(v, c, k_ok, tau):
    """Soft assignment of a (BLOCK_U,) tile of values to (BLOCK_K,) centroids.

    Returns ``(a, diff)``: the (BLOCK_U, BLOCK_K) softmax over the live centroids
    (``k_ok``; the others get weight 0) and ``diff = v - c``.
    """
    diff = v[:, None] - c[None, :]  # (BLOCK_U, BLOCK_K)
    z = (diff * diff) / -tau
    z = tl.where(k_ok[None, :], z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None], diff


def interpreting() -> bool:
    """Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """Raise unless all ``tensors`` share one device the kernels can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors are on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{name}: Triton kernels need CUDA tensors, got {device}; "
            "CPU tensors run only under TRITON_INTERPRET=1 (set before triton is imported)"
        )


def check_points(name: str, points: torch.Tensor) -> None:
    """Raise unless ``points`` is a (G, N) bf16 / fp16 tensor the grid can cover."""
    if points.dim() != 2 or points.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: points must be (G, N) bf16/fp16, got {points.dtype} {tuple(points.shape)}")
    if points.shape[0] > MAX_GRID_Y:
        raise ValueError(f"{name}: at most {MAX_GRID_Y} groups per launch, got {points.shape[0]}")
    if points.shape[1] >= 2**31:
        raise ValueError(f"{name}: at most 2**31 - 1 points per group, got {points.shape[1]}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """Raise unless ``t`` has ``shape`` (and ``dtype`` when given)."""
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        want = f"{tuple(shape)}" + (f" {dtype}" if dtype is not None else "")
        raise ValueError(f"{name}: expected {want}, got {tuple(t.shape)} {t.dtype}")


def block_k(k: int) -> int:
    """Power-of-two tile width that holds ``k`` centroids (tl.arange needs a power of 2)."""
    if not 1 <= k <= 256:
        raise ValueError(f"the kernels handle 1..256 centroids, got {k}")
    return max(2, triton.next_power_of_2(k))


def block_u(k: int) -> int:
    """Table rows per tile for ``k`` centroids: a BLOCK_U x BLOCK_K fp32 tile of ~2K
    floats (128 x 16), which 4 warps hold in registers with room for the temporaries.
    A GPU autotune over this choice is owed (bench/kernels.py)."""
    return max(16, min(256, 2048 // block_k(k)))

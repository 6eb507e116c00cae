"""The one tolerance rule of the test suite (STYLE.md), used by every test file.

- fp32 / fp64 results: against an fp64 reference, a path's normwise error (max abs error
  over max |reference|) may be at most twice the error of the path it is held to (the
  naive (N, K) autograd DKM, or the torch twin of a kernel) on the same inputs, plus a
  small ``atol`` (1e-5: the fp32 rounding of a 3-iteration DKM with tau = 1e-4 amplifies
  input errors ~1e4 times, so 1e-5 is the floor of what fp32 can agree on).
- 16-bit results against their torch twin: element by element in units of that element's
  own ulp (`ulp_distance`): 0 where the computation is the same sequence of ops, at most
  1 where only the fp32 value before the one rounding cast may differ (FMA, summation order).
- Discrete results (counts, indices, codes): bit-exact.
"""

from __future__ import annotations

import torch

ATOL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise error: max |a - ref| / max |ref| (in fp64)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def worst(a: torch.Tensor, ref: torch.Tensor) -> str:
    """The index where ``a`` is farthest from ``ref``, with both values."""
    d = (a.double() - ref.double()).abs()
    i = int(d.argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape))
    return f"worst index {idx}: got {a.flatten()[i].item():.8g}, want {ref.flatten()[i].item():.8g}"


def assert_within_rule(name: str, got: torch.Tensor, held_to: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    """``rel_err(got, ref) <= 2 * rel_err(held_to, ref) + atol``."""
    e_got, e_held = rel_err(got, ref), rel_err(held_to, ref)
    assert e_got <= 2 * e_held + atol, f"{name}: err {e_got:.3g} vs {e_held:.3g} allowed 2x + {atol:g}; {worst(got, ref)}"


def assert_equal_fp64(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-10) -> None:
    """Two fp64 computations of the same math agree to ``tol`` (normwise)."""
    err = rel_err(got, ref)
    assert err < tol, f"{name}: err {err:.3g} >= {tol:g}; {worst(got, ref)}"


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats -> int64 keys whose difference counts representable values between them."""
    p = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    mag = p & 0x7FFF
    return torch.where(p >= 0x8000, -mag, mag)  # +0 and -0 both map to 0


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable 16-bit values between ``a`` and ``b``, element by element."""
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16), (a.dtype, b.dtype)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "ulp distance of non-finite values"
    return (_ordered(a) - _ordered(b)).abs()


def assert_ulps(name: str, got: torch.Tensor, want: torch.Tensor, max_ulps: int) -> None:
    """Every element of 16-bit ``got`` is within ``max_ulps`` of ``want`` (0: bit-exact)."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} vs {want.dtype}"
    d = ulp_distance(got, want)
    bad = (d > max_ulps).nonzero()
    if bad.numel():
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{name}: {bad.shape[0]} of {d.numel()} elements more than {max_ulps} ulp apart (max {int(d.max())}); "
            f"first at {i}: got {got[i].item():.8g}, want {want[i].item():.8g}"
        )

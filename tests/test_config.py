"""DKMConfig validation: tau may not be so small that distance / tau overflows fp32."""

from __future__ import annotations

import pytest
import torch

from edkm.config import TAU_MIN, DKMConfig


def test_tau_bound_is_where_the_largest_16bit_distance_overflows_fp32():
    far = torch.tensor((2 * 65504.0) ** 2, dtype=torch.float32)  # squared distance of -65504 and 65504
    assert torch.isfinite(far / torch.tensor(TAU_MIN, dtype=torch.float32))
    assert torch.isinf(far / torch.tensor(TAU_MIN / 2, dtype=torch.float32))


def test_tau_below_the_bound_is_refused_with_the_value():
    DKMConfig(tau=TAU_MIN)
    with pytest.raises(ValueError, match=r"tau must be >= 5.04e-29 .* got 1e-40"):
        DKMConfig(tau=1e-40)

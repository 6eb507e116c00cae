"""`LowRankConfig`: which layers `lowrank_model` decomposes, and to what rank.

One frozen, validated dataclass; errors carry the bad value. ``to_dict`` / ``from_dict``
round-trip through plain types; unknown keys are errors that name the key.

Ranks come from exactly one of:

- ``rank_reduction = f``: every unit (layer or group) keeps ``floor((1 - f) * p)`` with
  ``p = out*in/(out+in)`` its parity rank, i.e. a fraction ``f`` of its weights is removed.
- ``budget = f``: a fraction ``f`` of all selected weights is removed in total, split
  across units by a sensitivity estimate (``sensitivity``, see `edkm.lowrank.budget`);
  units estimated to be sensitive keep more rank or stay dense.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from edkm._checks import check_int, check_number, check_patterns, is_finite_number
from edkm.config import ConfigDict
from edkm.lowrank.budget import SENSITIVITIES
from edkm.lowrank.factor import DEFAULT_DAMPING

__all__ = ["LowRankConfig"]


@dataclass(frozen=True)
class LowRankConfig(ConfigDict):
    """How `lowrank_model` decomposes a model's linear layers.

    Args:
        include: Glob patterns (fnmatch) of ``nn.Linear`` module names to decompose.
        exclude: Glob patterns never decomposed (default: the LM head).
        rank_reduction: Fraction in (0, 1) of each unit's weights removed (uniform).
        budget: Fraction in (0, 1) of all selected weights removed, allocated by
            sensitivity. Exactly one of ``rank_reduction`` / ``budget`` is set.
        sensitivity: How ``budget`` ranks units: ``"fisher"`` (K-FAC loss estimate; the
            calibration pass also runs a backward) or ``"spectrum"`` (relative output
            error only, no gradients).
        activation_aware: Minimise output error on calibration inputs (False: plain SVD).
        groups: Stack layers that read the same input tensor (q/k/v, gate/up) and share
            one bottleneck A.
        damping: Relative damping of each input second moment, ``S + damping*mean(diag S)*I``.
        rank_multiple: Round every rank down to a multiple of this (e.g. a DKM
            ``group_size`` so ``down`` can use per-grouped-channel LUTs, or 8/16 for GPU
            matmul tiles); at least this value.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head",)
    rank_reduction: float | None = 0.25
    budget: float | None = None
    sensitivity: str = "fisher"
    activation_aware: bool = True
    groups: bool = True
    damping: float = DEFAULT_DAMPING
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            object.__setattr__(self, name, check_patterns(name, getattr(self, name)))
        if (self.rank_reduction is None) == (self.budget is None):
            raise ValueError(
                f"set exactly one of rank_reduction / budget, got rank_reduction={self.rank_reduction!r}, "
                f"budget={self.budget!r}"
            )
        for name in ("rank_reduction", "budget"):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and 0.0 < value < 1.0):
                raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
        for name in ("activation_aware", "groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_number("damping", self.damping, inclusive=True)
        check_int("rank_multiple", self.rank_multiple)

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is chosen by include/exclude patterns."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)

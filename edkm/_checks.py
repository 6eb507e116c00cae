"""Argument checks shared by every layer of edkm, whose messages name the argument and carry
the bad value (``"tau must be a finite number > 0, got nan"``).

A bool is never a number here (``True`` would pass as 1), and NaN / inf never pass a number
check: a NaN learning rate or damping trains on NaN without an error of its own.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_number", "check_patterns", "is_finite_number"]


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value: Any, *, inclusive: bool = False, also: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``inclusive``: >= 0).

    Args:
        name: The argument's name as the user wrote it (``"optim.lr"``, ``"damp"``).
        value: The value to check.
        inclusive: Accept 0.
        also: Appended to the rule in the message (e.g. ``"or null"`` where None is allowed
            and handled by the caller).
    """
    if not (is_finite_number(value) and (value >= 0 if inclusive else value > 0)):
        rule = f"a finite number {'>=' if inclusive else '>'} 0" + (f" {also}" if also else "")
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def check_int(name: str, value: Any, low: int | None = 1, high: int | None = None, *, also: str = "") -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) in ``[low, high]`` (None: no bound).

    ``also`` is appended to the rule in the message, as in `check_number`.
    """
    if (isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
            and (high is None or value <= high)):
        return
    if low is not None and high is not None:
        rule = f"an integer in [{low}, {high}]"
    elif low is not None:
        rule = f"an integer >= {low}"
    elif high is not None:
        rule = f"an integer <= {high}"
    else:
        rule = "an integer"
    if also:
        rule += f" {also}"
    raise ValueError(f"{name} must be {rule}, got {value!r}")


def check_patterns(name: str, value: Any, *, distinct: bool = False) -> tuple[str, ...]:
    """``value`` (one glob pattern, or a list of them as YAML gives) as a tuple of non-empty strings.

    Raises ValueError naming ``name`` and the whole value otherwise (``distinct``: also on a
    repeated pattern).
    """
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, str) and p for p in items) or distinct and len(set(items)) < len(items):
        rule = f"a non-empty pattern or a list of {'distinct ' if distinct else ''}non-empty patterns"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return items

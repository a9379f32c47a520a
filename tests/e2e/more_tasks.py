"""A second module, served only by workers started for it."""

from __future__ import annotations

from typing import Any


def cube(x: float) -> float:
    """Return ``x ** 3``."""
    return x * x * x


def identity(value: Any) -> Any:
    """Return `value` as it came."""
    return value

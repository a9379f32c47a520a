"""A second module, served only by workers started for it."""

from __future__ import annotations


def cube(x: float) -> float:
    """Return ``x ** 3``."""
    return x * x * x

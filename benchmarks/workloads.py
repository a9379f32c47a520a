"""The functions every benchmarked system runs, importable by name."""

from __future__ import annotations

import time

__all__ = ["check_squares", "length", "spin", "square"]


def square(x: int) -> int:
    """A tiny task: the cost measured is the system's, not the task's."""
    return x * x


def spin(seconds: float) -> int:
    """Burn `seconds` of pure-Python CPU (a busy loop, not a sleep)."""
    deadline = time.perf_counter() + seconds
    turns = 0
    while time.perf_counter() < deadline:
        turns += 1
    return turns


def length(blob: bytes) -> int:
    """Return the size of a payload, so it must arrive whole."""
    return len(blob)


def check_squares(results: list[int]) -> None:
    """Fail loudly if any result is missing, doubled or out of order."""
    if results != [i * i for i in range(len(results))]:
        raise AssertionError("results are missing, doubled or out of order")

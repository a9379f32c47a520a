"""Time helpers shared by the I/O shells (the core takes time as an argument)."""

from __future__ import annotations

import math
import time


def poll_timeout_ms(wake_at: float) -> int:
    """Milliseconds from now until `wake_at` (monotonic), rounded up, never < 0.

    Rounding up matters: a poll of 0 ms while the deadline is 0.4 ms away would
    spin until it passes.
    """
    return max(0, math.ceil((wake_at - time.monotonic()) * 1000))


class StallWatch:
    """Tells a loop that wakes at least once per `interval_s` when its process
    stood still (stopped by SIGSTOP, swapped out, blocked on a stalled disk).

    A peer's silence that overlaps such a stall is ours, not the peer's: the
    loop could not have heard it. Only what a turn came later than one
    interval counts; a gap of up to two intervals is a busy turn, not a stall.
    """

    def __init__(self, interval_s: float, now: float) -> None:
        self._interval_s = interval_s
        self._last_turn = now

    def stalled_s(self, now: float) -> float:
        """How long the loop stood still before this turn (at `now`); 0.0 if
        it turned on time. Call once per turn."""
        gap_s = now - self._last_turn
        self._last_turn = now
        if gap_s <= 2 * self._interval_s:
            return 0.0
        return gap_s - self._interval_s

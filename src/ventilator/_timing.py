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
        # The thread's CPU time, read at most once an interval: a system call
        # on every turn of a busy loop showed in its profile.
        self._cpu_at, self._cpu_s = now, time.thread_time()
        # Of the last stall, the CPU time the loop's thread spent computing
        # (from up to an interval before it began).
        self.computing_s = 0.0

    def stalled_s(self, now: float) -> float:
        """How long the loop stood still before this turn (at `now`); 0.0 if
        it turned on time. Call once per turn."""
        gap_s = now - self._last_turn
        self._last_turn = now
        if gap_s <= 2 * self._interval_s:
            if now - self._cpu_at >= self._interval_s:
                self._cpu_at, self._cpu_s = now, time.thread_time()
            return 0.0
        cpu_s = time.thread_time()
        self.computing_s = cpu_s - self._cpu_s
        self._cpu_at, self._cpu_s = now, cpu_s
        return gap_s - self._interval_s

    def cause(self, stalled_s: float) -> str:
        """Why the loop stood still for `stalled_s`, in words for a log: it
        was computing (one long turn), or it did not run at all."""
        if self.computing_s >= stalled_s / 2:
            return (
                f"one turn computed for {self.computing_s:.1f}s: a large batch "
                "or a long garbage collection"
            )
        return (
            "it did not run: stopped, swapped out, starved of CPU by other "
            "processes, or waiting on its disk"
        )


class BrokerSilence:
    """When a peer (a client's I/O thread, a worker) last heard its broker,
    as a reconnection counts it.

    The silence is judged as it passes the limit, not at the next heartbeat:
    judged at beats, a killed broker was noticed up to an interval later than
    the `liveness` intervals docs/cli.md promises. The limit is given at each
    question: a client's follows the interval the broker's WELCOME set.
    """

    def __init__(self, now: float) -> None:
        self.seen_at = now

    def forgive(self, stalled_s: float, now: float) -> None:
        """This process stood still (SIGSTOP, a swapped-out host) for
        `stalled_s`: it could not hear the broker, so that silence is not the
        broker's, and a reconnection would drop what the socket still holds."""
        self.seen_at = min(now, self.seen_at + stalled_s)

    def gone_at(self, limit_s: float) -> float:
        """When a silence of `limit_s` is reached, unless the broker speaks."""
        return self.seen_at + limit_s

    def presumed_gone(self, now: float, limit_s: float) -> bool:
        # At the wake-up for gone_at(), not a spin until the next microsecond.
        return now >= self.gone_at(limit_s)

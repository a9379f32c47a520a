"""StallWatch: when a loop stood still, and why."""

from __future__ import annotations

import time

from ventilator._timing import StallWatch

INTERVAL_S = 0.02
# Well past the two intervals that a busy turn may take.
STALL_S = 0.3


def compute_for(seconds: float) -> None:
    """Keep this thread on the CPU for `seconds` of its own CPU time."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def test_a_turn_on_time_is_no_stall() -> None:
    # The clock is the test's: read twice, it let a preemption of two
    # intervals between the reads on a loaded machine pass for a stall.
    started = time.monotonic()
    watch = StallWatch(INTERVAL_S, started)

    assert watch.stalled_s(started + INTERVAL_S) == 0.0
    # Short of the limit of two intervals: at exactly two, rounding made the
    # gap a hair over it now and then (0.0200...02 stalled).
    assert watch.stalled_s(started + 2.9 * INTERVAL_S) == 0.0


def test_a_long_turn_that_computed_says_so() -> None:
    watch = StallWatch(INTERVAL_S, time.monotonic())
    compute_for(STALL_S)

    stalled_s = watch.stalled_s(time.monotonic())

    assert stalled_s >= STALL_S - INTERVAL_S
    assert watch.computing_s >= STALL_S
    # Its wall time may exceed its CPU time on a busy machine: judged on the
    # CPU time alone, it computed for all of it.
    assert "computed" in watch.cause(watch.computing_s)


def test_a_stall_spent_off_the_cpu_says_it_did_not_run() -> None:
    watch = StallWatch(INTERVAL_S, time.monotonic())
    time.sleep(STALL_S)  # the fault itself: a thread that does not run

    stalled_s = watch.stalled_s(time.monotonic())

    assert stalled_s >= STALL_S - INTERVAL_S
    assert watch.computing_s < STALL_S / 2
    assert "did not run" in watch.cause(stalled_s)

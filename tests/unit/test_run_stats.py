"""RunStats: per queue, how long tasks run and how large their results are."""

from __future__ import annotations

import pytest

from ventilator.run_stats import RUN_TIME_WEIGHT, RunStats


def test_a_queues_first_task_sets_both_averages() -> None:
    stats = RunStats()
    stats.observe("m:f", duration_s=2.0, size=100)
    assert stats.run_s == {"m:f": 2.0}
    assert stats.result_size == {"m:f": 100.0}


def test_run_times_move_by_their_weight() -> None:
    stats = RunStats()
    stats.observe("m:f", duration_s=1.0, size=0)
    stats.observe("m:f", duration_s=2.0, size=0)
    assert stats.run_s["m:f"] == pytest.approx(1.0 + RUN_TIME_WEIGHT)


def test_the_result_size_rises_at_once_and_falls_slowly() -> None:
    stats = RunStats()
    stats.observe("m:f", duration_s=0.0, size=10)
    stats.observe("m:f", duration_s=0.0, size=60_000)
    assert stats.result_size["m:f"] == 60_000.0
    stats.observe("m:f", duration_s=0.0, size=0)
    assert stats.result_size["m:f"] == pytest.approx(60_000 * (1 - RUN_TIME_WEIGHT))


def test_queues_are_averaged_apart() -> None:
    stats = RunStats()
    stats.observe("m:f", duration_s=1.0, size=1)
    stats.observe("m:g", duration_s=5.0, size=5)
    assert stats.run_s == {"m:f": 1.0, "m:g": 5.0}

"""ReturnWait: restored queues wait for their workers after a restart."""

from __future__ import annotations

from ventilator.return_wait import RETURN_WAIT_BEATS, ReturnWait

BEAT_S = 1.0


def test_nothing_waits_when_nothing_was_restored() -> None:
    wait = ReturnWait(BEAT_S)
    assert wait.start(now=10.0) == 0.0
    assert not wait.held_back


def test_restored_queues_are_held_back_until_the_wait_passes() -> None:
    wait = ReturnWait(BEAT_S)
    wait.restored("m:f")

    wait_s = wait.start(now=10.0)
    assert wait_s == RETURN_WAIT_BEATS * BEAT_S
    assert wait.held_back == {"m:f"}

    wait.end_if_due(now=10.0 + wait_s / 2)
    assert wait.held_back == {"m:f"}
    wait.end_if_due(now=10.0 + wait_s)
    assert not wait.held_back


def test_a_second_start_holds_nothing_back() -> None:
    wait = ReturnWait(BEAT_S)
    wait.restored("m:f")
    wait.start(now=10.0)
    wait.end_if_due(now=100.0)
    assert wait.start(now=100.0) == 0.0

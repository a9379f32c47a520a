"""Counts in correct English (the helper every log line with a count uses)."""

from __future__ import annotations

from ventilator._words import counted, times


def test_one_of_a_thing_is_singular_and_any_other_count_plural() -> None:
    assert counted(1, "task") == "1 task"
    assert counted(0, "task") == "0 tasks"
    assert counted(3, "task") == "3 tasks"
    assert counted(2, "client joined", "clients joined") == "2 clients joined"
    assert counted(1, "handshake", bare_one=True) == "handshake"
    assert counted(4, "handshake", bare_one=True) == "4 handshakes"


def test_how_often_reads_as_said() -> None:
    assert [times(n) for n in (1, 2, 5)] == ["once", "2 times", "5 times"]

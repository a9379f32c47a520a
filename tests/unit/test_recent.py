"""The bounded memory of result keys that client and sink hand on once."""

from __future__ import annotations

from ventilator._recent import RecentResults


def test_recent_results_forget_the_oldest_key_past_their_limit() -> None:
    recent = RecentResults(limit=2)
    for task_id in (1, 2, 3):
        recent.add(("", task_id))

    assert ("", 1) not in recent
    assert list(recent) == [("", 2), ("", 3)]


def test_recent_results_come_back_in_chunks_oldest_first() -> None:
    recent = RecentResults()
    for task_id in range(5):
        recent.add(("origin", task_id))

    assert [len(chunk) for chunk in recent.chunks(2)] == [2, 2, 1]
    assert next(recent.chunks(2)) == [("origin", 0), ("origin", 1)]

"""Room for results: the bytes a session has kept and expected, and when they
hold it back."""

from __future__ import annotations

from ventilator.result_room import ResultRoom

LIMIT = 1_000


def test_an_expected_result_that_fills_the_room_holds_its_session_back() -> None:
    room = ResultRoom(LIMIT)
    room.count_kept("alice", 600)

    assert not room.expect("alice", 300)
    assert room.expect("alice", 100)
    assert room.held_back == {"alice"}


def test_review_lets_a_session_go_once_its_results_are_read() -> None:
    room = ResultRoom(LIMIT)
    room.count_kept("alice", LIMIT)
    assert room.review() == [("alice", True)]

    room.count_kept("alice", -LIMIT)

    assert room.review() == [("alice", False)]
    assert not room.held_back
    assert room.kept == {}, "a count at zero is dropped"


def test_review_names_only_sessions_whose_state_changed() -> None:
    room = ResultRoom(LIMIT)
    room.count_kept("alice", 10)
    room.count_kept("bob", LIMIT)

    assert room.review() == [("bob", True)]
    assert room.review() == [], "nothing changed since"


def test_a_finished_task_is_expected_no_more() -> None:
    room = ResultRoom(LIMIT)
    room.expect("alice", LIMIT)

    room.unexpect("alice", LIMIT)

    assert room.expected == {}
    assert room.review() == [("alice", False)]
    room.check(kept={}, expected={})

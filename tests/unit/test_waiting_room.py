"""Tasks past their sender's window, waiting at the broker for room."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.waiting_room import WaitingRoom

WINDOW = 3
MAX_BYTES = 100


def spec(task_id: int, payload: bytes = b"args") -> p.TaskSpec:
    return p.TaskSpec(task_id, "tasks:work", payload)


def test_tasks_wait_in_the_order_they_came() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    for task_id in (7, 3, 5):
        assert room.park("alice", spec(task_id)) is None

    assert list(room.parked["alice"].specs) == [7, 3, 5]
    assert room.holds("alice", 3)
    assert not room.holds("bob", 3)


def test_past_a_window_of_waiting_tasks_a_sender_is_refused() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    for task_id in range(WINDOW):
        room.park("alice", spec(task_id))

    reason = room.park("alice", spec(WINDOW))

    assert reason is not None and f"client_window={WINDOW}" in reason
    assert not room.holds("alice", WINDOW)


def test_past_the_bytes_of_a_window_a_sender_is_refused() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    room.park("alice", spec(1, b"x" * 60))

    assert room.park("alice", spec(2, b"x" * 60)) is not None
    assert room.parked["alice"].size == 60


def test_room_that_came_back_is_handed_out_once() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    room.park("alice", spec(1))
    room.room_freed("alice")

    [(session, parked)] = room.take_freed()

    assert session == "alice" and list(parked.specs) == [1]
    assert room.take_freed() == []


def test_a_cancelled_waiting_task_makes_room_for_the_next() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    room.park("alice", spec(1))
    room.park("alice", spec(2))

    assert room.cancel("alice", 1)
    assert not room.cancel("alice", 1)
    assert [session for session, _ in room.take_freed()] == ["alice"]


def test_a_session_emptied_is_forgotten_once_tidied() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    room.park("alice", spec(1))
    room.cancel("alice", 1)
    [(session, _)] = room.take_freed()

    room.tidy(session)

    assert "alice" not in room.parked
    room.check()


def test_dropping_a_session_says_how_many_waited() -> None:
    room = WaitingRoom(WINDOW, MAX_BYTES)
    room.park("alice", spec(1))
    room.park("alice", spec(2))
    room.room_freed("alice")

    assert room.drop("alice") == 2
    assert room.drop("alice") == 0
    assert room.take_freed() == [], "no look at a session that left"

"""The session registry: recipients, and which connection speaks for which."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.policy import Limits
from ventilator.sessions import SESSIONS_PER_CONNECTION, Recipient, SessionRegistry

A = b"conn-a"
B = b"conn-b"


def registry(holds_nothing: bool = True, max_sessions: int = 100) -> SessionRegistry:
    return SessionRegistry(Limits(max_sessions=max_sessions), lambda _: holds_nothing)


def opened(sessions: SessionRegistry, peer: bytes, name: str) -> Recipient:
    recipient = sessions.recipient(name)
    sessions.connect(recipient, peer)
    sessions.count_opened(recipient, peer)
    return recipient


def test_a_session_on_a_new_connection_leaves_its_earlier_one_unmapped() -> None:
    sessions = registry()
    alice = opened(sessions, A, "alice")

    sessions.connect(alice, B)

    assert alice.peer == B
    assert sessions.name_of(B) == "alice"
    assert sessions.name_of(A) is None
    sessions.check()


def test_an_away_recipient_still_hears_its_connection() -> None:
    sessions = registry()
    alice = opened(sessions, A, "alice")
    alice.peer = None  # given up on for silence

    assert sessions.speaker(A) is alice


def test_a_connection_that_opened_its_fill_of_held_sessions_is_refused() -> None:
    sessions = registry(holds_nothing=False)
    for number in range(SESSIONS_PER_CONNECTION):
        opened(sessions, A, f"s{number}")

    reason = sessions.room_for_new(A)

    assert reason is not None and f"({SESSIONS_PER_CONNECTION})" in reason
    assert sessions.room_for_new(B) is None


def test_the_session_a_connection_leaves_empty_makes_room_for_its_next() -> None:
    sessions = registry(holds_nothing=True)
    for number in range(SESSIONS_PER_CONNECTION):
        opened(sessions, A, f"s{number}")

    assert sessions.room_for_new(A) is None


def test_past_max_sessions_nobody_opens_one() -> None:
    sessions = registry(max_sessions=1)
    opened(sessions, A, "alice")

    reason = sessions.room_for_new(B)

    assert reason is not None and "max_sessions=1" in reason


def test_a_forgotten_session_no_longer_counts_against_its_opener() -> None:
    sessions = registry()
    alice = opened(sessions, A, "alice")

    sessions.forget(alice)

    assert sessions.recipients == {}
    assert sessions.name_of(A) is None
    sessions.check()


def test_a_connection_disconnected_leaves_its_recipient_away() -> None:
    sessions = registry()
    alice = opened(sessions, A, "alice")

    assert sessions.disconnect(A) is alice
    assert alice.peer is None and alice.last_peer == A
    assert sessions.disconnect(A) is None


def test_another_live_client_may_not_take_a_held_session() -> None:
    sessions = registry()
    alice = opened(sessions, A, "alice")
    alice.instance = 1

    assert sessions.held_by_another(B, p.Hello("alice", instance=2)) is alice
    # The same client on a new connection, and an older client, take it.
    assert sessions.held_by_another(B, p.Hello("alice", instance=1)) is None
    assert sessions.held_by_another(B, p.Hello("alice")) is None


def test_another_process_may_not_take_a_received_sink() -> None:
    sessions = registry()
    sink = opened(sessions, A, "sink:totals")
    sink.holder = "proc-1"

    assert sessions.sink_held_by_another(B, "sink:totals", "proc-2") is sink
    assert sessions.sink_held_by_another(B, "sink:totals", "proc-1") is None

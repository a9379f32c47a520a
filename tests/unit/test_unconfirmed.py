"""What a worker keeps of the results it sent, until the broker's voice
confirms them."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator._unconfirmed import Unconfirmed


def outcome(ticket: int, attempt: int = 1, size: int = 1) -> p.Outcome:
    return p.Outcome(ticket, attempt, p.Status.OK, bytes(size))


def tickets(unconfirmed: Unconfirmed) -> list[tuple[int, int]]:
    return [(o.ticket, o.attempt) for o in unconfirmed.outcomes()]


def test_results_stay_until_the_broker_speaks_an_interval_after_they_went() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0)
    unconfirmed.sent([outcome(1)], now=10.0)
    unconfirmed.sent([outcome(2)], now=10.5)

    unconfirmed.heard(10.9)
    assert tickets(unconfirmed) == [(1, 1), (2, 1)]

    unconfirmed.heard(11.2)
    assert tickets(unconfirmed) == [(2, 1)]


def test_results_sent_again_wait_for_a_voice_after_the_new_sending() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0)
    unconfirmed.sent([outcome(1)], now=10.0)
    unconfirmed.resend(running=(), room=10, now=20.0)

    unconfirmed.heard(15.0)

    assert tickets(unconfirmed) == [(1, 1)]


def test_a_resending_keeps_only_what_it_names_and_counts_what_had_no_room() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0)
    unconfirmed.sent([outcome(1, attempt=1), outcome(2), outcome(3)], now=1.0)
    unconfirmed.sent([outcome(4)], now=2.0)

    # 1 runs again (at a later attempt); room for two of the others.
    resent = unconfirmed.resend(running={1}, room=2, now=5.0)

    assert [(o.ticket, o.attempt) for o in resent] == [(2, 1), (3, 1)]
    assert tickets(unconfirmed) == [(2, 1), (3, 1)]
    assert unconfirmed.forgotten == 1  # 4, left out for room; 1 is superseded
    unconfirmed.heard(5.5)
    assert len(unconfirmed) == 2, "stamped as sent at the resending"


def test_the_oldest_results_are_forgotten_past_the_count_and_counted() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0, max_outcomes=3)
    unconfirmed.sent([outcome(1), outcome(2)], now=1.0)
    unconfirmed.sent([outcome(3), outcome(4)], now=2.0)

    assert tickets(unconfirmed) == [(3, 1), (4, 1)]
    assert unconfirmed.forgotten == 2


def test_the_oldest_results_are_forgotten_past_the_bytes() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0, max_bytes=100)
    unconfirmed.sent([outcome(1, size=60)], now=1.0)
    unconfirmed.sent([outcome(2, size=60)], now=2.0)

    assert tickets(unconfirmed) == [(2, 1)]
    assert len(unconfirmed) == 1


def test_a_ticket_sent_twice_is_named_once_at_its_latest_attempt() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0)
    unconfirmed.sent([outcome(1, attempt=1)], now=1.0)
    unconfirmed.sent([outcome(1, attempt=2), outcome(2)], now=2.0)

    assert tickets(unconfirmed) == [(1, 2), (2, 1)]
    assert [o.ticket for o in unconfirmed.outcomes(skip={1})] == [2]


def test_results_the_broker_does_not_want_are_forgotten() -> None:
    unconfirmed = Unconfirmed(confirm_after_s=1.0)
    unconfirmed.sent([outcome(1), outcome(2, size=10)], now=1.0)

    unconfirmed.forget([(1, 1), (2, 7)])

    assert tickets(unconfirmed) == [(2, 1)]
    assert len(unconfirmed) == 1

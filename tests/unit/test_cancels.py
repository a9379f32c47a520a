"""What a client keeps of the cancellations the broker has not confirmed."""

from __future__ import annotations

from ventilator._cancels import UnconfirmedCancels


def test_a_cancel_is_kept_until_confirmed_however_long_ago_it_was_sent() -> None:
    cancels = UnconfirmedCancels()
    cancels.sent([1, 2])
    for task_id in range(3, 1000):
        cancels.sent([task_id])
        cancels.settled(task_id)

    # Before, a cancel sent more than liveness + 1 heartbeats before a later
    # one was forgotten, and a new connection did not send it again.
    assert cancels.to_send_again() == [1, 2]


def test_a_result_of_the_task_confirms_its_cancel() -> None:
    cancels = UnconfirmedCancels()
    cancels.sent([1, 2, 3])

    cancels.settled(2)

    assert cancels.to_send_again() == [1, 3]


def test_a_receipt_confirms_the_cancels_sent_before_it_was_asked() -> None:
    cancels = UnconfirmedCancels()
    cancels.sent([1, 2])
    covers = cancels.receipt_wanted()
    assert covers is not None
    cancels.sent([3])

    cancels.receipt_answered(covers)

    assert cancels.to_send_again() == [3]


def test_a_cancel_sent_again_after_a_receipt_was_asked_waits_for_the_next() -> None:
    cancels = UnconfirmedCancels()
    cancels.sent([1, 2])
    covers = cancels.receipt_wanted()
    assert covers is not None
    cancels.sent(cancels.to_send_again())  # a new connection sent both again

    cancels.receipt_answered(covers)

    assert cancels.to_send_again() == [1, 2]
    assert cancels.receipt_wanted() is not None


def test_one_receipt_at_a_time_and_none_for_nothing_uncovered() -> None:
    cancels = UnconfirmedCancels()
    assert cancels.receipt_wanted() is None
    cancels.sent([1])
    covers = cancels.receipt_wanted()
    assert covers is not None
    cancels.sent([2])

    assert cancels.receipt_wanted() is None, "one in flight already"
    cancels.receipt_answered(covers)
    assert cancels.receipt_wanted() is not None, "2 is not covered yet"


def test_a_lost_receipt_is_asked_again() -> None:
    cancels = UnconfirmedCancels()
    cancels.sent([1])
    covers = cancels.receipt_wanted()
    assert covers is not None

    cancels.receipt_lost(covers)

    assert cancels.to_send_again() == [1]
    assert cancels.receipt_wanted() is not None


def test_unconfirmed_cancels_are_bounded_forgetting_the_oldest() -> None:
    cancels = UnconfirmedCancels(limit=3)

    forgotten = cancels.sent([1, 2, 3, 4, 5])

    assert forgotten == 2
    assert cancels.to_send_again() == [3, 4, 5]

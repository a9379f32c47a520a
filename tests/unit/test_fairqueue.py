"""The per-owner lanes of a function queue, served in turns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ventilator.fairqueue import FairQueue


def drain(queue: FairQueue) -> list[int]:
    return [queue.popleft() for _ in range(len(queue))]


def test_one_owner_is_a_plain_fifo() -> None:
    queue = FairQueue()
    for ticket in range(5):
        queue.append(ticket, "alice")

    assert drain(queue) == [0, 1, 2, 3, 4]
    assert not queue


def test_owners_take_turns_whatever_their_backlogs() -> None:
    queue = FairQueue()
    for ticket in range(100, 106):
        queue.append(ticket, "flood")
    queue.append(1, "bob")
    queue.append(2, "bob")

    assert drain(queue) == [100, 1, 101, 2, 102, 103, 104, 105]


def test_a_task_given_back_goes_first_in_its_lane_and_its_owner_is_next() -> None:
    queue = FairQueue()
    queue.append(1, "alice")
    queue.append(2, "bob")
    queue.appendleft(9, "carol")
    queue.appendleft(0, "alice")

    assert drain(queue) == [9, 0, 2, 1]


def test_empty_queue_raises_index_error() -> None:
    with pytest.raises(IndexError):
        FairQueue().popleft()


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abc"))))
def test_every_ticket_comes_out_once_in_lane_order(
    operations: list[tuple[bool, str]],
) -> None:
    queue = FairQueue()
    lanes: dict[str, list[int]] = {}
    for ticket, (front, owner) in enumerate(operations):
        if front:
            queue.appendleft(ticket, owner)
            lanes.setdefault(owner, []).insert(0, ticket)
        else:
            queue.append(ticket, owner)
            lanes.setdefault(owner, []).append(ticket)

    assert len(queue) == len(operations) == len(list(queue))
    out = drain(queue)
    assert sorted(out) == list(range(len(operations)))
    for lane in lanes.values():
        assert [t for t in out if t in lane] == lane


def test_discarded_tickets_leave_their_lane_and_the_rest_keep_their_turns() -> None:
    queue = FairQueue()
    for ticket, owner in [(1, "alice"), (2, "bob"), (3, "alice"), (4, "carol")]:
        queue.append(ticket, owner)

    queue.discard("alice", {1, 3})
    queue.discard("bob", {99})
    queue.discard("nobody", {2})

    assert len(queue) == 2
    assert drain(queue) == [2, 4]
    assert queue.owners() == 0


def test_a_resting_owner_is_skipped_and_keeps_its_lane() -> None:
    resting: set[str] = set()
    queue = FairQueue(resting)
    for ticket in range(3):
        queue.append(ticket, "full")
    queue.append(10, "bob")

    resting.add("full")
    queue.rest("full")

    assert queue.popleft() == 10
    assert not queue, "only a resting owner's tickets are left"
    assert len(queue) == 3


def test_an_owner_resting_before_its_first_ticket_gets_no_turn() -> None:
    resting = {"full"}
    queue = FairQueue(resting)
    queue.append(1, "full")
    queue.appendleft(0, "full")

    assert not queue
    resting.discard("full")
    queue.wake("full")
    assert drain(queue) == [0, 1]


def test_a_woken_owner_takes_its_turn_again_behind_the_others() -> None:
    resting: set[str] = set()
    queue = FairQueue(resting)
    queue.append(1, "full")
    queue.append(2, "full")
    queue.append(10, "bob")
    queue.append(11, "bob")
    resting.add("full")
    queue.rest("full")
    assert queue.popleft() == 10

    resting.discard("full")
    queue.wake("full")

    assert drain(queue) == [11, 1, 2]


def test_discarding_a_resting_lane_leaves_no_turn_behind() -> None:
    resting = {"full"}
    queue = FairQueue(resting)
    queue.append(1, "full")
    queue.discard("full", {1})
    resting.discard("full")
    queue.wake("full")

    assert not queue and len(queue) == 0
    queue.append(2, "bob")
    assert drain(queue) == [2]

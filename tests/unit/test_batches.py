"""Batches of a map: how they are sized, encoded, run and decoded."""

from __future__ import annotations

import pickle
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import CancelledError

import msgpack
import pytest

from ventilator import protocol as p
from ventilator._maps import (
    BATCH_OVERRUN,
    BATCH_TARGET_S,
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    PROBE_BATCHES,
    SLOW_START,
    TAPER_FLOOR_S,
    TAPER_PARTS,
    TIMEOUT_SHARE,
    _BatchEncoder,
    _BatchSizer,
    _Feed,
    _split_when_failed,
    values_of,
)
from ventilator.errors import (
    FunctionNotFound,
    PoisonTask,
    ResultExpired,
    TaskError,
    TaskRaised,
    TaskRejected,
    TaskTimeout,
    UsageError,
)
from ventilator.execution import run_task
from ventilator.scheduler import split_for_its_map
from ventilator.serialization import (
    BatchPacker,
    pack_call,
    pack_error,
    pack_pickled_batch,
    unpack_batch,
    unpack_batch_outcomes,
    unpack_pickled_batch,
    unpack_value,
)


def square(x: int) -> int:
    return x * x


def reciprocal(x: float) -> float:
    return 1 / x


def test_sizer_sends_single_items_until_a_batch_came_back() -> None:
    sizer = _BatchSizer(None)

    assert sizer.probing
    assert sizer.size() == 1


def test_sizer_fits_about_the_target_time_of_work_in_a_batch() -> None:
    sizer = _BatchSizer(None)

    sizer.observe(items=4, elapsed_s=4 * BATCH_TARGET_S / 10)

    assert not sizer.probing
    assert sizer.size() == 10


@pytest.mark.parametrize(("item_s", "size"), [(1e-9, MAX_BATCH_ITEMS), (10.0, 1)])
def test_sizer_stays_between_one_item_and_the_maximum(item_s: float, size: int) -> None:
    sizer = _BatchSizer(None)

    sizer.observe(items=1, elapsed_s=item_s)

    assert sizer.size() == size


def test_sizer_shrinks_the_last_batches_to_a_share_of_the_items_left() -> None:
    sizer = _BatchSizer(None)
    sizer.observe(items=1, elapsed_s=BATCH_TARGET_S / 10)  # 10 items fit

    assert sizer.size(items_left=1000) == 10
    assert sizer.size(items_left=TAPER_PARTS * 4) == 4
    assert sizer.size(items_left=3) == 1


def test_sizer_tapers_no_lower_than_its_floor_of_work() -> None:
    # Tiny items: a batch of TAPER_FLOOR_S of them costs less than the idle
    # time it could save, so the tail keeps them together.
    sizer = _BatchSizer(None)
    item_s = TAPER_FLOOR_S / 20
    sizer.observe(items=1, elapsed_s=item_s)

    assert sizer.size(items_left=TAPER_PARTS * 2) == 20


def test_map_sends_smaller_batches_as_its_items_run_out() -> None:
    sizes = []
    sizer = _BatchSizer(None)
    sizer.observe(items=1, elapsed_s=BATCH_TARGET_S / 8)
    items_left = 400
    while items_left:
        sizes.append(min(items_left, sizer.size(items_left)))
        items_left -= sizes[-1]

    assert sizes[0] == 8
    assert sizes[-3:] == [1, 1, 1]
    assert sizes == sorted(sizes, reverse=True)


def mixed_durations(count: int) -> list[float]:
    """The tester's mix: mostly instant, 4% take 50 ms, 1% 300 ms (item 0 too)."""
    shares = [(x * 7919) % 100 for x in range(count)]
    return [0.3 if r == 0 else 0.05 if r < 5 else 0.00002 for r in shares]


def run_map(sizer: _BatchSizer, durations: list[float]) -> list[list[float]]:
    """The batches `_BatchMap` would make of items taking `durations`: it sends
    while `ahead_limit` allows, and results come back in order, at once (the
    worst case: a short map that the window lets send everything at once)."""
    batches: list[list[float]] = []
    unyielded: deque[list[float]] = deque()
    sent = ahead = 0
    while sent < len(durations) or unyielded:
        limit = sizer.ahead_limit()
        while sent < len(durations) and (limit is None or ahead < limit):
            size = sizer.size(items_left=len(durations) - sent)
            batch = durations[sent : sent + size]
            batches.append(batch)
            unyielded.append(batch)
            sent += len(batch)
            ahead += len(batch)
        head = unyielded.popleft()
        sizer.observe(len(head), sum(head))
        ahead -= len(head)
    return batches


def test_a_slow_first_item_does_not_make_every_batch_one_item() -> None:
    durations = mixed_durations(3000)

    batches = run_map(_BatchSizer(None), durations)

    assert sum(map(len, batches)) == 3000
    assert len(batches) < 3000 / 4  # it was 3,000: one task per item
    # ... and sized by the mean, a slow item holds up a few others, never a
    # batch of hundreds.
    assert max(len(b) for b in batches if max(b) >= 0.3) <= 64


def test_one_slow_item_among_many_fast_ones_fades_from_the_estimate() -> None:
    durations = [0.3 if x == 10 else 0.00002 for x in range(20_000)]

    batches = run_map(_BatchSizer(None), durations)

    sizes = [len(batch) for batch in batches]
    slow_at = next(n for n, batch in enumerate(batches) if max(batch) >= 0.3)
    assert sizes[slow_at + 1] < MAX_BATCH_ITEMS  # the slow item shrank the next
    assert MAX_BATCH_ITEMS in sizes[slow_at + 2 :]  # ... until it faded
    assert len(batches) < 20_000 / MAX_BATCH_ITEMS * 2


def run_map_within_budget(
    sizer: _BatchSizer, durations: list[float], slow_s: float
) -> tuple[list[tuple[int, list[float]]], list[list[float]]]:
    """As `run_map`, but each batch stops at the sizer's time budget, as a
    worker stops it, and its unrun items are sent again before the rest.

    Returns each batch as sent, with how many batches holding an item of
    `slow_s` or more had come back by then; and the items each batch ran.
    """
    sent_batches: list[tuple[int, list[float]]] = []
    ran_batches: list[list[float]] = []
    unyielded: deque[list[float]] = deque()
    sent = ahead = slow_back = 0

    def send(batch: list[float]) -> list[float]:
        sent_batches.append((slow_back, batch))
        return batch

    while sent < len(durations) or unyielded:
        limit = sizer.ahead_limit()
        while sent < len(durations) and (limit is None or ahead < limit):
            unyielded.append(send(durations[sent : sent + sizer.size()]))
            sent += len(unyielded[-1])
            ahead += len(unyielded[-1])
        head = unyielded.popleft()
        ran = ran_within(head, sizer.budget_s())
        ran_batches.append(ran)
        slow_back += max(ran) >= slow_s
        sizer.observe(len(ran), sum(ran))
        ahead -= len(ran)
        rest, again = head[len(ran) :], []
        while rest:
            again.append(send(rest[: sizer.size()]))
            rest = rest[len(again[-1]) :]
        unyielded.extendleft(reversed(again))
    return sent_batches, ran_batches


def ran_within(batch: list[float], budget_s: float | None) -> list[float]:
    """The items of `batch` a worker runs before it passes `budget_s`."""
    ran: list[float] = []
    for duration in batch:
        ran.append(duration)
        if budget_s is not None and sum(ran) >= budget_s:
            break
    return ran


def test_batches_follow_items_that_turn_slow_within_a_batch_or_two() -> None:
    # The tester's map: instant items, then from the 300th 0.2 s each.
    durations = [0.00002] * 300 + [0.2] * 300

    sent, ran = run_map_within_budget(_BatchSizer(None), durations, slow_s=0.2)

    budget_s = _BatchSizer(None).budget_s()
    assert budget_s is not None
    # No batch holds a worker much past its budget: it was 256 slow items.
    assert max(sum(batch) for batch in ran) < budget_s + 0.2
    # Once two batches of slow items came back, every batch is one item.
    later = [batch for slow_back, batch in sent if slow_back >= 2]
    assert later and all(len(batch) == 1 for batch in later)
    assert sum(map(len, ran)) == len(durations)


def test_batch_much_slower_than_the_estimate_restarts_it() -> None:
    sizer = _BatchSizer(None)
    for _ in range(20):
        sizer.observe(items=MAX_BATCH_ITEMS, elapsed_s=MAX_BATCH_ITEMS * 0.00002)
    assert sizer.size() == MAX_BATCH_ITEMS

    sizer.observe(items=1, elapsed_s=0.2)

    assert sizer.size() == 1


def test_sizer_gives_a_batch_a_budget_of_its_target_unless_the_caller_chose() -> None:
    assert _BatchSizer(None).budget_s() == BATCH_OVERRUN * BATCH_TARGET_S
    timed = _BatchSizer(None, timeout_s=0.05).budget_s()
    assert timed == pytest.approx(BATCH_OVERRUN * 0.05 * TIMEOUT_SHARE)
    assert _BatchSizer(7).budget_s() is None


def test_sizer_sends_ahead_by_what_came_back_unless_the_caller_chose() -> None:
    sizer = _BatchSizer(None)
    assert sizer.ahead_limit() == PROBE_BATCHES

    sizer.observe(items=5, elapsed_s=0.5)

    assert sizer.ahead_limit() == SLOW_START * 5
    assert _BatchSizer(7).ahead_limit() is None


def test_sizer_keeps_the_size_the_caller_chose() -> None:
    sizer = _BatchSizer(7)

    sizer.observe(items=1, elapsed_s=10.0)

    assert not sizer.probing
    assert sizer.size() == 7


def test_encoder_stops_a_batch_at_its_byte_bound() -> None:
    encoder = _BatchEncoder("m:f", p.Flags.NONE)
    blob = b"x" * (MAX_BATCH_BYTES // 3)
    items = iter([blob] * 10)

    taken, payload, refused, raised = encoder.take(items, count=10)

    assert refused is None and raised is None
    assert len(taken) == 3
    assert unpack_value(payload) == [blob] * 3
    assert len(list(items)) == 7  # nothing taken beyond the batch


def test_packer_single_call_is_an_ordinary_call_payload() -> None:
    packer = BatchPacker()

    assert packer.single_call(packer.item({"a": 1})) == pack_call(({"a": 1},), {})


def test_packer_names_the_type_it_cannot_encode() -> None:
    with pytest.raises(UsageError, match="an item of type object"):
        BatchPacker().item(object())


def _run_batch(function: object, items: list[object]) -> tuple[p.Status, object]:
    packer = BatchPacker()
    payload = packer.batch([packer.item(item) for item in items])
    status, result = run_task({"m:f": function}, False, "m:f", p.Flags.BATCH, payload)  # type: ignore[dict-item]
    return status, unpack_value(result)


def test_batch_runs_each_item_and_reports_each_outcome_in_order() -> None:
    status, result = _run_batch(reciprocal, [1, 0, 4])

    assert status is p.Status.OK
    _, outcomes = unpack_batch_outcomes(result, 3)
    values = values_of(outcomes)
    assert next(values) == 1.0
    with pytest.raises(TaskRaised, match="ZeroDivisionError"):
        next(values)
    assert outcomes[2] == [p.Status.OK.value, 0.25]


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_batch_stops_once_it_ran_past_its_budget_with_the_outcomes_it_has() -> None:
    packer = BatchPacker()
    payload = packer.batch([packer.item(0.02)] * 10, budget_s=0.03)

    status, result = run_task({"m:f": nap}, False, "m:f", p.Flags.BATCH, payload)

    assert status is p.Status.OK
    elapsed_s, outcomes = unpack_batch_outcomes(unpack_value(result), 10)
    assert 1 <= len(outcomes) < 10
    assert outcomes == [[p.Status.OK.value, 0.02]] * len(outcomes)
    assert elapsed_s >= 0.03


def test_batch_payload_carries_its_budget_after_its_items() -> None:
    packer = BatchPacker()
    items = [packer.item(i) for i in range(3)]

    assert unpack_batch(packer.batch(items, budget_s=0.2)) == ([0, 1, 2], 0.2)
    assert unpack_batch(packer.batch(items)) == ([0, 1, 2], None)


def test_pickled_batch_carries_its_budget_and_one_journalled_without_runs_whole() -> (
    None
):
    payload = pack_pickled_batch(square, [1, 2], budget_s=0.2)
    earlier = pickle.dumps((square, [1, 2]))

    assert unpack_pickled_batch(payload) == (square, [1, 2], 0.2)
    assert unpack_pickled_batch(earlier) == (square, [1, 2], None)


def test_batch_of_an_unserved_function_fails_whole() -> None:
    packer = BatchPacker()
    payload = packer.batch([packer.item(1)])

    status, _ = run_task({}, False, "m:missing", p.Flags.BATCH, payload)

    assert status is p.Status.NOT_FOUND


def test_batch_that_is_not_a_list_fails_whole_naming_the_items() -> None:
    payload = msgpack.packb({"not": "a list"})

    status, result = run_task({"m:f": square}, False, "m:f", p.Flags.BATCH, payload)

    assert status is p.Status.RAISED
    assert "cannot decode the items" in unpack_value(result)["message"]


@pytest.mark.parametrize(
    "value",
    [
        [],
        [0.1],
        [0.1, []],
        [0.1, [[0, 1]] * 3],
        ["soon", [[0, 1], [0, 4]]],
        [0.1, [[0], [0]]],
    ],
)
def test_malformed_batch_results_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="batch"):
        unpack_batch_outcomes(value, 2)


def test_encoder_ends_a_batch_at_an_item_it_cannot_encode_and_refuses_that_one() -> (
    None
):
    encoder = _BatchEncoder("m:f", p.Flags.NONE)
    unsendable = object()
    items = iter([1, 2, unsendable, 3])

    taken, payload, refused, _ = encoder.take(items, count=10)

    assert taken == [1, 2]
    assert unpack_value(payload) == [1, 2]
    assert refused is not None
    assert refused[0] is unsendable
    with pytest.raises(TaskRejected, match="an item of type object"):
        list(values_of([refused[1]]))
    assert list(items) == [3]  # the next batch starts after the refused item


def test_encoder_keeps_the_items_read_before_the_iterable_raised() -> None:
    def items() -> Iterator[int]:
        yield from (1, 2)
        raise KeyError("the input broke")

    taken = _BatchEncoder("m:f", p.Flags.NONE).take(items(), count=10)

    assert taken.items == [1, 2]
    assert unpack_value(taken.payload) == [1, 2]
    assert isinstance(taken.raised, KeyError)


def test_encoder_names_a_string_that_is_not_utf8() -> None:
    encoder = _BatchEncoder("m:f", p.Flags.NONE)
    line = b"caf\xe9".decode("utf-8", "surrogateescape")

    refused = encoder.take(iter([line]), count=10).refused

    assert refused is not None
    assert "UTF-8" in refused[1][1]["message"]


def test_sizer_keeps_a_batch_well_inside_a_per_item_timeout() -> None:
    sizer = _BatchSizer(None, timeout_s=0.05)

    sizer.observe(items=1, elapsed_s=0.001)

    assert sizer.size() == int(0.05 * TIMEOUT_SHARE / 0.001)


def test_cancelled_item_raises_cancelled_error_in_its_place() -> None:
    values = values_of([[p.Status.OK.value, 1], [p.Status.CANCELLED.value, None]])

    assert next(values) == 1
    with pytest.raises(CancelledError):
        next(values)


@pytest.mark.parametrize(
    ("error", "split", "one_runs_alone"),
    [
        (TaskTimeout("TaskTimeout", "ran past 1s"), True, False),
        # A batch fails as poison at its first death: its items have attempts left.
        (PoisonTask("PoisonTask", "died"), True, True),
        (FunctionNotFound("FunctionNotFound", "m:f"), False, False),
    ],
)
def test_batch_that_failed_whole_is_split_when_one_item_may_be_to_blame(
    error: TaskError, split: bool, one_runs_alone: bool
) -> None:
    assert _split_when_failed(error, items=3) is split
    assert _split_when_failed(error, items=1) is one_runs_alone


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TaskTimeout("TaskTimeout", "ran past 1s"), p.Status.TIMEOUT),
        (TaskRejected("ResultTooLarge", "over the limit"), p.Status.REJECTED),
        (TaskRejected("PickleNotAllowed", "no pickles"), p.Status.REJECTED),
        (ResultExpired("ResultExpired", "not collected"), p.Status.EXPIRED),
        (PoisonTask("PoisonTask", "died"), p.Status.POISON),
        (FunctionNotFound("FunctionNotFound", "m:f"), p.Status.NOT_FOUND),
        (TaskRaised("ValueError", "bad batch"), p.Status.RAISED),
    ],
)
def test_the_broker_counts_split_exactly_the_batches_their_map_splits(
    error: TaskError, status: p.Status
) -> None:
    # A map marks a batch of several items SPLITTABLE, a batch of one not.
    several = p.Flags.BATCH | p.Flags.SPLITTABLE
    report = pack_error(error)

    assert split_for_its_map(several, status, report) is _split_when_failed(error, 3)
    assert split_for_its_map(p.Flags.BATCH, status, report) is _split_when_failed(
        error, 1
    )


def ready_items(feed: _Feed, count: int, timeout_s: float = 5.0) -> list[int] | None:
    """What the feed gives a map asking for `count` items, waiting as a map
    does until it gives something or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while (ready := feed.ready(count)) is None and time.monotonic() < deadline:
        feed.wait(lambda: False, want_input=True)
    return None if ready is None else list(ready)


def test_feed_gives_a_partial_batch_once_the_input_pauses() -> None:
    release = threading.Event()

    def paused() -> Iterator[int]:
        yield from (1, 2)
        release.wait(10)  # input that stays open, as under tail -f

    feed = _Feed(paused())
    feed.start()
    try:
        assert ready_items(feed, count=10) == [1, 2]
    finally:
        release.set()


def test_feed_ends_with_what_its_iterable_raised() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise KeyError("the input broke")

    feed = _Feed(broken())
    feed.start()

    assert ready_items(feed, count=10) == [1]
    deadline = time.monotonic() + 5.0
    while not feed.exhausted and time.monotonic() < deadline:
        feed.wait(lambda: False, want_input=True)
    assert feed.exhausted
    assert isinstance(feed.raised, KeyError)

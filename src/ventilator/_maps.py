"""`Client.map` and its kin: items sent in batches, results yielded in order.

A map packs many items into one task, so that a tiny function costs a small
part of a task per item. `map_batches` drives it: `_BatchMap` keeps the
batches sent ahead of what the caller has consumed, up to the window, sized
by `_BatchSizer` from how long items took and packed by `_BatchEncoder`, and
runs again one by one the items of a batch that failed whole. `map_each` is
the map with a task per item (with a sink, or a chunksize of 1). A `_Feed`
reads streaming input (the CLI's) on a thread of its own. `MapTasks` tracks
what a map has not yielded, so that a map abandoned from any thread, or by
close(), cancels it.

All of it runs on the callers' threads, and reaches the I/O thread only
through the `Client`: `_enqueue` for tasks, `_withdraw` for cancels.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from . import protocol as p
from ._client_io import SUBMIT_BATCH
from ._words import counted
from .errors import (
    ClientClosed,
    PoisonTask,
    ProtocolError,
    ResultExpired,
    TaskError,
    TaskRejected,
    TaskTimeout,
    UsageError,
    task_error_from_wire,
)
from .serialization import BatchPacker, pack_pickled_batch, unpack_batch_outcomes

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "ItemOutcome",
    "MapTasks",
    "Slot",
    "check_chunksize",
    "map_batches",
    "map_each",
    "outcome_batches",
    "values_of",
]

# The client's own logger, whichever of its modules speaks: operators know
# one component, the client, and configure it by that name.
log = logging.getLogger("ventilator.client")

# The batches of `map`: how much work one carries once the map knows how long an
# item takes. Long enough to spread a task's cost over many items: each result
# wakes worker, broker and client, about 1 ms of CPU in all, which on busy cores
# delays the next batch. Short enough to keep results flowing.
BATCH_TARGET_S = 0.05
# When the map knows how many items are left, a batch carries at most this
# share of them, so the last batches shrink and the workers finish together;
# but never less than about TAPER_FLOOR_S of work, below which a task's cost
# outweighs the time a late batch can leave a worker idle.
TAPER_PARTS = 8
TAPER_FLOOR_S = 0.005
MAX_BATCH_ITEMS = 256
MAX_BATCH_BYTES = 256 * 1024
# Until a first batch is back, a map sends only this many one-item batches: a
# slow function must not be packed many items to a task before we know.
PROBE_BATCHES = 4
# After that, it keeps at most SLOW_START times as many items sent ahead as
# have come back. Without it, the window let a map of a few thousand items
# send them all the moment its first item came back, each batch sized by that
# one item: a rare slow first item made it 3,000 tasks for 3,000 items.
SLOW_START = 8
# How long an item takes is a mean over items (not batches) in which an item
# weighs half as much once this many more came back: one slow item among
# many fast ones shrinks the next batches, then fades.
ESTIMATE_HALF_LIFE_ITEMS = 32
# ... but a batch that took this many times what the estimate said (and at
# least TAPER_FLOOR_S) restarts it: items that turned slow for good would
# otherwise fade in over hundreds of items, each batch sized for fast ones.
RESTART_WHEN_SLOWER = 2
# A batch stops on its worker once it has run this many times its target
# work, and its unrun items are sent again: batches sized for fast items
# that turned slow hold a worker a fraction of a second, not minutes, and
# the map soon yields (or, after a break, stops).
BATCH_OVERRUN = 4
# A map over streaming input (the CLI's) sends a partial batch once it has
# waited this long for more items: a pipe that goes quiet must not hold back
# lines already read. Well under a batch's work, so full batches still form
# while input flows.
FEED_LINGER_S = 0.005
# ... and reads at most this many items ahead of what it sent.
FEED_MAX_ITEMS = 4 * MAX_BATCH_ITEMS
# What a map's unfinished items raise once close() cancelled them.
MAP_CLOSED_UNDER = (
    "the client was closed while this map ran; its tasks not finished then "
    "were cancelled"
)
# The flags of a map's batch: of several items, its map splits it if it fails
# whole by a timeout, a result over the limit or expiry (see _split_when_failed),
# and says so, for the broker to count that as no failure.
_ONE = int(p.Flags.BATCH)
_SEVERAL = int(p.Flags.BATCH | p.Flags.SPLITTABLE)
# With a per-item timeout, a batch carries at most this share of it in work: a
# batch shares one deadline, and one of items that each keep to theirs should
# not run past it as a whole (it would then be run again item by item).
TIMEOUT_SHARE = 0.1


class ItemOutcome(NamedTuple):
    """How one item of `Client.map_outcomes` ended.

    Attributes:
        value: the function's return value; None when `error` is set.
        error: None on success; else why there is no value: a `TaskError`
            (`TaskRejected` with remote_type "UsageError" for an item that could
            not be encoded and was never sent), or a `CancelledError` when an
            operator cancelled it at the broker.
    """

    value: Any
    error: TaskError | CancelledError | None


def values_of(outcomes: list[list[Any]]) -> Iterator[Any]:
    """The values of a `map` batch's items, from the ``[status, value]`` pairs
    of its raw result (as `Client.collect` yields it: ``[elapsed_s, pairs]``).

    A generator: nothing is checked until it is iterated, and it stops at the
    first failed item. Use `map_outcomes` to see every item's error.

    Yields:
        Each item's value, in input order.

    Raises:
        TaskError: while iterating, in the place of an item that failed (its
            subclass says how: `TaskRaised`, `TaskTimeout`, `TaskRejected`...).
        concurrent.futures.CancelledError: likewise, for a cancelled item.
    """
    for status, value in outcomes:
        if status != p.Status.OK:
            raise _error_of(status, value)
        yield value


def outcome_batches(
    client: Client,
    function: str | Callable[..., Any],
    iterable: Iterable[Any],
    chunksize: int | None,
    timeout_s: float | None = None,
    retries: int = 0,
    streaming: bool = False,
    tasks: MapTasks | None = None,
) -> Generator[list[ItemOutcome], None, None]:
    """`Client.map_outcomes` a batch at a time. With `streaming`, the items
    are read by a thread of their own (see _Feed), for input that may pause;
    `tasks` lets another thread abandon the map (see map_batches)."""
    items = _Feed(iterable) if streaming else iterable
    batches = map_batches(client, function, items, chunksize, timeout_s, retries, tasks)
    with contextlib.closing(batches):
        for outcomes in batches:
            yield [
                ItemOutcome(value, None)
                if status == p.Status.OK
                else ItemOutcome(None, _error_of(status, value))
                for status, value in outcomes
            ]


def map_each(
    client: Client,
    function: str | Callable[..., Any],
    iterable: Iterable[Any],
    options: dict[str, Any],
    tasks: MapTasks | None = None,
) -> Iterator[Any]:
    """`Client.map` with a task per item (with a sink, or a chunksize of 1);
    its arguments were checked when the map was called (`Client._check_map`)."""
    client._refuse_to_wait("map()")
    tasks = tasks or MapTasks(client)
    wakeup = threading.Condition()
    slots: deque[Slot] = deque()
    items = iter(iterable)
    more, raised = True, None
    try:
        while (more or slots) and not tasks.abandoned:
            if more:
                chunk, raised = _read_items(items, SUBMIT_BATCH)
                more = len(chunk) == SUBMIT_BATCH
                queued = _queue_each(client, function, chunk, options, wakeup, tasks)
                slots.extend(queued)
            while slots and (not more or len(slots) > client._handover.window // 2):
                slot = slots.popleft()
                # Tracked while awaited, so that abandoning the map (from
                # the event loop, or close()) cancels this task too.
                try:
                    value = slot.result()
                finally:
                    tasks.settled([slot])
                yield value
        tasks.raise_if_closed()
        if raised is not None:
            raise raised
    finally:
        tasks.abandon()


def _queue_each(
    client: Client,
    function: str | Callable[..., Any],
    items: list[Any],
    options: dict[str, Any],
    wakeup: threading.Condition,
    tasks: MapTasks,
) -> list[Slot]:
    """A task per item, queued; their slots in order. An item that cannot
    be sent (too large, say) gets a slot failed with why, in its place."""

    def queue(specs: list[p.TaskSpec]) -> list[Slot]:
        queued = client._enqueue(specs, lambda task_id: Slot(wakeup, task_id))
        tasks.track(queued)
        return queued

    slots: list[Slot] = []
    specs: list[p.TaskSpec] = []
    for item in items:
        try:
            specs.append(client._spec(function, (item,), {}, **options))
            continue
        except (TaskError, UsageError) as exc:
            refused = Slot(wakeup)
            refused.set_exception(_as_task_error(exc))
        slots.extend(queue(specs))
        slots.append(refused)
        specs = []
    slots.extend(queue(specs))
    return slots


def map_batches(
    client: Client,
    function: str | Callable[..., Any],
    iterable: Iterable[Any] | _Feed,
    chunksize: int | None,
    timeout_s: float | None = None,
    retries: int = 0,
    tasks: MapTasks | None = None,
) -> Generator[list[list[Any]], None, None]:
    """Submit the items in batches; yield each batch's outcomes in order,
    one ``[status, value or error report]`` per item.

    However it ends, what it has not yielded is cancelled (`tasks`, which
    another thread may abandon too)."""
    client._refuse_to_wait("map()")
    name, flags = client._check_job(function, timeout_s=timeout_s, retries=retries)
    job = _MapJob(function, name, flags, timeout_s, retries)
    run = _BatchMap(client, job, iterable, chunksize, tasks or MapTasks(client))
    try:
        while not run.tasks.abandoned:
            run.send_ahead()
            if not run.batches and not run.more:
                break
            if run.feed is not None and not (run.batches and run.batches[0].done):
                run.wait()  # for input, or for the first batch's result
                continue
            outcomes = run.outcomes(run.batches[0])
            head = run.pop_head()
            run.tasks.settled([head])
            if len(outcomes) < len(head.items):  # it stopped at its budget
                run.send_again(head.items[len(outcomes) :])
            yield outcomes
        run.tasks.raise_if_closed()
        if run.raised is not None and not run.tasks.abandoned:
            raise run.raised
    finally:
        run.tasks.abandon()
        if run.feed is not None:
            run.feed.stop()


class Slot:
    """What `map` waits on instead of a Future: one condition serves a whole
    map, so a task costs a slot, not a Future with its own lock."""

    __slots__ = ("_done", "_error", "_value", "_wakeup", "task_id")

    def __init__(self, wakeup: threading.Condition, task_id: int | None = None) -> None:
        self._wakeup = wakeup
        self.task_id = task_id  # None for an item refused before it was sent
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        with self._wakeup:
            self._value, self._done = value, True
            self._wakeup.notify_all()

    def set_exception(self, error: BaseException) -> None:
        with self._wakeup:
            self._error, self._done = error, True
            self._wakeup.notify_all()

    def cancel(self) -> bool:
        self.set_exception(CancelledError())
        return True

    @property
    def done(self) -> bool:
        return self._done

    def result(self) -> Any:
        with self._wakeup:
            while not self._done:
                self._wakeup.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _BatchSlot(Slot):
    """A `Slot` for one batch of a map, which keeps the batch's items: if the
    batch fails as a whole, they are submitted again one by one.

    `outcomes` is set from the start for an item refused before sending (it
    cannot be encoded): it keeps its place in the map without being a task.
    """

    __slots__ = ("items", "outcomes")

    def __init__(
        self,
        wakeup: threading.Condition,
        items: list[Any],
        outcomes: list[list[Any]] | None = None,
        task_id: int | None = None,
    ) -> None:
        super().__init__(wakeup, task_id)
        self.items = items
        self.outcomes = outcomes

    @property
    def done(self) -> bool:
        return self.outcomes is not None or self._done


class _BatchSizer:
    """How many items the next batch of a map carries.

    `chunksize` when the caller gave one. Otherwise one item per batch until a
    batch came back, then as many as run in about BATCH_TARGET_S (less with a
    per-item timeout, see TIMEOUT_SHARE), by a moving mean of the time an item
    took on the workers; fewer towards the end when the number of items left
    is known (see TAPER_PARTS).

    The mean is the right measure for a batch's work: sized by it, a batch of
    items that are mostly instant and sometimes slow still carries about
    BATCH_TARGET_S of work, so a slow item holds up a few others, not a
    MAX_BATCH_ITEMS batch. A mean of a few items is at the mercy of one slow
    one, hence `ahead_limit`: the map commits items to batches only as fast as
    results confirm the estimate.
    """

    def __init__(self, chunksize: int | None, timeout_s: float | None = None) -> None:
        self._fixed = chunksize
        # Decayed sums of the items' run time and of their count (see
        # ESTIMATE_HALF_LIFE_ITEMS), and every item seen, undecayed.
        self._work_s = 0.0
        self._weight = 0.0
        self._seen = 0
        self._target_s = BATCH_TARGET_S
        if timeout_s is not None:
            self._target_s = min(BATCH_TARGET_S, timeout_s * TIMEOUT_SHARE)

    @property
    def probing(self) -> bool:
        return self._fixed is None and not self._seen

    @property
    def _item_s(self) -> float | None:
        return self._work_s / self._weight if self._seen else None

    def budget_s(self) -> float | None:
        """How long a batch may run before its worker stops it (see
        BATCH_OVERRUN); None, no limit, for the `chunksize` the caller chose."""
        if self._fixed is not None:
            return None
        return BATCH_OVERRUN * self._target_s

    def ahead_limit(self) -> int | None:
        """How many items the map may have sent and not yielded, for the
        estimate's sake; None: no limit but the client's window."""
        if self._fixed is not None:
            return None
        return max(PROBE_BATCHES, SLOW_START * self._seen)

    def size(self, items_left: int | None = None) -> int:
        """Items for the next batch; `items_left`, when known, counts the
        items not sent yet."""
        if self._fixed is not None:
            return self._fixed
        if self._item_s is None:
            return 1
        size = self._fitting(self._target_s)
        if items_left is not None:
            tapered = max(items_left // TAPER_PARTS, self._fitting(TAPER_FLOOR_S))
            size = min(size, tapered)
        return size

    def _fitting(self, work_s: float) -> int:
        """Items that run in about `work_s`, within the bounds of a batch."""
        item_s = self._item_s
        assert item_s is not None
        fitting = int(work_s / max(item_s, 1e-9))
        return max(1, min(MAX_BATCH_ITEMS, fitting))

    def observe(self, items: int, elapsed_s: float) -> None:
        """A batch ran `items` in `elapsed_s` in all."""
        if self._much_slower(items, elapsed_s):
            self._work_s, self._weight = elapsed_s, items
        else:
            fading = 0.5 ** (items / ESTIMATE_HALF_LIFE_ITEMS)
            self._work_s = self._work_s * fading + elapsed_s
            self._weight = self._weight * fading + items
        self._seen += items

    def _much_slower(self, items: int, elapsed_s: float) -> bool:
        """Whether a batch took much longer than the estimate said (see
        RESTART_WHEN_SLOWER)."""
        item_s = self._item_s
        return (
            item_s is not None
            and elapsed_s >= TAPER_FLOOR_S
            and elapsed_s > RESTART_WHEN_SLOWER * items * item_s
        )


class _BatchEncoder:
    """Turns a map's items into the payloads of batches of one function."""

    def __init__(self, function: Callable[..., Any] | str, flags: int) -> None:
        self._function = function
        self._pickled = bool(flags & p.Flags.PICKLED)
        self._packer = BatchPacker()

    def take(
        self, items: Iterator[Any], count: int, budget_s: float | None = None
    ) -> _Taken:
        """Up to `count` items from `items` and their payload, a batch that
        stops after `budget_s` of work; the item that ended the batch early by
        failing to encode, with its outcome; and what `items` raised, if it did.

        A batch also ends once it passes MAX_BATCH_BYTES; a pickled batch is
        bounded by count only, and fails whole if an item cannot be pickled.
        """
        taken: list[Any] = []
        encoded: list[bytes] = []
        size = 0
        try:
            for item in itertools.islice(items, count):
                if self._pickled:
                    taken.append(item)
                    continue
                try:
                    encoded.append(self._packer.item(item))
                except UsageError as exc:
                    refused = (item, _refusal(exc))
                    payload = self._packer.batch(encoded, budget_s)
                    return _Taken(taken, payload, refused)
                taken.append(item)
                size += len(encoded[-1])
                if size >= MAX_BATCH_BYTES:
                    break
        except Exception as exc:  # the caller's iterable raised: see _Taken
            payload = self._payload(taken, encoded, budget_s)
            return _Taken(taken, payload, raised=exc)
        return _Taken(taken, self._payload(taken, encoded, budget_s))

    def _payload(
        self, taken: list[Any], encoded: list[bytes], budget_s: float | None
    ) -> bytes:
        if self._pickled and taken:
            return pack_pickled_batch(self._function, taken, budget_s)  # type: ignore[arg-type]
        return self._packer.batch(encoded, budget_s)


class _Taken(NamedTuple):
    """What `_BatchEncoder.take` read for one batch.

    `raised` is what the map's iterable raised after `items`: as with the
    built-in `map`, the results of the items before it come first, and then
    the map raises it.
    """

    items: list[Any]
    payload: bytes
    refused: tuple[Any, list[Any]] | None = None
    raised: Exception | None = None


class MapTasks:
    """The tasks of one map whose results it has not yielded yet.

    A map that is abandoned (its generator closed, an exception, an asyncio
    task cancelled) cancels them, from its own thread or another: those not
    sent yet are dropped, the others cancelled at the broker, and their slots
    cancelled so that nothing waits on them.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._slots: set[Slot] = set()
        self.abandoned = False
        self._closed = False
        client._track_map(self)

    def track(self, slots: Iterable[Slot]) -> None:
        """Count `slots` as outstanding; cancel them at once if abandoned."""
        with self._lock:
            if not self.abandoned:
                self._slots.update(slots)
                return
        self._cancel(list(slots))

    def settled(self, slots: Iterable[Slot]) -> None:
        with self._lock:
            self._slots.difference_update(slots)

    def abandon(self, closed: bool = False) -> None:
        """Cancel every outstanding task, and any tracked from now on. Their
        slots raise CancelledError, or ClientClosed if the client was `closed`
        under the map."""
        with self._lock:
            self.abandoned = True
            self._closed = closed
            slots, self._slots = list(self._slots), set()
        self._cancel(slots)

    def raise_if_closed(self) -> None:
        """Raise ClientClosed if close() abandoned the map: its caller must
        not take the early end for the whole of it."""
        if self._closed:
            raise ClientClosed(MAP_CLOSED_UNDER)

    def _cancel(self, slots: list[Slot]) -> None:
        if not slots:
            return
        task_ids = [slot.task_id for slot in slots if slot.task_id is not None]
        log.debug("cancelling %d tasks of an abandoned map", len(task_ids))
        self._client._withdraw(task_ids)
        for slot in slots:
            if self._closed:
                slot.set_exception(ClientClosed(MAP_CLOSED_UNDER))
            else:
                slot.cancel()


class _Feed:
    """A map's items read by a thread of their own, for input that comes
    slowly or in bursts (a pipe fed by ``tail -f``).

    A map over a feed sends what has arrived once it has waited FEED_LINGER_S
    for a whole batch, and yields each result as soon as it and those before
    it are in, instead of blocking on input that may not come for hours. The
    feed holds at most FEED_MAX_ITEMS read ahead. `wakeup` is shared with the
    map's slots: one wait serves results and input alike.
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.wakeup = threading.Condition()
        self._items: deque[Any] = deque()
        self._source = iter(iterable)
        self._waiting = False  # the map waits on `wakeup` for input
        self._reader_waits = False  # the reader waits for room
        self._seen = -1  # items there were when the map last looked
        self._wanted = 1  # items the map asked for when it last looked
        self._partial_since: float | None = None
        self.ended = False
        self.raised: Exception | None = None
        self._stopped = False
        self._thread = threading.Thread(
            target=self._read, name="ventilator-map-feed", daemon=True
        )

    def start(self) -> None:
        if not self._thread.is_alive() and not self.ended:
            self._thread.start()

    def stop(self) -> None:
        """Read nothing more (the map was abandoned)."""
        with self.wakeup:
            self._stopped = True
            self.wakeup.notify_all()

    def _read(self) -> None:
        try:
            for item in self._source:
                self._items.append(item)
                # The map is woken for the first item (a partial batch starts
                # to linger) and for a whole batch, not for each item between.
                held = len(self._items)
                if held >= FEED_MAX_ITEMS or (
                    self._waiting and (held == 1 or held >= self._wanted)
                ):
                    self._arrived()
                if self._stopped:
                    return
        except Exception as exc:  # raised after the results before it
            self.raised = exc
        finally:
            with self.wakeup:
                self.ended = True
                self.wakeup.notify_all()

    def _arrived(self) -> None:
        with self.wakeup:
            self.wakeup.notify_all()
            # Read ahead only so far: the map takes items as the window allows.
            self._reader_waits = True
            while len(self._items) >= FEED_MAX_ITEMS and not self._stopped:
                self.wakeup.wait()
            self._reader_waits = False

    def ready(self, count: int) -> Iterator[Any] | None:
        """An iterator over up to `count` items to send now (taken from the
        feed as it is read), or None while a batch should wait for more."""
        available = len(self._items)
        self._wanted = count
        if not available or (available < count and not self.ended):
            if available and self._partial_since is None:
                self._partial_since = time.monotonic()
            lingered = self._partial_since is not None and (
                time.monotonic() - self._partial_since >= FEED_LINGER_S
            )
            if not lingered:
                self._seen = available
                return None
        self._partial_since = None
        self._seen = -1  # what is left is looked at again before any wait
        return (self._items.popleft() for _ in range(min(count, available)))

    def taken(self) -> None:
        """Tell a reader waiting for room that the map took items."""
        if self._reader_waits:
            with self.wakeup:
                self.wakeup.notify_all()

    @property
    def exhausted(self) -> bool:
        return self.ended and not self._items

    def wait(self, result_in: Callable[[], bool], want_input: bool) -> None:
        """Wait for a result (`result_in` says whether it came), or, when the
        map has room for them, for more items or a partial batch's time."""
        timeout_s = None
        if want_input and self._partial_since is not None:
            deadline = self._partial_since + FEED_LINGER_S
            timeout_s = max(0.0, deadline - time.monotonic())
        with self.wakeup:
            self._waiting = want_input
            try:
                news = want_input and (self.ended or len(self._items) != self._seen)
                if not news and not result_in():
                    self.wakeup.wait(timeout_s)
            finally:
                self._waiting = False


class _BatchMap:
    """One map in batches: its items read, sent and not yet yielded."""

    def __init__(
        self,
        client: Client,
        job: _MapJob,
        iterable: Iterable[Any] | _Feed,
        chunksize: int | None,
        tasks: MapTasks,
    ) -> None:
        self._client = client
        self.job = job
        self.tasks = tasks
        self.sizer = _BatchSizer(chunksize, job.timeout_s)
        self._encoder = _BatchEncoder(job.function, job.flags)
        self.feed = iterable if isinstance(iterable, _Feed) else None
        self.wakeup = self.feed.wakeup if self.feed else threading.Condition()
        self._items = None if isinstance(iterable, _Feed) else iter(iterable)
        self._items_left = len(iterable) if isinstance(iterable, Sized) else None
        self.batches: deque[_BatchSlot] = deque()
        self._ahead = 0  # items submitted and not yet yielded
        self._read_all = False
        self._raised: Exception | None = None
        if self.feed is not None:
            self.feed.start()

    @property
    def more(self) -> bool:
        """Whether items may be left to read."""
        if self.feed is not None:
            return not self.feed.exhausted
        return not self._read_all

    @property
    def raised(self) -> Exception | None:
        """What the iterable raised, once every item before it was read."""
        if self.feed is not None and self.feed.exhausted:
            return self.feed.raised
        return self._raised

    def has_room(self) -> bool:
        if not self.more or self._ahead >= self._client._handover.window:
            return False
        # Until enough batches are back, the size of a batch is a guess: a
        # slow function must not be packed many items to a task, nor a fast
        # one sent item by item for want of patience (see SLOW_START).
        limit = self.sizer.ahead_limit()
        return limit is None or self._ahead < limit

    def send_ahead(self) -> None:
        """Submit batches of the items at hand while the window has room."""
        while self.has_room():
            count = self.sizer.size(self._items_left)
            items = self._items if self.feed is None else self.feed.ready(count)
            if items is None:
                return  # a feed waiting a little for more input
            self._send(self._encoder.take(items, count, self.sizer.budget_s()))
            if self.feed is not None:
                self.feed.taken()

    def send_again(self, items: list[Any]) -> None:
        """Submit the items a batch left unrun at its budget, in batches
        sized by what it ran, to be yielded before any batch in flight."""
        rest = iter(items)
        again: list[_BatchSlot] = []
        while slots := self._slots(
            self._encoder.take(rest, self.sizer.size(), self.sizer.budget_s())
        ):
            again += slots
        self.batches.extendleft(reversed(again))
        self._ahead += len(items)

    def _send(self, taken: _Taken) -> None:
        read = len(taken.items) + (taken.refused is not None)
        self.batches.extend(self._slots(taken))
        self._ahead += read
        if self._items_left is not None:
            self._items_left -= read
        if taken.raised is not None:
            self._raised, self._read_all = taken.raised, True
        elif self.feed is None and not read:
            self._read_all = True

    def _slots(self, taken: _Taken) -> list[_BatchSlot]:
        """The batch of `taken` submitted, and the item it refused, in order."""
        slots = []
        if taken.items:
            slots.append(self._submit_batch(taken.items, taken.payload))
        if taken.refused is not None:
            item, outcome = taken.refused
            slots.append(_BatchSlot(self.wakeup, [item], [outcome]))
        return slots

    def pop_head(self) -> _BatchSlot:
        """The oldest batch, its outcomes taken: no longer counted ahead."""
        head = self.batches.popleft()
        self._ahead -= len(head.items)
        return head

    def _submit_batch(self, items: list[Any], payload: bytes) -> _BatchSlot:
        # Retries are the items' own (see _retry_raised): a batch that failed
        # whole fails the same way again, or is split. It carries them all
        # the same, so that the broker counts an item we will retry as
        # retried, not failed; it never retries a batch itself.
        job = self.job
        flags = job.flags | (_SEVERAL if len(items) > 1 else _ONE)
        spec = p.TaskSpec(0, job.name, payload, flags, job.timeout_s, job.retries)
        slot = _BatchSlot(self.wakeup, items)

        def numbered(task_id: int) -> Slot:
            slot.task_id = task_id
            return slot

        self.tasks.track(self._client._enqueue([spec], numbered))
        return slot

    def outcomes(self, batch: _BatchSlot) -> list[list[Any]]:
        """The outcomes of the batch's items in order: of its first items only
        when it stopped at its budget."""
        if batch.outcomes is not None:
            return batch.outcomes
        try:
            value = batch.result()
        except CancelledError:
            return [_cancelled() for _ in batch.items]
        except TaskError as error:
            if _split_when_failed(error, len(batch.items)):
                # The error's message says why (a process died, a worker was
                # lost, a timeout): its type alone read as "poison" for a
                # batch whose worker was merely killed.
                log.info(
                    "a batch of %s failed as a whole (%s: %s); running them one by one",
                    counted(len(batch.items), "item"),
                    error.remote_type,
                    error.message,
                )
                # The death that poisoned the batch counts for each item.
                died = isinstance(error, PoisonTask)
                return self._run_singly(batch.items, self.job.retries, died)
            return [[p.Status.RAISED.value, error.to_wire()]] * len(batch.items)

        try:
            elapsed_s, outcomes = unpack_batch_outcomes(value, len(batch.items))
        except ValueError as exc:
            raise ProtocolError(f"undecodable result of a batch: {exc}") from exc
        self.sizer.observe(len(outcomes), elapsed_s)
        if self.job.retries:
            self._retry_raised(batch.items, outcomes)
        return outcomes

    def _retry_raised(self, items: list[Any], outcomes: list[list[Any]]) -> None:
        """Run again, each on its own, the items that raised in their batch."""
        raised = [
            index
            for index, (status, _) in enumerate(outcomes)
            if status == p.Status.RAISED
        ]
        if not raised:
            return
        log.debug("retrying %d items of a batch that raised", len(raised))
        retried = [items[i] for i in raised]
        again = self._run_singly(retried, self.job.retries - 1)
        for index, outcome in zip(raised, again, strict=True):
            outcomes[index] = outcome

    def _run_singly(
        self, items: list[Any], retries: int, died: bool = False
    ) -> list[list[Any]]:
        """Each item as a task of its own; their outcomes, in order. `died`:
        a worker died running them together, which the broker counts as each
        one's first death (`Flags.SPLIT`)."""
        client, job = self._client, self.job
        outcomes: list[list[Any]] = [[] for _ in items]
        specs, places = [], []
        for index, item in enumerate(items):
            try:
                spec = client._spec(job.function, (item,), {}, job.timeout_s, retries)
            except (TaskError, UsageError) as exc:  # too large alone, say
                outcomes[index] = _refusal(exc)
                continue
            specs.append(_split(spec) if died else spec)
            places.append(index)

        wakeup = threading.Condition()
        slots = client._enqueue(specs, lambda task_id: Slot(wakeup, task_id))
        self.tasks.track(slots)
        for index, slot in zip(places, slots, strict=True):
            outcomes[index] = _settled(slot)
        self.tasks.settled(slots)
        return outcomes

    def wait(self) -> None:
        """With a feed: wait until the first batch is done, or input came."""
        assert self.feed is not None
        head = self.batches[0] if self.batches else None
        self.feed.wait(lambda: head is not None and head.done, self.has_room())


@dataclass(frozen=True, slots=True)
class _MapJob:
    """What every task of one map shares."""

    function: str | Callable[..., Any]
    name: str
    flags: int
    timeout_s: float | None = None
    retries: int = 0


def _error_of(status: int, value: Any) -> TaskError | CancelledError:
    """The error of an outcome that is not OK."""
    if status == p.Status.CANCELLED:
        return CancelledError("the task was cancelled at the broker")
    return task_error_from_wire(value)


def _cancelled() -> list[Any]:
    return [p.Status.CANCELLED.value, None]


def _refusal(error: UsageError | TaskError) -> list[Any]:
    """The outcome of an item refused before it was sent."""
    return [p.Status.REJECTED.value, _as_task_error(error).to_wire()]


def _as_task_error(error: UsageError | TaskError) -> TaskError:
    """An item's own refusal as the `TaskError` it has in a map's results."""
    if isinstance(error, TaskError):
        return error
    return TaskRejected("UsageError", str(error))


def _settled(slot: Slot) -> list[Any]:
    """The outcome of a finished one-item task, as a batch would report it."""
    try:
        return [p.Status.OK.value, slot.result()]
    except CancelledError:
        return _cancelled()
    except TaskError as error:
        return [p.Status.RAISED.value, error.to_wire()]


def check_chunksize(chunksize: int | None) -> None:
    if chunksize is None:
        return
    whole = isinstance(chunksize, int) and not isinstance(chunksize, bool)
    if not whole or chunksize < 1:
        raise UsageError(f"chunksize must be an int >= 1, got {chunksize!r}")


def _read_items(items: Iterator[Any], count: int) -> tuple[list[Any], Exception | None]:
    """Up to `count` items, and what `items` raised after them, if it did."""
    read: list[Any] = []
    try:
        read.extend(itertools.islice(items, count))
    except Exception as exc:  # raised after the results of the items before it
        return read, exc
    return read, None


def _split_when_failed(error: TaskError, items: int) -> bool:
    """Whether a batch that failed whole is worth running item by item.

    Yes when the failure may belong to one item (a worker it killed, a result
    too large, an oversized item, a per-item timeout the batch ran past) so
    that the others need not share it; no when every item would fail the same
    way (no worker has the function). A batch fails as poison at its first
    death, so even its only item has attempts left (see Flags.SPLIT).

    The broker counts the batches split by the same rule, told by
    `Flags.SPLITTABLE` that a batch holds several items
    (`scheduler.split_for_its_map`): a change here is a change there.
    """
    if error.remote_type in p.UNSPLIT_ERROR_TYPES:
        return False
    if isinstance(error, PoisonTask):
        return True
    return items > 1 and isinstance(error, ResultExpired | TaskRejected | TaskTimeout)


def _split(spec: p.TaskSpec) -> p.TaskSpec:
    return p.TaskSpec(
        spec.task_id,
        spec.function,
        spec.payload,
        spec.flags | p.Flags.SPLIT,
        spec.timeout_s,
        spec.retries,
        spec.sink,
    )

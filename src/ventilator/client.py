"""The client: submit tasks, get `concurrent.futures.Future`s back.

A `Client` is the callers' side of a connection to a broker: it checks and
encodes tasks, numbers them, and queues them for its I/O thread, which owns
the socket (`_client_io.ClientIO`). What passes between the two sides, tasks,
questions, cancels one way, room in the window and the broker's limits the
other, is a `_handover.Handover`, under one lock; the I/O thread settles the
futures and answers itself.

Flow control is a window: at most `window` tasks of this client are in the
broker at once, and `submit` blocks while the window is full. That is how a
fast producer slows down instead of growing the broker's memory.

A session id names this client to the broker. Task ids are the client's own,
so the broker recognises a resubmission after a reconnect.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import queue
import secrets
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from concurrent.futures import CancelledError, Future
from concurrent.futures._base import CANCELLED as _CANCELLED
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import zmq

from . import _client_io, _handover, _wire
from . import protocol as p
from ._client_io import SUBMIT_BATCH, ClientIO, IOSettings
from ._executor import ClientExecutor
from ._handover import Handover, Pending, Question
from .errors import (
    BrokerTimeout,
    ClientClosed,
    PickleNotAllowed,
    PoisonTask,
    ProtocolError,
    ResultExpired,
    TaskError,
    TaskRejected,
    TaskTimeout,
    UsageError,
    task_error_from_wire,
)
from .policy import check_heartbeat
from .security import client_keys, fingerprint
from .serialization import (
    BatchPacker,
    pack_call,
    pack_pickled_batch,
    pack_pickled_call,
    unpack_batch_outcomes,
)

__all__ = ["Client", "ClientExecutor", "ItemOutcome", "TaskFuture", "values_of"]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_WINDOW = 20_000
# Payload bytes of this client's unfinished tasks in the broker at once. Large
# payloads then flow through memory that every process reuses while it is warm,
# instead of each landing on freshly faulted pages: 2,000 tasks of 100 KiB
# submitted at once took a third less CPU in all with about 25 MiB in flight
# than with all 200 MB. Workers still find a queue far deeper than their credit
# (and WINDOW_BYTES_MIN_TASKS go whatever their size).
DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024

# Settings that lived in this module before the I/O thread moved to a module
# of its own: still importable from here.
WINDOW_BYTES_MIN_TASKS = _client_io.WINDOW_BYTES_MIN_TASKS
SUBMIT_BATCH_BYTES = _client_io.SUBMIT_BATCH_BYTES
ACK_DELAY_S = _client_io.ACK_DELAY_S
ACK_BATCH = _client_io.ACK_BATCH
SESSION_WAIT_LIVENESS_PERIODS = _client_io.SESSION_WAIT_LIVENESS_PERIODS
WITHDRAW_BY_SEARCH = _handover.WITHDRAW_BY_SEARCH

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


class TaskFuture(Future):  # type: ignore[type-arg]
    """A `concurrent.futures.Future` for one task; `cancel()` reaches the broker.

    A task still queued at the broker is removed from the queue; one a worker
    already holds is stopped there (see `Future.cancel()` in the README).
    """

    def __init__(self, client: Client, task_id: int) -> None:
        super().__init__()
        self._client = client
        self.task_id = task_id

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # concurrent.futures.wait() and as_completed() count a cancelled
        # future done once notified, which an executor's own worker does as it
        # dequeues it; nothing else would here, and they waited on. Under the
        # future's own lock, after its callbacks ran: of two threads that
        # cancel it, one notifies (the second would find it notified, fail
        # and log it) and withdraws the task.
        with self._condition:
            if self._state != _CANCELLED:  # notified already
                return True
            self.set_running_or_notify_cancel()
        self._client._withdraw([self.task_id])
        return True

    def result(self, timeout: float | None = None) -> Any:
        """As `concurrent.futures.Future.result`.

        Raises:
            UsageError: called in a done-callback (on the client's I/O thread)
                while this task is not done: the wait could never end.
        """
        if not self.done():
            self._client._refuse_on_io_thread(f"result() of task {self.task_id}")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As `concurrent.futures.Future.exception`; raises `UsageError` as
        `result` does."""
        if not self.done():
            self._client._refuse_on_io_thread(f"exception() of task {self.task_id}")
        return super().exception(timeout)


class _Slot:
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


class _BatchSlot(_Slot):
    """A `_Slot` for one batch of a map, which keeps the batch's items: if the
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


class _MapTasks:
    """The tasks of one map whose results it has not yielded yet.

    A map that is abandoned (its generator closed, an exception, an asyncio
    task cancelled) cancels them, from its own thread or another: those not
    sent yet are dropped, the others cancelled at the broker, and their slots
    cancelled so that nothing waits on them.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._slots: set[_Slot] = set()
        self.abandoned = False
        self._closed = False
        client._track_map(self)

    def track(self, slots: Iterable[_Slot]) -> None:
        """Count `slots` as outstanding; cancel them at once if abandoned."""
        with self._lock:
            if not self.abandoned:
                self._slots.update(slots)
                return
        self._cancel(list(slots))

    def settled(self, slots: Iterable[_Slot]) -> None:
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

    def _cancel(self, slots: list[_Slot]) -> None:
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
        tasks: _MapTasks,
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
            slots.append(
                self._client._submit_batch(
                    self.job, self.wakeup, taken.items, taken.payload, self.tasks
                )
            )
        if taken.refused is not None:
            item, outcome = taken.refused
            slots.append(_BatchSlot(self.wakeup, [item], [outcome]))
        return slots

    def pop_head(self) -> _BatchSlot:
        """The oldest batch, its outcomes taken: no longer counted ahead."""
        head = self.batches.popleft()
        self._ahead -= len(head.items)
        return head

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


OutcomeT = TypeVar("OutcomeT", TaskFuture, _Slot)


class Client:
    """A connection to a broker's frontend. Thread-safe; use as a context manager.

    Args:
        address: the broker's frontend endpoint.
        session: resume an earlier session (to collect its results), or None for
            a new one.
        allow_pickle: allow `submit` of callables that are not importable by
            name, shipped with cloudpickle; the worker must allow it too.
        window: at most this many tasks in the broker at once (the broker may
            lower it).
        heartbeat_interval_s: how often to beat; the broker is presumed gone
            after `liveness` silent intervals, and the client reconnects.
        secret_key: this client's ``.key_secret`` file, for a CURVE broker.
        broker_key: the broker's public ``.key`` file (with `secret_key`).

    Raises:
        UsageError: a bad window or session name, or only one of the two key
            files, or a key file that cannot be read.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        session: str | None = None,
        allow_pickle: bool = False,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        context: zmq.Context[Any] | None = None,
        secret_key: str | None = None,
        broker_key: str | None = None,
    ) -> None:
        if window < 1:
            raise UsageError(f"window must be at least 1, got {window}")
        if window_bytes < 1:
            raise UsageError(f"window_bytes must be at least 1, got {window_bytes}")
        check_heartbeat(heartbeat_interval_s, liveness)
        context = context or zmq.Context.instance()
        _wire.check_endpoint(address, "the broker address")
        _check_session(session)
        self._curve = client_keys(secret_key, broker_key)
        self.address = address
        self.session = session or uuid.uuid4().hex
        self.allow_pickle = allow_pickle

        # Task ids are unique per session across Client objects: a random
        # instance number in the high bits, a counter in the low ones. A client
        # resuming a session must not reuse an id the broker still holds.
        self._instance = secrets.randbits(30) + 1
        self._ids = itertools.count(self._instance << 32)
        # Maps not finished yet, abandoned by close(): their results could
        # reach nobody once the client is closed. Callers' threads only, under
        # `_maps_lock`.
        self._open_maps: weakref.WeakSet[_MapTasks] = weakref.WeakSet()
        self._maps_lock = threading.Lock()
        # All that callers and the I/O thread share (see _handover.py); the
        # I/O thread's own state is `_io`'s.
        self._handover = Handover(window, window_bytes)
        settings = IOSettings(
            address,
            self.session,
            self._instance,
            self._curve,
            heartbeat_interval_s,
            liveness,
        )
        self._io = ClientIO(settings, self._handover, context, self._future)
        self._io.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        function: str | Callable[..., Any],
        /,
        *args: Any,
        timeout_s: float | None = None,
        retries: int = 0,
        sink: str | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Submit one task; blocks only while this client's window is full.

        Args:
            function: ``"module:function"``, or a callable. A public module-level
                function is sent by its name; any other callable is pickled,
                which needs ``allow_pickle=True`` here and on the worker.
            timeout_s: stop the task after this many seconds (TaskTimeout).
            retries: run the task again up to this many times if it raises,
                with capped exponential backoff.
            sink: send the result to the sink registered under this name; the
                future then completes with None once the broker accepted it.

        Returns:
            A future whose `result()` is the task's return value, or raises a
            `TaskError` (see ventilator.errors) when the task failed.

        Raises:
            UsageError: the arguments cannot be encoded, or the client is closed.
            PickleNotAllowed: a callable that needs pickling, without allow_pickle.
        """
        spec = self._spec(function, args, kwargs, timeout_s, retries, sink)
        return self._enqueue([spec], self._future)[0]

    def submit_nowait(
        self,
        function: str | Callable[..., Any],
        /,
        *args: Any,
        timeout_s: float | None = None,
        retries: int = 0,
        sink: str | None = None,
        **kwargs: Any,
    ) -> TaskFuture | None:
        """Like `submit`, but return None instead of waiting when the window is
        full (for event loops, which must not block)."""
        spec = self._spec(function, args, kwargs, timeout_s, retries, sink)
        queued = self._enqueue([spec], self._future, block=False)
        return queued[0] if queued else None

    def _future(self, task_id: int) -> TaskFuture:
        return TaskFuture(self, task_id)

    def map(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        """Apply `function` to each item; yield the results in input order.

        Items travel in batches, many to a task, so that a tiny function costs
        a small part of a task per item. A batch carries about 50 ms of work
        (at most 256 items), judged from the items already run, or `chunksize`
        items; without `chunksize` it stops after 0.2 s, and the items it did
        not run are sent again. `timeout_s` and `retries` still apply to each item (see
        `map_outcomes`); with `sink`, each item is a task of its own.

        Submits ahead of what has been consumed, up to the window. An item that
        failed raises its `TaskError` when its turn comes (`TaskRejected` for
        one that could not be encoded); `map_outcomes` reports every item
        without raising. If `iterable` raises, the results of the items before
        it come first, then its exception.

        A map that ends early (a failed item raised, the generator is closed
        or collected after a ``break``) cancels the tasks whose results it has
        not yielded: those still queued at the broker never run; running ones
        finish on their worker, and their results are dropped.
        """
        _check_chunksize(chunksize)
        sink = options.pop("sink", None)
        if sink is not None or chunksize == 1:
            yield from self._map_each(function, iterable, {**options, "sink": sink})
            return

        batches = self._map_batches(function, iterable, chunksize, **options)
        with contextlib.closing(batches):
            for outcomes in batches:
                yield from values_of(outcomes)

    def map_outcomes(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> Iterator[ItemOutcome]:
        """Like `map`, but yield every item's `ItemOutcome` and raise for none.

        An item that raised, timed out or could not be encoded has its error in
        its place; the items around it are not held back. `timeout_s` and
        `retries` apply to each item: a batch runs under the timeout of one
        item and carries only a tenth of it in work; a batch that still runs
        past it, or whose worker died, is run again item by item (so an item
        of it may run twice). An item that raised in a batch is run again on
        its own, up to `retries` more times; its first retry comes without
        backoff, the later ones with the broker's. Closed early, it cancels
        what it has not yielded, as `map` does.

        Raises:
            UsageError: a bad `chunksize`, `timeout_s` or `retries`, or a
                function that cannot be named.
            ClientClosed: the client was closed while the map waited.
            Exception: what `iterable` raised, after the outcomes before it.
        """
        _check_chunksize(chunksize)
        batches = self._outcome_batches(
            function, iterable, chunksize, timeout_s, retries
        )
        with contextlib.closing(batches):
            for outcomes in batches:
                yield from outcomes

    def _outcome_batches(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout_s: float | None = None,
        retries: int = 0,
        streaming: bool = False,
        tasks: _MapTasks | None = None,
    ) -> Generator[list[ItemOutcome], None, None]:
        """`map_outcomes` a batch at a time. With `streaming`, the items are
        read by a thread of their own (see _Feed), for input that may pause;
        `tasks` lets another thread abandon the map (see _map_batches)."""
        items = _Feed(iterable) if streaming else iterable
        batches = self._map_batches(
            function, items, chunksize, timeout_s, retries, tasks
        )
        with contextlib.closing(batches):
            for outcomes in batches:
                yield [
                    ItemOutcome(value, None)
                    if status == p.Status.OK
                    else ItemOutcome(None, _error_of(status, value))
                    for status, value in outcomes
                ]

    def _map_each(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        options: dict[str, Any],
        tasks: _MapTasks | None = None,
    ) -> Iterator[Any]:
        self._refuse_on_io_thread("map()")
        # What every item shares is checked once: a bad name or option is the
        # whole map's error, not each item's.
        name, flags = self._name_of(function)
        _check_task(p.TaskSpec(0, name, b"", flags, **options))
        tasks = tasks or _MapTasks(self)
        wakeup = threading.Condition()
        slots: deque[_Slot] = deque()
        items = iter(iterable)
        more, raised = True, None
        try:
            while (more or slots) and not tasks.abandoned:
                if more:
                    chunk, raised = _read_items(items, SUBMIT_BATCH)
                    more = len(chunk) == SUBMIT_BATCH
                    queued = self._queue_each(function, chunk, options, wakeup, tasks)
                    slots.extend(queued)
                while slots and (not more or len(slots) > self._handover.window // 2):
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
        self,
        function: str | Callable[..., Any],
        items: list[Any],
        options: dict[str, Any],
        wakeup: threading.Condition,
        tasks: _MapTasks,
    ) -> list[_Slot]:
        """A task per item, queued; their slots in order. An item that cannot
        be sent (too large, say) gets a slot failed with why, in its place."""

        def queue(specs: list[p.TaskSpec]) -> list[_Slot]:
            queued = self._enqueue(specs, lambda task_id: _Slot(wakeup, task_id))
            tasks.track(queued)
            return queued

        slots: list[_Slot] = []
        specs: list[p.TaskSpec] = []
        for item in items:
            try:
                specs.append(self._spec(function, (item,), {}, **options))
                continue
            except (TaskError, UsageError) as exc:
                refused = _Slot(wakeup)
                refused.set_exception(_as_task_error(exc))
            slots.extend(queue(specs))
            slots.append(refused)
            specs = []
        slots.extend(queue(specs))
        return slots

    def _map_batches(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any] | _Feed,
        chunksize: int | None,
        timeout_s: float | None = None,
        retries: int = 0,
        tasks: _MapTasks | None = None,
    ) -> Generator[list[list[Any]], None, None]:
        """Submit the items in batches; yield each batch's outcomes in order,
        one ``[status, value or error report]`` per item.

        However it ends, what it has not yielded is cancelled (`tasks`, which
        another thread may abandon too)."""
        self._refuse_on_io_thread("map()")
        job = _MapJob(function, *self._name_of(function), timeout_s, retries)
        _check_task(p.TaskSpec(0, job.name, b"", job.flags, timeout_s, retries))
        run = _BatchMap(self, job, iterable, chunksize, tasks or _MapTasks(self))
        try:
            while not run.tasks.abandoned:
                run.send_ahead()
                if not run.batches and not run.more:
                    break
                if run.feed is not None and not (run.batches and run.batches[0].done):
                    run.wait()  # for input, or for the first batch's result
                    continue
                outcomes = self._outcomes(job, run.batches[0], run.sizer, run.tasks)
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

    def _submit_batch(
        self,
        job: _MapJob,
        wakeup: threading.Condition,
        items: list[Any],
        payload: bytes,
        tasks: _MapTasks,
    ) -> _BatchSlot:
        # Retries are the items' own (see _retry_raised): a batch that failed
        # whole fails the same way again, or is split.
        flags = job.flags | p.Flags.BATCH
        spec = p.TaskSpec(0, job.name, payload, flags, job.timeout_s)
        slot = _BatchSlot(wakeup, items)

        def numbered(task_id: int) -> _Slot:
            slot.task_id = task_id
            return slot

        tasks.track(self._enqueue([spec], numbered))
        return slot

    def _outcomes(
        self, job: _MapJob, batch: _BatchSlot, sizer: _BatchSizer, tasks: _MapTasks
    ) -> list[list[Any]]:
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
                log.info(
                    "a batch of %d items failed as a whole (%s); running them one "
                    "by one",
                    len(batch.items),
                    error.remote_type,
                )
                # The death that poisoned the batch counts for each item.
                died = isinstance(error, PoisonTask)
                return self._run_singly(job, batch.items, job.retries, tasks, died)
            return [[p.Status.RAISED.value, error.to_wire()]] * len(batch.items)

        try:
            elapsed_s, outcomes = unpack_batch_outcomes(value, len(batch.items))
        except ValueError as exc:
            raise ProtocolError(f"undecodable result of a batch: {exc}") from exc
        sizer.observe(len(outcomes), elapsed_s)
        if job.retries:
            self._retry_raised(job, batch.items, outcomes, tasks)
        return outcomes

    def _retry_raised(
        self,
        job: _MapJob,
        items: list[Any],
        outcomes: list[list[Any]],
        tasks: _MapTasks,
    ) -> None:
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
        again = self._run_singly(job, retried, job.retries - 1, tasks)
        for index, outcome in zip(raised, again, strict=True):
            outcomes[index] = outcome

    def _run_singly(
        self,
        job: _MapJob,
        items: list[Any],
        retries: int,
        tasks: _MapTasks,
        died: bool = False,
    ) -> list[list[Any]]:
        """Each item as a task of its own; their outcomes, in order. `died`:
        a worker died running them together, which the broker counts as each
        one's first death (`Flags.SPLIT`)."""
        outcomes: list[list[Any]] = [[] for _ in items]
        specs, places = [], []
        for index, item in enumerate(items):
            try:
                spec = self._spec(job.function, (item,), {}, job.timeout_s, retries)
            except (TaskError, UsageError) as exc:  # too large alone, say
                outcomes[index] = _refusal(exc)
                continue
            specs.append(_split(spec) if died else spec)
            places.append(index)

        wakeup = threading.Condition()
        slots = self._enqueue(specs, lambda task_id: _Slot(wakeup, task_id))
        tasks.track(slots)
        for index, slot in zip(places, slots, strict=True):
            outcomes[index] = _settled(slot)
        tasks.settled(slots)
        return outcomes

    def collect(
        self, count: int | None = None, timeout_s: float | None = None
    ) -> Iterator[TaskFuture]:
        """Yield finished futures of tasks an earlier `Client` of this session
        submitted (resume it with ``Client(session=...)``).

        Each future has the `task_id` that the earlier client's future had.
        Stops after `count` futures, or when none arrived for `timeout_s`.

        A result is acknowledged to the broker once it is yielded, not when it
        arrives: those not yet yielded when this process dies, or the client
        is closed, go to the next client of the session. Until then they count
        against this client's window, as the broker counts them.

        A task of `map` carries a batch of items: its future's result is the
        batch's, ``[elapsed_s, [[status, value], ...]]`` with one pair per item
        in input order, or per item of its first ones if it stopped at its
        time budget (`values_of` turns the pairs into values). The broker
        does not mark batches, so they are not told apart from other tasks.
        """
        self._refuse_on_io_thread("collect()")
        received = 0
        while count is None or received < count:
            try:
                collected = self._handover.orphans.get(timeout=timeout_s)
            except queue.Empty:
                return
            self._handover.hand_over(collected)
            yield collected.future
            received += 1

    def _collect_nowait(self) -> TaskFuture | None:
        """The next result `collect` would yield if one is here, else None."""
        try:
            collected = self._handover.orphans.get_nowait()
        except queue.Empty:
            return None
        self._handover.hand_over(collected)
        return collected.future

    def _collect_listener(
        self, listener: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """Have the I/O thread call `listener` whenever a result waits for
        `collect`, for the block. It must not block: it runs on that thread."""
        return self._handover.listening(listener)

    def executor(self) -> ClientExecutor:
        """A `concurrent.futures.Executor` that runs its calls through this client."""
        return ClientExecutor(self)

    @property
    def session_at_broker(self) -> str:
        """The name the broker knows this session by, as sink records,
        `failed()` and status show it: under CURVE, sessions live inside their
        key, ``<key fingerprint>.<session>``; without, `session` itself."""
        if self._curve is None:
            return self.session
        return f"{fingerprint(self._curve.public_key)}.{self.session}"

    def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The broker's workers, queues and clients, as plain data.

        At most `STATUS_CLIENTS` (100) clients and sinks are listed, the most
        relevant first (owed the most results, connected, heard last);
        ``client_counts`` counts them all: ``all``, ``connected``, ``sinks``,
        ``connected_sinks`` and ``listed``. Likewise at most `STATUS_WORKERS`
        (100) workers (serving nothing first, then holding the oldest task,
        then the most), each with at most `STATUS_SERVICES` (100) of its
        functions (``service_count`` counts them), and ``queued`` and
        ``running`` for the `STATUS_QUEUES` (100) functions with the most
        tasks; ``worker_counts`` (``all``, ``draining``, ``not_serving``,
        ``held``, ``slots``, ``capacity``, ``listed``) and ``queue_counts``
        (``all``, ``queued``, ``running``, ``listed``) are exact.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
            ProtocolError: the broker answered, but its answer could not be
                read (too large, or malformed); the message says why.
        """
        return self._ask(p.StatusRequest(), timeout_s, "status")

    def failed(self, limit: int = 100, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The broker's latest failed tasks, newest first, with their reasons.

        Each is a dict: ticket, session, task_id, function, outcome (raised,
        timeout, poison, not_found, rejected), type, message, traceback,
        retryable. The broker remembers a bounded number (`failed_kept`).
        Under CURVE, a key with a ``.functions`` file gets its own sessions'
        failures only (see README, Security).

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
        """
        report = self._ask(p.ListFailed(limit), timeout_s, "failed")
        return list(report["failed"])

    def retry(
        self,
        tickets: Sequence[int] = (),
        sink: str = "retried",
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Run failed tasks (by ticket; none named: all) again.

        The original submitter already has its failure, so the reruns are the
        broker's own tasks and their results go to the sink `sink`.

        Returns:
            {"retried": [tickets], "refused": [[ticket, reason], ...],
            "sink": sink}.

        Under CURVE, a key with a ``.functions`` file retries its own
        sessions' failures only, as functions its rights still allow.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
            UsageError: under CURVE, this client's key has a ``.functions``
                file that does not name the sink (``sink:NAME``).
        """
        return self._ask(p.Retry(list(tickets), sink), timeout_s, "retry")

    def purge(self, function: str, timeout_s: float = 10.0) -> int:
        """Cancel every task of `function` still waiting to run; return how many.

        Their submitters see them cancelled. Running tasks are left alone.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
            UsageError: under CURVE, this client's key has a ``.functions``
                file (see README, Security).
        """
        return int(self._ask(p.Purge(function), timeout_s, "purge")["purged"])

    def purge_session(self, session: str, timeout_s: float = 10.0) -> dict[str, int]:
        """Drop everything the broker holds for a session that left.

        The results waiting for it are dropped, and the tasks it submitted:
        those queued at once, those running once their workers are done with
        them (never run again). Nothing is delivered to anyone. Name the
        session as `status()` shows it (under CURVE, ``<fingerprint>.<name>``).

        Returns:
            {"results": dropped results, "queued": dropped queued tasks,
            "running": running tasks that will be dropped when they end}.

        Raises:
            UsageError: the session is connected (its results are on their
                way to it), or, under CURVE, this client's key has a
                ``.functions`` file (see README, Security).
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
        """
        report = self._ask(p.Purge(session=session), timeout_s, "purge_session")
        if "refused" in report:
            raise UsageError(str(report["refused"]))
        return {kind: int(report[kind]) for kind in ("results", "queued", "running")}

    def cancel_task(self, session: str, task_id: int, timeout_s: float = 10.0) -> str:
        """Cancel any session's task by its id, as an operator.

        Under CURVE a bare session name is one of this client's key (as
        `self.session` is); another key's session is named in full,
        ``<fingerprint>.<name>``, as `failed()` and sinks show it.

        Returns what became of it: "cancelled", "running" (a running task is
        not stopped), "cancelled already", "finished" or "unknown".

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
            UsageError: under CURVE, this client's key has a ``.functions``
                file and the session is another key's.
        """
        report = self._ask(p.CancelTask(session, task_id), timeout_s, "cancel_task")
        return str(report["outcome"])

    def _ask(self, question: p.Command, timeout_s: float, what: str) -> dict[str, Any]:
        """The broker's answer to `question`, which the caller knows as `what`."""
        self._refuse_on_io_thread(f"{what}()")
        asked = Question(question, Future(), what)
        self._handover.ask(asked)
        try:
            return asked.answer.result(timeout_s)
        except TimeoutError:
            self._handover.forget(asked)
            raise BrokerTimeout(self._no_answer(what, timeout_s)) from None

    def _no_answer(self, what: str, timeout_s: float) -> str:
        heard_at = self._io.broker_heard_at
        if heard_at is None:
            since = "no broker has answered at this address yet: is one running there?"
        else:
            since = f"it was last heard {time.monotonic() - heard_at:.1f}s ago"
        return (
            f"the broker at {self.address} did not answer {what}() within "
            f"{timeout_s:g}s; {since} (pass a larger timeout_s to wait longer)"
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Leave the broker. Maps still open cancel what they have not
        yielded, and raise `ClientClosed` if iterated further; futures still
        pending fail with `ClientClosed`.

        Waits up to `timeout_s` until the broker has accepted every task this
        client sent, so that none is lost by leaving. The broker keeps their
        results for this session; ``Client(session=...)`` collects them later.

        Raises:
            UsageError: called in a done-callback (on the client's I/O thread),
                which close() would have to wait for.
        """
        self._refuse_on_io_thread("close()")
        self._abandon_open_maps()
        if not self._handover.close(timeout_s):
            return
        self._io.join()
        self._handover.close_pipe()

    def _track_map(self, tasks: _MapTasks) -> None:
        with self._maps_lock:
            self._open_maps.add(tasks)

    def _abandon_open_maps(self) -> None:
        """Cancel what maps still open have not yielded, as a map closed
        early does: after close() their generators can yield nothing, and
        their tasks would run for nobody (a map is not collected later)."""
        with self._maps_lock:
            open_maps = list(self._open_maps)
        for tasks in open_maps:
            if not tasks.abandoned:
                tasks.abandon(closed=True)

    def _spec(
        self,
        function: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout_s: float | None = None,
        retries: int = 0,
        sink: str | None = None,
    ) -> p.TaskSpec:
        name, flags, payload = self._encode_call(function, args, kwargs)
        spec = p.TaskSpec(0, name, payload, flags, timeout_s, retries, sink)
        _check_task(spec)
        oversized = self._handover.oversized(len(payload))
        if oversized is not None:
            raise oversized
        return spec

    def _encode_call(
        self,
        function: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, int, bytes]:
        name, flags = self._name_of(function)
        if flags & p.Flags.PICKLED:
            return name, flags, pack_pickled_call(function, args, kwargs)  # type: ignore[arg-type]
        return name, flags, pack_call(args, kwargs)

    def _name_of(self, function: str | Callable[..., Any]) -> tuple[str, int]:
        """The name a task of `function` goes by, and its flags."""
        if isinstance(function, str):
            problem = p.submission_problem(function, p.Flags.NONE)
            if problem is not None:
                raise UsageError(problem)
            return function, p.Flags.NONE

        importable = _importable_name(function)
        if importable is not None:
            return importable, p.Flags.NONE
        if not self.allow_pickle:
            raise PickleNotAllowed(_pickle_refusal(function))
        label = getattr(function, "__qualname__", type(function).__name__)
        return f"{p.PICKLED_PREFIX}{label}", p.Flags.PICKLED

    def _enqueue(
        self,
        specs: list[p.TaskSpec],
        outcome: Callable[[int], OutcomeT],
        block: bool = True,
    ) -> list[OutcomeT]:
        """Queue tasks for the I/O thread; `outcome(task_id)` makes what each
        task's result is delivered to. Without `block`, queue nothing and
        return [] when they do not all fit in the window now."""
        handover = self._handover
        outcomes = []
        wake = False
        with handover.room:
            if not block and not handover.fits(specs):
                return []
            # Tasks that find none of ours in flight go out at once, from this
            # thread if it can (send_now); tasks that follow others wait for
            # the I/O thread, which gathers a burst into one SUBMIT.
            alone = handover.in_window == 0
            for spec in specs:
                size = len(spec.payload)
                while handover.must_wait(size) and not handover.stopped:
                    self._refuse_on_io_thread("submit() with the window full")
                    if wake:  # what we queued must go out, or no room comes back
                        handover.wake()
                        wake = False
                    handover.room.wait()
                handover.check_open()
                # The I/O thread takes the whole queue when it wakes: one wake-up
                # per burst, not one write to the pipe per task.
                wake = wake or not handover.outgoing
                task_id = next(self._ids)
                result = outcome(task_id)
                handover.queue(Pending(_with_id(spec, task_id), result, size=size))
                outcomes.append(result)
        if wake and not (alone and self._io.send_now()):
            handover.wake()
        return outcomes

    def _refuse_on_io_thread(self, call: str) -> None:
        """Raise, rather than let the I/O thread wait (in a done-callback, which
        it runs) for what only it can bring: it would wait for itself, and
        every future of this client with it."""
        if threading.current_thread() is not self._io.thread:
            return
        raise UsageError(
            f"{call} would wait on this client's I/O thread, which runs "
            "done-callbacks and is the thread that would end the wait; a "
            "callback must not wait for the client. Use the future passed to "
            "the callback (it is done), chain with add_done_callback (or "
            "submit_nowait), or hand the waiting to a thread of your own, "
            "such as a concurrent.futures.ThreadPoolExecutor"
        )

    def _withdraw(self, task_ids: list[int]) -> None:
        """Cancel tasks nobody waits for any more (a cancelled future, an
        abandoned map): see `Handover.withdraw`."""
        self._handover.withdraw(task_ids)


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


def _settled(slot: _Slot) -> list[Any]:
    """The outcome of a finished one-item task, as a batch would report it."""
    try:
        return [p.Status.OK.value, slot.result()]
    except CancelledError:
        return _cancelled()
    except TaskError as error:
        return [p.Status.RAISED.value, error.to_wire()]


def _check_session(session: str | None) -> None:
    """Refuse a session name the broker would refuse in HELLO: its futures
    would otherwise wait for a welcome that never comes."""
    if session is None:
        return
    if not isinstance(session, str):
        raise UsageError(f"session must be a str, got {type(session).__name__}")
    problem = p.label_problem(session, "session")
    if problem is not None:
        raise UsageError(f"cannot open this session: {problem}")


def _check_chunksize(chunksize: int | None) -> None:
    if chunksize is not None and chunksize < 1:
        raise UsageError(f"chunksize must be at least 1, got {chunksize!r}")


def _check_task(spec: p.TaskSpec) -> None:
    """Refuse, alone and at once, a task whose fields break the wire's rules.

    The broker refuses a whole SUBMIT for one such task, and with it the tasks
    it was sent with; the rules are the broker's own (protocol.task_problem).
    """
    problem = p.task_problem(spec)
    if problem is not None:
        raise UsageError(f"cannot submit this task: {problem}")


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
    """
    if error.remote_type == "PickleNotAllowed":
        return False
    if isinstance(error, PoisonTask):
        return True
    return items > 1 and isinstance(error, ResultExpired | TaskRejected | TaskTimeout)


def _importable_name(function: Callable[..., Any]) -> str | None:
    """``module:name`` for a public module-level function, else None.

    Only a plain function that its module really exposes under that name
    qualifies: a partial, a bound method, a lambda or a local function does not.
    """
    if not inspect.isfunction(function):
        return None
    module, name = function.__module__, function.__qualname__
    if module == "__main__" or name.startswith("_") or "." in name or "<" in name:
        return None
    if getattr(sys.modules.get(module), name, None) is not function:
        return None
    return f"{module}:{name}"


def _pickle_refusal(function: Callable[..., Any]) -> str:
    """Why `function` cannot be sent by name, and what the caller does instead."""
    opt_in = (
        "or create the client with allow_pickle=True and start the workers with "
        "--allow-pickle to ship it pickled"
    )
    if getattr(function, "__module__", None) == "__main__":
        # The worker's own __main__ is the worker, not the user's script: a
        # name in __main__ means nothing there, however public.
        return (
            f"{function!r} is defined in __main__ (a script or the REPL), and "
            "workers cannot import functions of __main__; move it into a module "
            "the workers serve and import it from there (or submit its "
            f"'module:function' name), {opt_in}"
        )
    return (
        f"{function!r} is not a public module-level function, so it would have "
        f"to be pickled; pass 'module:function' by name, {opt_in}"
    )


# Direct construction: dataclasses.replace costs several times more, per task.
def _with_id(spec: p.TaskSpec, task_id: int) -> p.TaskSpec:
    return p.TaskSpec(
        task_id,
        spec.function,
        spec.payload,
        spec.flags,
        spec.timeout_s,
        spec.retries,
        spec.sink,
    )


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

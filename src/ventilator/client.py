"""The client: submit tasks, get `concurrent.futures.Future`s back.

One background thread owns the DEALER socket. Callers hand it tasks through a
locked deque and a wake-up pipe; it sends everything that piled up in one
SUBMIT per loop turn, so a burst of `submit` calls costs one message, not one
each. Results come back in batches and complete their futures; the thread
acknowledges them in one ACK per turn.

A task submitted while none of this client's is in flight, the round trip of
a caller that waits for each result, skips the hand-over: while the I/O thread
sleeps, the caller takes the socket (behind a lock, which is the memory barrier
libzmq asks for when a socket changes threads) and sends the task itself.

Flow control is a window: at most `window` tasks of this client are in the
broker at once, and `submit` blocks while the window is full. That is how a
fast producer slows down instead of growing the broker's memory.

A session id names this client to the broker. If the broker goes silent, the
client reconnects with the same session: the broker sends again whatever it
had not seen acknowledged, and the client resends whatever the broker had not
accepted (all unfinished tasks when the broker has no durable journal). Task
ids are the client's own, so the broker recognises a resubmission.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import itertools
import logging
import math
import os
import queue
import secrets
import select
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED as _CANCELLED
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import zmq

from . import _wire
from . import protocol as p
from ._cancels import UnconfirmedCancels
from ._recent import RecentResults
from ._timing import StallWatch, poll_timeout_ms
from .errors import (
    BrokerTimeout,
    ClientBroken,
    ClientClosed,
    NetworkError,
    PickleNotAllowed,
    PoisonTask,
    ProtocolError,
    ResultExpired,
    SessionInUse,
    SessionRefused,
    TaskError,
    TaskRejected,
    TaskTimeout,
    UsageError,
    task_error_from_wire,
)
from .logs import Dwindling
from .policy import check_heartbeat
from .security import NOT_PERMITTED, REVOKED, client_keys, fingerprint
from .serialization import (
    BatchPacker,
    pack_call,
    pack_pickled_batch,
    pack_pickled_call,
    unpack_batch_outcomes,
    unpack_value,
)

__all__ = ["Client", "ClientExecutor", "ItemOutcome", "TaskFuture", "values_of"]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_WINDOW = 20_000
# Payload bytes of this client's unfinished tasks in the broker at once. Large
# payloads then flow through memory that every process reuses while it is warm,
# instead of each landing on freshly faulted pages: 2,000 tasks of 100 KiB
# submitted at once took a third less CPU in all with about 25 MiB in flight
# than with all 200 MB. Workers still find a queue far deeper than their credit.
DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024
# ... but this many tasks may always be in the broker, whatever their size, so
# that tasks larger than the window still keep several workers busy.
WINDOW_BYTES_MIN_TASKS = 16
# Tasks sent in one SUBMIT at most; bounds the size of one message.
SUBMIT_BATCH = 2048
# ... and at most about this many payload bytes: one huge message would stall
# the broker's loop while it is copied in, and hold memory on both sides.
SUBMIT_BATCH_BYTES = 1024 * 1024

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
# Cancelling this many tasks or fewer finds each unsent one by a binary search
# of the outgoing queue; more (an abandoned map) take one pass over it.
WITHDRAW_BY_SEARCH = 16
# Acknowledgements of results wait up to this long to travel with the next
# batch of submissions, or until this many. A lone task does not take them
# along: they are a message of their own, which the broker reads in a turn of
# its own more often than not, on the lone task's way.
ACK_DELAY_S = 0.005
ACK_BATCH = 1024
# What a map's unfinished items raise once close() cancelled them.
MAP_CLOSED_UNDER = (
    "the client was closed while this map ran; its tasks not finished then "
    "were cancelled"
)
# With a per-item timeout, a batch carries at most this share of it in work: a
# batch shares one deadline, and one of items that each keep to theirs should
# not run past it as a whole (it would then be run again item by item).
TIMEOUT_SHARE = 0.1
# ERROR codes with which a broker refuses a whole message it could not decode
# (ProtocolError.code); with a SUBMIT, every task in it.
_MESSAGE_REFUSED = frozenset({"frames", "size", "body", "malformed"})
# A client refused its session (another live client holds it) asks again every
# heartbeat for this many of its liveness periods, then fails what it holds:
# long enough for a broker with the same settings to give up a holder that
# died without BYE, and take it over then.
SESSION_WAIT_LIVENESS_PERIODS = 3


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
        if not self.more or self._ahead >= self._client._window:
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


_Outcome = TaskFuture | _Slot
OutcomeT = TypeVar("OutcomeT", TaskFuture, _Slot)


@dataclass(frozen=True, slots=True, eq=False)
class _Question:
    command: p.Command
    answer: Future[dict[str, Any]]
    what: str = "a question"  # as the caller knows it: "status", "failed"...


# The command bytes of answers to questions: one that cannot be read still
# answers the oldest question asked (the broker answers in order).
_ANSWER_BYTES = frozenset({bytes([p.Cmd.STATUS_REPLY]), bytes([p.Cmd.OPERATOR_REPLY])})


class _Collected(NamedTuple):
    """A result of an earlier client of the session, waiting for `collect`."""

    future: TaskFuture
    key: tuple[str, int]  # what acknowledges it
    size: int  # the bytes the broker holds for it until then


@dataclass(slots=True, eq=False)
class _Pending:
    spec: p.TaskSpec
    future: _Outcome
    accepted: bool = False
    # Its payload's size, which the broker counts against client_max_bytes
    # until the task ends (the spec may drop the payload once accepted).
    size: int = 0


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
        self._context = context or zmq.Context.instance()
        _wire.check_endpoint(address, "the broker address")
        _check_session(session)
        self._curve = client_keys(secret_key, broker_key)
        self.address = address
        self.session = session or uuid.uuid4().hex
        self.allow_pickle = allow_pickle
        self._heartbeat_interval_s = heartbeat_interval_s
        self._liveness = liveness

        # Task ids are unique per session across Client objects: a random
        # instance number in the high bits, a counter in the low ones. A client
        # resuming a session must not reuse an id the broker still holds.
        self._instance = secrets.randbits(30) + 1
        self._ids = itertools.count(self._instance << 32)
        # Results of earlier clients of the session wait here for collect(),
        # unacknowledged: the broker keeps them until collect() hands them on,
        # so that a collector killed meanwhile loses none. `_handed` holds
        # those handed on and not yet taken by the I/O thread to acknowledge.
        self._orphans: queue.SimpleQueue[_Collected] = queue.SimpleQueue()
        self._handed: list[_Collected] = []
        # Called by the I/O thread after it puts a result in `_orphans`: how an
        # asyncio collect() learns of one without a thread blocked on the
        # queue. A tuple, replaced whole, so the I/O thread reads it unlocked.
        self._collect_listeners: tuple[Callable[[], None], ...] = ()
        # Maps not finished yet, abandoned by close(): their results could
        # reach nobody once the client is closed.
        self._open_maps: weakref.WeakSet[_MapTasks] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._window = window
        self._in_window = 0
        self._outgoing: deque[_Pending] = deque()
        # The broker's client_max_bytes (unknown until WELCOME), a hard limit,
        # and our own window_bytes, which WINDOW_BYTES_MIN_TASKS may pass; and
        # the bytes waiting in _outgoing: a caller waits while they would pass
        # the lower of the two.
        self._max_bytes: float = math.inf
        self._window_bytes = window_bytes
        self._outgoing_bytes = 0
        # Tasks to cancel at the broker, and those sent and not yet confirmed
        # (see _cancels.py), sent again on every new connection.
        self._cancels: deque[int] = deque()
        self._unconfirmed_cancels = UnconfirmedCancels()
        # Questions for the broker (status, operator commands) and their answers'
        # futures; the broker answers each in the order asked.
        self._questions: deque[_Question] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._closed = False
        # Set when the I/O thread failed; every later call raises it.
        self._broken: ClientBroken | None = None
        self._close_deadline = 0.0
        self._max_payload_bytes: int | None = None

        # Owned by whoever holds `_socket_lock` from here on: the I/O thread,
        # except while it waits (see _wait), when a caller may send (_send_now).
        # A Lock's acquire and release are full memory barriers, so the socket
        # changes threads as libzmq requires. Taken before `_lock`, never after.
        self._socket_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        # Bytes the broker holds for us as we reckon them: payloads of tasks
        # sent and not finished, results received and not acknowledged (of
        # which `_acks_bytes`). Nothing is sent that would take them past
        # _max_bytes, which the broker would refuse.
        self._bytes_held = 0
        self._acks_bytes = 0
        self._asked: deque[_Question] = deque()
        self._socket: zmq.Socket[bytes]
        self._poll = select.poll()
        self._socket_fd = -1
        self._monitor_fd = -1
        self._input: _wire.InputCheck  # with the socket (see _watch)
        self._welcomed = False
        # When the I/O thread last heard from a broker; None while none answered.
        self._started_at = time.monotonic()
        self._broker_heard_at: float | None = None
        # Says a broker is silent (or never answered), less and less often.
        self._silence_log = Dwindling(self._heartbeat_interval_s * self._liveness)
        # Since when the broker refuses our session to us (another live client
        # holds it); None while it is ours, or not asked for yet.
        self._session_refused_at: float | None = None
        # Why: another client holds it (session_in_use), or no room for it.
        self._session_refusal: p.Error | None = None
        self._durable = True
        self._acks: list[tuple[str, int]] = []
        self._acks_due = math.inf
        # Results handed to a future or to collect(): a copy the broker sends
        # again is acknowledged, not handed on twice.
        self._handed_on = RecentResults()
        # Results waiting in `_orphans`, by key (a copy of one is dropped):
        # the broker counts them against the window until acknowledged.
        self._collectable: set[tuple[str, int]] = set()
        self._window_held_warned = False
        self._warned: set[str] = set()  # what the broker told us, logged once
        # Why the broker stopped serving this client's key, once it said so.
        self._revoked: str | None = None
        public_key = self._curve.public_key if self._curve is not None else None
        self._handshakes = _wire.HandshakeWatch(address, "client", public_key)
        # Why this address cannot be a broker's frontend, once a refusal showed
        # it (see _misdirected); None while none did, or since a WELCOME.
        self._misdirection: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"ventilator-client-{self.session[:8]}", daemon=True
        )
        self._thread.start()

    # --- the caller's side -------------------------------------------------------

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
                while slots and (not more or len(slots) > self._window // 2):
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
        # whole fails the same way again, or is split. It carries them all
        # the same, so that the broker counts an item we will retry as
        # retried, not failed; it never retries a batch itself.
        flags = job.flags | p.Flags.BATCH
        spec = p.TaskSpec(0, job.name, payload, flags, job.timeout_s, job.retries)
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
                collected = self._orphans.get(timeout=timeout_s)
            except queue.Empty:
                return
            self._hand_over(collected)
            yield collected.future
            received += 1

    def _collect_nowait(self) -> TaskFuture | None:
        """The next result `collect` would yield if one is here, else None."""
        try:
            collected = self._orphans.get_nowait()
        except queue.Empty:
            return None
        self._hand_over(collected)
        return collected.future

    @contextlib.contextmanager
    def _collect_listener(self, listener: Callable[[], None]) -> Iterator[None]:
        """Have the I/O thread call `listener` whenever a result waits for
        `collect`, for the block. It must not block: it runs on that thread."""
        with self._lock:
            self._collect_listeners = (*self._collect_listeners, listener)
        try:
            yield
        finally:
            with self._lock:
                listeners = list(self._collect_listeners)
                listeners.remove(listener)
                self._collect_listeners = tuple(listeners)

    def _hand_over(self, collected: _Collected) -> None:
        """Have the I/O thread acknowledge a result collect() hands on: only
        now may the broker forget it."""
        with self._lock:
            wake = not self._handed
            self._handed.append(collected)
        if wake:
            self._wake()

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
        asked = _Question(question, Future(), what)
        with self._lock:
            self._check_open()
            self._questions.append(asked)
        self._wake()
        try:
            return asked.answer.result(timeout_s)
        except TimeoutError:
            self._forget_question(asked)
            raise BrokerTimeout(self._no_answer(what, timeout_s)) from None

    def _forget_question(self, asked: _Question) -> None:
        """Drop a question nobody waits for, if it was not sent yet: a client
        that never reaches a broker must not pile up questions. One sent stays
        in `_asked`, since the broker answers in the order asked."""
        with self._lock, contextlib.suppress(ValueError):
            self._questions.remove(asked)

    def _no_answer(self, what: str, timeout_s: float) -> str:
        heard_at = self._broker_heard_at
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_deadline = time.monotonic() + timeout_s
            self._room.notify_all()
        self._wake()
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _track_map(self, tasks: _MapTasks) -> None:
        with self._lock:
            self._open_maps.add(tasks)

    def _abandon_open_maps(self) -> None:
        """Cancel what maps still open have not yielded, as a map closed
        early does: after close() their generators can yield nothing, and
        their tasks would run for nobody (a map is not collected later)."""
        with self._lock:
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
        oversized = _oversized(len(payload), self._max_payload_bytes)
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
        outcomes = []
        wake = False
        with self._room:
            if not block and not self._fits(specs):
                return []
            # Tasks that find none of ours in flight go out at once, from this
            # thread if it can (_send_now); tasks that follow others wait for
            # the I/O thread, which gathers a burst into one SUBMIT.
            alone = self._in_window == 0
            for spec in specs:
                size = len(spec.payload)
                while self._must_wait(size) and not self._stopped:
                    self._refuse_on_io_thread("submit() with the window full")
                    if wake:  # what we queued must go out, or no room comes back
                        self._wake()
                        wake = False
                    self._room.wait()
                self._check_open()
                # The I/O thread takes the whole queue when it wakes: one wake-up
                # per burst, not one write to the pipe per task.
                wake = wake or not self._outgoing
                task_id = next(self._ids)
                result = outcome(task_id)
                pending = _Pending(_with_id(spec, task_id), result, size=size)
                self._outgoing.append(pending)
                self._outgoing_bytes += size
                self._in_window += 1
                outcomes.append(result)
        if wake and not (alone and self._send_now()):
            self._wake()
        return outcomes

    def _refuse_on_io_thread(self, call: str) -> None:
        """Raise, rather than let the I/O thread wait (in a done-callback, which
        it runs) for what only it can bring: it would wait for itself, and
        every future of this client with it."""
        if threading.current_thread() is not self._thread:
            return
        raise UsageError(
            f"{call} would wait on this client's I/O thread, which runs "
            "done-callbacks and is the thread that would end the wait; a "
            "callback must not wait for the client. Use the future passed to "
            "the callback (it is done), chain with add_done_callback (or "
            "submit_nowait), or hand the waiting to a thread of your own, "
            "such as a concurrent.futures.ThreadPoolExecutor"
        )

    def _must_wait(self, size: int) -> bool:
        """Whether a task of `size` bytes waits for room: the window is full,
        or it would take the bytes waiting to be sent past the broker's
        client_max_bytes (then they could not all be sent anyway)."""
        return self._in_window >= self._window or self._too_many_bytes(size)

    def _fits(self, specs: list[p.TaskSpec]) -> bool:
        """Whether all of `specs` fit the window and the bytes now."""
        size = sum(len(spec.payload) for spec in specs)
        in_window = self._in_window + len(specs) <= self._window
        return in_window and not self._too_many_bytes(size)

    def _too_many_bytes(self, size: int) -> bool:
        waiting = self._outgoing_bytes
        limit = min(self._max_bytes, self._window_bytes)
        return waiting > 0 and waiting + size > limit

    def _room_for(self, size: int, in_broker: int) -> bool:
        """Whether a task of `size` bytes may join the `in_broker` tasks of
        ours in the broker: within its client_max_bytes (alone, a larger task
        goes: the broker says why not), and within window_bytes unless fewer
        than WINDOW_BYTES_MIN_TASKS are there."""
        held = self._bytes_held
        if held and held + size > self._max_bytes:
            return False
        return held + size <= self._window_bytes or in_broker < WINDOW_BYTES_MIN_TASKS

    @property
    def _stopped(self) -> bool:
        return self._closed or self._broken is not None

    def _check_open(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise UsageError("this client is closed")

    def _send_now(self) -> bool:
        """Send what is queued from the caller's thread, if the I/O thread is
        idle in its wait; False when it must be woken to do it (or to read).

        This saves a round trip between threads (a pipe write, a wake-up and a
        loop turn) on the path of a lone task, the one that waits for it.
        """
        if not self._socket_lock.acquire(blocking=False):
            return False  # the I/O thread is busy: it may be sending already
        try:
            if self._stopped or not self._welcomed:
                return False
            self._send_outgoing(time.monotonic())
            # The I/O thread sleeps on the socket's descriptor, which our sends
            # may have silenced for a message that came in meanwhile.
            return not self._input.unannounced()
        finally:
            self._socket_lock.release()

    def _withdraw(self, task_ids: list[int]) -> None:
        """Cancel tasks nobody waits for any more (a cancelled future, an
        abandoned map): those not sent yet are dropped here, never to be sent;
        the others are cancelled at the broker once it welcomed this
        connection (see _send_outgoing). Their outcomes are the caller's to
        settle."""
        if not task_ids:
            return
        wanted = set(task_ids)
        with self._room:
            if len(wanted) <= WITHDRAW_BY_SEARCH:
                unsent = {t for t in wanted if self._drop_unsent(t)}
            else:
                unsent = self._drop_all_unsent(wanted)
            if unsent:
                self._in_window -= len(unsent)
                self._room.notify_all()
            self._cancels.extend(wanted - unsent)
        self._wake()

    def _drop_unsent(self, task_id: int) -> bool:
        """Take the task out of the outgoing queue, if there (under `_lock`).

        A binary search: task ids join the queue in increasing order and
        leave from its head. Scanning the queue instead made cancelling
        20,000 futures that were never sent, one by one, take half a minute.
        """
        outgoing = self._outgoing
        index = bisect.bisect_left(outgoing, task_id, key=_task_id_of)
        if index == len(outgoing) or outgoing[index].spec.task_id != task_id:
            return False
        self._outgoing_bytes -= outgoing[index].size
        del outgoing[index]
        return True

    def _drop_all_unsent(self, wanted: set[int]) -> set[int]:
        """Take those of `wanted` out of the outgoing queue in one pass
        (under `_lock`); return their ids."""
        unsent = {x.spec.task_id for x in self._outgoing} & wanted
        if unsent:
            kept = (x for x in self._outgoing if x.spec.task_id not in unsent)
            self._outgoing = deque(kept)
            self._outgoing_bytes = sum(x.size for x in self._outgoing)
        return unsent

    def _wake(self) -> None:
        # A full pipe means the thread is awake already; a closed one, that it left.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def _release(self, count: int) -> None:
        with self._room:
            self._in_window -= count
            self._room.notify_all()

    # --- the I/O thread --------------------------------------------------------

    def _run(self) -> None:
        with self._socket_lock:
            try:
                self._serve()
            except Exception as exc:  # a bug of ours: nothing may hang on it
                self._broke(exc)

    def _broke(self, cause: Exception) -> None:
        """The I/O thread failed: fail what waits on it, and every later call."""
        log.error(
            "the client's I/O thread failed; failing its pending tasks session=%s",
            self.session,
            exc_info=cause,
        )
        error = ClientBroken(
            f"the client's I/O thread failed ({type(cause).__name__}: {cause}); "
            f"this client can send and receive nothing more; session={self.session}"
        )
        with self._room:
            self._broken = error
            self._room.notify_all()  # callers waiting for room in the window
            outgoing, self._outgoing = self._outgoing, deque()
            self._outgoing_bytes = 0
            questions = [*self._asked, *self._questions]
            self._questions.clear()
        for pending in (*self._pending.values(), *outgoing):
            _fail(pending.future, error)
        for question in questions:
            _fail(question.answer, error)
        with contextlib.suppress(Exception):
            self._close_socket(linger=0)

    def _serve(self) -> None:
        self._poll.register(self._wake_read, select.POLLIN)
        self._socket = self._connect()
        broker_seen = time.monotonic()
        next_beat = broker_seen + self._heartbeat_interval_s
        stalls = StallWatch(self._heartbeat_interval_s, broker_seen)

        while not self._closed or self._awaiting_acceptance():
            ready = self._wait(min(next_beat, self._acks_due))
            now = time.monotonic()
            # While this process stood still (SIGSTOP, a swapped-out host) it
            # could not hear the broker: that silence is not the broker's, and
            # a reconnection would drop what this socket still holds.
            broker_seen = min(now, broker_seen + stalls.stalled_s(now))
            if self._monitor_fd in ready:
                self._handshakes.read()
            if self._wake_read in ready:
                self._drain_wake()
            if self._receive(now):
                broker_seen = self._broker_heard_at = now
                # WELCOME may have lowered the interval to the broker's: the
                # next beat must not keep the date our own interval gave it.
                next_beat = min(next_beat, now + self._heartbeat_interval_s)
            self._send_outgoing(now)
            if not self._welcomed:
                self._fail_unanswerable()

            if now >= next_beat:
                # A refused client asks again instead: a beat would only be
                # answered "hello_first".
                refused = self._session_refused_at is not None
                self._send(self._hello_command() if refused else p.Heartbeat())
                self._ask_cancel_receipt()
                self._give_up_waiting_for_session(now)
                next_beat = now + self._heartbeat_interval_s
                if now - broker_seen > self._heartbeat_interval_s * self._liveness:
                    self._log_silence(now)
                    self._close_socket(linger=0)
                    self._socket = self._connect()
                    broker_seen = now

        self._shutdown()

    def _fail_unanswerable(self) -> None:
        """Before a WELCOME: fail what cannot be answered, saying why.

        Questions (status) would wait in silence for an answer that cannot
        come, from a broker whose handshakes fail or from a backend; so would
        tasks, which a backend never accepts. Checked every turn, not only
        when the refusal arrives: what is asked or submitted after it must
        fail as promptly as what came before.
        """
        problem = self._handshakes.problem
        self._fail_questions([x for x in (problem, self._misdirection) if x])
        if problem is not None and self._handshakes.definitive:
            refusals = _wire.REFUSALS_BEFORE_GIVING_UP
            self._fail_tasks(
                f"{problem} (this task was not run: the broker refused this "
                f"client's last {refusals} handshakes; session={self.session})",
                "the broker refuses this client",
            )
        if self._misdirection is not None:
            self._fail_tasks(
                f"{self._misdirection} (this task was not run)",
                f"{self.address} is not a broker's frontend",
            )

    def _log_silence(self, now: float) -> None:
        """Say that the broker is silent, at each reconnection at first, then
        less and less often while it stays so (see Dwindling)."""
        heard_at = self._broker_heard_at
        silent_since = self._started_at if heard_at is None else heard_at
        if not self._silence_log.due(now, silent_since):
            return
        refused = self._handshakes.refused_note()
        if refused is not None:
            log.warning("%s", refused)  # not silent: it refused our key
        elif heard_at is None:
            log.warning(
                "no broker answered at %s yet (waited %.1fs); reconnecting",
                self.address,
                now - self._started_at,
            )
        else:
            log.warning(
                "broker silent for %.1fs broker=%s; reconnecting",
                now - heard_at,
                self.address,
            )

    def _wait(self, wake_at: float) -> set[int]:
        """The descriptors ready by `wake_at` (monotonic); none if it passed.

        The only time the I/O thread lets go of the socket: a caller may send
        on it meanwhile, and writes the pipe if a message then waits unseen.
        """
        if self._input.unannounced():
            return {self._socket_fd}
        self._socket_lock.release()
        try:
            return {fd for fd, _ in self._poll.poll(poll_timeout_ms(wake_at))}
        finally:
            self._socket_lock.acquire()

    def _close_socket(self, linger: int) -> None:
        self._unwatch()
        self._handshakes.close()
        self._socket.close(linger=linger)

    def _awaiting_acceptance(self) -> bool:
        """While closing: are tasks still unaccepted, with time left to wait?
        Not while the broker refuses this client: none can be accepted."""
        if time.monotonic() >= self._close_deadline or self._refused_entry:
            return False
        if self._session_refused_at is not None:
            return False  # the session is another client's: nothing is accepted
        with self._lock:
            # Cancels too: a map abandoned just before close() must not leave
            # its tasks to run for a session that is going away.
            if self._outgoing or self._cancels:
                return True
        return any(not pending.accepted for pending in self._pending.values())

    def _connect(self) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        if self._curve is not None:
            self._curve.apply(socket)
        self._handshakes.watch(socket)
        socket.connect(self.address)
        self._socket = socket
        self._watch()
        self._hello()
        return socket

    def _hello(self) -> None:
        # Nothing else is sent until the broker's WELCOME gives its limits; then
        # whatever it may not have (see _welcome) is sent again.
        self._welcomed = False
        with self._lock:
            # Questions asked of a broker that forgot us will not be answered.
            self._questions.extendleft(reversed(self._asked))
            self._asked.clear()
            # ... and cancellations it did not confirm go again after WELCOME.
            self._cancels.extend(self._unconfirmed_cancels.to_send_again())
        self._send(self._hello_command())

    def _hello_command(self) -> p.Hello:
        # The instance tells the broker this is the client that holds the
        # session, back on a new connection, and not a second one.
        return p.Hello(self.session, instance=self._instance)

    def _watch(self) -> None:
        """Wait on the socket and its monitor through their ZMQ_FDs, with the
        wake-up pipe in one `select.poll`: one system call per wait, where a
        `zmq.Poller` polls twice and asks each socket's ZMQ_EVENTS twice. It
        also leaves the socket alone while the I/O thread waits (see _wait)."""
        self._socket_fd = _wire.fd_of(self._socket)
        self._poll.register(self._socket_fd, select.POLLIN)
        self._input = _wire.InputCheck(self._socket)
        if self._handshakes.monitor is not None:
            self._monitor_fd = _wire.fd_of(self._handshakes.monitor)
            self._poll.register(self._monitor_fd, select.POLLIN)
            # Its descriptor announces events only once a receive found it empty.
            self._handshakes.read()

    def _unwatch(self) -> None:
        for fd in (self._socket_fd, self._monitor_fd):
            if fd != -1:
                self._poll.unregister(fd)
        self._socket_fd = self._monitor_fd = -1

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 65536)

    def _send(self, command: p.Command) -> None:
        _wire.send(self._socket, command)
        self._input.sent()

    def _receive(self, now: float) -> bool:
        heard = False
        commands = _wire.receive(
            self._socket, p.TO_CLIENT, unreadable=self._unreadable_answer
        )
        for command in commands:
            heard = True
            self._handle(command)
        if self._acks and self._acks_due == math.inf:
            self._acks_due = now + ACK_DELAY_S
        return heard

    def _send_acks(self, now: float, submitting: bool) -> None:
        """Acknowledge results with the next submission, or once they are due.

        Waiting lets the broker read acknowledgements and submissions in one
        turn; `_take_outgoing` counts the unsent ones against the window."""
        due = now >= self._acks_due or len(self._acks) >= ACK_BATCH
        if self._acks and (submitting or due):
            self._send(p.Ack(self._acks))
            self._acks = []
            self._acks_due = math.inf
            self._bytes_held -= self._acks_bytes
            self._acks_bytes = 0

    def _handle(self, command: p.Command) -> None:
        if isinstance(command, p.Results):
            self._complete(command.results)
        elif isinstance(command, p.Accepted):
            self._accepted(command.task_ids)
        elif isinstance(command, p.Welcome):
            self._welcome(command)
        elif isinstance(command, p.StatusReply):
            self._answered(command.status)
        elif isinstance(command, p.OperatorReply):
            self._answered(command.report)
        elif isinstance(command, p.Error):
            self._refused(command)

    def _answered(self, answer: dict[str, Any]) -> None:
        if self._asked:
            _resolve(self._asked.popleft().answer, answer)

    def _unreadable_answer(self, frames: list[p.Payload], error: ProtocolError) -> None:
        """An answer that cannot be read still came: fail the question it
        answers with why, rather than let it time out and advise waiting
        longer (a status too large to read was taken for silence)."""
        if len(frames) < 2 or bytes(frames[1]) not in _ANSWER_BYTES:
            return
        if not self._asked:
            return
        asked = self._asked.popleft()
        message = (
            f"the broker at {self.address} answered {asked.what}(), but its "
            f"answer could not be read: {error}; a longer timeout_s will not "
            "help"
        )
        if error.code == "size":
            message += (
                f" (a client reads answers of up to {p.MAX_BODY_BYTES} bytes; "
                "a broker that lists every client in its status outgrows that "
                "past about 100,000 sessions: upgrade it)"
            )
        _fail(asked.answer, ProtocolError(message, error.code))

    def _refused(self, error: p.Error) -> None:
        if error.code == "hello_first":
            # Not once the key was revoked: its results would come back to
            # futures failed meanwhile, and be acknowledged and lost.
            if self._welcomed and self._revoked is None:
                # A restarted broker, or one that forgot this connection: open
                # the session again, which also resends what it may have lost.
                # Expected after every broker restart, so not a warning.
                log.info("the broker does not know this session; saying HELLO again")
                self._hello()
        elif error.code == p.UNSERVED:
            self._warn_once(error.message)
        elif error.code in (p.SESSION_IN_USE, p.TOO_MANY_SESSIONS):
            self._session_refused(error)
        elif error.code in _MESSAGE_REFUSED:
            self._submit_refused(error)
        elif error.code == "command":
            self._misdirected(f"it refused a client's command ({error.message})")
        elif error.code == "unknown_worker":
            # A backend's answer to our heartbeat, with advice for a worker.
            self._misdirected("it took a client's heartbeat for a worker's")
        elif error.code == NOT_PERMITTED and self._asked:
            # An operator command this client's key may not give: its answer.
            _fail(self._asked.popleft().answer, UsageError(error.message))
        elif error.code == REVOKED or (error.code == "forbidden" and self._revoked):
            self._key_revoked(self._revoked or error.message)
        else:
            log.warning(
                "the broker refused a message: %s (%s)", error.message, error.code
            )

    def _session_refused(self, error: p.Error) -> None:
        """Another live client holds our session, or the broker has no room
        for it: wait, asking again each heartbeat (see _serve), and say so
        once."""
        if self._session_refused_at is None:
            self._session_refused_at = time.monotonic()
        self._session_refusal = error
        if error.code == p.SESSION_IN_USE:
            until, kind = "takes the session once that client has left", "SessionInUse"
        else:
            until, kind = "takes the session once there is room", "SessionRefused"
        self._warn_once(
            f"{error.message}; this client asks again every "
            f"{self._heartbeat_interval_s:g}s and {until}; after "
            f"{self._session_wait_s:g}s it fails its tasks with {kind} "
            f"(session={self.session}, {error.code})"
        )

    @property
    def _session_wait_s(self) -> float:
        periods = SESSION_WAIT_LIVENESS_PERIODS * self._liveness
        return periods * self._heartbeat_interval_s

    def _give_up_waiting_for_session(self, now: float) -> None:
        """Refused our session for longer than we wait: fail what we hold
        (tasks, questions) rather than let it hang. We keep asking: what is
        submitted once the session is ours again goes through."""
        since = self._session_refused_at
        if since is None or now - since < self._session_wait_s:
            return
        error: type[SessionRefused] = SessionInUse
        message = (
            f"session {self.session!r} is held by another live client, which "
            f"kept it for the {now - since:.1f}s this client waited; one client "
            "holds a session at a time: close the other one, or use another "
            "session name"
        )
        # What is submitted from now on gets a whole wait of its own: failed
        # at the next beat, it could never see the session freed meanwhile.
        self._session_refused_at = now
        refusal = self._session_refusal
        if refusal is not None and refusal.code != p.SESSION_IN_USE:
            error = SessionRefused
            message = (
                f"{refusal.message}; refused for the {now - since:.1f}s this "
                "client waited"
            )
        with self._lock:
            outgoing, self._outgoing = self._outgoing, deque()
            self._outgoing_bytes = 0
            questions = [*self._asked, *self._questions]
            self._asked.clear()
            self._questions.clear()
        held = [*self._pending.values(), *outgoing]
        self._pending.clear()
        self._bytes_held = self._acks_bytes

        for pending in held:
            _fail(pending.future, error(f"{message}; {_fate(pending)}"))
        for question in questions:
            _fail(question.answer, error(message))
        if held:
            self._release(len(held))
            log.error("failed %d tasks: %s", len(held), message)

    def _misdirected(self, evidence: str) -> None:
        """A command of ours was answered as not a client's: every one we send
        is, so this is a broker's backend, where workers connect. It will
        answer no question: those asked fail now, and those asked later at
        once (see _fail_unanswerable), instead of timing out in silence."""
        if self._misdirection is not None:
            log.debug("%s still answers as a backend: %s", self.address, evidence)
            return
        self._misdirection = (
            f"{self.address} is not a broker's frontend: {evidence}; is it the "
            "backend, where workers connect? Connect clients to the broker's "
            "frontend"
        )
        log.error("%s", self._misdirection)
        self._fail_questions([self._misdirection])

    def _fail_questions(self, problems: list[str]) -> None:
        """Fail the questions asked (status, operator commands) with the last
        of `problems`, which say why no answer can come: not a timeout later."""
        if not problems:
            return
        with self._lock:
            questions = [*self._asked, *self._questions]
            self._asked.clear()
            self._questions.clear()
        for question in questions:
            _fail(question.answer, NetworkError(problems[-1]))

    @property
    def _refused_entry(self) -> bool:
        """Whether the broker definitely refuses this client's handshakes, or
        the address is a backend's: either way nothing sent is accepted."""
        if self._welcomed:
            return False
        return self._handshakes.definitive or self._misdirection is not None

    def _fail_tasks(self, message: str, why: str) -> None:
        """Fail every task held, sent or not, with a NetworkError saying
        `message`: where this client connects, none can be accepted (see
        _fail_unanswerable). The connection keeps trying: tasks submitted
        once a handshake succeeds (the operator let the key in) go through."""
        failed = self._fail_held(NetworkError(message))
        if failed:
            log.error("failed %d tasks: %s session=%s", failed, why, self.session)

    def _key_revoked(self, message: str) -> None:
        """The broker removed this client's key: it sends no more results, and
        refuses what this client sends. Every task held, and every one
        submitted later, fails saying so, rather than wait for results that
        will not come here; those of tasks the broker has wait there for the
        session's return, under a key it allows again."""
        if self._revoked is None:
            self._revoked = message
            log.error("%s (session=%s)", message, self.session)
        self._fail_questions([message])
        self._fail_held(NetworkError(f"{message} (session={self.session})"))

    def _fail_held(self, error: NetworkError) -> int:
        """Fail every task held, sent or not, with `error`; return how many."""
        with self._lock:
            outgoing, self._outgoing = self._outgoing, deque()
            self._outgoing_bytes = 0
        held = [*self._pending.values(), *outgoing]
        if not held:
            return 0
        self._pending.clear()
        self._bytes_held = self._acks_bytes
        for pending in held:
            _fail(pending.future, error)
        self._release(len(held))
        return len(held)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _submit_refused(self, error: p.Error) -> None:
        """The broker refused a message of ours whole, as malformed.

        Only a SUBMIT can be, and only for a task the client's own checks
        missed (_check_task). The broker does not say which message it was:
        the unaccepted tasks that break a rule fail with it, and the others
        are sent again, since they may have shared its message (the broker
        ignores a task it has already). When none breaks a known rule, every
        unaccepted task fails with the broker's reason, rather than wait for
        ever.
        """
        unaccepted = [x for x in self._pending.values() if not x.accepted]
        faulty = [x for x in unaccepted if p.task_problem(x.spec) is not None]
        blamed = faulty or unaccepted
        for pending in blamed:
            del self._pending[pending.spec.task_id]
            self._bytes_held -= pending.size
            reason = p.task_problem(pending.spec) or error.message
            _fail(
                pending.future,
                TaskRejected(
                    "ProtocolError",
                    f"the broker refused the message that carried this task: {reason}",
                ),
            )
        if blamed:
            self._release(len(blamed))
        log.error(
            "the broker refused a message as malformed (%s: %s); failed %d "
            "unaccepted tasks, sent %d again",
            error.code,
            error.message,
            len(blamed),
            len(unaccepted) - len(blamed),
        )
        if faulty:
            self._resend_unaccepted()

    def _resend_unaccepted(self) -> None:
        again = [x.spec for x in self._pending.values() if not x.accepted]
        for chunk in _batches(again):
            self._send(p.Submit(chunk))

    def _welcome(self, welcome: p.Welcome) -> None:
        self._welcomed = True
        self._misdirection = None  # a frontend answers here now
        if self._session_refused_at is not None:
            self._session_refused_at = self._session_refusal = None
            log.info("the session is ours now session=%s", self.session)
        self._durable = welcome.durable
        self._max_payload_bytes = welcome.max_payload_bytes
        # Beat at least as often as the broker expects, or it takes us for gone.
        self._heartbeat_interval_s = min(
            self._heartbeat_interval_s, welcome.heartbeat_interval_s
        )
        with self._room:
            self._window = min(self._window, welcome.window)
            self._max_bytes = welcome.client_max_bytes or math.inf
            self._room.notify_all()
        self._acknowledge_again()
        self._resend()

    def _acknowledge_again(self) -> None:
        """Acknowledge again the results handed on lately: the ACKs of some
        may have died with the connection this one replaces (closed with
        linger 0), and the broker would send them again, to this client or
        to a later one of the session. It ignores those it has forgotten."""
        for keys in self._handed_on.chunks(ACK_BATCH):
            self._send(p.Ack(keys))

    def _resend(self) -> None:
        # Whatever the broker has not accepted may be lost; with no durable
        # journal, so may everything it accepted.
        again = [
            pending.spec
            for pending in self._pending.values()
            if not pending.accepted or not self._durable
        ]
        for chunk in _batches(again):
            self._send(p.Submit(chunk))

    def _accepted(self, task_ids: Iterable[int]) -> None:
        released = 0
        for task_id in task_ids:
            pending = self._pending.get(task_id)
            if pending is None:
                continue
            pending.accepted = True
            if pending.spec.sink is not None:
                # Its result goes to the sink; for us, acceptance is the end.
                del self._pending[task_id]
                self._bytes_held -= pending.size
                _resolve(pending.future, None)
                released += 1
            elif self._durable:
                # The broker's journal has the payload now; drop our copy.
                pending.spec = _without_payload(pending.spec)
        if released:
            self._release(released)

    def _complete(self, results: Iterable[p.ResultEntry]) -> None:
        released = 0
        # Looked at once a message: results far outnumber cancels.
        unconfirmed = self._unconfirmed_cancels if self._unconfirmed_cancels else None
        collectable = self._collectable
        for entry in results:
            key = (entry.origin, entry.task_id)
            if unconfirmed is not None:
                unconfirmed.settled(entry.task_id)  # a task's end confirms a cancel
            if collectable and key in collectable:
                continue  # sent again while it waits for collect(), which acks it
            # The broker holds the result, instead of the payload, until acked.
            self._bytes_held += len(entry.payload)
            if key in self._handed_on:
                self._acknowledge(key, len(entry.payload))  # sent again
                continue
            pending = self._pending.pop(entry.task_id, None)
            if pending is not None:
                released += 1
                self._bytes_held -= pending.size
                _settle(pending.future, entry)
            elif entry.task_id >> 32 != self._instance:
                # Submitted by an earlier Client of this session: see collect().
                self._keep_for_collect(key, entry)
                continue
            # A future counts as handed on; otherwise it is ours and sent again
            # after a reconnect: already done.
            self._handed_on.add(key)
            self._acknowledge(key, len(entry.payload))
        if released:
            self._release(released)

    def _acknowledge(self, key: tuple[str, int], size: int) -> None:
        self._acks.append(key)
        self._acks_bytes += size

    def _keep_for_collect(self, key: tuple[str, int], entry: p.ResultEntry) -> None:
        orphan = TaskFuture(self, entry.task_id)
        _settle(orphan, entry)
        self._collectable.add(key)
        self._orphans.put(_Collected(orphan, key, len(entry.payload)))
        for listener in self._collect_listeners:
            listener()

    def _take_handed(self, now: float) -> None:
        """Acknowledge the results collect() handed on (under `_lock`)."""
        for collected in self._handed:
            self._collectable.discard(collected.key)
            self._handed_on.add(collected.key)
            self._acknowledge(collected.key, collected.size)
        if self._handed and self._acks_due == math.inf:
            self._acks_due = now + ACK_DELAY_S
        self._handed.clear()

    def _send_outgoing(self, now: float) -> None:
        if self._revoked is not None and self._outgoing:
            # Fail them here, saying why: sent, they would meet a broker that
            # refuses this key, and a reconnection would blame the handshake.
            self._key_revoked(self._revoked)
        with self._lock:
            # Before the submissions: the broker counts a result against our
            # window until it is acknowledged.
            self._take_handed(now)
            self._send_acks(now, submitting=self._acks_go_along())
            batch = self._take_outgoing()
            cancels = self._take_cancels()
            questions = list(self._questions) if self._welcomed else []
            if self._welcomed:
                self._questions.clear()

        batch = self._refuse_oversized(batch)
        for pending in batch:
            self._pending[pending.spec.task_id] = pending
        for chunk in _batches([pending.spec for pending in batch]):
            self._send(p.Submit(chunk))
        if cancels:
            self._forget_cancelled(cancels)
            self._send(p.Cancel(cancels))
            self._remember_cancels(cancels)
        for question in questions:
            self._asked.append(question)
            self._send(question.command)

    def _acks_go_along(self) -> bool:
        """Whether the acknowledgements due travel with this turn's
        submissions: with a batch, or when the tasks fit the window only once
        the broker has forgotten the results they acknowledge."""
        outgoing = len(self._outgoing)
        if outgoing > 1:
            return True
        if outgoing == 0:
            return False
        in_broker = self._held_in_broker()
        size = self._outgoing[0].size
        return in_broker + 1 > self._window or not self._room_for(size, in_broker)

    def _take_outgoing(self) -> list[_Pending]:
        """Submissions that fit the broker's window; the rest wait their turn."""
        if not self._welcomed:
            return []
        in_broker = self._held_in_broker()
        room = max(0, self._window - in_broker)
        if not in_broker:
            self._bytes_held = 0  # nothing of ours in the broker, by any count
        taken: list[_Pending] = []
        while self._outgoing and len(taken) < room:
            size = self._outgoing[0].size
            if not self._room_for(size, in_broker + len(taken)):
                break
            taken.append(self._outgoing.popleft())
            self._bytes_held += size
            self._outgoing_bytes -= size
        if taken:
            self._room.notify_all()  # callers waiting for bytes to go
        elif self._outgoing and self._collectable and room == 0:
            self._warn_window_held_for_collect()
        return taken

    def _warn_window_held_for_collect(self) -> None:
        """Say once why tasks do not go: a resumed session's results fill the
        window until collect() takes them (the broker counts them too)."""
        if self._window_held_warned:
            return
        self._window_held_warned = True
        log.warning(
            "%d results of earlier clients of session %s wait for collect() and "
            "fill the broker's window of %d; new tasks wait until collect() "
            "takes some",
            len(self._collectable),
            self.session,
            self._window,
        )

    def _held_in_broker(self) -> int:
        """Tasks and results of ours the broker counts against our window:
        tasks unfinished, results not acknowledged."""
        return len(self._pending) + len(self._acks) + len(self._collectable)

    def _take_cancels(self) -> list[int]:
        """The cancellations to send now (under `_lock`): none until the
        broker welcomed this connection. Sent earlier, a CANCEL would reach
        the broker before the SUBMIT that _welcome sends again, for a task it
        does not know yet, and the task would run after all."""
        if not self._welcomed or not self._cancels:
            return []
        cancels = list(self._cancels)
        self._cancels.clear()
        return cancels

    def _remember_cancels(self, task_ids: list[int]) -> None:
        """Keep what was cancelled until the broker confirms it, to cancel it
        again on a new connection (see _hello): a CANCEL still queued when the
        old one was closed is lost, and so is one read by a broker that died
        before its commit. Cancelling twice is harmless."""
        forgotten = self._unconfirmed_cancels.sent(task_ids)
        if forgotten:
            log.warning(
                "forgot %d cancellations the broker has not confirmed (over %d "
                "kept); a broker restarted before it read them may run those "
                "tasks session=%s",
                forgotten,
                len(self._unconfirmed_cancels),
                self.session,
            )

    def _ask_cancel_receipt(self) -> None:
        """Ask a question after the cancels sent so far, if some await no
        result: its answer says the broker has them (see _cancels.py). At most
        one is in flight, asked at a heartbeat, so cancels confirmed by their
        results soon after they were sent cost no question."""
        if not self._welcomed or self._cancels:
            return  # the cancels waiting to go would not be covered
        covers = self._unconfirmed_cancels.receipt_wanted()
        if covers is None:
            return
        receipt: Future[dict[str, Any]] = Future()
        receipt.add_done_callback(lambda done: self._receipt_done(done, covers))
        with self._lock:
            self._questions.append(_Question(p.StatusRequest(), receipt))

    def _receipt_done(self, receipt: Future[dict[str, Any]], covers: int) -> None:
        if receipt.exception() is None:
            self._unconfirmed_cancels.receipt_answered(covers)
        else:
            self._unconfirmed_cancels.receipt_lost(covers)

    def _refuse_oversized(self, batch: list[_Pending]) -> list[_Pending]:
        # Checked here rather than at the broker: libzmq drops a connection that
        # sends a frame far over the broker's limit, and with it the session.
        fitting = []
        for pending in batch:
            oversized = _oversized(len(pending.spec.payload), self._max_payload_bytes)
            if oversized is None:
                fitting.append(pending)
            else:
                _fail(pending.future, oversized)
                self._release(1)
        return fitting

    def _forget_cancelled(self, task_ids: list[int]) -> None:
        forgotten = [self._pending.pop(t, None) for t in task_ids]
        count = 0
        for pending in forgotten:
            if pending is not None:
                self._bytes_held -= pending.size
                count += 1
        if count:
            self._release(count)

    def _shutdown(self) -> None:
        with self._lock:
            self._take_handed(time.monotonic())
        self._send_acks(time.monotonic(), submitting=True)
        self._send(p.Bye())
        self._close_socket(linger=100)
        error = ClientClosed(
            f"the client was closed before this task finished; session={self.session}"
        )
        for pending in self._pending.values():
            _fail(pending.future, error)
        for pending in self._outgoing:
            _fail(pending.future, error)
        for question in (*self._asked, *self._questions):
            _fail(question.answer, error)


class ClientExecutor(Executor):
    """`concurrent.futures.Executor` over a `Client`; functions go by name.

    `submit` takes the keywords of `Client.submit`: `timeout_s`, `retries` and
    `sink` are the task's options, never arguments of the function.

    `shutdown(wait=True)` waits for the futures it handed out; it does not close
    the client, which may serve others.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._futures: set[Future[Any]] = set()
        self._lock = threading.Lock()
        # Signalled when the last submit in progress has registered its future.
        self._registered = threading.Condition(self._lock)
        self._submitting = 0
        self._shut = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitting += 1
        future: Future[Any] | None = None
        try:
            # Not under the lock: this blocks while the client's window is
            # full, and the results that open it run _discard, which takes it.
            future = self._client.submit(fn, *args, **kwargs)
        finally:
            with self._lock:
                if future is not None:
                    self._futures.add(future)
                self._submitting -= 1
                if self._submitting == 0:
                    self._registered.notify_all()
        future.add_done_callback(self._discard)
        return future

    def _discard(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            # A submit under way when we were shut down still hands out its
            # future: wait for it to count among those we wait for.
            self._registered.wait_for(lambda: self._submitting == 0)
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            if not all(future.done() for future in futures):
                self._client._refuse_on_io_thread("shutdown(wait=True)")
            for future in futures:
                with contextlib.suppress(BaseException):
                    future.exception()


def _batches(specs: list[p.TaskSpec]) -> Iterator[list[p.TaskSpec]]:
    """Split submissions into messages bounded in count and in bytes."""
    chunk: list[p.TaskSpec] = []
    size = 0
    for spec in specs:
        if chunk and (len(chunk) >= SUBMIT_BATCH or size >= SUBMIT_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += len(spec.payload)
    if chunk:
        yield chunk


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
    if problem is None:
        problem = p.reserved_session_problem(session)
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


def _oversized(size: int, limit: int | None) -> TaskRejected | None:
    """The error for a payload over the broker's limit, once the limit is known."""
    if limit is None or size <= limit:
        return None
    return TaskRejected(
        "TaskRejected",
        f"payload of {size} bytes is over the broker's limit of {limit} bytes "
        "(max_payload_bytes)",
    )


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


def _fate(pending: _Pending) -> str:
    """What became of a task its client gave up on while refused its session."""
    if pending.accepted:
        # Accepted while the session was ours: it runs, for the session.
        return "the broker has this task: its holder can collect() the result"
    return "the broker had not accepted this task"


# Direct construction: dataclasses.replace costs several times more, per task.
def _task_id_of(pending: _Pending) -> int:
    return pending.spec.task_id


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


def _without_payload(spec: p.TaskSpec) -> p.TaskSpec:
    return p.TaskSpec(
        spec.task_id,
        spec.function,
        b"",
        spec.flags,
        spec.timeout_s,
        spec.retries,
        spec.sink,
    )


def _settle(future: _Outcome, entry: p.ResultEntry) -> None:
    if entry.status is p.Status.CANCELLED:
        future.cancel()
        return
    try:
        value = unpack_value(entry.payload)
    except Exception as exc:  # msgpack raises a family of unrelated types
        _fail(
            future, ProtocolError(f"undecodable result for task {entry.task_id}: {exc}")
        )
        return

    if entry.status is p.Status.OK:
        _resolve(future, value)
    else:
        _fail(future, task_error_from_wire(value))


def _resolve(future: _Outcome | Future[Any], value: Any) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its owner meanwhile
        future.set_result(value)


def _fail(future: _Outcome | Future[Any], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)

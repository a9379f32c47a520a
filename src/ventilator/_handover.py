"""What a client's callers and its I/O thread hand each other, under one lock.

A `Client` has two sides. Its callers, on any number of threads, submit
tasks, ask the broker questions and cancel tasks; one I/O thread
(`_client_io.ClientIO`) owns the socket, sends what they queued, and settles
their futures and answers as the broker replies. Everything that passes
between the two sides is one `Handover`, guarded by its `lock`:

    callers -> I/O thread    tasks to send (`Pending`), questions (`Question`),
                             task ids to cancel, results collect() handed on,
                             the request to close
    I/O thread -> callers    room in the window, the broker's limits, results
                             waiting for collect() (`Collected`), why it broke

Futures and answers are settled by the I/O thread directly: a
`concurrent.futures.Future`, or a map's slot, is its own synchronisation.

The I/O thread's own state (tasks in flight, acknowledgements due, the
socket) is guarded by its socket lock, which is taken before this lock, never
after. Methods documented "(under `lock`)" expect their caller to hold it,
so that one side can do several steps as one; the others take it themselves.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from . import protocol as p
from .errors import ClientBroken, ClientClosed, TaskRejected

__all__ = [
    "WITHDRAW_BY_SEARCH",
    "Collected",
    "Handover",
    "Outcome",
    "Pending",
    "Question",
]

# Cancelling this many tasks or fewer finds each unsent one by a binary search
# of the outgoing queue; more (an abandoned map) take one pass over it.
WITHDRAW_BY_SEARCH = 16


class Outcome(Protocol):
    """What a task's result is delivered to: a `TaskFuture`, or a map's slot."""

    def set_result(self, value: Any, /) -> None: ...

    def set_exception(self, error: BaseException, /) -> None: ...

    def cancel(self) -> bool: ...


@dataclass(slots=True, eq=False)
class Pending:
    """A task submitted and not finished: queued here, then in flight."""

    spec: p.TaskSpec
    future: Outcome
    accepted: bool = False
    # Its payload's size, which the broker counts against client_max_bytes
    # until the task ends (the spec may drop the payload once accepted).
    size: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Question:
    """A question for the broker, and the future its answer settles."""

    command: p.Command
    answer: Future[dict[str, Any]]
    what: str = "a question"  # as the caller knows it: "status", "failed"...


class Collected(NamedTuple):
    """A result of an earlier client of the session, waiting for `collect`.

    The result as it came, not a future: a future holds its Client, and the
    I/O thread, which holds these, must not keep a dropped Client alive.
    """

    entry: p.ResultEntry
    key: tuple[str, int]  # what acknowledges it
    size: int  # the bytes the broker holds for it until then


class Handover:
    """The state a client's callers and its I/O thread share, and its lock.

    Every field is read and written under `lock` (`room` is a condition on
    it), except where its comment says what may be read without it and why.
    The I/O thread also peeks at `outgoing` and `cancels` without it, for
    whether anything waits, where a stale answer only puts off what it
    decides (see ClientIO._send_outgoing and _ask_cancel_receipt).
    """

    def __init__(self, window: int, window_bytes: int) -> None:
        self.lock = threading.Lock()
        # Callers wait on it for room in the window; notified whenever room
        # may have come: tasks sent or finished, the window changed, closed.
        self.room = threading.Condition(self.lock)
        # Callers blocked in wait_for_room: what a test waits on.
        self.waiting_for_room = 0
        # Tasks of ours in the broker at once; WELCOME may lower it. A map
        # reads it unlocked to size what it reads ahead, which a stale value
        # only makes larger or smaller for a turn.
        self.window = window
        # Tasks submitted and not finished, sent or not: callers wait while
        # it reaches the window.
        self.in_window = 0
        # Tasks queued for the I/O thread, in increasing task id order, and
        # the bytes of their payloads.
        self.outgoing: deque[Pending] = deque()
        self.outgoing_bytes = 0
        # The broker's client_max_bytes (unknown until WELCOME), a hard limit,
        # and our own window_bytes, which a few tasks may pass (see
        # ClientIO._room_for): a caller waits while the bytes waiting to be
        # sent would pass the lower of the two.
        self.max_bytes: float = math.inf
        self.window_bytes = window_bytes
        # The broker's max_payload_bytes, None until WELCOME. Callers read it
        # unlocked to refuse an oversized task early; the I/O thread checks
        # again before it sends, so a stale None only defers the refusal.
        self.max_payload_bytes: int | None = None
        # Tasks to cancel at the broker.
        self.cancels: deque[int] = deque()
        # Questions for the broker (status, operator commands) not sent yet.
        self.questions: deque[Question] = deque()
        # Results of earlier clients of the session wait in `orphans` for
        # collect(), unacknowledged: the broker keeps them until collect()
        # hands them on, so that a collector killed meanwhile loses none.
        # `handed` holds those handed on and not yet taken by the I/O thread
        # to acknowledge. A SimpleQueue has its own lock.
        self.orphans: queue.SimpleQueue[Collected] = queue.SimpleQueue()
        self.handed: list[Collected] = []
        # Called by the I/O thread after it puts a result in `orphans`: how an
        # asyncio collect() learns of one without a thread blocked on the
        # queue. A tuple, replaced whole, so the I/O thread reads it unlocked.
        self.collect_listeners = Listeners(self.lock)
        # Called with the room condition's notify (see room_changed).
        self.room_listeners = Listeners(self.lock)
        # Set by close(), and when the I/O thread failed. The I/O thread reads
        # `closed` and `close_deadline` unlocked: the wake-up that follows
        # close() makes its next turn see them.
        self.closed = False
        self.close_deadline = 0.0
        self.broken: ClientBroken | None = None
        # Set, without the lock, by the finalizer of a Client dropped without
        # close(): the I/O thread then closes the client itself (see drop).
        self.dropped = False
        # Written by callers when they queue something while the I/O thread
        # may sleep; its poll wakes on the read end.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        # Closes the pipe once: at close(), or when this object is collected
        # after its Client was dropped (then nobody is left to write to it).
        self._pipe_closer = weakref.finalize(
            self, _close_pipe, self._wake_read, self._wake_write
        )
        # At exit the daemon I/O thread may still poll the pipe.
        self._pipe_closer.atexit = False

    # --- both sides -----------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.closed or self.broken is not None

    def wake(self) -> None:
        """Wake the I/O thread, or have its next wait return at once."""
        # A full pipe means the thread is awake already; a closed one, that it left.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def oversized(self, size: int) -> TaskRejected | None:
        """The error for a payload over the broker's limit, once it is known."""
        limit = self.max_payload_bytes
        if limit is None or size <= limit:
            return None
        return TaskRejected(
            "TaskRejected",
            f"payload of {size} bytes is over the broker's limit of {limit} bytes "
            "(max_payload_bytes)",
        )

    # --- what callers hand over -------------------------------------------------

    def check_open(self, waited: bool = False) -> None:
        """Raise why nothing can be queued any more (under `lock`); `waited`:
        the caller waited for room in the window first.

        ClientClosed, as for a client that broke: a thread that submits or
        reads a map while another closes the client cannot tell that it was
        too late, and the docs name ClientClosed for it.
        """
        if self.broken is not None:
            raise self.broken
        if self.closed and waited:
            raise ClientClosed(
                "the client was closed while this task waited for room in its "
                "window: it was never sent"
            )
        if self.closed:
            raise ClientClosed("this client is closed")

    def must_wait(self, size: int) -> bool:
        """Whether a task of `size` bytes waits for room (under `lock`): the
        window is full, or it would take the bytes waiting to be sent past the
        broker's client_max_bytes (then they could not all be sent anyway)."""
        return self.in_window >= self.window or self._too_many_bytes(size)

    def wait_for_room(self) -> None:
        """Wait, under `lock`, until room may have come back (see room_changed)."""
        self.waiting_for_room += 1
        try:
            self.room.wait()
        finally:
            self.waiting_for_room -= 1

    def fits(self, specs: list[p.TaskSpec]) -> bool:
        """Whether all of `specs` fit the window and the bytes now (under `lock`)."""
        size = sum(len(spec.payload) for spec in specs)
        in_window = self.in_window + len(specs) <= self.window
        return in_window and not self._too_many_bytes(size)

    def _too_many_bytes(self, size: int) -> bool:
        waiting = self.outgoing_bytes
        limit = min(self.max_bytes, self.window_bytes)
        return waiting > 0 and waiting + size > limit

    def queue(self, pending: Pending) -> None:
        """Queue a task for the I/O thread, in the window (under `lock`)."""
        self.outgoing.append(pending)
        self.outgoing_bytes += pending.size
        self.in_window += 1

    def withdraw(self, task_ids: list[int]) -> None:
        """Withdraw tasks nobody waits for any more: those not sent yet are
        dropped here, never to be sent; the others are cancelled at the broker
        by the I/O thread once the broker welcomed this connection. Their
        outcomes are the caller's to settle."""
        if not task_ids:
            return
        wanted = set(task_ids)
        with self.room:
            if len(wanted) <= WITHDRAW_BY_SEARCH:
                unsent = {t for t in wanted if self._drop_unsent(t)}
            else:
                unsent = self._drop_all_unsent(wanted)
            if unsent:
                self.in_window -= len(unsent)
                self.room_changed()
            self.cancels.extend(wanted - unsent)
        self.wake()

    def _drop_unsent(self, task_id: int) -> bool:
        """Take the task out of the outgoing queue, if there (under `lock`).

        A binary search: task ids join the queue in increasing order and
        leave from its head. Scanning the queue instead made cancelling
        20,000 futures that were never sent, one by one, take half a minute.
        """
        outgoing = self.outgoing
        index = bisect.bisect_left(outgoing, task_id, key=_task_id_of)
        if index == len(outgoing) or outgoing[index].spec.task_id != task_id:
            return False
        self.outgoing_bytes -= outgoing[index].size
        del outgoing[index]
        return True

    def _drop_all_unsent(self, wanted: set[int]) -> set[int]:
        """Take those of `wanted` out of the outgoing queue in one pass
        (under `lock`); return their ids."""
        unsent = {x.spec.task_id for x in self.outgoing} & wanted
        if unsent:
            kept = (x for x in self.outgoing if x.spec.task_id not in unsent)
            self.outgoing = deque(kept)
            self.outgoing_bytes = sum(x.size for x in self.outgoing)
        return unsent

    def ask(self, question: Question) -> None:
        """Queue a question for the broker; raise if the client cannot ask."""
        with self.lock:
            self.check_open()
            self.questions.append(question)
        self.wake()

    def forget(self, question: Question) -> None:
        """Drop a question nobody waits for, if it was not sent yet: a client
        that never reaches a broker must not pile up questions. One sent stays
        with the I/O thread, since the broker answers in the order asked."""
        with self.lock, contextlib.suppress(ValueError):
            self.questions.remove(question)

    def hand_over(self, collected: Collected) -> None:
        """Have the I/O thread acknowledge a result collect() hands on: only
        now may the broker forget it."""
        with self.lock:
            wake = not self.handed
            self.handed.append(collected)
        if wake:
            self.wake()

    def room_changed(self) -> None:
        """Wake whoever waits for room in the window (under `lock`): threads
        blocked in submit, and the listeners of event loops (see
        `listening_for_room`), which must not block."""
        self.room.notify_all()
        self.room_listeners.call()

    def listening_for_room(
        self, listener: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """Have `listener` called whenever room in the window may have come
        back, or the client closed or broke, for the block. It runs on
        whichever thread made the room, under `lock`: it must not block."""
        return self.room_listeners.added(listener)

    def listening(
        self, listener: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """Have the I/O thread call `listener` whenever a result waits for
        `collect`, for the block. It must not block: it runs on that thread."""
        return self.collect_listeners.added(listener)

    def close(self, timeout_s: float) -> bool:
        """Ask the I/O thread to leave once the broker has accepted what was
        sent, or after `timeout_s`; False if the client was closed already."""
        with self.room:
            if self.closed:
                return False
            self._close_by(time.monotonic() + timeout_s)
        self.wake()
        return True

    def stop_waiting(self) -> None:
        """Closing: have the I/O thread leave now, whatever the broker has not
        accepted yet (it says how many), rather than at the close deadline."""
        with self.room:
            self._close_by(0.0)
        self.wake()

    def _close_by(self, deadline: float) -> None:
        """Closed: the I/O thread leaves at `deadline` at the latest (called
        under `room`; the caller wakes the thread to see it)."""
        self.closed = True
        self.close_deadline = deadline
        self.room_changed()

    def drop(self) -> None:
        """The Client was dropped without close(): have its I/O thread close
        it, and leave.

        Called by the Client's finalizer, on whatever thread the garbage
        collector ran, maybe the I/O thread itself while it holds `lock`: so
        no lock is taken here, and nothing waits.
        """
        self.dropped = True
        self.wake()

    def close_pipe(self) -> None:
        """Close the wake-up pipe, once the I/O thread has left."""
        self._pipe_closer()

    # --- what the I/O thread hands back ---------------------------------------

    @property
    def wake_fd(self) -> int:
        """The descriptor the I/O thread polls for wake-ups."""
        return self._wake_read

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 65536)

    def release(self, count: int) -> None:
        """Tasks finished or failed: room for as many in the window."""
        with self.room:
            self.in_window -= count
            self.room_changed()

    def welcome(
        self, window: int, max_bytes: float, max_payload_bytes: int | None
    ) -> None:
        """The broker's limits, from its WELCOME."""
        with self.room:
            self.max_payload_bytes = max_payload_bytes
            self.window = min(self.window, window)
            self.max_bytes = max_bytes
            self.room_changed()

    def break_down(self, error: ClientBroken) -> None:
        """The I/O thread failed: every later call raises `error` (under
        `lock`). Callers waiting for room are woken to raise it."""
        self.broken = error
        self.room_changed()

    def take_unsent(self) -> deque[Pending]:
        """Every task not sent yet, to fail (under `lock`); the window is the
        I/O thread's to release."""
        outgoing, self.outgoing = self.outgoing, deque()
        self.outgoing_bytes = 0
        return outgoing

    def pop_unsent(self) -> Pending:
        """The oldest task not sent yet, to send (under `lock`)."""
        pending = self.outgoing.popleft()
        self.outgoing_bytes -= pending.size
        return pending

    def take_questions(self) -> list[Question]:
        """Every question not sent yet (under `lock`)."""
        questions = list(self.questions)
        self.questions.clear()
        return questions

    def take_cancels(self) -> list[int]:
        """Every task id to cancel (under `lock`)."""
        cancels = list(self.cancels)
        self.cancels.clear()
        return cancels

    def take_handed(self) -> list[Collected]:
        """The results collect() handed on since the last call (under `lock`)."""
        handed, self.handed = self.handed, []
        return handed

    def ask_again(self, questions: Iterable[Question], cancels: Iterable[int]) -> None:
        """Questions and cancels sent on a connection that is gone, to send
        again on the next, the questions before any asked since."""
        with self.lock:
            self.questions.extendleft(reversed(list(questions)))
            self.cancels.extend(cancels)

    def has_unsent(self) -> bool:
        """Whether tasks or cancels wait to be sent."""
        with self.lock:
            return bool(self.outgoing or self.cancels)

    def keep_for_collect(self, collected: Collected) -> None:
        """A result of an earlier client of the session, for collect()."""
        self.orphans.put(collected)
        self.collect_listeners.call()


class Listeners:
    """Callables that another thread calls, each for as long as its `added`
    block lasts. Changed under `lock`; called without it, from a tuple that
    is replaced whole, never changed in place."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._calls: tuple[Callable[[], None], ...] = ()

    def __bool__(self) -> bool:
        return bool(self._calls)

    def call(self) -> None:
        for listener in self._calls:
            listener()

    @contextlib.contextmanager
    def added(self, listener: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._calls = (*self._calls, listener)
        try:
            yield
        finally:
            with self._lock:
                calls = list(self._calls)
                calls.remove(listener)
                self._calls = tuple(calls)


def _task_id_of(pending: Pending) -> int:
    return pending.spec.task_id


def _close_pipe(read_end: int, write_end: int) -> None:
    os.close(read_end)
    os.close(write_end)

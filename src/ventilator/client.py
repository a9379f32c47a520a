"""The client: submit tasks, get `concurrent.futures.Future`s back.

A `Client` is the callers' side of a connection to a broker: it checks and
encodes tasks, numbers them, and queues them for its I/O thread, which owns
the socket (`_client_io.ClientIO`). What passes between the two sides, tasks,
questions, cancels one way, room in the window and the broker's limits the
other, is a `_handover.Handover`, under one lock; the I/O thread settles the
futures and answers itself. `map` and its batches are `_maps.py`'s, and the
`concurrent.futures.Executor` face is `_executor.py`'s.

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
import os
import queue
import secrets
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED as _CANCELLED
from typing import Any, TypeVar

import zmq

from . import _client_io, _handover, _maps, _open_clients, _wire
from . import protocol as p
from ._client_io import ClientIO, IOSettings, settle
from ._executor import ClientExecutor
from ._handover import Collected, Handover, Pending, Question
from ._maps import (
    ItemOutcome,
    MapTasks,
    Slot,
    check_chunksize,
    map_batches,
    map_each,
    outcome_batches,
    values_of,
)
from .errors import (
    BrokerTimeout,
    PickleNotAllowed,
    UsageError,
)
from .policy import DEFAULT_ADDRESS, check_heartbeat
from .security import client_keys, fingerprint
from .serialization import (
    Pieces,
    pack_call_in_pieces,
    pack_pickled_call,
)

__all__ = ["Client", "ClientExecutor", "ItemOutcome", "TaskFuture", "values_of"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 20_000
# Payload bytes of this client's unfinished tasks in the broker at once. Large
# payloads then flow through memory that every process reuses while it is warm,
# instead of each landing on freshly faulted pages: 2,000 tasks of 100 KiB
# submitted at once took a third less CPU in all with about 25 MiB in flight
# than with all 200 MB. Workers still find a queue far deeper than their credit
# (and WINDOW_BYTES_MIN_TASKS go whatever their size).
DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024

# Settings that lived in this module before the I/O thread and the map
# machinery moved to modules of their own: still importable from here.
WINDOW_BYTES_MIN_TASKS = _client_io.WINDOW_BYTES_MIN_TASKS
SUBMIT_BATCH = _client_io.SUBMIT_BATCH
SUBMIT_BATCH_BYTES = _client_io.SUBMIT_BATCH_BYTES
ACK_DELAY_S = _client_io.ACK_DELAY_S
ACK_BATCH = _client_io.ACK_BATCH
SESSION_WAIT_LIVENESS_PERIODS = _client_io.SESSION_WAIT_LIVENESS_PERIODS
WITHDRAW_BY_SEARCH = _handover.WITHDRAW_BY_SEARCH
BATCH_TARGET_S = _maps.BATCH_TARGET_S
TAPER_PARTS = _maps.TAPER_PARTS
TAPER_FLOOR_S = _maps.TAPER_FLOOR_S
MAX_BATCH_ITEMS = _maps.MAX_BATCH_ITEMS
MAX_BATCH_BYTES = _maps.MAX_BATCH_BYTES
PROBE_BATCHES = _maps.PROBE_BATCHES
SLOW_START = _maps.SLOW_START
ESTIMATE_HALF_LIFE_ITEMS = _maps.ESTIMATE_HALF_LIFE_ITEMS
RESTART_WHEN_SLOWER = _maps.RESTART_WHEN_SLOWER
BATCH_OVERRUN = _maps.BATCH_OVERRUN
FEED_LINGER_S = _maps.FEED_LINGER_S
FEED_MAX_ITEMS = _maps.FEED_MAX_ITEMS
MAP_CLOSED_UNDER = _maps.MAP_CLOSED_UNDER
TIMEOUT_SHARE = _maps.TIMEOUT_SHARE


class TaskFuture(Future):  # type: ignore[type-arg]
    """A `concurrent.futures.Future` for one task; `cancel()` reaches the broker.

    A task still queued at the broker is removed from the queue; one a worker
    already holds is stopped there (see `Future.cancel()` in docs/python.md).
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
            self._client._refuse_to_wait(f"result() of task {self.task_id}")
        try:
            return super().result(timeout)
        except TimeoutError:
            if self.done():  # the task's own error: a remote TimeoutError
                raise
            raise self._client._wait_timed_out(self.task_id, timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As `concurrent.futures.Future.exception`; raises `UsageError` as
        `result` does."""
        if not self.done():
            self._client._refuse_to_wait(f"exception() of task {self.task_id}")
        try:
            return super().exception(timeout)
        except TimeoutError:
            raise self._client._wait_timed_out(self.task_id, timeout) from None


OutcomeT = TypeVar("OutcomeT", TaskFuture, Slot)


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
        shared_memory: pass payloads of 64 KiB or more through shared memory
            when the broker and the workers are on this machine; they travel
            in messages otherwise.

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
        shared_memory: bool = True,
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
        self._open_maps: weakref.WeakSet[MapTasks] = weakref.WeakSet()
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
            session_named=session is not None,
            shared_memory=shared_memory,
        )
        self._io = ClientIO(settings, self._handover, context)
        self._io.start()
        # Dropped without close(), the client leaves the broker all the same
        # (not at exit: the process's end says as much).
        self._dropped = weakref.finalize(self, self._handover.drop)
        self._dropped.atexit = False
        # The pid of the process that made this client, once this copy of it
        # is in a child forked from there (see _open_clients).
        self._forked_from: int | None = None
        _open_clients.track(self)

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
            UsageError: the arguments cannot be encoded.
            PickleNotAllowed: a callable that needs pickling, without allow_pickle.
            ClientClosed: the client is closed, or was while this waited.
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
        return self._enqueue_nowait(spec)

    def _enqueue_nowait(self, spec: p.TaskSpec) -> TaskFuture | None:
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
        are stopped on their worker; finished ones have their results
        forgotten at the broker.

        Raises:
            UsageError: at once, a bad `chunksize` or option, or a function
                that cannot be named.
        """
        self._check_map(function, chunksize, **options)
        return self._map(function, iterable, chunksize, options)

    def _map(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        options: dict[str, Any],
    ) -> Iterator[Any]:
        sink = options.pop("sink", None)
        if sink is not None or chunksize == 1:
            yield from map_each(self, function, iterable, {**options, "sink": sink})
            return

        batches = map_batches(self, function, iterable, chunksize, **options)
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
            UsageError: at once, a bad `chunksize`, `timeout_s` or `retries`,
                or a function that cannot be named.
            ClientClosed: the client was closed while the map waited.
            Exception: what `iterable` raised, after the outcomes before it.
        """
        self._check_map(function, chunksize, timeout_s=timeout_s, retries=retries)
        batches = outcome_batches(
            self, function, iterable, chunksize, timeout_s, retries
        )
        return self._outcomes(batches)

    def _outcomes(
        self, batches: Generator[list[ItemOutcome], None, None]
    ) -> Iterator[ItemOutcome]:
        with contextlib.closing(batches):
            for outcomes in batches:
                yield from outcomes

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
        self._refuse_to_wait("collect()")
        received = 0
        while count is None or received < count:
            try:
                collected = self._handover.orphans.get(timeout=timeout_s)
            except queue.Empty:
                return
            self._handover.hand_over(collected)
            yield self._collected_future(collected)
            received += 1

    def _collect_nowait(self) -> TaskFuture | None:
        """The next result `collect` would yield if one is here, else None."""
        try:
            collected = self._handover.orphans.get_nowait()
        except queue.Empty:
            return None
        self._handover.hand_over(collected)
        return self._collected_future(collected)

    def _collected_future(self, collected: Collected) -> TaskFuture:
        future = TaskFuture(self, collected.entry.task_id)
        settle(future, collected.entry)
        return future

    def _room_listener(
        self, listener: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """Have `listener` called whenever room in the window may have come
        back (or the client closed), for the block. It must not block."""
        return self._handover.listening_for_room(listener)

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
            UsageError: this connection asked more questions within a second
                than the broker answers (100); the message names the limit.
        """
        return self._ask(p.StatusRequest(), timeout_s, "status")

    def failed(self, limit: int = 100, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The broker's latest failed tasks, newest first, with their reasons.

        Each is a dict: ticket, session, task_id, function, outcome (raised,
        timeout, poison, not_found, rejected), type, message, traceback,
        retryable. The broker remembers a bounded number (`failed_kept`).
        Under CURVE, a key with a ``.functions`` file gets its own sessions'
        failures only (see docs/security.md).

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
                file (see docs/security.md).
        """
        return int(self._ask(p.Purge(function), timeout_s, "purge")["purged"])

    def purge_session(self, session: str, timeout_s: float = 10.0) -> dict[str, int]:
        """Drop everything the broker holds for a session that left.

        The results waiting for it are dropped, and the tasks it submitted:
        those queued at once, those running once their workers are done with
        them (never run again). Nothing is delivered to anyone. Name the
        session as `status()` shows it (under CURVE, ``<fingerprint>.<name>``).

        Returns:
            {"results": dropped results, "expired": dropped tombstones of its
            results that expired (or a full broker dropped), which were kept
            only to tell it so, "queued": dropped queued tasks, "running":
            running tasks that will be dropped when they end, "for_sinks":
            tasks of its whose results wait for sinks, which count against it
            but are the sinks' (see `purge --sink`)}.

        Raises:
            UsageError: the session is connected (its results are on their
                way to it), or, under CURVE, this client's key has a
                ``.functions`` file (see docs/security.md).
            BrokerTimeout: the broker did not answer within `timeout_s`
                (a TimeoutError too).
        """
        report = self._ask(p.Purge(session=session), timeout_s, "purge_session")
        if "refused" in report:
            raise UsageError(str(report["refused"]))
        kinds = ("results", "expired", "queued", "running", "for_sinks")
        # An older broker counts no for_sinks, and its expired among results.
        return {kind: int(report.get(kind, 0)) for kind in kinds}

    def cancel_task(self, session: str, task_id: int, timeout_s: float = 10.0) -> str:
        """Cancel any session's task by its id, as an operator.

        Under CURVE a bare session name is one of this client's key (as
        `self.session` is); another key's session is named in full,
        ``<fingerprint>.<name>``, as `failed()` and sinks show it.

        Returns what became of it: "cancelled" (a running task is stopped
        by its worker), "running" (on an MDP worker, which cannot be told to
        stop it), "cancelled already", "finished", "unknown" (no such task
        of the session) or "unknown session".

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
        self._refuse_to_wait(f"{what}()")
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
        if self._forked_from is not None:
            return  # the parent's to close; its I/O thread is not here
        self._refuse_on_io_thread("close()")
        self._dropped.detach()
        _open_clients.untrack(self)
        self._abandon_open_maps()
        if not self._handover.close(timeout_s):
            return
        self._io.join()
        self._handover.close_pipe()

    def _track_map(self, tasks: MapTasks) -> None:
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
    ) -> tuple[str, int, bytes | Pieces]:
        name, flags = self._name_of(function)
        if flags & p.Flags.PICKLED:
            return name, flags, pack_pickled_call(function, args, kwargs)  # type: ignore[arg-type]
        return name, flags, pack_call_in_pieces(args, kwargs)

    def _check_job(
        self, function: str | Callable[..., Any], **options: Any
    ) -> tuple[str, int]:
        """The name and flags of the tasks of `function` (see _name_of), with
        the options they share checked once: a bad name or option is a whole
        map's error, not each item's."""
        name, flags = self._name_of(function)
        _check_task(p.TaskSpec(0, name, b"", flags, **options))
        return name, flags

    def _check_map(
        self, function: str | Callable[..., Any], chunksize: int | None, **options: Any
    ) -> None:
        """Refuse a map's bad arguments when it is called, not at its first
        item: a map is a generator, which runs nothing until then."""
        check_chunksize(chunksize)
        self._check_job(function, **options)

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
        self._refuse_in_forked_child("submit()")
        handover = self._handover
        outcomes = []
        wake = False
        with handover.room:
            if not block:
                handover.check_open()  # a closed client has no room to wait for
                if not handover.fits(specs):
                    return []
            # Tasks that find none of ours in flight go out at once, from this
            # thread if it can (send_now); tasks that follow others wait for
            # the I/O thread, which gathers a burst into one SUBMIT.
            alone = handover.in_window == 0
            for spec in specs:
                size = len(spec.payload)
                waited = False
                while handover.must_wait(size) and not handover.stopped:
                    self._refuse_on_io_thread("submit() with the window full")
                    if wake:  # what we queued must go out, or no room comes back
                        handover.wake()
                        wake = False
                    handover.wait_for_room()
                    waited = True
                handover.check_open(waited)
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

    def _close_at_exit(self, timeout_s: float) -> None:
        """The program ends with this client open: close it as close() would,
        so that what it sent reaches the broker before the interpreter stops
        its daemon I/O thread."""
        log.info(
            "the program ends with a Client open; closing it session=%s", self.session
        )
        if self._io.broker_heard_at is None:
            # No broker ever answered: wait as long as it takes to call one
            # silent, not the whole wait (a Ctrl-C on a script facing no
            # broker was followed by it, uninterruptible).
            timeout_s = min(timeout_s, self._io.silence_s)
        self.close(timeout_s)

    def _stop_waiting_at_exit(self, timeout_s: float) -> None:
        """The program is ending and its user said not to wait (Ctrl-C): leave
        the broker now. The I/O thread gets `timeout_s` to say what it leaves
        unaccepted, which would otherwise go unsaid."""
        if self._forked_from is not None:
            return
        _open_clients.untrack(self)
        self._handover.stop_waiting()
        self._io.left.wait(timeout_s)

    def _forked(self, parent_pid: int) -> None:
        """This process is a child forked from `parent_pid`, whose client
        this is: only the forking thread came along, not the I/O thread."""
        self._forked_from = parent_pid
        self._dropped.detach()  # dropping this copy must not wake the parent's

    def _wait_timed_out(self, task_id: int, timeout_s: float | None) -> TimeoutError:
        """The error for a wait on task `task_id` that timed out, saying what
        is known of why: a bare TimeoutError left a mistyped function's name
        to a log line printed once, long before."""
        function = self._io.function_of(task_id)
        what = f"task {task_id}" if function is None else f"task {task_id} ({function})"
        message = f"{what} is not done after {timeout_s:g}s"
        why = self._io.why_waiting(task_id)
        return TimeoutError(f"{message}; {why}" if why else message)

    def _refuse_to_wait(self, call: str) -> None:
        """Raise rather than wait for what no thread here would bring."""
        self._refuse_in_forked_child(call)
        self._refuse_on_io_thread(call)

    def _refuse_in_forked_child(self, call: str) -> None:
        if self._forked_from is None:
            return
        raise UsageError(
            f"{call} on a Client made by process {self._forked_from}, from which "
            f"this process (pid {os.getpid()}) was forked: the client's I/O "
            "thread did not come along (fork() copies only the thread that "
            "calls it). Make a new Client in the child; the parent's goes on "
            "working"
        )

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
        self._refuse_in_forked_child("cancelling a task")
        self._handover.withdraw(task_ids)


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


def _check_task(spec: p.TaskSpec) -> None:
    """Refuse, alone and at once, a task whose fields break the wire's rules.

    The broker refuses a whole SUBMIT for one such task, and with it the tasks
    it was sent with; the rules are the broker's own (protocol.task_problem).
    """
    problem = p.task_problem(spec)
    if problem is not None:
        raise UsageError(f"cannot submit this task: {problem}")


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

"""asyncio face of the client: `await client.submit(...)` gives the result.

It wraps a `Client` (whose I/O thread does the work) and turns its futures into
asyncio ones; the event loop is never blocked, even when the window is full.
A full window is waited for on the loop itself (the client's I/O thread wakes
it when room comes); what else would block (a map's next batch, a question to
the broker) waits in a thread of the loop's default executor instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from . import protocol as p
from ._maps import (
    MapTasks,
    map_batches,
    map_each,
    outcome_batches,
    values_of,
)
from .client import Client, ItemOutcome, TaskFuture

__all__ = ["AsyncClient"]


class AsyncClient:
    """A `Client` for asyncio programs. Use with ``async with``.

    Takes the same arguments as `Client`, and has these of its methods, under
    the same names, as coroutines or async iterators: `submit`, `map`, `map_outcomes`,
    `collect`, `status`, `failed`, `retry`, `purge`, `purge_session`,
    `cancel_task`, `close`. Those that wait for the broker run in a thread of
    the loop's default executor; `collect` needs none.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555", **options: Any) -> None:
        self._client = Client(address, **options)
        self.session = self._client.session

    @property
    def session_at_broker(self) -> str:
        """The name the broker knows this session by (see
        `Client.session_at_broker`): what `purge_session` and `cancel_task`
        take under CURVE."""
        return self._client.session_at_broker

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(
        self,
        function: str | Callable[..., Any],
        /,
        *args: Any,
        timeout_s: float | None = None,
        retries: int = 0,
        sink: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run one task and return its result; raises its `TaskError` if it failed.

        Options (`timeout_s`, `retries`, `sink`) are those of `Client.submit`.
        """
        # Encoded once: past a full window it is offered again as room comes.
        spec = self._client._spec(function, args, kwargs, timeout_s, retries, sink)
        future = self._client._enqueue_nowait(spec)
        if future is None:
            future = await self._when_room(spec)
        return await asyncio.wrap_future(future)

    async def _when_room(self, spec: p.TaskSpec) -> TaskFuture:
        """Queue `spec` once the window has room, waiting on the loop. A thread
        per waiting submit would take the loop's default executor from
        everything else: thirty submits past a full window held up status()
        and close() for seconds, as they queued behind them."""
        room = asyncio.Event()
        with self._client._room_listener(_waker(room)):
            while True:
                room.clear()  # before looking, so room made meanwhile sets it
                future = self._client._enqueue_nowait(spec)
                if future is not None:
                    return future
                await room.wait()

    def map(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Yield `function(item)` for each item, in input order.

        Items travel in batches as with `Client.map` (`timeout_s` and `retries`
        still apply to each item; with `sink`, each item is a task of its own),
        and the event loop waits in a thread once per batch, not once per item.
        A map that ends early (``aclose()``, its task cancelled, a failed item
        raised) cancels the tasks whose results it has not yielded, as
        `Client.map` does.

        Raises:
            UsageError: at once, a bad `chunksize` or option, or a function
                that cannot be named.
        """
        self._client._check_map(function, chunksize, **options)
        return self._map(function, iterable, chunksize, options)

    async def _map(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        options: dict[str, Any],
    ) -> AsyncIterator[Any]:
        # The tasks are cancelled from here: the thread that runs the map may
        # be waiting in it for a result when this task is cancelled.
        tasks = MapTasks(self._client)
        try:
            if options.get("sink") is not None or chunksize == 1:
                results = map_each(self._client, function, iterable, options, tasks)
                async for value in _in_thread(results):
                    yield value
                return

            options.pop("sink", None)
            batches = map_batches(
                self._client, function, iterable, chunksize, tasks=tasks, **options
            )
            async for outcomes in _in_thread(batches):
                for value in values_of(outcomes):
                    yield value
        finally:
            tasks.abandon()

    def map_outcomes(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
    ) -> AsyncIterator[ItemOutcome]:
        """Like `map`, but yield every item's `ItemOutcome` and raise for none,
        as `Client.map_outcomes` does; ended early, it cancels what it has not
        yielded, as `map` does.

        Raises:
            UsageError: at once, a bad `chunksize`, `timeout_s` or `retries`,
                or a function that cannot be named.
            ClientClosed: the client was closed while the map waited.
            Exception: what `iterable` raised, after the outcomes before it.
        """
        self._client._check_map(
            function, chunksize, timeout_s=timeout_s, retries=retries
        )
        return self._outcomes(function, iterable, chunksize, timeout_s, retries)

    async def _outcomes(
        self,
        function: str | Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout_s: float | None,
        retries: int,
    ) -> AsyncIterator[ItemOutcome]:
        tasks = MapTasks(self._client)  # cancelled from here, as in `map`
        try:
            batches = outcome_batches(
                self._client,
                function,
                iterable,
                chunksize,
                timeout_s,
                retries,
                tasks=tasks,
            )
            async for outcomes in _in_thread(batches):
                for outcome in outcomes:
                    yield outcome
        finally:
            tasks.abandon()

    async def collect(
        self, count: int | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[TaskFuture]:
        """Yield finished futures of tasks an earlier client of this session
        submitted, as `Client.collect` does (read their values with
        ``future.result()``, which does not block: they are done).

        Stops after `count` futures, or when none arrived for `timeout_s`
        (None: waits until the task consuming it is cancelled). No thread
        waits for results: the client's I/O thread wakes the loop when one
        comes, so a cancelled collect leaves nothing behind that could take
        a result and lose it.
        """
        arrived = asyncio.Event()
        with self._client._collect_listener(_waker(arrived)):
            received = 0
            while count is None or received < count:
                # Cleared before looking, so a result put meanwhile sets it.
                arrived.clear()
                future = self._client._collect_nowait()
                if future is not None:
                    received += 1
                    yield future
                    continue
                try:
                    await asyncio.wait_for(arrived.wait(), timeout_s)
                except TimeoutError:
                    return

    async def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The broker's workers, queues and clients, as `Client.status`.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`.
        """
        return await asyncio.to_thread(self._client.status, timeout_s)

    async def failed(
        self, limit: int = 100, timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """The broker's latest failed tasks, newest first, as `Client.failed`.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`.
        """
        return await asyncio.to_thread(self._client.failed, limit, timeout_s)

    async def retry(
        self,
        tickets: Sequence[int] = (),
        sink: str = "retried",
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Run failed tasks again, their results to `sink`, as `Client.retry`.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`.
            UsageError: as for `Client.retry` (CURVE rights).
        """
        return await asyncio.to_thread(self._client.retry, tickets, sink, timeout_s)

    async def purge(self, function: str, timeout_s: float = 10.0) -> int:
        """Cancel every queued task of `function`; return how many, as
        `Client.purge`.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`.
            UsageError: as for `Client.purge` (CURVE rights).
        """
        return await asyncio.to_thread(self._client.purge, function, timeout_s)

    async def purge_session(
        self, session: str, timeout_s: float = 10.0
    ) -> dict[str, int]:
        """Drop what the broker holds for a session that left, as
        `Client.purge_session`.

        Raises:
            UsageError: the session is connected, or CURVE rights forbid it.
            BrokerTimeout: the broker did not answer within `timeout_s`.
        """
        return await asyncio.to_thread(self._client.purge_session, session, timeout_s)

    async def cancel_task(
        self, session: str, task_id: int, timeout_s: float = 10.0
    ) -> str:
        """Cancel any session's task by its id; return what became of it, as
        `Client.cancel_task`.

        Raises:
            BrokerTimeout: the broker did not answer within `timeout_s`.
            UsageError: as for `Client.cancel_task` (CURVE rights).
        """
        return await asyncio.to_thread(
            self._client.cancel_task, session, task_id, timeout_s
        )

    async def close(self, timeout_s: float = 10.0) -> None:
        """Leave the broker; pending tasks fail with `ClientClosed`. Waits up
        to `timeout_s` for the broker to accept what was sent, as
        `Client.close`."""
        await asyncio.to_thread(self._client.close, timeout_s)


def _waker(event: asyncio.Event) -> Callable[[], None]:
    """A callable that sets `event` from any thread, on its loop."""
    loop = asyncio.get_running_loop()

    def wake() -> None:
        # A loop closed meanwhile has nobody left to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)

    return wake


async def _in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """The items of a blocking iterator, each waited for in a thread."""
    done = object()
    while (item := await asyncio.to_thread(next, iterator, done)) is not done:
        yield item

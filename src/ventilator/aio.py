"""asyncio face of the client: `await client.submit(...)` gives the result.

It wraps a `Client` (whose I/O thread does the work) and turns its futures into
asyncio ones; the event loop is never blocked, even when the window is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from .client import Client, _check_chunksize, _MapTasks, values_of

__all__ = ["AsyncClient"]


class AsyncClient:
    """A `Client` for asyncio programs. Use with ``async with``.

    Takes the same arguments as `Client`.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555", **options: Any) -> None:
        self._client = Client(address, **options)
        self.session = self._client.session

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run one task and return its result; raises its `TaskError` if it failed.

        Options (`timeout_s`, `retries`, `sink`) are those of `Client.submit`.
        """
        # Straight from the event loop while the window has room; only a full
        # window costs a thread, which waits for room without blocking the loop.
        future = self._client.submit_nowait(function, *args, **kwargs)
        if future is None:
            future = await asyncio.to_thread(
                self._client.submit, function, *args, **kwargs
            )
        return await asyncio.wrap_future(future)

    async def map(
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
        """
        _check_chunksize(chunksize)
        # The tasks are cancelled from here: the thread that runs the map may
        # be waiting in it for a result when this task is cancelled.
        tasks = _MapTasks(self._client)
        try:
            if options.get("sink") is not None or chunksize == 1:
                results = self._client._map_each(function, iterable, options, tasks)
                async for value in _in_thread(results):
                    yield value
                return

            options.pop("sink", None)
            batches = self._client._map_batches(
                function, iterable, chunksize, tasks=tasks, **options
            )
            async for outcomes in _in_thread(batches):
                for value in values_of(outcomes):
                    yield value
        finally:
            tasks.abandon()

    async def status(self) -> dict[str, Any]:
        """The broker's workers, queues and clients."""
        return await asyncio.to_thread(self._client.status)

    async def close(self) -> None:
        """Leave the broker; pending tasks fail with `ClientClosed`."""
        await asyncio.to_thread(self._client.close)


async def _in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """The items of a blocking iterator, each waited for in a thread."""
    done = object()
    while (item := await asyncio.to_thread(next, iterator, done)) is not done:
        yield item

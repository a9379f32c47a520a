"""asyncio face of the client: `await client.submit(...)` gives the result.

It wraps a `Client` (whose I/O thread does the work) and turns its futures into
asyncio ones; the event loop is never blocked, even when the window is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from .client import Client

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
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Yield `function(item)` for each item, in input order."""
        results = await asyncio.to_thread(
            self._client.map, function, iterable, **options
        )
        sentinel = object()
        while (
            value := await asyncio.to_thread(next, results, sentinel)
        ) is not sentinel:
            yield value

    async def status(self) -> dict[str, Any]:
        """The broker's workers, queues and clients."""
        return await asyncio.to_thread(self._client.status)

    async def close(self) -> None:
        """Leave the broker; pending tasks fail with `ClientClosed`."""
        await asyncio.to_thread(self._client.close)

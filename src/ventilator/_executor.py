"""`concurrent.futures.Executor` over a `Client`, for code written against the
standard interface: `submit` hands back the client's own futures."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ClientExecutor"]


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
                self._client._refuse_to_wait("shutdown(wait=True)")
            for future in futures:
                with contextlib.suppress(BaseException):
                    future.exception()

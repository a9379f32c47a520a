"""The program a process-pool slot runs:
``python -m ventilator._child FD PROGRESS_FD PARENT_PID pickle|no-pickle MODULE...``.

Started with `subprocess`, not `multiprocessing`, so the child never imports
the parent's ``__main__``: a worker embedded in any script needs no
``if __name__ == "__main__"`` guard, and the child holds nothing but its pipe.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any

from ._allocator import keep_freed_memory
from ._framing import CANNOT_START, EARLY, read_message, write_message
from ._lifeline import end_with_parent
from ._progress import Progress
from .errors import UsageError
from .execution import run_task
from .registry import load_functions

# A batch is sized to a few milliseconds of work (pool.TaskDuration), and its
# outcomes go back together when it ends. When a task of it runs far longer
# (it hangs, or its function's run time was misjudged), the outcomes of those
# before it go back on their own once they have waited this long: their
# clients must not wait on it, nor see them run again should it be stopped.
EARLY_AFTER_S = 0.2


def serve(
    batches: IO[bytes],
    sock: socket.socket,
    progress: Progress,
    modules: Sequence[str],
    allow_pickle: bool,
) -> None:
    """Receive a batch of tasks, run them, send their outcomes; until EOF.

    Before each task, `progress` notes which it is: if it kills us, the
    worker blames it alone; and says whether the worker took it back (see
    _progress)."""
    functions = _import_or_explain(sock, modules)
    # An empty message says we are ready: a task's timeout counts from here,
    # not from a start that may take seconds on a loaded machine.
    write_message(sock, [], [])
    outcomes = _Outcomes(sock)
    for batch in itertools.count(1):
        try:
            tasks, payloads = read_message(batches)
        except (EOFError, OSError):
            return  # the worker closed our pipe: leave

        _run_batch(batch, tasks, payloads, progress, functions, allow_pickle, outcomes)
        try:
            outcomes.send()
        except OSError:
            return  # the worker went away while we ran


def _run_batch(
    batch: int,
    tasks: list[list[Any]],
    payloads: list[Any],
    progress: Progress,
    functions: dict[str, Callable[..., Any]],
    allow_pickle: bool,
    outcomes: _Outcomes,
) -> None:
    """Run the tasks of batch number `batch`, adding their outcomes to
    `outcomes`. Those the worker took back, run elsewhere while we were held
    up, are not run: the outcomes are of those before them (none, for a batch
    taken back whole)."""
    outcomes.batch_started(len(tasks))
    for place, ((function, flags), payload) in enumerate(
        zip(tasks, payloads, strict=True)
    ):
        if progress.withdrawn(batch, place):
            break
        progress.running(batch, place)
        started = time.perf_counter()
        status, result = run_task(functions, allow_pickle, function, flags, payload)
        outcomes.add(int(status), time.perf_counter() - started, result)
    progress.between(batch)


class _Outcomes:
    """The outcomes of the running batch not sent yet, and the one writer of
    our pipe. The main thread adds them as its tasks end, and sends them when
    the batch does; a thread of ours sends those that waited EARLY_AFTER_S
    before that, marked EARLY (see _framing).

    That thread looks only while batches of several tasks run: a batch of one
    has nothing to send early, and a lone round trip (one task at a time)
    must not pay for its wake-ups."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._reports: list[tuple[int, float]] = []
        self._results: list[Any] = []
        self._oldest_at = 0.0  # when the first of them was added
        # Set while a batch of several tasks runs: the thread waits on it.
        # Only the main thread sets and clears it.
        self._batch_of_many = threading.Event()
        early = threading.Thread(target=self._send_early, name="early", daemon=True)
        early.start()

    def batch_started(self, size: int) -> None:
        if size > 1:
            self._batch_of_many.set()

    def add(self, status: int, duration_s: float, result: Any) -> None:
        with self._lock:
            if not self._reports:
                self._oldest_at = time.monotonic()
            self._reports.append((status, duration_s))
            self._results.append(result)

    def send(self) -> None:
        """The batch ended: send the message that says so, with the outcomes
        not sent early (none, if all were, or if none ran)."""
        if self._batch_of_many.is_set():
            self._batch_of_many.clear()
        with self._lock:
            write_message(self._sock, *self._take())

    def _take(self) -> tuple[list[tuple[int, float]], list[Any]]:
        taken = self._reports, self._results
        self._reports, self._results = [], []
        return taken

    def _send_early(self) -> None:
        # A look now and then, not a timer per batch: a batch normally ends
        # within milliseconds, and must cost nothing more for this.
        while True:
            self._batch_of_many.wait()
            time.sleep(EARLY_AFTER_S / 2)
            with self._lock:
                if not self._due():
                    continue
                reports, results = self._take()
                try:
                    write_message(self._sock, [[EARLY], *reports], [b"", *results])
                except OSError:
                    return  # the worker is gone; the main thread leaves too

    def _due(self) -> bool:
        """Whether outcomes wait, and have for EARLY_AFTER_S."""
        return bool(self._reports) and (
            time.monotonic() - self._oldest_at >= EARLY_AFTER_S
        )


def _import_or_explain(
    sock: socket.socket, modules: Sequence[str]
) -> dict[str, Callable[..., Any]]:
    """The modules' functions; if they do not import, tell the worker why
    and leave. The worker logs it now and then: a traceback on stderr from
    each child it restarts would bury it."""
    try:
        return load_functions(modules)
    except UsageError as error:
        reason, details = str(error), traceback.format_exc()
    with contextlib.suppress(OSError):  # the worker is gone: nobody to tell
        write_message(sock, [[CANNOT_START, reason]], [details.encode()])
    raise SystemExit(2)


def main(argv: Sequence[str]) -> None:
    # Ctrl-C is for the worker's main process, which stops its children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()  # see _allocator: a payload per task
    fd, progress_fd, parent, allow_pickle, *modules = argv
    # A worker killed outright cannot stop us; a task that never returns would
    # never see our pipe close, and would run on (and again elsewhere).
    end_with_parent(int(parent))
    sock = socket.socket(fileno=int(fd))
    progress = Progress(int(progress_fd))
    os.close(int(progress_fd))  # the mapping holds its own
    serve(sock.makefile("rb"), sock, progress, modules, allow_pickle == "pickle")


if __name__ == "__main__":
    main(sys.argv[1:])

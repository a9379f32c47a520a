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
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any

from ._allocator import keep_freed_memory
from ._framing import CANNOT_START, read_message, write_message
from ._lifeline import end_with_parent
from ._progress import Progress
from .errors import UsageError
from .execution import run_task
from .registry import load_functions


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
    for batch in itertools.count(1):
        try:
            tasks, payloads = read_message(batches)
        except (EOFError, OSError):
            return  # the worker closed our pipe: leave

        reports, results = _run_batch(
            batch, tasks, payloads, progress, functions, allow_pickle
        )
        try:
            write_message(sock, reports, results)
        except OSError:
            return  # the worker went away while we ran


def _run_batch(
    batch: int,
    tasks: list[list[Any]],
    payloads: list[Any],
    progress: Progress,
    functions: dict[str, Callable[..., Any]],
    allow_pickle: bool,
) -> tuple[list[tuple[int, float]], list[Any]]:
    """Run the tasks of batch number `batch`; their reports and results.
    Those the worker took back, run elsewhere while we were held up, are not
    run: the report is of those before them (none, for a batch taken back
    whole)."""
    reports: list[tuple[int, float]] = []
    results: list[Any] = []
    for place, ((function, flags), payload) in enumerate(
        zip(tasks, payloads, strict=True)
    ):
        if progress.withdrawn(batch, place):
            break
        progress.running(batch, place)
        started = time.perf_counter()
        status, result = run_task(functions, allow_pickle, function, flags, payload)
        reports.append((int(status), time.perf_counter() - started))
        results.append(result)
    progress.between(batch)
    return reports, results


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

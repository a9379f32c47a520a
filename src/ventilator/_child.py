"""The program a process-pool slot runs: ``python -m ventilator._child FD MODULE...``.

Started with `subprocess`, not `multiprocessing`, so the child never imports
the parent's ``__main__``: a worker embedded in any script needs no
``if __name__ == "__main__"`` guard, and the child holds nothing but its pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import IO

from ._framing import read_message
from .execution import run_task
from .registry import load_functions


def serve(
    batches: IO[bytes], conn: Connection, modules: Sequence[str], allow_pickle: bool
) -> None:
    """Receive a batch of tasks, run them, send their outcomes; until EOF."""
    functions = load_functions(modules)
    while True:
        try:
            message = read_message(batches)
        except (EOFError, OSError):
            return  # the worker went away
        if message is None:
            return

        reports = []
        for function, flags, payload in message:
            started = time.perf_counter()
            status, result = run_task(functions, allow_pickle, function, flags, payload)
            reports.append((int(status), result, time.perf_counter() - started))
        try:
            conn.send(reports)
        except OSError:
            return  # the worker went away while we ran


def main(argv: Sequence[str]) -> None:
    # Ctrl-C is for the worker's main process, which stops its children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, allow_pickle, *modules = argv
    sock = socket.socket(fileno=int(fd))
    batches = sock.makefile("rb")
    outcomes = Connection(os.dup(sock.fileno()))
    serve(batches, outcomes, modules, allow_pickle == "pickle")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Functions the e2e workers serve, as ``tests.e2e.tasks:NAME``.

Each one is small and does one thing a test needs to observe: a value, a raised
exception, time passing, a dead process, or where it ran.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


def square(x: float) -> float:
    """Return ``x * x``."""
    return x * x


def echo(value: Any) -> Any:
    """Return `value` unchanged (bytes stay bytes)."""
    return value


def length(value: bytes) -> int:
    """Return how many bytes arrived: a small result for a large payload."""
    return len(value)


def describe(value: Any) -> list[Any]:
    """Return the type name of `value` next to the value, to see how it arrived."""
    return [type(value).__name__, value]


def fail(message: str) -> None:
    """Raise ValueError with `message`."""
    raise ValueError(f"failed on purpose: {message}")


def reciprocal(x: float) -> float:
    """Return ``1 / x``; raises ZeroDivisionError for 0."""
    return 1 / x


def sleep_for(seconds: float) -> float:
    """Sleep, then return how long was asked for."""
    time.sleep(seconds)
    return seconds


# Set by an in-process test to let the `hang` tasks of a thread pool return.
RELEASE_HANGS = threading.Event()


def hang(*_: Any) -> None:
    """Block until `RELEASE_HANGS` is set: in a worker process, for ever."""
    RELEASE_HANGS.wait()


def slow_echo(value: Any, seconds: float) -> Any:
    """Sleep, then return `value`."""
    time.sleep(seconds)
    return value


def sleep_then_touch(seconds: float, path: str) -> float:
    """Sleep, then create the file at `path`: proof the task ran to its end."""
    time.sleep(seconds)
    Path(path).touch()
    return seconds


def stop_worker_sleep_then_touch(seconds: float, path: str) -> float:
    """Stop the worker that runs this task process (SIGSTOP, as a long GC or a
    swapped-out host would), then as `sleep_then_touch`: the worker cannot
    stop the task in time, however slow the machine."""
    os.kill(os.getppid(), signal.SIGSTOP)
    return sleep_then_touch(seconds, path)


def crash(code: int = 1) -> None:
    """End the process running the task at once, as a segfault would."""
    os._exit(code)


def pid() -> int:
    """The id of the process running the task."""
    return os.getpid()


def make_bytes(size: int) -> bytes:
    """Return `size` bytes, to produce a large result."""
    return b"r" * size


def touch(path: str) -> str:
    """Create the file at `path`; the pickle tests use it as a tripwire."""
    Path(path).touch()
    return path


def whereabouts(seconds: float) -> list[int]:
    """Sleep, then return ``[pid, parent pid]``; in a process pool the parent is
    the worker process."""
    time.sleep(seconds)
    return [os.getpid(), os.getppid()]


def flaky(path: str, failures: int) -> int:
    """Raise on the first `failures` calls for `path`, then return the call count.

    The count lives in the file at `path`, so it survives between attempts that
    run in different processes.
    """
    counter = Path(path)
    calls = (int(counter.read_text()) if counter.exists() else 0) + 1
    counter.write_text(str(calls))
    if calls <= failures:
        raise RuntimeError(f"failure {calls} of {failures}")
    return calls


def crash_on_negative(x: int) -> int:
    """Square `x`, but end the process at once on a negative one: a poison item."""
    if x < 0:
        os._exit(1)
    return x * x


def crash_on_negative_counted(item: list[Any]) -> int:
    """`crash_on_negative` on ``item = [x, path]``; a negative x first appends a
    line to the file at `path`, which counts the processes the poison killed."""
    x, path = item
    if x < 0:
        with open(path, "a") as runs:
            runs.write("ran\n")
    return crash_on_negative(x)


def slow_from(item: list[Any]) -> int:
    """For ``item = [x, threshold, seconds, path]``: return x, at once while it
    is below `threshold`; from there on, after `seconds`, and once the file at
    `path` has a line with the id of the process that ran it."""
    x, threshold, seconds, path = item
    if x >= threshold:
        time.sleep(seconds)
        with open(path, "a") as ran:
            ran.write(f"{os.getpid()}\n")
    return int(x)


def crash_once(path: str) -> str:
    """End the process at once the first time, when there is no file at `path`
    yet (it is created then); return "survived" every time after."""
    marker = Path(path)
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return "survived"


def crash_counted_after_release(runs: str, release: str) -> None:
    """Leave a marker in the folder `runs`, then end the process: at once on
    the first run, once `release` exists on every later one, so that a test
    can act between two deaths of the same poison task."""
    if any(Path(runs).iterdir()):
        run_counted(runs, release)
    else:
        Path(runs, "first").touch()
    os._exit(1)


def unsendable_on_negative(x: int) -> Any:
    """Square `x`, but return a value msgpack cannot carry for a negative one."""
    return object() if x < 0 else x * x


def flaky_item(item: list[Any]) -> int:
    """`flaky(path, failures)` for ``item = [path, failures]``: the one-argument
    form that `ventilator map` calls with a JSON input line."""
    path, failures = item
    return flaky(path, failures)


def run_counted(runs: str, release: str) -> str:
    """Leave a marker file of its own in the folder `runs`, then return
    "released" once `release` exists: a test counts the markers to know how
    often the task ran, and ends it when it wants."""
    marker = Path(runs, f"run-{os.getpid()}-{time.monotonic_ns()}")
    marker.touch()
    while not os.path.exists(release):
        time.sleep(0.01)
    return "released"


def run_counted_large(runs: str, release: str, size: int) -> bytes:
    """As `run_counted`, but return `size` bytes: a result too large for the
    kernel's socket buffers, so that part of it waits in the worker's
    socket when the broker stops reading."""
    run_counted(runs, release)
    return bytes(size)


def run_counted_item(item: list[str]) -> str:
    """`run_counted` for `map`, which passes one argument: [runs, release]."""
    runs, release = item
    return run_counted(runs, release)


def wait_for_file(started: str, release: str) -> str:
    """Create `started`, then return "released" once `release` exists: a task
    that runs exactly as long as its test wants."""
    Path(started).touch()
    while not os.path.exists(release):
        time.sleep(0.01)
    return "released"

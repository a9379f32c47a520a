"""Where a worker's tasks run: child processes (default) or threads.

The worker's main thread owns the broker socket and never runs task code, so
it keeps heartbeating however long and CPU-bound the tasks are. Pools report
through file descriptors the main loop polls next to its socket, so a finished
task is noticed at once, with no polling interval.

Process pool: one child per slot, each fed through its own pipe. A child that
dies takes only its current task with it (reported as CRASHED, which the broker
counts towards poison) and is replaced. A task past its timeout has its child
killed and replaced.

Thread pool: for I/O-bound work. A thread cannot be killed, so a task past its
timeout is reported as timed out and left to finish in the background; its
result is dropped and its thread is not reused until it returns.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

from . import protocol as p
from .errors import TaskTimeout
from .execution import run_task
from .registry import load_functions
from .serialization import pack_error

__all__ = ["Pool", "ProcessPool", "ThreadPool", "make_pool"]

log = logging.getLogger(__name__)

# How long a child gets to exit on its own before it is killed.
CHILD_EXIT_GRACE_S = 2.0


@dataclass(slots=True)
class Running:
    """A task a slot is running, and when it must be stopped."""

    ticket: int
    attempt: int
    started: float
    deadline: float | None


class Pool(Protocol):
    """What the worker's loop needs from a pool."""

    def fds(self) -> Sequence[int]:
        """Descriptors that become readable when a task ended or a child died."""
        ...

    def has_free_slot(self) -> bool: ...

    def start(self, task: p.Assignment, now: float) -> None: ...

    def collect(self, now: float) -> list[p.Outcome]:
        """Outcomes of tasks that ended, crashed or timed out since the last call."""
        ...

    def next_deadline(self) -> float | None: ...

    def busy(self) -> int: ...

    def close(self) -> None: ...


def make_pool(
    kind: str, concurrency: int, modules: Sequence[str], allow_pickle: bool
) -> Pool:
    """Start the pool a worker was configured with ("process" or "thread")."""
    if kind == "thread":
        return ThreadPool(concurrency, modules, allow_pickle)
    return ProcessPool(concurrency, modules, allow_pickle)


def _timeout_outcome(running: Running, now: float, timeout_s: float) -> p.Outcome:
    error = TaskTimeout(
        "TaskTimeout",
        f"the task ran past its timeout of {timeout_s:g}s and was stopped",
    )
    return p.Outcome(
        running.ticket,
        running.attempt,
        p.Status.TIMEOUT,
        pack_error(error),
        now - running.started,
    )


def _deadline(task: p.Assignment, now: float) -> float | None:
    return now + task.timeout_s if task.timeout_s else None


# --- processes -------------------------------------------------------------------


def _child_main(conn: Connection, modules: Sequence[str], allow_pickle: bool) -> None:
    """The loop of one child process: receive a task, run it, send the outcome."""
    # Ctrl-C is for the worker's main process, which stops the children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    functions = load_functions(modules)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker went away
        if message is None:
            return

        function, flags, payload = message
        started = time.perf_counter()
        status, result = run_task(functions, allow_pickle, function, flags, payload)
        conn.send((int(status), result, time.perf_counter() - started))


@dataclass(slots=True, eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    running: Running | None = None
    timeout_s: float | None = None


class ProcessPool:
    """One child process per slot, replaced when it dies or overruns."""

    def __init__(self, size: int, modules: Sequence[str], allow_pickle: bool) -> None:
        # spawn, not fork: the worker holds a ZeroMQ context and its I/O threads,
        # which a forked child would inherit in an undefined state.
        self._mp = multiprocessing.get_context("spawn")
        self._modules = list(modules)
        self._allow_pickle = allow_pickle
        self._children = [self._spawn() for _ in range(size)]

    def _spawn(self) -> _Child:
        parent_end, child_end = self._mp.Pipe()
        process = self._mp.Process(
            target=_child_main,
            args=(child_end, self._modules, self._allow_pickle),
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Child(process, parent_end)

    def fds(self) -> Sequence[int]:
        return [child.conn.fileno() for child in self._children]

    def has_free_slot(self) -> bool:
        return any(child.running is None for child in self._children)

    def busy(self) -> int:
        return sum(1 for child in self._children if child.running is not None)

    def start(self, task: p.Assignment, now: float) -> None:
        child = next(c for c in self._children if c.running is None)
        child.running = Running(task.ticket, task.attempt, now, _deadline(task, now))
        child.timeout_s = task.timeout_s
        try:
            child.conn.send((task.function, task.flags, bytes(task.payload)))
        except OSError:
            pass  # the child died; collect() reports the task as crashed

    def collect(self, now: float) -> list[p.Outcome]:
        outcomes: list[p.Outcome] = []
        for index, child in enumerate(self._children):
            outcome = self._check(child, now)
            if outcome is not None:
                outcomes.append(outcome)
            if (
                outcome is not None
                and outcome.status
                in (
                    p.Status.CRASHED,
                    p.Status.TIMEOUT,
                )
            ) or (not child.process.is_alive() and child.running is None):
                self._children[index] = self._replace(child)
        return outcomes

    def _check(self, child: _Child, now: float) -> p.Outcome | None:
        running = child.running
        if running is None:
            return None
        try:
            if child.conn.poll():
                status, result, duration_s = child.conn.recv()
                child.running = None
                return p.Outcome(
                    running.ticket,
                    running.attempt,
                    p.Status(status),
                    result,
                    duration_s,
                )
        except (EOFError, OSError):
            return self._crashed(child, running, now)

        if not child.process.is_alive():
            return self._crashed(child, running, now)
        if running.deadline is not None and now >= running.deadline:
            child.running = None
            return _timeout_outcome(running, now, child.timeout_s or 0.0)
        return None

    def _crashed(self, child: _Child, running: Running, now: float) -> p.Outcome:
        child.running = None
        log.warning(
            "task process died ticket=%d attempt=%d exitcode=%s; starting a new one",
            running.ticket,
            running.attempt,
            child.process.exitcode,
        )
        return p.Outcome(
            running.ticket,
            running.attempt,
            p.Status.CRASHED,
            b"",
            now - running.started,
        )

    def _replace(self, child: _Child) -> _Child:
        self._stop_child(child, at_once=True)
        return self._spawn()

    def next_deadline(self) -> float | None:
        deadlines = [
            c.running.deadline
            for c in self._children
            if c.running is not None and c.running.deadline is not None
        ]
        return min(deadlines, default=None)

    def close(self) -> None:
        for child in self._children:
            with contextlib.suppress(OSError):
                child.conn.send(None)
        deadline = time.monotonic() + CHILD_EXIT_GRACE_S
        for child in self._children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            self._stop_child(child, at_once=False)

    def _stop_child(self, child: _Child, at_once: bool) -> None:
        if child.process.is_alive():
            child.process.kill() if at_once else child.process.terminate()
            child.process.join(CHILD_EXIT_GRACE_S)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
        child.conn.close()
        child.process.close()


# --- threads ---------------------------------------------------------------------


class ThreadPool:
    """Threads for I/O-bound tasks; a pipe wakes the worker when one ends."""

    def __init__(self, size: int, modules: Sequence[str], allow_pickle: bool) -> None:
        self._functions = load_functions(modules)
        self._allow_pickle = allow_pickle
        self._size = size
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="ventilator-task")
        self._done: queue.SimpleQueue[tuple[Running, p.Status, bytes, float]] = (
            queue.SimpleQueue()
        )
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._running: dict[tuple[int, int], tuple[Running, float | None]] = {}
        self._abandoned = 0  # timed-out threads still running their task

    def fds(self) -> Sequence[int]:
        return [self._wake_read]

    def has_free_slot(self) -> bool:
        return len(self._running) + self._abandoned < self._size

    def busy(self) -> int:
        return len(self._running)

    def start(self, task: p.Assignment, now: float) -> None:
        running = Running(task.ticket, task.attempt, now, _deadline(task, now))
        self._running[(task.ticket, task.attempt)] = (running, task.timeout_s)
        self._executor.submit(self._run, running, task)

    def _run(self, running: Running, task: p.Assignment) -> None:
        started = time.perf_counter()
        status, result = run_task(
            self._functions, self._allow_pickle, task.function, task.flags, task.payload
        )
        self._done.put((running, status, result, time.perf_counter() - started))
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass  # the pool was closed while this task ran; nobody waits for it

    def collect(self, now: float) -> list[p.Outcome]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 65536)

        outcomes = []
        while not self._done.empty():
            running, status, result, duration_s = self._done.get()
            key = (running.ticket, running.attempt)
            if self._running.pop(key, None) is None:
                self._abandoned -= 1  # it had timed out; its result is not wanted
                continue
            outcomes.append(p.Outcome(*key, status, result, duration_s))

        for key, (running, timeout_s) in list(self._running.items()):
            if running.deadline is not None and now >= running.deadline:
                del self._running[key]
                self._abandoned += 1
                outcomes.append(_timeout_outcome(running, now, timeout_s or 0.0))
        return outcomes

    def next_deadline(self) -> float | None:
        deadlines = [r.deadline for r, _ in self._running.values() if r.deadline]
        return min(deadlines, default=None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_read)
        os.close(self._wake_write)

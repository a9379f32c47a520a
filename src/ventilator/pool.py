"""Where a worker's tasks run: child processes (default) or threads.

The worker's main thread owns the broker socket and never runs task code, so
it keeps heartbeating however long and CPU-bound the tasks are. Pools report
through file descriptors the main loop polls next to its socket, so a finished
task is noticed at once, with no polling interval.

Process pool: one child per slot, fed through its own socket pair. Each child
gets its next batch of tasks before it finishes the current one (up to
`PIPELINE_DEPTH` batches in its pipe), so it never waits for the worker's main
loop to be scheduled: on a busy machine that wait is what costs efficiency.
Batches behind one that runs long (`HELD_UP_S`) are taken back for a child
that idles, which a task that hangs would otherwise leave idle; when every
child is so held up, what waits is given up for the worker to hand back to
the broker (`give_up_held_up`). The worker
writes to a child without blocking, keeping what the socket does not take yet
for when it becomes writable: a child busy writing a large result would
otherwise wait for the worker while the worker waits for it. A child that
dies takes its current task with it (reported as CRASHED, which the broker
counts towards poison), even inside a batch (see `_progress`); the other tasks
of its batch, and those queued behind it, go to another child. A task
past its timeout has its child killed and replaced. Whatever a child's tasks
started goes with it, whether the worker stopped it or it died on its own: its
environment carries a mark (`TASK_PROCESS_ENV`) that its commands inherit,
which finds them even once init has adopted them (`_proctree.kill_marked`).

A child that dies before it said it is ready did not fail a task: its modules
do not import here (a deploy broken after the worker started), or the machine
killed it. Its tasks go back to the others, unblamed, and its slot starts a new
child after a delay that doubles with each failed start (`CHILD_RESTART_BACKOFF`),
for ever, so that a fixed deploy needs no restart of the worker. While no child
is ready and every slot has failed to start, `unable` says why: the worker
then hands its tasks back to the broker and serves nothing until one starts.

Thread pool: for I/O-bound work. A thread cannot be killed, so a task past its
timeout is reported as timed out and left to run on in the background, its
result dropped; a fresh thread takes its slot, so that tasks that hang cannot
jam the pool. The processes its thread started are killed, with theirs: Linux
lists a process's children per thread, so they are told from those of other
tasks, and a task waiting for its command may return then. A command that has
left its parent (a daemon) is not found: the worker's environment, which the
threads share, cannot mark one task's commands. At most `MAX_STUCK_THREADS`
such threads may pile up: beyond that, a timed-out task keeps its slot until a
stuck thread returns, and once every slot is kept so, `unable` says so, and
the worker hands its tasks back, as when task processes cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, Protocol

from . import _proctree
from . import protocol as p
from ._framing import CANNOT_START, EARLY, Inbox, Outbox, frame
from ._progress import Progress
from ._words import counted, how_it_ended
from .errors import TaskError, TaskTimeout
from .execution import run_task
from .logs import REMOTE_TRACEBACK, Routine
from .policy import Backoff
from .registry import load_functions
from .serialization import pack_error

__all__ = ["POOL_KINDS", "Pool", "ProcessPool", "ThreadPool", "make_pool"]

log = logging.getLogger(__name__)

POOL_KINDS = ("process", "thread")

# Batches in one child's pipe at once: the running one and the next.
PIPELINE_DEPTH = 2
# Payload bytes in one batch to a child.
BATCH_BYTES = 1024 * 1024
# Functions whose run times a process pool keeps to size batches; past this
# many it starts again, as every new function does, with batches of one.
MAX_FUNCTIONS_TIMED = 1024
_BATCH = int(p.Flags.BATCH)
_SPLIT = int(p.Flags.SPLIT)

# How long a child gets to exit on its own before it is killed.
CHILD_EXIT_GRACE_S = 2.0
# How often to look whether each child process is still alive, and whether
# one is held up (see HELD_UP_S).
LIVENESS_CHECK_S = 1.0
# How long a child may run one batch before the batches in its pipe behind it
# are taken back for a child that idles (see ProcessPool._withdraw_held_up),
# and, once every child is so held up, what waits is handed back to the
# broker (see give_up_held_up). Batches are sized to BATCH_WORK_S of work;
# tasks of a function not timed yet go one at a time, and that one may run
# for ever. Twice the broker's `long_task_s`: a worker that has reported
# nothing for longer is given no tasks to hold, so what it hands back is not
# given straight back (a tester saw that once per hand-back at 0.5 s).
HELD_UP_S = 1.0
# How long a new child may take to import its modules and say it is ready
# before it is taken for stuck and replaced (its tasks wait, unblamed).
CHILD_START_TIMEOUT_S = 60.0
# How long a slot whose child died before it was ready waits before it starts
# another: a broken deploy must not cost a core in restarts, and a fixed one
# is picked up within the cap.
CHILD_RESTART_BACKOFF = Backoff(base_s=0.5, cap_s=30.0, jitter=0.2)
# How often the error that no task process can start is repeated while it lasts
# (at once when the reason changes).
START_FAILURE_REPEAT_S = 300.0
# How long to wait for a lost child to be reaped, to log how it ended.
REAP_WAIT_S = 0.05
# Tasks the broker took back (cancelled, mostly) are said at once, then after
# this long, then twice as long each time, by the worker and its pool.
TAKEN_BACK_FIRST_INTERVAL_S = 60.0
# Tasks past their timeout are a WARNING each while they are rare; a flood of
# them (a map of hanging lines) is said at once, then after this long, then
# twice as long each time up to TIMEOUTS_MAX_INTERVAL_S, counting the others.
TIMEOUTS_FIRST_INTERVAL_S = 10.0
TIMEOUTS_MAX_INTERVAL_S = 300.0
# The variable that marks the environment of a task process with its own
# token, inherited by whatever it starts: what finds those once it is gone.
TASK_PROCESS_ENV = "VENTILATOR_TASK_PROCESS"
# Timed-out threads still running that a thread pool replaces with fresh ones.
# Each holds its stack and whatever its task holds; past this many, a
# timed-out task keeps its slot until one returns, rather than the worker
# growing threads without bound.
MAX_STUCK_THREADS = 32


def _timeout_routine() -> Routine:
    """How a pool says that tasks ran past their timeouts (see
    TIMEOUTS_FIRST_INTERVAL_S); both pools say it alike."""
    return Routine(
        __name__, TIMEOUTS_FIRST_INTERVAL_S, TIMEOUTS_MAX_INTERVAL_S, logging.WARNING
    )


class Pool(Protocol):
    """What the worker's loop needs from a pool."""

    def fds(self) -> Sequence[int]:
        """Descriptors that become readable when a task ended or a child died."""
        ...

    def write_fds(self) -> Sequence[int]:
        """Descriptors with writes pending: call `collect` once they are writable."""
        ...

    def submit(self, task: p.Assignment, now: float) -> None:
        """Run `task` as soon as a slot is free."""
        ...

    def collect(self, now: float, readable: Collection[int] = ()) -> list[p.Outcome]:
        """Outcomes of tasks that ended, crashed or timed out since the last call.

        `readable` names the descriptors of `fds` that poll found readable:
        only those are read.
        """
        ...

    def drop_waiting(self) -> int:
        """Forget tasks not started yet (the broker requeued them); return how many."""
        ...

    def give_up_held_up(self, now: float) -> int:
        """When every slot has run its task or batch for HELD_UP_S or more,
        forget the tasks not started yet, for the caller to hand back to the
        broker; return how many (0: none, or a slot may free soon)."""
        ...

    def held(self) -> list[tuple[int, int]]:
        """(ticket, attempt) of every task it will still report an outcome
        for: those started or in a pipe first, then those waiting."""
        ...

    def release(self, tickets: Collection[tuple[int, int]]) -> int:
        """Give up these tasks (the broker no longer has them here): drop
        those waiting, stop those running where it can, and report none of
        them; return how many of them it held."""
        ...

    def next_deadline(self) -> float | None:
        """When the earliest running task times out, if any has a timeout."""
        ...

    def load(self) -> int:
        """Tasks held: running, in pipes, or waiting for a slot."""
        ...

    def unable(self) -> str | None:
        """Why no task can run here now, in words for the broker's status (no
        task process can start; every slot holds a stuck thread); else None."""
        ...

    def close(self, at_once: bool = False) -> None:
        """Stop: let the tasks under way end first, or (`at_once`) stop them,
        as the broker runs them again elsewhere."""
        ...


def make_pool(
    kind: str, concurrency: int, modules: Sequence[str], allow_pickle: bool
) -> Pool:
    """Start the pool a worker was configured with ("process" or "thread")."""
    if kind == "thread":
        return ThreadPool(concurrency, modules, allow_pickle)
    return ProcessPool(concurrency, modules, allow_pickle)


class TaskDuration:
    """A moving average of how long tasks take here, and what follows from it."""

    # Work per batch sent to a child: small enough not to delay results much.
    BATCH_WORK_S = 0.002
    MAX_BATCH = 64

    def __init__(self) -> None:
        self.mean_s: float | None = None

    def observe(self, duration_s: float) -> None:
        if self.mean_s is None:
            self.mean_s = duration_s
        else:
            self.mean_s += 0.2 * (duration_s - self.mean_s)

    def batch_size(self) -> int:
        if self.mean_s is None:
            return 1
        return max(
            1, min(self.MAX_BATCH, int(self.BATCH_WORK_S / max(self.mean_s, 1e-6)))
        )


@dataclass(slots=True, eq=False)
class _Running:
    """A task handed to a slot, and since when it has been running."""

    task: p.Assignment
    started: float = 0.0

    def deadline(self) -> float | None:
        timeout_s = self.task.timeout_s
        return self.started + timeout_s if timeout_s else None

    def outcome(self, status: p.Status, payload: bytes, now: float) -> p.Outcome:
        return p.Outcome(
            self.task.ticket, self.task.attempt, status, payload, now - self.started
        )

    def ran_past_timeout(self, duration_s: float) -> bool:
        """Whether the task ran longer than its timeout, as its process
        measured it: this process could not stop it in time (it stood still,
        paused or starved of CPU), and its result must not count."""
        timeout_s = self.task.timeout_s
        return timeout_s is not None and 0 < timeout_s < duration_s

    def timed_out(self, now: float, what_then: str = "was stopped") -> p.Outcome:
        error = TaskTimeout(
            "TaskTimeout",
            f"the task ran past its timeout of {self.task.timeout_s:g}s "
            f"and {what_then}",
        )
        return self.outcome(p.Status.TIMEOUT, pack_error(error), now)


# --- processes -------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Child:
    process: subprocess.Popen[bytes]
    sock: socket.socket  # our end of its pipe, both ways, never blocking
    inbox: Inbox  # outcomes coming back
    outbox: Outbox  # batches the socket has not taken yet
    progress: Progress  # which task of its batch it runs, told through memory
    mark: str  # its TASK_PROCESS_ENV, inherited by what it starts
    spawned_at: float
    # Batches sent down the pipe, oldest (the one running) first. One taken
    # back is left empty, and the running one without the tasks taken back
    # from it: the child still answers them (see _withdraw).
    sent: deque[list[_Running]] = field(default_factory=deque)
    # Batches it reported: the oldest in `sent` is its batch number this plus 1.
    batches_reported: int = 0
    # Tasks of its running batch it reported early (see _child), dropped from
    # the front of `sent[0]`: the first task there is at this place in it.
    reported_early: int = 0
    # Whether it said it has imported its modules; until then its tasks wait
    # in the pipe and their timeouts have not started.
    ready: bool = False
    # Children of its slot that died before they were ready, in a row: while
    # any did, it gets no task before it is ready.
    failed_starts: int = 0
    # What it said before it left, if it could not import its modules:
    # the reason in one line, and the traceback.
    start_error: tuple[str, str] | None = None

    def fileno(self) -> int:
        return self.sock.fileno()


# How a child is after a look at it: "healthy"; "lost" (dead, or its pipe
# garbled); "overran" (its task ran past its timeout, and was reported so);
# "unstarted" (it never said it was ready within CHILD_START_TIMEOUT_S).
# All but "healthy" cost the child its slot (see `_give_up`).
_Health = Literal["healthy", "lost", "overran", "unstarted"]


@dataclass(slots=True, frozen=True)
class _Resting:
    """A slot whose child could not start, until its next try."""

    restart_at: float
    failed_starts: int


class ProcessPool:
    """One child process per slot, replaced when it dies or overruns.

    Short tasks travel to a child in batches, sized to about `BATCH_WORK_S` of
    work, so that a child's pipe costs one message per batch rather than per
    task. A child notes which task of its batch it is running (see
    `_progress`), so the task that killed it is blamed alone, at its first
    death, and the others of its batch go again. A task with a timeout, and an
    item split from a map's batch that died, travel alone: their deadline and
    their blame are then exact. Should a child die between tasks, the tasks
    of its batch run one at a time, and map batches among them are blamed at
    once (see `_blame`).

    A dead child is noticed when its pipe reads end-of-file, which wakes the
    worker's poll at once; a look at every child's process, once per
    `LIVENESS_CHECK_S`, catches one whose pipe a task of its own kept open.
    """

    def __init__(
        self,
        size: int,
        modules: Sequence[str],
        allow_pickle: bool,
        restart_backoff: Backoff = CHILD_RESTART_BACKOFF,
    ) -> None:
        self._modules = list(modules)
        self._allow_pickle = allow_pickle
        self._restart_backoff = restart_backoff
        # Slots without a child: theirs could not start, and they wait to retry.
        self._resting: list[_Resting] = []
        # Whether no child is ready and each has failed to start: derived
        # from the children when they change (_update_starts_failing), as
        # the worker asks whether it is unable every loop turn.
        self._starts_failing = False
        self._start_error: tuple[str, str] | None = None  # the latest, and why
        self._start_error_logged: tuple[str, float] | None = None  # reason, when
        self._waiting: deque[p.Assignment] = deque()
        self._suspects: set[tuple[int, int]] = set()  # (ticket, attempt)
        # Tasks given up (see release) still in a child's pipe: their
        # outcomes are dropped, and a child whose running batch holds one is
        # stopped.
        self._released: set[tuple[int, int]] = set()
        # As the worker's line on tasks taken back: routine for a client that
        # cancels a lot.
        self._stops_of_released = Routine(__name__, TAKEN_BACK_FIRST_INTERVAL_S)
        self._timeouts = _timeout_routine()
        # Per function: a batch is sized by how long its own function runs.
        self._task_s: dict[str, TaskDuration] = {}
        self._children = [self._spawn() for _ in range(size)]
        self._fds: tuple[int, ...] = ()
        self._by_fd: dict[int, _Child] = {}
        self._index_children()
        # Children with a batch not fully written, as the worker polls them.
        self._write_fds: tuple[int, ...] = ()
        self._next_liveness_check = 0.0
        # The earliest deadline of a running task, as of the last collect():
        # every task starts there, so until then no other can pass first.
        self._next_deadline: float | None = None
        # Whether a task with a timeout may be in a pipe: set when one is sent,
        # cleared when a look at the pipes finds none.
        self._timed_in_pipes = False

    def _spawn(self, failed_starts: int = 0) -> _Child:
        # A fresh interpreter per child rather than fork: the worker holds a
        # ZeroMQ context whose I/O threads a forked child would inherit broken.
        parent_end, child_end = socket.socketpair()
        progress, progress_fd = Progress.create()
        mark = f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ventilator._child",
                    str(child_end.fileno()),
                    str(progress_fd),
                    str(os.getpid()),
                    "pickle" if self._allow_pickle else "no-pickle",
                    *self._modules,
                ],
                pass_fds=[child_end.fileno(), progress_fd],
                stdin=subprocess.DEVNULL,
                env={**os.environ, TASK_PROCESS_ENV: mark},
            )
        finally:
            child_end.close()
            os.close(progress_fd)
        parent_end.setblocking(False)
        # Room for the batches a child holds, so that feeding it rarely has to
        # wait for the socket to become writable (the kernel caps this).
        parent_end.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, PIPELINE_DEPTH * BATCH_BYTES
        )
        return _Child(
            process,
            parent_end,
            Inbox(parent_end),
            Outbox(parent_end),
            progress,
            mark,
            spawned_at=time.monotonic(),
            failed_starts=failed_starts,
        )

    def _index_children(self) -> None:
        self._fds = tuple(child.fileno() for child in self._children)
        self._by_fd = {child.fileno(): child for child in self._children}
        self._update_starts_failing()

    def _update_starts_failing(self) -> None:
        # No child ready, and none that may become so without having failed.
        self._starts_failing = not any(
            child.ready or not child.failed_starts for child in self._children
        )

    def unable(self) -> str | None:
        if not self._starts_failing or self._start_error is None:
            return None
        return f"task processes cannot start: {self._start_error[0]}"

    def fds(self) -> Sequence[int]:
        return self._fds

    def write_fds(self) -> Sequence[int]:
        # The same tuple until it changes: the worker's poll compares it each
        # turn, and re-registers its descriptors only when it did.
        return self._write_fds

    def submit(self, task: p.Assignment, now: float) -> None:
        self._waiting.append(task)

    def load(self) -> int:
        in_pipes = sum(len(batch) for c in self._children for batch in c.sent)
        return len(self._waiting) + in_pipes

    def drop_waiting(self) -> int:
        dropped = len(self._waiting)
        self._waiting.clear()
        return dropped

    def held(self) -> list[tuple[int, int]]:
        waiting = [(task.ticket, task.attempt) for task in self._waiting]
        held = [*self._in_pipes(), *waiting]
        if self._released:
            return [key for key in held if key not in self._released]
        return held

    def release(self, tickets: Collection[tuple[int, int]]) -> int:
        released = set(tickets).intersection(self.held())
        if released:
            self._released |= released
            self._withdraw_released(released)
            self._drop_waiting_released()
            self._settle_released([])
        return len(released)

    def _withdraw_released(self, released: set[tuple[int, int]]) -> None:
        """Take back the batches behind a child's running one if they hold a
        released task: the child skips them, rather than be stopped for it
        once it gets there (see _withdraw); their other tasks wait again."""
        for child in self._children:
            behind = islice(child.sent, 1, None)
            if any(
                (r.task.ticket, r.task.attempt) in released for b in behind for r in b
            ):
                self._withdraw(child)

    def _drop_waiting_released(self) -> None:
        self._waiting = deque(
            t for t in self._waiting if (t.ticket, t.attempt) not in self._released
        )

    def _settle_released(self, outcomes: list[p.Outcome]) -> list[p.Outcome]:
        """Act on what was released and is still in a pipe: stop the children
        running it, and remember only what is still there. Return `outcomes`
        without those of released tasks."""
        kept = [o for o in outcomes if (o.ticket, o.attempt) not in self._released]
        if self._stop_children_running_released():
            # Their pipes' tasks wait again, but for those released.
            self._drop_waiting_released()
        self._released = self._released.intersection(self._in_pipes())
        return kept

    def _stop_children_running_released(self) -> bool:
        """Stop each child whose running batch holds a released task: a long
        one would hold its slot to the end. The rest of that batch runs again
        (a batch is short work, unless its function's run time is not known
        yet); a released task further down a pipe was taken back from it
        (see _withdraw_released). Return whether it stopped any."""
        stopping = [c for c in self._children if c.sent and self._runs_released(c)]
        for child in stopping:
            self._stop_released(child)
        return bool(stopping)

    def _in_pipes(self) -> list[tuple[int, int]]:
        """(ticket, attempt) of every task written to a child, not reported;
        each child's running batch before those behind it."""
        return [
            (r.task.ticket, r.task.attempt)
            for child in self._children
            for batch in child.sent
            for r in batch
        ]

    def _runs_released(self, child: _Child) -> bool:
        return any(
            (r.task.ticket, r.task.attempt) in self._released for r in child.sent[0]
        )

    def _stop_released(self, child: _Child) -> None:
        others = sum(
            (r.task.ticket, r.task.attempt) not in self._released
            for batch in child.sent
            for r in batch
        )
        self._stops_of_released.log(
            time.monotonic(),
            1,
            "stopping task process pid=%d: it runs a task the broker took back "
            "(other tasks in its pipe, which wait again: %d); starting a new one",
            child.process.pid,
            others,
        )
        self._swap_child(child)

    def _feed(self, now: float) -> None:
        """Top up the children's pipes, idle children first."""
        while self._waiting:
            # A child whose slot failed to start gets tasks once it is ready:
            # they would only travel back and forth while the deploy is broken.
            child = min(
                (c for c in self._children if c.ready or not c.failed_starts),
                key=lambda c: len(c.sent),
                default=None,
            )
            if child is None or len(child.sent) >= PIPELINE_DEPTH:
                return
            self._send(child, self._next_batch(), now)

    def _withdraw_held_up(self, now: float) -> None:
        """Take back the tasks each child held up by a long task has not
        started, in its batch and behind it in its pipe, for a child that
        idles: they would wait as long, for ever behind a task that hangs,
        while it idles. Nothing is taken back while tasks wait here: an idle
        child gets those first."""
        if self._waiting or not any(c.ready and not c.sent for c in self._children):
            return
        for child in self._children:
            running = self._held_up_at(child, now)
            if running is not None and self._unstarted_in(child, running):
                log.info(
                    "task process pid=%d has run one task for %.1fs; the %s "
                    "it has not started go to another",
                    child.process.pid,
                    now - child.sent[0][0].started,
                    counted(self._withdraw(child, running + 1), "task"),
                )

    def give_up_held_up(self, now: float) -> int:
        held_up = [self._held_up_at(c, now) for c in self._children]
        if not held_up or None in held_up:
            return 0
        for child, running in zip(self._children, held_up, strict=True):
            assert running is not None
            self._withdraw(child, running + 1)
        return self.drop_waiting()

    def _held_up_at(self, child: _Child, now: float) -> int | None:
        """Where in `child.sent[0]` the task `child` runs is, if it has run
        that batch for HELD_UP_S and more (since its last report); else None."""
        if not child.ready or not child.sent or not child.sent[0]:
            return None
        if now - child.sent[0][0].started < HELD_UP_S:
            return None
        # None between tasks too: about to start the next, not held up.
        return _running_in_head(child)

    def _unstarted_in(self, child: _Child, running: int) -> bool:
        """Whether `child`, running the task `sent[0][running]`, holds tasks it
        has not started: later in that batch, or behind it."""
        return len(child.sent[0]) > running + 1 or any(islice(child.sent, 1, None))

    def _withdraw(self, child: _Child, from_place: int | None = None) -> int:
        """Take back the tasks `child` has not started: those of its running
        batch from `sent[0][from_place]` on (none when None), and every batch
        behind it; return how many. They go to the head of the queue, in
        order. The child reads in its note that they were taken back, and
        skips them (see _progress); the batches behind stay in `sent`, empty,
        as the child still answers them. Should it start one just as it is
        taken back, that task runs twice, and the outcome of its other run
        counts (see _report)."""
        head, *behind = child.sent
        number = child.batches_reported + 1
        if from_place is None:
            cut, from_place = (number + 1, 0), len(head)
        else:
            cut = (number, child.reported_early + from_place)
        child.progress.withdraw(*cut, through=number + len(behind))

        taken = [head[from_place:], *behind]
        for batch in reversed(taken):
            self._waiting.extendleft(r.task for r in reversed(batch))
        child.sent = deque([head[:from_place], *([] for _ in behind)])
        return sum(len(batch) for batch in taken)

    def _next_batch(self) -> list[p.Assignment]:
        first = self._waiting.popleft()
        if not self._batchable(first):
            return [first]

        # Share what waits among the children (the first task included, or two
        # tasks for two idle children would go to one), in batches of bounded
        # work, each of one function, whose run time sizes it.
        share = -(-(len(self._waiting) + 1) // len(self._children))
        size = min(self._duration_of(first.function).batch_size(), share)
        batch, batch_bytes = [first], len(first.payload)
        while len(batch) < size and self._joins(first, batch_bytes):
            batch_bytes += len(self._waiting[0].payload)
            batch.append(self._waiting.popleft())
        return batch

    def _joins(self, first: p.Assignment, batch_bytes: int) -> bool:
        """Whether the next waiting task may join the batch `first` began."""
        if not self._waiting:
            return False
        task = self._waiting[0]
        return (
            task.function == first.function
            and self._batchable(task)
            and batch_bytes + len(task.payload) <= BATCH_BYTES
        )

    def _batchable(self, task: p.Assignment) -> bool:
        # An item of a map's batch that died has that death counted already:
        # in a batch that died, it would run once more alone, uncounted.
        return (
            not task.timeout_s
            and not task.flags & _SPLIT
            and (task.ticket, task.attempt) not in self._suspects
        )

    def _duration_of(self, function: str) -> TaskDuration:
        duration = self._task_s.get(function)
        if duration is None:
            if len(self._task_s) >= MAX_FUNCTIONS_TIMED:
                self._task_s.clear()  # pickled callables have endless names
            duration = self._task_s[function] = TaskDuration()
        return duration

    def _send(self, child: _Child, batch: list[p.Assignment], now: float) -> None:
        if batch[0].timeout_s:
            self._timed_in_pipes = True
        child.sent.append([_Running(task, started=now) for task in batch])
        rows = [(task.function, task.flags) for task in batch]
        child.outbox.put(frame(rows, [task.payload for task in batch]))
        self._flush(child)

    def _flush(self, child: _Child) -> None:
        """Write what the child's socket takes now; the rest waits until the
        worker's loop sees it writable (`write_fds`)."""
        try:
            child.outbox.flush()
        except OSError:
            # A dead child: its pipe reads end-of-file, and collect() requeues
            # its batches.
            child.outbox.clear()
        writing = child.fileno() in self._write_fds
        if bool(child.outbox) != writing:
            self._update_write_fds()

    def _update_write_fds(self) -> None:
        self._write_fds = tuple(c.fileno() for c in self._children if c.outbox)

    def collect(self, now: float, readable: Collection[int] = ()) -> list[p.Outcome]:
        outcomes: list[p.Outcome] = []
        if self._resting:
            self._restart_rested(now)
        for fd in self._write_fds:
            self._flush(self._by_fd[fd])
        # Now and then, read every pipe and look at every process, whatever
        # poll said: a task may hold a dead child's pipe open. And when a task
        # may have run past its timeout, look at every child for it.
        check_all = now >= self._next_liveness_check
        if check_all:
            self._next_liveness_check = now + LIVENESS_CHECK_S
        deadline = self._next_deadline
        if check_all or (deadline is not None and now >= deadline):
            for child in list(self._children):
                read = check_all or child.fileno() in readable
                self._look_after(child, read, check_all, outcomes, now)
        else:
            # The usual turn: read only the pipes poll found readable.
            for fd in readable:
                polled = self._by_fd.get(fd)
                if polled is not None:
                    self._look_after(polled, True, False, outcomes, now)
        if self._released:
            outcomes = self._settle_released(outcomes)
        if check_all:
            self._withdraw_held_up(now)
            self._timeouts.flush(now)
            self._stops_of_released.flush(now)
        self._feed(now)
        self._next_deadline = self._earliest_deadline()
        return outcomes

    def _look_after(
        self,
        child: _Child,
        read: bool,
        check_process: bool,
        outcomes: list[p.Outcome],
        now: float,
    ) -> None:
        """Collect what `child` finished (if `read`), and replace it if it was
        lost, overran or never started (looking at its process if
        `check_process`)."""
        health = self._health(child, read, check_process, outcomes, now)
        if health != "healthy":
            self._give_up(child, health, outcomes, now)

    def _give_up(
        self, child: _Child, health: _Health, outcomes: list[p.Outcome], now: float
    ) -> None:
        """Replace a child that was lost, overran or never started; blame its
        task if it was lost while running one."""
        if not child.ready:
            self._failed_start(child, health, now)
            return
        if health == "lost" and child.sent and child.sent[0]:
            ended = _how_it_ended(child.process)
            culprit = _running_in_head(child)
            # Past the batch: it died running a task just taken back from it
            # (see _withdraw), blamed nowhere; the batch goes again, unblamed.
            if culprit is None or culprit < len(child.sent[0]):
                self._blame(child.sent.popleft(), culprit, outcomes, now, ended)
        self._swap_child(child)

    def _swap_child(self, child: _Child) -> None:
        """A new child in `child`'s slot; the tasks in its pipe wait again."""
        index = self._children.index(child)
        self._retire(child)
        self._children[index] = self._spawn()
        self._index_children()
        self._update_write_fds()

    def _health(
        self,
        child: _Child,
        read: bool,
        check_process: bool,
        outcomes: list[p.Outcome],
        now: float,
    ) -> _Health:
        """Collect what `child` finished, and say how it is (see `_Health`)."""
        if read:
            try:
                for reports, results in child.inbox.read():
                    if child.ready:
                        self._finished(child, reports, results, outcomes, now)
                    else:
                        self._started(child, reports, results, now)
            except (EOFError, OSError, ValueError, IndexError, TypeError):
                return "lost"  # gone, or garbled: either way a new child
        if check_process and not _alive(child.process):
            return "lost"
        if check_process and self._stuck_starting(child, now):
            return "unstarted"
        return "overran" if self._overran(child, outcomes, now) else "healthy"

    def _started(
        self, child: _Child, reports: list[list[Any]], results: list[Any], now: float
    ) -> None:
        """A new child's first message. Empty: it is ready; the batch waiting
        in its pipe starts now, and so does the timeout of its task. With a
        reason and a traceback: it cannot import its modules, and leaves."""
        if reports and reports[0][0] == CANNOT_START:
            details = bytes(results[0]).decode(errors="replace")
            child.start_error = (str(reports[0][1]), details)
            return
        if reports:
            raise ValueError("a task process reported a batch before it was ready")
        child.ready = True
        if child.failed_starts:
            self._update_starts_failing()
            log.info(
                "task process pid=%d started after %d failed starts of its slot; "
                "it runs tasks again",
                child.process.pid,
                child.failed_starts,
            )
        if child.sent:
            for running in child.sent[0]:
                running.started = now

    def _stuck_starting(self, child: _Child, now: float) -> bool:
        # Reported as a failed start (see _failed_start), its tasks unblamed.
        return not child.ready and now - child.spawned_at >= CHILD_START_TIMEOUT_S

    def _finished(
        self,
        child: _Child,
        reports: list[list[Any]],
        results: list[Any],
        outcomes: list[p.Outcome],
        now: float,
    ) -> None:
        """Turn a batch's reports into outcomes; the next batch starts now."""
        if not child.sent:
            raise ValueError("a task process reported a batch it was not given")
        if reports and reports[0] == [EARLY]:
            self._finished_early(child, reports[1:], results[1:], outcomes, now)
            return
        child.batches_reported += 1
        child.reported_early = 0
        batch = child.sent.popleft()
        if len(reports) < len(batch) or len(results) != len(reports):
            raise ValueError("a task process reported less than it was given")
        self._report(child, batch, reports, results, outcomes, now)
        if child.sent:
            for running in child.sent[0]:
                running.started = now

    def _finished_early(
        self,
        child: _Child,
        reports: list[list[Any]],
        results: list[Any],
        outcomes: list[p.Outcome],
        now: float,
    ) -> None:
        """Turn the reports of the first tasks of the running batch, sent
        while a later one runs long, into outcomes; the rest of the batch
        runs from now, as far as the held-up check goes."""
        if not reports or len(results) != len(reports):
            raise ValueError("a task process reported early nothing it ran")
        head = child.sent[0]
        reported = min(len(reports), len(head))
        self._report(child, head[:reported], reports, results, outcomes, now)
        del head[:reported]
        child.reported_early += len(reports)
        for running in head:
            running.started = now

    def _report(
        self,
        child: _Child,
        batch: list[_Running],
        reports: list[list[Any]],
        results: list[Any],
        outcomes: list[p.Outcome],
        now: float,
    ) -> None:
        """Add the outcomes of `batch`, the first of `reports` and `results`.
        Reports beyond it are of tasks taken back from it (see _withdraw),
        which another child runs: had this one started one just before, its
        outcome is dropped here."""
        kept = len(batch)
        for running, (status, duration_s), result in zip(
            batch, reports[:kept], results[:kept], strict=True
        ):
            self._duration_of(running.task.function).observe(duration_s)
            self._suspects.discard((running.task.ticket, running.task.attempt))
            if running.ran_past_timeout(duration_s):
                outcomes.append(running.timed_out(now, _NOT_STOPPED_IN_TIME))
                self._say_timed_out(running.task, now, child, stopped=False)
            else:
                outcomes.append(running.outcome(_STATUSES[status], result, now))

    def _overran(self, child: _Child, outcomes: list[p.Outcome], now: float) -> bool:
        if not child.ready or not child.sent or len(child.sent[0]) != 1:
            return False  # only single tasks carry a timeout
        running = child.sent[0][0]
        deadline = running.deadline()
        if deadline is None or now < deadline:
            return False
        outcomes.append(running.timed_out(now))
        child.sent.popleft()
        self._say_timed_out(running.task, now, child, stopped=True)
        return True

    def _say_timed_out(
        self, task: p.Assignment, now: float, child: _Child, stopped: bool
    ) -> None:
        # As the thread pool says it: the client was told TaskTimeout, and
        # the operator looks for it in this worker's log.
        self._timeouts.log(
            now,
            1,
            "task ran past its timeout and %s ticket=%d function=%s "
            "timeout_s=%g pid=%d; %s",
            "was stopped" if stopped else _NOT_STOPPED_HERE,
            task.ticket,
            task.function,
            task.timeout_s,
            child.process.pid,
            "its task process is killed and a new one takes its slot"
            if stopped
            else "its result is dropped",
        )

    def _retire(self, child: _Child) -> None:
        """Stop `child`; what is left in its pipe goes back to the head of
        the queue, in order, for another child. The caller has taken out the
        task it blamed or reported; a batch it stopped for a released task
        goes back whole, that task dropped afterwards (see _settle_released)."""
        for batch in reversed(child.sent):
            self._waiting.extendleft(r.task for r in reversed(batch))
        child.sent.clear()
        self._stop_child(child, at_once=True)

    def _failed_start(self, child: _Child, health: _Health, now: float) -> None:
        """A child died or hung before it was ready: no task of its is to
        blame. Its slot rests, longer after each failure in a row."""
        error = self._start_error = _why_not_started(child, health)
        self._retire(child)
        self._children.remove(child)
        failed_starts = child.failed_starts + 1
        delay_s = self._restart_backoff.delay_s(failed_starts, random.random())
        self._resting.append(_Resting(now + delay_s, failed_starts))
        self._index_children()
        self._update_write_fds()
        self._report_start_failure(error, failed_starts, delay_s, now)

    def _report_start_failure(
        self, error: tuple[str, str], failed_starts: int, delay_s: float, now: float
    ) -> None:
        """Log why a task process cannot start: at once, then now and then, or
        at once again if the reason changed; the traceback with a new reason."""
        reason, details = error
        last = self._start_error_logged
        new_reason = last is None or last[0] != reason
        if (
            last is not None
            and not new_reason
            and now - last[1] < START_FAILURE_REPEAT_S
        ):
            log.debug("task process failed to start again: %s", reason)
            return
        self._start_error_logged = (reason, now)
        traceback = details.rstrip() if new_reason and details else ""
        log.error(
            "task process for %s cannot start: %s; %s (%d failed starts in a "
            "row; next try in %.1fs, then less often, up to %gs apart)%s",
            ", ".join(self._modules),
            reason,
            "no task runs here until one starts"
            if self._starts_failing
            else "the other task processes run its tasks",
            failed_starts,
            delay_s,
            self._restart_backoff.cap_s,
            f"\n{traceback}" if traceback else "",
            # Under the line in text; in JSON, under "exception".
            extra={REMOTE_TRACEBACK: traceback},
        )

    def _restart_rested(self, now: float) -> None:
        """Start a child in each slot whose rest is over."""
        due = [slot for slot in self._resting if slot.restart_at <= now]
        if not due:
            return
        self._resting = [slot for slot in self._resting if slot.restart_at > now]
        self._children += [self._spawn(slot.failed_starts) for slot in due]
        self._index_children()

    def _blame(
        self,
        batch: list[_Running],
        culprit: int | None,
        outcomes: list[p.Outcome],
        now: float,
        ended: str,
    ) -> None:
        """Report the task that killed its child, or find out which one did.

        `culprit` is the place in `batch` of the task the child was running
        when it died, as its progress note says; None if it was between tasks.
        """
        if len(batch) == 1:
            # Between tasks too: blamed, or a child that keeps dying on its
            # result would never let its task fail.
            culprit = 0
        if culprit is not None:
            self._blame_one(batch, culprit, outcomes, now, ended)
            return

        # The child died between tasks; running them one by one tells which
        # killed it, so that the others are not blamed for it. But a map's batch
        # is blamed at once: its map runs its items alone, each with this death
        # counted, and a run of it here would cost its poison item one more
        # run than it counts.
        suspects = [r for r in batch if not r.task.flags & _BATCH]
        blamed = [r for r in batch if r.task.flags & _BATCH]
        log.warning(
            "task process died running a batch of %s function=%s (%s); %s of "
            "it reported as crashed, the other tasks run one at a time",
            counted(len(batch), "task"),
            batch[0].task.function,
            ended,
            counted(len(blamed), "map batch", "map batches"),
        )
        report = crash_report(ended)
        outcomes.extend(r.outcome(p.Status.CRASHED, report, now) for r in blamed)
        self._suspects.update((r.task.ticket, r.task.attempt) for r in suspects)
        self._waiting.extendleft(r.task for r in reversed(suspects))

    def _blame_one(
        self,
        batch: list[_Running],
        culprit: int,
        outcomes: list[p.Outcome],
        now: float,
        ended: str,
    ) -> None:
        """Report the task at `culprit` as crashed, this death counted
        against it alone; the others of its batch go again, unblamed (those
        before it ran, but their outcomes died with the child)."""
        running = batch[culprit]
        log.warning(
            "task process died ticket=%d attempt=%d function=%s (%s); starting a "
            "new one%s",
            running.task.ticket,
            running.task.attempt,
            running.task.function,
            ended,
            f", and running again the {len(batch) - 1} other tasks of its batch"
            if len(batch) > 1
            else "",
        )
        outcomes.append(running.outcome(p.Status.CRASHED, crash_report(ended), now))
        innocents = batch[:culprit] + batch[culprit + 1 :]
        self._waiting.extendleft(r.task for r in reversed(innocents))

    def next_deadline(self) -> float | None:
        if not self._resting:
            return self._next_deadline
        restart_at = min(slot.restart_at for slot in self._resting)
        deadline = self._next_deadline
        return restart_at if deadline is None else min(deadline, restart_at)

    def _earliest_deadline(self) -> float | None:
        if not self._timed_in_pipes:
            return None  # the usual case: no task in a pipe has a timeout
        earliest = None
        timed = False
        for child in self._children:
            # Only single tasks carry a timeout (see _batchable).
            timed = timed or any(
                batch and batch[0].task.timeout_s for batch in child.sent
            )
            if child.ready and child.sent and len(first := child.sent[0]) == 1:
                deadline = first[0].deadline()
                if deadline is not None and (earliest is None or deadline < earliest):
                    earliest = deadline
        self._timed_in_pipes = timed
        return earliest

    def close(self, at_once: bool = False) -> None:
        if at_once:
            # Abandoned: the broker runs them again, so they must not run on.
            for child in self._children:
                self._stop_child(child, at_once=True, closing=True)
            return
        for child in self._children:
            # Best effort: batches not written yet are dropped, and end-of-file
            # tells the child to leave once it has run what is in its pipe.
            child.outbox.clear()
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + CHILD_EXIT_GRACE_S
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
            self._stop_child(child, at_once=False, closing=True)

    def _stop_child(self, child: _Child, at_once: bool, closing: bool = False) -> None:
        """Stop `child` and whatever its tasks started; `closing`: the pool
        is closing, so what is ended is no news worth a WARNING."""
        if _alive(child.process):
            # What its task started goes first, or it would run on, adopted by
            # init: a command, a task's own subprocess, and theirs.
            _proctree.kill_descendants(child.process.pid)
            child.process.kill() if at_once else child.process.terminate()
            try:
                child.process.wait(CHILD_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        child.sock.close()
        child.progress.close()
        _end_leftovers(child, logging.INFO if closing else logging.WARNING)


# Status by value: indexing costs less than calling the enum, once per task.
_STATUSES = tuple(p.Status)


def _end_leftovers(child: _Child, level: int) -> None:
    """Kill what a gone child's tasks started and left running: adopted by
    init when the child died, no walk of its tree finds them any more."""
    left = _proctree.kill_marked(TASK_PROCESS_ENV, [child.mark])
    if left:
        log.log(
            level,
            "killed %s that tasks of task process pid=%d started and left running: %s",
            counted(len(left), "process", "processes"),
            child.process.pid,
            ", ".join(map(str, left)),
        )


def crash_report(ended: str) -> bytes:
    """The report a CRASHED outcome carries: how its task process ended
    ("exit code 9", "killed by SIGKILL"), for the broker to tell the client
    when the task fails as poison."""
    return pack_error(TaskError(p.PROCESS_DIED, ended))


def _running_in_head(child: _Child) -> int | None:
    """Where in `child.sent[0]` the task its progress note says it runs is:
    its place in the batch, less the tasks reported early; None between
    tasks, or when the note is of another batch."""
    place = child.progress.running_task(child.batches_reported + 1)
    return None if place is None else place - child.reported_early


def _how_it_ended(process: subprocess.Popen[bytes]) -> str:
    """A lost child's end in words, for the log. Its pipe closes an instant
    before the process is gone: wait that instant, not longer."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=REAP_WAIT_S)
    if process.returncode is None:
        return "still exiting"
    return how_it_ended(process.returncode)


def _why_not_started(child: _Child, health: _Health) -> tuple[str, str]:
    """Why a child never became ready, in one line, and its traceback if any."""
    if child.start_error is not None:
        return child.start_error
    if health == "unstarted":
        return f"it did not finish importing in {CHILD_START_TIMEOUT_S:.0f}s", ""
    return f"it ended before it was ready ({_how_it_ended(child.process)})", ""


def _alive(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is None


# --- threads ---------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _ThreadTask:
    """A task handed to a thread, and what became of it; `lock` settles the
    race between the thread finishing it and the pool giving up on it."""

    running: _Running
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread_id: int | None = None  # the native id of the thread running it
    finished: bool = False  # the thread has its result
    abandoned: bool = False  # timed out: its result is dropped
    replaced: bool = False  # a fresh thread took its slot: this one leaves


# What a task process's task that ran past its timeout before this worker
# could stop it says (the worker stood still meanwhile).
_NOT_STOPPED_IN_TIME = (
    "was not stopped in time, as its worker stood still meanwhile (paused or "
    "starved of CPU); its result was dropped"
)
# Why a thread pool gives up on a task, most often.
_PAST_TIMEOUT = "ran past its timeout"
# The same, in the worker's log.
_NOT_STOPPED_HERE = (
    "was not stopped in time, as this worker stood still meanwhile (paused or "
    "starved of CPU)"
)
# What a thread pool says of a task past its timeout.
_RUNS_ON = (
    "could not be stopped: it runs on in the background and its result will be dropped"
)


def _end_commands_of(handed: _ThreadTask) -> list[int]:
    """Kill the processes the thread running a timed-out task started, and
    theirs; return the ones it started. The thread itself cannot be stopped,
    but a command it waits for ends, and it may return then."""
    if handed.thread_id is None:
        return []  # not started yet
    commands = _proctree.children_of_thread(handed.thread_id)
    if commands:
        _proctree.kill_trees(commands)
    return commands


def _killed_commands(commands: list[int]) -> str:
    if not commands:
        return ""
    return f"; the processes it started were killed: {', '.join(map(str, commands))}"


class ThreadPool:
    """Threads for I/O-bound tasks; a pipe wakes the worker when one ends.

    A task past its timeout cannot be stopped: its thread is abandoned and,
    while fewer than `max_stuck` are, a fresh thread takes its slot. The
    abandoned thread leaves once its task returns.
    """

    def __init__(
        self,
        size: int,
        modules: Sequence[str],
        allow_pickle: bool,
        max_stuck: int = MAX_STUCK_THREADS,
    ) -> None:
        self._functions = load_functions(modules)
        self._allow_pickle = allow_pickle
        self._size = size
        self._max_stuck = max_stuck
        # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an
        # executor's threads at exit, so a worker told to leave at once would
        # still wait for a task that may never return.
        self._inbox: queue.SimpleQueue[_ThreadTask | None] = queue.SimpleQueue()
        self._spawned = 0
        for _ in range(size):
            self._start_thread()
        self._done: queue.SimpleQueue[tuple[_ThreadTask, p.Status, bytes]] = (
            queue.SimpleQueue()
        )
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        # An abandoned thread may return after close(): it must not write to
        # the pipe's descriptor number, which may belong to someone else by
        # then (it once fed a byte into a task process's socket).
        self._wake_lock = threading.Lock()
        self._closed = False
        self._waiting: deque[p.Assignment] = deque()
        self._running: dict[tuple[int, int], _ThreadTask] = {}
        self._stuck = 0  # abandoned threads still running their task
        self._stuck_in_slot = 0  # of those, the ones no fresh thread replaced
        self._timeouts = _timeout_routine()

    def _start_thread(self) -> None:
        self._spawned += 1
        threading.Thread(
            target=self._serve, name=f"ventilator-task-{self._spawned}", daemon=True
        ).start()

    def fds(self) -> Sequence[int]:
        return (self._wake_read,)

    def write_fds(self) -> Sequence[int]:
        return ()  # tasks go to threads through a queue

    def submit(self, task: p.Assignment, now: float) -> None:
        self._waiting.append(task)
        self._feed(now)

    def load(self) -> int:
        return len(self._waiting) + len(self._running)

    def drop_waiting(self) -> int:
        dropped = len(self._waiting)
        self._waiting.clear()
        return dropped

    def give_up_held_up(self, now: float) -> int:
        busy = len(self._running) + self._stuck_in_slot >= self._size
        if not busy or any(
            now - handed.running.started < HELD_UP_S
            for handed in self._running.values()
        ):
            return 0
        return self.drop_waiting()

    def held(self) -> list[tuple[int, int]]:
        # An abandoned task has left `_running`: its outcome was reported.
        waiting = [(task.ticket, task.attempt) for task in self._waiting]
        return [*self._running, *waiting]

    def release(self, tickets: Collection[tuple[int, int]]) -> int:
        # A thread cannot be stopped: a running task's thread is abandoned,
        # as one past its timeout is, and its result dropped.
        released = set(tickets)
        held = len(self._waiting)
        self._waiting = deque(
            t for t in self._waiting if (t.ticket, t.attempt) not in released
        )
        count = held - len(self._waiting)
        for key in released.intersection(self._running):
            if self._abandon(self._running[key], "was taken back by the broker"):
                del self._running[key]
                count += 1
        return count

    def _feed(self, now: float) -> None:
        while self._waiting and len(self._running) + self._stuck_in_slot < self._size:
            task = self._waiting.popleft()
            handed = _ThreadTask(_Running(task, started=now))
            self._running[(task.ticket, task.attempt)] = handed
            self._inbox.put(handed)

    def _serve(self) -> None:
        while (handed := self._inbox.get()) is not None:
            if not self._run(handed):
                return  # abandoned and replaced: a fresh thread has the slot

    def _run(self, handed: _ThreadTask) -> bool:
        """Run a task and post its result; say whether this thread serves on."""
        task = handed.running.task
        handed.thread_id = threading.get_native_id()
        status, result = run_task(
            self._functions, self._allow_pickle, task.function, task.flags, task.payload
        )
        with handed.lock:
            handed.finished = True
            serve_on = not handed.replaced
        self._done.put((handed, status, result))
        with self._wake_lock, contextlib.suppress(BlockingIOError):
            if not self._closed:  # a full pipe: the worker is awake already
                os.write(self._wake_write, b"x")
        return serve_on

    def collect(self, now: float, readable: Collection[int] = ()) -> list[p.Outcome]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 65536)
        self._timeouts.flush(now)

        outcomes = []
        while not self._done.empty():
            handed, status, result = self._done.get()
            if handed.abandoned:
                self._stuck_returned(handed)
                continue
            task = handed.running.task
            del self._running[(task.ticket, task.attempt)]
            outcomes.append(handed.running.outcome(status, result, now))

        for key, handed in list(self._running.items()):
            deadline = handed.running.deadline()
            if deadline is not None and now >= deadline and self._abandon(handed):
                del self._running[key]
                outcomes.append(handed.running.timed_out(now, _RUNS_ON))

        self._feed(now)
        return outcomes

    def _abandon(self, handed: _ThreadTask, why: str = _PAST_TIMEOUT) -> bool:
        """Give up on a task past its timeout (or `why` else), freeing its
        slot if the cap on stuck threads allows; False if it finished
        meanwhile (its result is on its way, and counts)."""
        replace = self._stuck < self._max_stuck
        with handed.lock:
            if handed.finished:
                return False
            handed.abandoned = True
            handed.replaced = replace
            # Under the lock: the thread cannot have moved on to another task,
            # whose commands these would be.
            commands = _end_commands_of(handed)
        self._stuck += 1
        if replace:
            self._start_thread()
        else:
            self._stuck_in_slot += 1
        self._say_abandoned(handed.running.task, why, replace, commands)
        return True

    def _say_abandoned(
        self, task: p.Assignment, why: str, replaced: bool, commands: list[int]
    ) -> None:
        """A WARNING while a fresh thread took the slot; an ERROR once the cap
        on stuck threads costs the worker a slot."""
        if replaced:
            message = (
                "task %s and cannot be stopped ticket=%d function=%s; it runs "
                "on in the background (%d of at most %d stuck threads) and a "
                "fresh thread takes its slot%s"
            )
            args = (
                why,
                task.ticket,
                task.function,
                self._stuck,
                self._max_stuck,
                _killed_commands(commands),
            )
            if why == _PAST_TIMEOUT:  # may come in floods, as a process pool's
                self._timeouts.log(time.monotonic(), 1, message, *args)
            else:
                log.warning(message, *args)
            return
        log.error(
            "task %s and cannot be stopped ticket=%d "
            "function=%s; %s stuck, the limit, so it keeps its "
            "slot until it returns: this worker serves fewer tasks at once%s",
            why,
            task.ticket,
            task.function,
            counted(self._stuck, "thread"),
            _killed_commands(commands),
        )

    def _stuck_returned(self, handed: _ThreadTask) -> None:
        """An abandoned task returned; its result is not wanted."""
        self._stuck -= 1
        if not handed.replaced:
            self._stuck_in_slot -= 1  # its thread serves its slot again
        log.info(
            "an abandoned task returned late ticket=%d; result dropped, %s still stuck",
            handed.running.task.ticket,
            counted(self._stuck, "thread"),
        )

    def unable(self) -> str | None:
        # Threads run in the worker, which imported the modules: only stuck
        # threads keep tasks from running here.
        if self._stuck_in_slot < self._size:
            return None
        return (
            f"every slot holds a thread stuck in a task it gave up on "
            f"({counted(self._stuck, 'thread')} stuck, the limit being "
            f"{self._max_stuck}); serving again once one returns"
        )

    def next_deadline(self) -> float | None:
        deadlines = [h.running.deadline() for h in self._running.values()]
        return min((d for d in deadlines if d is not None), default=None)

    def close(self, at_once: bool = False) -> None:
        # Threads cannot be stopped: with `at_once`, those running a task end
        # with the process (they are daemons).
        for _ in range(self._spawned):
            self._inbox.put(None)
        with self._wake_lock:
            self._closed = True
            os.close(self._wake_read)
            os.close(self._wake_write)

"""The deadlines the broker enforces on running tasks: their terms, and a heap.

`LeaseTerms` says when a running task's deadline is (its timeout, and a grace
for its worker to report it), and how long the broker leaves a worker's tasks
to the worker's own timeouts. `DeadlineHeap` orders the deadlines.

A task with a timeout gets an entry ``(deadline, ticket, attempt)`` when its
clock starts (see `Scheduler._arm`). Entries are never searched for: one whose
task finished, went back to its queue or was re-armed since stays in the heap,
and its owner skips it when it comes due. Which entries still stand for a
running task is the scheduler's to say, through the `armed_task` lookup it
hands the heap; the heap only orders them and keeps the stale ones bounded.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Task

__all__ = [
    "DEADLINE_HEAP_SLACK",
    "LEASE_GRACE_BEATS",
    "START_GRACE_BEATS",
    "DeadlineEntry",
    "DeadlineHeap",
    "LeaseTerms",
]

# How long past a task's timeout_s the broker waits for its worker to report
# the timeout itself, in heartbeat intervals. A worker notices a timeout at
# once, but stopping the task (killing its process, starting another) and the
# report's trip can take a moment on a loaded machine; three beats is also how
# long the broker lets a worker stay silent before it is presumed dead. Only a
# worker that does not enforce timeouts (hung, or not ours) is ever overtaken.
LEASE_GRACE_BEATS = 3
# How long, in heartbeat intervals, a worker that has reported nothing since it
# registered may keep tasks past their deadlines: its task processes may still
# be importing modules (a few seconds for the heavy ones) before any task of
# it starts. Past it, a worker that never reports is overtaken all the same.
START_GRACE_BEATS = 10

# Stale entries the heap may keep beyond twice the running tasks before it is
# rebuilt (see `DeadlineHeap.take_due`).
DEADLINE_HEAP_SLACK = 1024

DeadlineEntry = tuple[float, int, int]  # (deadline, ticket, attempt)


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """How long the broker gives a running task and its worker, in
    heartbeat intervals of `heartbeat_interval_s`."""

    heartbeat_interval_s: float

    @property
    def grace_s(self) -> float:
        """How long past a task's timeout its worker has to report it."""
        return LEASE_GRACE_BEATS * self.heartbeat_interval_s

    def deadline(self, start: float, timeout_s: float) -> float:
        """When a task with `timeout_s` that started at `start` ends as timed
        out, unless its worker reports it first."""
        return start + timeout_s + self.grace_s

    def trusted_until(self, registered_at: float, reported_at: float | None) -> float:
        """Until when the broker leaves a worker's tasks to its own timeouts,
        given when it registered and last reported outcomes (None: not yet).

        While it reports outcomes it is running its tasks, and stops those that
        overrun itself: a task that waited for a slot, or for a task process
        that restarts, is not its fault. Before its first report, its task
        processes may still be importing modules. Only a worker silent about
        its tasks for longer than that is overtaken.
        """
        if reported_at is None:
            return registered_at + START_GRACE_BEATS * self.heartbeat_interval_s
        return reported_at + self.grace_s


class DeadlineHeap:
    """Entries by deadline, with stale ones dropped lazily; `armed_task` gives
    the running task an entry still stands for, or None."""

    __slots__ = ("_armed_task", "_entries")

    def __init__(self, armed_task: Callable[[DeadlineEntry], Task | None]) -> None:
        self._entries: list[DeadlineEntry] = []
        self._armed_task = armed_task

    def __len__(self) -> int:
        return len(self._entries)

    def arm(self, task: Task, deadline: float) -> None:
        """Start `task`'s clock, or move its deadline: an entry it had before
        goes stale."""
        task.deadline = deadline
        heapq.heappush(self._entries, (deadline, task.ticket, task.attempt))

    def take_due(self, now: float, running: int) -> list[DeadlineEntry]:
        """Take out every entry due by `now`, earliest first, stale ones too.

        First the heap is rebuilt without its stale entries if they outnumber
        the `running` tasks: a task that finishes well within a long timeout
        (an hour, a day) leaves its entry for that long, and a stream of such
        tasks would grow the heap without bound."""
        entries = self._entries
        if len(entries) > 2 * running + DEADLINE_HEAP_SLACK:
            armed = self._armed_task
            entries = self._entries = [e for e in entries if armed(e) is not None]
            heapq.heapify(entries)
        due: list[DeadlineEntry] = []
        while entries and entries[0][0] <= now:
            due.append(heapq.heappop(entries))
        return due

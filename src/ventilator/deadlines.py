"""The deadlines the broker enforces on running tasks, earliest first.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduler import Task

__all__ = ["DEADLINE_HEAP_SLACK", "DeadlineEntry", "DeadlineHeap"]

# Stale entries the heap may keep beyond twice the running tasks before it is
# rebuilt (see `DeadlineHeap.take_due`).
DEADLINE_HEAP_SLACK = 1024

DeadlineEntry = tuple[float, int, int]  # (deadline, ticket, attempt)


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

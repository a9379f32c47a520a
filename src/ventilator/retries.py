"""Tasks that raised and wait out their retry's backoff.

A task whose function raised, with retries left, is not queued again at once:
it waits (WAITING) for a delay its backoff policy gives (see `policy.Backoff`),
then joins its queue as any task does. `Retries` keeps those waits in a heap of
``(due time, ticket)``, looked at once a tick.

As in the deadline heap, entries are never searched for: one whose task was
cancelled or purged while it waited stays in the heap, and is skipped when it
comes due or when status counts the waits. Only the scheduler changes a task's
state; `Retries` reads it in the scheduler's table of tasks, which it is
handed once.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

from .tasks import State, Task

__all__ = ["Retries"]


class Retries:
    """The tasks waiting for a retry, by when each is due, in `tasks` (the
    scheduler's own table, by ticket)."""

    __slots__ = ("_heap", "_tasks")

    def __init__(self, tasks: Mapping[int, Task]) -> None:
        self._tasks = tasks
        self._heap: list[tuple[float, int]] = []

    def wait(self, task: Task, due: float) -> None:
        """Let `task`, which the caller made WAITING, wait until `due`."""
        heapq.heappush(self._heap, (due, task.ticket))

    def due(self, now: float) -> Iterator[Task]:
        """The waiting tasks due by `now`, soonest first. Each is looked at as
        it comes: the caller takes it out of WAITING before it asks for the
        next, so that a ticket in the heap twice is never woken twice."""
        heap, tasks = self._heap, self._tasks
        while heap and heap[0][0] <= now:
            _, ticket = heapq.heappop(heap)
            task = tasks.get(ticket)
            if task is not None and task.state is State.WAITING:
                yield task

    def waiting(self) -> Iterator[tuple[float, Task]]:
        """Each task waiting for a retry, with when it is due, in no order;
        the heap also holds cancelled ones, left out."""
        for at, ticket in self._heap:
            task = self._tasks.get(ticket)
            if task is not None and task.state is State.WAITING:
                yield at, task

    def tasks(self) -> list[Task]:
        """The tasks waiting for a retry, in no order."""
        return [task for _, task in self.waiting()]

    def by_queue(self) -> dict[str, int]:
        """How many tasks wait for a retry, per queue: queued, and yet no
        worker takes them until their backoff passes."""
        retrying: dict[str, int] = {}
        for task in self.tasks():
            retrying[task.queue] = retrying.get(task.queue, 0) + 1
        return retrying

    def next_due_at(self) -> float | None:
        """When the next retry is due; None if no task waits for one."""
        return min((at for at, _ in self.waiting()), default=None)

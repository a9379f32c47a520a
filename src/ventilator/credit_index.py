"""Which workers have free credit for a queue, and how many share its work.

Dispatch hands a queue's tasks to the workers that serve it and have credit
left. Finding them by a pass over every worker, per queue and per turn, cost
as much as the workers were many; so per queue the index keeps the workers
with free credit, oldest first (`with_credit`), and is told as a worker's
credit frees or fills (`offer`), which happens per dispatch round and per
report, not per task.

A worker that does not say how many tasks it runs at once gets an even share
of a queue's work, waiting and held, among the workers that serve it and take
work (registered, not draining). A share counted over the workers, asked once
per such worker in each dispatch pass, made a pass over many of them
quadratic; so per queue the index counts those workers, and the tasks of the
queue they hold (`count_held`, on every task leased or released).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Worker

__all__ = ["CreditIndex"]


class CreditIndex:
    """Per queue, the workers with free credit, and the workers sharing its
    work with the tasks they hold.

    It keeps two flags of each worker: `offered` (listed with free credit
    under each of its services) and `sharing` (counted among those sharing
    its queues' work), and the worker's own count of what it holds per queue
    (`Worker.held`), which the shares add up.
    """

    __slots__ = ("_available", "_held_by_sharing", "_sharing")

    def __init__(self) -> None:
        # For each queue, the ids of workers serving it with free credit,
        # oldest first.
        self._available: dict[str, dict[str, None]] = {}
        # For each queue, how many registered workers that are not draining
        # serve it, and how many of its tasks they hold.
        self._sharing: dict[str, int] = {}
        self._held_by_sharing: dict[str, int] = {}

    def with_credit(self, queue_name: str) -> dict[str, None] | None:
        """The ids of the workers serving `queue_name` that have free credit,
        oldest first (the index's own dict: read it, do not change it)."""
        return self._available.get(queue_name)

    def serves(self, queue_name: str) -> bool:
        """Whether a registered worker that is not draining serves it."""
        return queue_name in self._sharing

    def even_share(self, queue_name: str, queued: int) -> int:
        """An even share of the queue's tasks, the `queued` ones and those
        held, among the workers that serve it and take work."""
        total = queued + self._held_by_sharing.get(queue_name, 0)
        return math.ceil(total / max(1, self._sharing.get(queue_name, 0)))

    def join(self, worker: Worker) -> None:
        """Count a worker that registered among those sharing its queues."""
        worker.sharing = True
        for service in worker.services:
            self._sharing[service] = self._sharing.get(service, 0) + 1
            held = self._held_by_sharing.get(service, 0)
            self._held_by_sharing[service] = held + worker.held.get(service, 0)

    def stop_sharing(self, worker: Worker) -> None:
        """Stop counting a worker that drains or leaves (once: it may do both),
        and forget the counts of a queue nobody serves any more."""
        if not worker.sharing:
            return
        worker.sharing = False
        for service in worker.services:
            self._held_by_sharing[service] -= worker.held.get(service, 0)
            self._sharing[service] -= 1
            if not self._sharing[service]:
                del self._sharing[service]
                del self._held_by_sharing[service]

    def leave(self, worker: Worker) -> None:
        """Forget a worker that is no longer registered."""
        self.stop_sharing(worker)
        for service in worker.services:
            self._available.get(service, {}).pop(worker.worker_id, None)
        worker.offered = False

    def offer(self, worker: Worker) -> None:
        """List `worker` under its services while it takes work (registered,
        not draining) and has free credit; unlist it otherwise."""
        has_credit = worker.sharing and worker.free > 0
        # Most calls change nothing (a worker of 2 slots running 1 task stays
        # offered), and the index has an entry per service: skip them.
        if has_credit == worker.offered:
            return
        worker.offered = has_credit
        for service in worker.services:
            available = self._available.setdefault(service, {})
            if has_credit:
                available.setdefault(worker.worker_id, None)
            else:
                available.pop(worker.worker_id, None)

    def count_held(self, worker: Worker, queue_name: str, change: int) -> None:
        """Count `change` more tasks of `queue_name` held by `worker` (which
        serves that queue: it got them from it)."""
        held = worker.held
        count = held.get(queue_name, 0) + change
        if count:
            held[queue_name] = count
        else:
            del held[queue_name]
        if worker.sharing:
            self._held_by_sharing[queue_name] += change

    def check(self, workers: Iterable[Worker]) -> None:
        """Raise AssertionError unless `workers` (the registered ones) are
        listed exactly where they have free credit, and the shares' counts
        match a recount (for tests, after a `flush`)."""
        sharing: dict[str, int] = {}
        held: dict[str, int] = {}
        for worker in workers:
            assert worker.offered == (worker.free > 0), f"{worker.worker_id} offered"
            for service in worker.services:
                listed = worker.worker_id in self._available.get(service, {})
                assert listed == worker.offered, f"{worker.worker_id} under {service}"
            assert worker.sharing == (not worker.draining), worker.worker_id
            assert set(worker.held) <= set(worker.services), worker.worker_id
            if not worker.sharing:
                continue
            for service in worker.services:
                sharing[service] = sharing.get(service, 0) + 1
                held[service] = held.get(service, 0) + worker.held.get(service, 0)
        assert self._sharing == sharing, (self._sharing, sharing)
        assert self._held_by_sharing == held, (self._held_by_sharing, held)

"""The index of workers with free credit, and the counts behind even shares."""

from __future__ import annotations

from ventilator.credit_index import CreditIndex
from ventilator.scheduler import Worker

JOBS = "jobs:work"
OTHER = "jobs:other"


def joined(index: CreditIndex, worker_id: str, capacity: int = 2) -> Worker:
    worker = Worker(worker_id, worker_id.encode(), (JOBS, OTHER), capacity, 0.0)
    index.join(worker)
    index.offer(worker)
    return worker


def hold(index: CreditIndex, worker: Worker, ticket: int, queue_name: str) -> None:
    worker.running.add(ticket)
    index.count_held(worker, queue_name, +1)
    index.offer(worker)


def test_workers_with_credit_are_listed_oldest_first_under_each_service() -> None:
    index = CreditIndex()
    first, second = joined(index, "w1"), joined(index, "w2")

    assert list(index.with_credit(JOBS) or {}) == ["w1", "w2"]
    assert list(index.with_credit(OTHER) or {}) == ["w1", "w2"]
    index.check([first, second])


def test_a_worker_whose_credit_fills_is_unlisted_until_it_frees() -> None:
    index = CreditIndex()
    worker = joined(index, "w1", capacity=1)

    hold(index, worker, 1, JOBS)
    assert not index.with_credit(JOBS)

    worker.running.discard(1)
    index.count_held(worker, JOBS, -1)
    index.offer(worker)
    assert list(index.with_credit(JOBS) or {}) == ["w1"]
    index.check([worker])


def test_a_draining_worker_is_unlisted_and_leaves_the_shares() -> None:
    index = CreditIndex()
    draining, staying = joined(index, "w1"), joined(index, "w2")
    hold(index, draining, 1, JOBS)

    index.stop_sharing(draining)
    draining.draining = True
    index.offer(draining)

    assert list(index.with_credit(JOBS) or {}) == ["w2"]
    # Three queued among the one worker sharing the work, which holds none.
    assert index.even_share(JOBS, queued=3) == 3
    index.check([draining, staying])


def test_shares_count_the_tasks_held_by_workers_sharing_the_work() -> None:
    index = CreditIndex()
    first, second = joined(index, "w1", capacity=4), joined(index, "w2", capacity=4)
    hold(index, first, 1, JOBS)
    hold(index, first, 2, JOBS)

    # Two held and three queued, among two workers: three each at most.
    assert index.even_share(JOBS, queued=3) == 3
    assert index.even_share(OTHER, queued=3) == 2
    index.check([first, second])


def test_a_queue_nobody_serves_any_more_is_forgotten() -> None:
    index = CreditIndex()
    worker = joined(index, "w1")

    index.leave(worker)

    assert not index.serves(JOBS)
    assert not index.with_credit(JOBS)
    assert not worker.offered
    index.check([])

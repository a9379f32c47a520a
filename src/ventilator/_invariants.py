"""The scheduler's invariants, which the tests check after every step.

Each check recounts a piece of the scheduler's bookkeeping (per-queue and
per-session counts, the indexes of peers and offered workers, the heaps and
tombstones) from the tasks, workers and recipients themselves, and raises
AssertionError where the two disagree. So they read the scheduler's private
fields by design: what they compare is how it keeps its books, which no
public view shows. They only read; nothing here changes the scheduler.

Test-only: the broker never loads this module (see `Scheduler.check_invariants`).
"""

from __future__ import annotations

from . import protocol as p
from .scheduler import Scheduler, sink_recipient
from .tasks import State, Task, Worker

__all__ = ["check_invariants"]


def check_invariants(scheduler: Scheduler) -> None:
    """Raise AssertionError if the scheduler's state is inconsistent (for
    tests, after a `flush`)."""
    running: set[int] = set()
    for worker in scheduler.workers.values():
        assert len(worker.running) <= worker.capacity + worker.grace, worker
        assert not running & worker.running, "a task on two workers"
        running |= worker.running
        for ticket in worker.running:
            task = scheduler.tasks[ticket]
            assert task.state is State.RUNNING and task.worker == worker.worker_id
        _check_held_counts(scheduler, worker)
    # Offered where they have free credit; shares' counts match a recount.
    scheduler._credit.check(scheduler.workers.values())

    for ticket, task in scheduler.tasks.items():
        assert scheduler._by_key[task.key] == ticket
        if task.state is State.RUNNING:
            assert ticket in running, f"task {ticket} running on no worker"
        if task.state is State.FINISHED:
            assert task.status is not None
        if task.cancelled:
            assert task.state is State.RUNNING, f"task {ticket} cancelled"

    for recipient in scheduler.recipients.values():
        is_sink = recipient.name.startswith(sink_recipient(""))
        assert recipient.unacked_bytes == sum(recipient.unacked.values()), (
            f"{recipient.name} counts {recipient.unacked_bytes} bytes unacked"
        )
        assert recipient.holder is None or is_sink, f"{recipient.name} held"
        # Sinks have holders, sessions have instances; one refused client
        # is remembered, never the one holding the session.
        assert recipient.instance is None or not is_sink, recipient.name
        assert recipient.refused is None or not is_sink, recipient.name
        assert recipient.refused is None or recipient.refused != (recipient.instance), (
            f"{recipient.name} refused its holder"
        )

    queued = {t for q in scheduler._queues.values() for t in q}
    for task in scheduler.tasks.values():
        if task.state is State.QUEUED:
            assert task.ticket in queued, f"queued task {task.ticket} in no queue"
            _check_nobody_idles_for(scheduler, task)
    _check_stale_counts(scheduler)
    _check_byte_counts(scheduler)
    _check_shared(scheduler)
    _check_result_room(scheduler)
    _check_tombstones(scheduler)
    # Connections on their recipients, none on a forgotten one, and the
    # sessions each opened counted exactly.
    scheduler._sessions.check()
    _check_parked(scheduler)
    assert scheduler._unannounced.none_empty(), "empty ACCEPTED"
    failed = [record.ticket for record in scheduler.failed]
    assert len(set(failed)) == len(failed), "a failure remembered twice"
    _check_totals(scheduler)


def _check_shared(scheduler: Scheduler) -> None:
    """Tasks whose payload lies in shared memory are listed under its arena,
    and only they."""
    listed: dict[bytes, set[int]] = {}
    for ticket, task in scheduler.tasks.items():
        if task.flags & p.Flags.SHARED and task.payload:
            listed.setdefault(p.shared_arena(task.payload), set()).add(ticket)
    assert scheduler._shared == listed, (scheduler._shared, listed)


def _check_parked(scheduler: Scheduler) -> None:
    """Tasks wait for room only while there is none, a window's worth at
    most, and only for a session the broker remembers."""
    scheduler._waiting_room.check()
    for session, parked in scheduler._waiting_room.parked.items():
        assert session in scheduler.recipients, f"{session} forgotten with tasks parked"
        assert not any((session, t) in scheduler._by_key for t in parked.specs)
        first = p.payload_bytes(parked.first())
        assert scheduler._window_refusal(session, first) is not None, (
            f"{session} waits with room in its window"
        )


def _check_totals(scheduler: Scheduler) -> None:
    # Withdrawn tasks count in neither side, hence <= rather than ==.
    unfinished = sum(
        1 for t in scheduler.tasks.values() if t.state is not State.FINISHED
    )
    failures = scheduler._failures
    finished = sum(failures.finished_by_status) + failures.batches_split
    assert finished + unfinished <= scheduler.submitted, (finished, scheduler.submitted)
    assert scheduler.restored <= scheduler.submitted


def _check_nobody_idles_for(scheduler: Scheduler, task: Task) -> None:
    if task.queue in scheduler._return_wait.held_back:
        return  # it waits for the worker that ran it before a restart
    if task.session in scheduler._room.held_back:
        return  # it waits for its client to read results
    for worker in scheduler.workers.values():
        free = max(
            scheduler._idle_room(worker, task.queue),
            scheduler._prefetch_room(worker, task.queue),
        )
        assert task.queue not in worker.services or free == 0, (
            f"task {task.ticket} waits while {worker.worker_id} has room for it"
        )


def _check_held_counts(scheduler: Scheduler, worker: Worker) -> None:
    by_queue: dict[str, int] = {}
    for ticket in worker.running:
        queue_name = scheduler.tasks[ticket].queue
        by_queue[queue_name] = by_queue.get(queue_name, 0) + 1
    assert worker.held == by_queue, f"{worker.worker_id} held {worker.held}"
    # What waits behind its slots is among what it holds, clock not started.
    for ticket in worker.unstarted:
        assert ticket in worker.running, f"{worker.worker_id} unstarted {ticket}"
        assert scheduler.tasks[ticket].deadline is None, f"ticket {ticket} armed"


def _check_stale_counts(scheduler: Scheduler) -> None:
    for name, queue in scheduler._queues.items():
        live = sum(
            1
            for ticket in queue
            if ticket in scheduler.tasks
            and scheduler.tasks[ticket].state is State.QUEUED
        )
        stale = scheduler._stale.get(name, 0)
        assert len(queue) - stale == live, f"queue {name}: {stale} stale counted"
    assert all(count > 0 for count in scheduler._stale.values()), scheduler._stale


def _check_result_room(scheduler: Scheduler) -> None:
    """Results and expected results are counted per session, and exactly the
    sessions they fill the room of are held back (their lanes out of turn in
    every queue), once the next flush has looked."""
    results: dict[str, int] = {}
    expected: dict[str, int] = {}
    for task in scheduler.tasks.values():
        if task.ticket not in scheduler._tombstones and task.result:
            results[task.session] = results.get(task.session, 0) + len(task.result)
        if task.expected:
            assert task.state is State.RUNNING, f"task {task.ticket} expected"
            expected[task.session] = expected.get(task.session, 0) + task.expected
    scheduler._room.check(results, expected)


def _check_tombstones(scheduler: Scheduler) -> None:
    size = 0
    for ticket in scheduler._tombstones:
        task = scheduler.tasks[ticket]
        assert task.status is p.Status.EXPIRED, f"tombstone {ticket} not expired"
        assert ticket not in scheduler._finish_order, f"tombstone {ticket} expires"
        size += len(task.result)
    assert scheduler._tombstone_bytes == size, (scheduler._tombstone_bytes, size)
    counted = sum(r.expired for r in scheduler.recipients.values())
    assert counted == len(scheduler._tombstones), (counted, len(scheduler._tombstones))
    finished = sum(1 for t in scheduler.tasks.values() if t.state is State.FINISHED)
    owed = sum(len(r.pending) + len(r.unacked) for r in scheduler.recipients.values())
    assert owed == finished, f"recipients owed {owed} of {finished} results"


def _check_byte_counts(scheduler: Scheduler) -> None:
    total = 0
    held: dict[str, int] = {}
    for task in scheduler.tasks.values():
        size = p.payload_size(task.payload, task.flags) + len(task.result)
        total += size
        held[task.session] = held.get(task.session, 0) + size
    assert scheduler._queued_bytes == total, (scheduler._queued_bytes, total)
    held = {session: size for session, size in held.items() if size}
    assert scheduler._held_bytes == held, (scheduler._held_bytes, held)
    for queue in scheduler._queues.values():
        assert len(queue) == sum(1 for _ in queue), "a fair queue miscounts"

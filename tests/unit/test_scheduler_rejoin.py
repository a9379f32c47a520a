"""A worker that registers again keeps the tasks it names as still held."""

from __future__ import annotations

import pytest

from ventilator import protocol as p
from ventilator.notices import (
    LateOutcome,
    WorkerJoined,
    WorkerLost,
    WorkerReturned,
)
from ventilator.scheduler import (
    MAX_ADOPTED_ATTEMPT,
    RETURN_WAIT_BEATS,
    State,
    Task,
)

from .driver import FUNCTION, Driver, assignments, notices, results, sent, task

W1 = b"worker-1"
W2 = b"worker-2"
# The same worker on the connection it opened after taking the broker for gone.
W1_AGAIN = b"worker-1-again"


@pytest.fixture
def driver() -> Driver:
    driver = Driver()
    driver.hello()
    return driver


def held_by(driver: Driver, worker_id: str) -> set[int]:
    return driver.scheduler.workers[worker_id].running


def test_worker_that_registers_again_naming_its_task_keeps_it(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    assert not assignments(effects, W1_AGAIN)
    assert held_by(driver, "worker-1") == {first.ticket}
    assert notices(effects, WorkerReturned) == [WorkerReturned("worker-1", 1, 0, 0)]
    assert not notices(effects, WorkerLost)


def test_a_worker_handing_back_on_its_connection_is_no_new_join(
    driver: Driver,
) -> None:
    # Every slot busy with a long task: it registers again, naming what runs.
    driver.submit(task(1), task(2))
    running, waiting = assignments(driver.ready(W1, capacity=2), W1)

    effects = driver.ready(W1, capacity=2, held=[running])

    assert notices(effects, WorkerReturned) == [
        WorkerReturned("worker-1", 1, 1, 0, same_connection=True)
    ]
    assert not notices(effects, WorkerJoined)
    assert waiting.ticket in held_by(driver, "worker-1")  # it has room again


def test_a_worker_back_on_a_new_connection_joins_again(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    assert not notices(effects, WorkerReturned)[0].same_connection
    assert [j.worker_id for j in notices(effects, WorkerJoined)] == ["worker-1"]


def test_result_of_a_kept_task_reaches_its_client(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    effects = driver.done(W1_AGAIN, first, payload=b"49")

    assert results(effects) == [p.ResultEntry(1, p.Status.OK, b"49", "")]


def test_tasks_a_returning_worker_no_longer_names_are_requeued(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    kept, dropped = assignments(driver.ready(W1, capacity=2), W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", capacity=2, held=[kept])

    assert held_by(driver, "worker-1") == {kept.ticket, dropped.ticket}
    [again] = assignments(effects, W1_AGAIN)
    assert (again.ticket, again.attempt) == (dropped.ticket, dropped.attempt + 1)
    assert notices(effects, WorkerReturned) == [WorkerReturned("worker-1", 1, 1, 0)]


def test_a_task_named_with_another_attempt_is_not_kept(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    stale = p.Assignment(first.ticket, first.attempt + 5, FUNCTION, b"")

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[stale])

    [again] = assignments(effects, W1_AGAIN)
    # Sent past the attempt named: whatever runs under it answers nothing.
    assert again.attempt == stale.attempt + 1
    assert notices(effects, WorkerReturned) == [WorkerReturned("worker-1", 0, 1, 1)]


def test_a_worker_naming_another_workers_task_does_not_steal_it(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    effects = driver.ready(W2, held=[first])

    assert held_by(driver, "worker-1") == {first.ticket}
    assert held_by(driver, "worker-2") == set()
    assert notices(effects, WorkerReturned) == [WorkerReturned("worker-2", 0, 0, 1)]
    assert not results(driver.done(W2, first))
    assert results(driver.done(W1, first))


def test_kept_tasks_beyond_a_lower_capacity_stay_and_no_more_come(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2), task(3))
    held = assignments(driver.ready(W1, capacity=2), W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", capacity=1, held=held)

    assert len(held_by(driver, "worker-1")) == 2
    assert not assignments(effects, W1_AGAIN)


def test_a_worker_lost_and_back_reclaims_its_task_nobody_took(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.unreachable(W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    assert not assignments(effects, W1_AGAIN)
    assert results(driver.done(W1_AGAIN, first))


def test_a_returning_worker_s_notice_tells_taken_back_from_kept(driver: Driver) -> None:
    # Its tasks were requeued when it was lost; the operator who read that
    # must read that it took them back, and did not run them twice.
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.unreachable(W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    [returned] = notices(effects, WorkerReturned)
    assert (returned.kept, returned.taken_back, returned.requeued) == (0, 1, 0)


def test_a_task_lost_by_one_worker_is_not_claimed_by_another(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.unreachable(W1)

    effects = driver.ready(W2, held=[first])

    assert notices(effects, WorkerReturned)[0].kept == 0
    [sent] = assignments(effects, W2)  # to run afresh, not taken as running
    assert (sent.ticket, sent.attempt) == (first.ticket, first.attempt + 1)


def test_a_task_taken_by_another_since_is_not_reclaimed(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.unreachable(W1)
    [second] = assignments(driver.ready(W2), W2)

    driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    assert held_by(driver, "worker-2") == {second.ticket}
    assert held_by(driver, "worker-1") == set()


# --- after a restart -----------------------------------------------------------------


def journalled(ticket: int) -> Task:
    """An unfinished task as the journal gives it back after a restart."""
    return Task(ticket, "alice", ticket, FUNCTION, b"args", 0, None, 0, "alice")


def restarted(*tasks: Task) -> Driver:
    driver = Driver()
    for one in tasks:
        driver.scheduler.restore(one, driver.now)
    driver.hello()
    return driver


def test_a_restored_task_a_worker_names_stays_with_it_at_its_attempt() -> None:
    driver = restarted(journalled(7), journalled(8))
    running = p.Assignment(7, 3, FUNCTION, b"args")

    effects = driver.ready(W1, capacity=2, held=[running])

    [other] = assignments(effects, W1)
    assert other.ticket == 8
    assert driver.scheduler.tasks[7].attempt == 3
    assert results(driver.done(W1, running, payload=b"done"))


def test_a_restored_task_handed_to_another_is_not_claimed() -> None:
    driver = restarted(journalled(7))
    [given] = assignments(driver.ready(W2), W2)

    effects = driver.ready(W1, held=[p.Assignment(7, given.attempt, FUNCTION, b"")])

    assert held_by(driver, "worker-2") == {7}
    assert notices(effects, WorkerReturned)[0].refused == 1


def test_a_restored_task_of_a_function_the_worker_lacks_is_not_claimed() -> None:
    driver = restarted(journalled(7))
    named = p.Assignment(7, 1, FUNCTION, b"")

    driver.ready(W1, services=["jobs:other"], held=[named])

    assert driver.scheduler.tasks[7].state is State.QUEUED


def test_a_new_task_with_a_named_ticket_is_sent_past_the_named_attempt(
    driver: Driver,
) -> None:
    # A broker without a journal numbers its tasks from 1 again after a
    # restart: a worker's old ticket may then name somebody else's task.
    driver.submit(task(1))
    [new] = driver.scheduler.tasks.values()
    named = p.Assignment(new.ticket, 1, FUNCTION, b"")

    effects = driver.ready(W1, held=[named])

    assert notices(effects, WorkerReturned)[0].kept == 0
    [sent] = assignments(effects, W1)
    assert (sent.ticket, sent.attempt) == (new.ticket, 2)  # sent to run
    # The earlier broker's task ends: its result answers nothing of ours.
    assert not results(driver.done(W1, named, payload=b"theirs"))
    assert results(driver.done(W1, sent, payload=b"ours")) == [
        p.ResultEntry(1, p.Status.OK, b"ours", "")
    ]


def test_tickets_start_past_those_a_returning_worker_names(driver: Driver) -> None:
    driver.ready(W1, held=[p.Assignment(50, 1, FUNCTION, b"")])

    driver.submit(task(1))

    [new] = driver.scheduler.tasks.values()
    assert new.ticket == 51


def test_a_forged_ticket_does_not_push_the_numbering_near_the_wire_limit(
    driver: Driver,
) -> None:
    driver.ready(W1, held=[p.Assignment(2**62, 1, FUNCTION, b"")])

    driver.submit(task(1))

    [new] = driver.scheduler.tasks.values()
    assert new.ticket == 1


def test_a_restored_task_named_at_an_absurd_attempt_is_not_claimed() -> None:
    driver = restarted(journalled(7))
    forged = p.Assignment(7, 2**63 - 1, FUNCTION, b"")

    [sent] = assignments(driver.ready(W1, held=[forged]), W1)

    # Not claimed; sent past the attempt named, which is capped far below
    # what the wire carries (each later run adds one).
    assert (sent.ticket, sent.attempt) == (7, MAX_ADOPTED_ATTEMPT + 1)


# --- the wait for returning workers ---------------------------------------------------


def restarted_and_serving(*tasks: Task) -> Driver:
    driver = restarted(*tasks)
    driver.scheduler.await_returning_workers(driver.now)
    return driver


def test_restored_tasks_wait_for_the_workers_that_ran_them() -> None:
    driver = restarted_and_serving(journalled(7), journalled(8))

    # A worker that ran nothing before the restart is given none of them yet.
    assert not assignments(driver.ready(W2, capacity=2), W2)
    # The one that ran 7 comes back and keeps it.
    named = p.Assignment(7, 1, FUNCTION, b"args")
    assert not assignments(driver.ready(W1, held=[named]), W1)
    assert held_by(driver, "worker-1") == {7}


def test_restored_tasks_nobody_names_are_served_once_the_wait_is_over() -> None:
    driver = restarted_and_serving(journalled(7))
    assert not assignments(driver.ready(W2), W2)

    wait_s = RETURN_WAIT_BEATS * driver.scheduler.limits.heartbeat_interval_s
    [sent] = assignments(driver.tick(wait_s), W2)

    assert sent.ticket == 7


def test_functions_with_nothing_restored_are_served_during_the_wait() -> None:
    driver = restarted_and_serving(journalled(7))
    driver.submit(task(1, function="jobs:other"))

    [sent] = assignments(driver.ready(W2, services=[FUNCTION, "jobs:other"]), W2)

    assert sent.function == "jobs:other"


def test_nothing_waits_after_a_restart_that_restored_nothing() -> None:
    driver = restarted()
    assert driver.scheduler.await_returning_workers(driver.now) == 0.0
    driver.submit(task(1))

    assert assignments(driver.ready(W2), W2)


# --- what a returning worker is told, and results it sends again ----------------------


def test_a_returning_worker_is_told_the_named_tasks_it_does_not_keep(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    kept, finished = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, finished)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[kept, finished])

    released = sent(effects, W1_AGAIN, p.Release)
    assert released == [p.Release([(finished.ticket, finished.attempt)])]


def test_a_returning_worker_that_keeps_all_it_named_is_told_nothing(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    effects = driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    assert not sent(effects, W1_AGAIN, p.Release)


def test_a_result_sent_again_after_it_arrived_is_dropped_as_late(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    assert results(driver.done(W1, first, payload=b"49"))
    driver.ready(W1_AGAIN, worker_id="worker-1", held=[first])

    again = driver.done(W1_AGAIN, first, payload=b"49")

    assert not results(again)
    late = LateOutcome(first.ticket, 1, "worker-1", released=True)
    assert notices(again, LateOutcome) == [late]
    assert not assignments(driver.flush(), W1_AGAIN)

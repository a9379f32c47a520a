"""A session's unread results are bounded by its own client_max_bytes: while
the results it has waiting, and those its running tasks are expected to
return, fill that room, none of its queued tasks is dispatched. They stay
accepted and queued; other sessions' tasks go on; reading results lets them
go again."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.policy import Limits
from ventilator.scheduler import State, Task

from .driver import Driver, assignments, results, task

W1 = b"worker-1"
BOB = b"client-2"
SINK_PEER = b"sink-peer"
LIMITS = Limits(client_max_bytes=100)
BIG = b"r" * 60  # two of these fill LIMITS' room


def held_back(driver: Driver, session: str = "alice") -> bool:
    status = driver.scheduler.status(driver.now)
    [client] = [c for c in status["clients"] if c["name"] == session]  # type: ignore[attr-defined]
    return bool(client["held_back"])


def run_one(driver: Driver, assignment: p.Assignment, result: bytes = BIG) -> None:
    driver.done(W1, assignment, payload=result)


def two_big_results_unread(driver: Driver) -> list[p.Assignment]:
    """Alice submits four tasks and reads nothing; a worker of one task at a
    time runs them while it is given any. Returns what it was given."""
    driver.hello()
    driver.submit(*(task(i, payload=b"a") for i in range(1, 5)))
    given = assignments(driver.ready(W1, capacity=1), W1)
    taken = list(given)
    while given:
        effects = driver.done(W1, given[0], payload=BIG)
        given = assignments(effects, W1)
        taken += given
    return taken


def restore_two_big_results_and_a_queued_task(driver: Driver, recipient: str) -> None:
    """What a journal gives back after a restart: two finished tasks of Alice
    whose results wait for `recipient`, and a third task of hers queued."""
    for ticket in (1, 2):
        done = Task(ticket, "alice", ticket, "jobs:work", b"", 0, None, 0, recipient)
        done.state, done.status, done.result = State.FINISHED, p.Status.OK, BIG
        driver.scheduler.restore(done, driver.now)
    queued = Task(3, "alice", 3, "jobs:work", b"a", 0, None, 0, recipient)
    driver.scheduler.restore(queued, driver.now)


def test_a_session_whose_unread_results_fill_its_room_gets_nothing_more_run() -> None:
    driver = Driver(LIMITS)

    taken = two_big_results_unread(driver)

    assert len(taken) == 2
    queued = [t for t in driver.scheduler.tasks.values() if t.state is State.QUEUED]
    assert len(queued) == 2, "the rest stay accepted and queued"
    assert held_back(driver)


def test_other_sessions_tasks_run_while_one_is_held_back() -> None:
    driver = Driver(LIMITS)
    two_big_results_unread(driver)

    driver.hello(BOB, "bob")
    effects = driver.submit(task(1, payload=b"b"), peer=BOB)

    [given] = assignments(effects, W1)
    assert driver.scheduler.tasks[given.ticket].session == "bob"
    assert not held_back(driver, "bob")


def test_reading_results_lets_the_held_back_tasks_go() -> None:
    driver = Driver(LIMITS)
    two_big_results_unread(driver)
    delivered = [r.task_id for r in results(driver.flush())]
    keys = [("", task_id) for task_id in delivered or (1, 2)]

    effects = driver.ack(*keys)

    assert len(assignments(effects, W1)) == 1
    assert not held_back(driver)


def test_expected_results_of_running_tasks_count_against_the_room() -> None:
    driver = Driver(Limits(client_max_bytes=200))
    driver.hello()
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1, capacity=10), W1)
    driver.done(W1, first, payload=b"r" * 50)
    driver.ack(("", 1))

    effects = driver.submit(*(task(i) for i in range(2, 12)))

    # 4 x 50 expected bytes fill the 200: the others wait for results.
    assert len(assignments(effects, W1)) == 4


def test_results_waiting_for_a_sink_hold_back_their_sender() -> None:
    driver = Driver(LIMITS)
    driver.hello()
    driver.submit(*(task(i, payload=b"a", sink="slow") for i in range(1, 5)))
    given = assignments(driver.ready(W1, capacity=1), W1)
    taken = 0
    while given:
        taken += 1
        given = assignments(driver.done(W1, given[0], payload=BIG), W1)
    assert taken == 2 and held_back(driver)

    driver.hello(SINK_PEER, "sink-session", sink="slow")
    driver.ack(("alice", 1), ("alice", 2), peer=SINK_PEER)

    assert not held_back(driver)


def test_expired_results_let_the_session_go_again() -> None:
    limits = Limits(client_max_bytes=100, result_ttl_s=30.0)
    driver = Driver(limits)
    two_big_results_unread(driver)

    given = []
    for _ in range(31):  # the worker beats on while the results expire
        driver.worker(W1, p.Heartbeat())
        given += assignments(driver.tick(1.0), W1)

    assert len(given) == 1


def test_a_restored_session_whose_results_fill_its_room_stays_held_back() -> None:
    driver = Driver(LIMITS)
    restore_two_big_results_and_a_queued_task(driver, recipient="alice")
    driver.scheduler.await_returning_workers(driver.now)
    driver.tick(10.0)

    effects = driver.ready(W1, capacity=1)

    assert not assignments(effects, W1)
    assert held_back(driver)


def test_status_tells_the_bytes_of_results_a_session_has_waiting() -> None:
    driver = Driver(LIMITS)
    two_big_results_unread(driver)

    status = driver.scheduler.status(driver.now)

    [alice] = [c for c in status["clients"] if c["name"] == "alice"]  # type: ignore[attr-defined]
    assert alice["result_bytes"] == 2 * len(BIG)
    assert alice["expected_result_bytes"] == 0  # nothing of it runs


def test_a_restored_sender_to_a_sink_is_listed_held_back_with_its_tasks() -> None:
    driver = Driver(LIMITS)
    restore_two_big_results_and_a_queued_task(driver, recipient="sink:s")

    status = driver.scheduler.status(driver.now)

    [alice] = [c for c in status["clients"] if c["name"] == "alice"]  # type: ignore[attr-defined]
    assert alice["tasks"] == 3
    assert alice["held_back"] is True


def test_status_tells_what_a_session_s_running_tasks_are_expected_to_return() -> None:
    driver = Driver(LIMITS)
    driver.hello()
    driver.submit(task(1, payload=b"a"), task(2, payload=b"a"))
    [first] = assignments(driver.ready(W1, capacity=1), W1)
    [_running] = assignments(driver.done(W1, first, payload=BIG), W1)

    status = driver.scheduler.status(driver.now)

    [alice] = [c for c in status["clients"] if c["name"] == "alice"]  # type: ignore[attr-defined]
    assert alice["expected_result_bytes"] == len(BIG)  # the mean of what it returned


def test_results_turning_large_are_expected_large_at_once() -> None:
    driver = Driver(Limits(client_max_bytes=10 * len(BIG)))
    driver.hello()
    driver.submit(*(task(i, payload=b"a") for i in range(1, 8)))
    [running] = assignments(driver.ready(W1, capacity=1), W1)
    for _ in range(5):  # tiny results, then one of BIG's size
        [running] = assignments(driver.done(W1, running, payload=b"r"), W1)
    assignments(driver.done(W1, running, payload=BIG), W1)

    status = driver.scheduler.status(driver.now)

    [alice] = [c for c in status["clients"] if c["name"] == "alice"]  # type: ignore[attr-defined]
    assert alice["expected_result_bytes"] == len(BIG)

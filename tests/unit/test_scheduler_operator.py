"""Operator commands and the broker's own bookkeeping of outcomes."""

from __future__ import annotations

from typing import Any

import pytest

from ventilator import protocol as p
from ventilator.errors import TaskRaised
from ventilator.scheduler import RETRY_PAYLOAD_BYTES, RETRY_SESSION, sink_recipient
from ventilator.serialization import pack_error

from .driver import FUNCTION, Driver, assignments, results, sent, task

W1 = b"worker-1"
OPERATOR = b"operator"


@pytest.fixture
def driver() -> Driver:
    driver = Driver()
    driver.hello()
    driver.hello(OPERATOR, "operator")
    return driver


def operate(driver: Driver, command: p.Command) -> dict[str, Any]:
    [reply] = sent(driver.client(OPERATOR, command), OPERATOR, p.OperatorReply)
    assert isinstance(reply, p.OperatorReply)
    return reply.report


def fail(driver: Driver, task_id: int, payload: bytes = b"args") -> None:
    driver.submit(task(task_id, payload))
    [assignment] = assignments(driver.ready(W1, worker_id=f"w{task_id}"), W1)
    error = pack_error(TaskRaised("ValueError", f"bad input {task_id}"))
    driver.done(W1, assignment, p.Status.RAISED, error)


def test_a_failed_task_is_listed_with_its_reason(driver: Driver) -> None:
    fail(driver, 1)

    [record] = operate(driver, p.ListFailed(10))["failed"]

    assert (record["session"], record["task_id"]) == ("alice", 1)
    assert (record["outcome"], record["type"]) == ("raised", "ValueError")
    assert record["message"] == "bad input 1" and record["retryable"]


def test_the_list_of_failures_is_newest_first_and_bounded(driver: Driver) -> None:
    for task_id in (1, 2, 3):
        fail(driver, task_id)

    failed = operate(driver, p.ListFailed(2))["failed"]

    assert [record["task_id"] for record in failed] == [3, 2]


def test_status_counts_outcomes_and_shows_recent_failures(driver: Driver) -> None:
    fail(driver, 1)
    driver.submit(task(2, function="jobs:unserved"))
    driver.cancel(2)

    status = driver.scheduler.status(driver.now)

    assert status["totals"] == {
        "submitted": 2,
        "restored": 0,
        "completed": 0,
        "failed": 1,
        "cancelled": 1,
    }
    assert [r["message"] for r in status["recent_failures"]] == ["bad input 1"]  # type: ignore[attr-defined]


def test_a_retried_task_runs_again_and_its_result_goes_to_the_sink(
    driver: Driver,
) -> None:
    fail(driver, 1)
    ticket = driver.scheduler.failed[0].ticket

    report = operate(driver, p.Retry([], "retried"))
    [again] = assignments(driver.ready(W1, worker_id="w-again"), W1)
    driver.hello(b"sink", "reader", sink="retried")
    delivered = results(driver.done(W1, again, p.Status.OK, b"fine"), b"sink")

    assert report["retried"] == [ticket] and again.payload == b"args"
    assert [(r.origin, r.task_id, r.payload) for r in delivered] == [
        (RETRY_SESSION, ticket, b"fine")
    ]
    assert not driver.scheduler.failed


def test_retry_refuses_unknown_tickets_and_arguments_too_large_to_keep(
    driver: Driver,
) -> None:
    fail(driver, 1, payload=b"x" * (RETRY_PAYLOAD_BYTES + 1))
    ticket = driver.scheduler.failed[0].ticket

    report = operate(driver, p.Retry([ticket, 999], "retried"))

    refused = dict(report["refused"])
    assert report["retried"] == []
    assert set(refused) == {ticket, 999}
    assert "not kept" in refused[ticket]


def test_purge_cancels_every_queued_task_of_a_function(driver: Driver) -> None:
    driver.submit(task(1), task(2), task(3, function="jobs:other"))

    report = operate(driver, p.Purge(FUNCTION))
    delivered = results(driver.flush()) + results(driver.tick(0.0))

    assert report == {"purged": 2}
    assert driver.scheduler.status(driver.now)["queued"] == {"jobs:other": 1}
    status = driver.scheduler.status(driver.now)
    assert status["totals"]["cancelled"] == 2  # type: ignore[index]
    assert all(r.status is p.Status.CANCELLED for r in delivered)


def test_purge_leaves_running_tasks_alone(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    driver.ready(W1)

    report = operate(driver, p.Purge(FUNCTION))

    assert report == {"purged": 1}
    assert driver.scheduler.status(driver.now)["running"] == {FUNCTION: 1}


def test_cancel_by_id_says_what_became_of_the_task(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    driver.ready(W1)  # takes task 1

    outcomes = [
        operate(driver, p.CancelTask("alice", task_id))["outcome"]
        for task_id in (1, 2, 2, 77)
    ]

    assert outcomes == ["running", "cancelled", "cancelled already", "unknown"]


def test_cancelling_a_task_that_ended_otherwise_says_it_finished(
    driver: Driver,
) -> None:
    fail(driver, 1)

    report = operate(driver, p.CancelTask("alice", 1))

    assert report["outcome"] == "finished"


def test_a_queue_that_dispatches_past_cancelled_tasks_counts_right(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2), task(3))
    driver.cancel(1)

    assert driver.scheduler.status(driver.now)["queued"] == {FUNCTION: 2}
    [a, b] = assignments(driver.ready(W1, capacity=5), W1)

    assert (a.ticket, b.ticket) == (2, 3)
    assert driver.scheduler.status(driver.now)["queued"] == {}


def test_sink_tasks_are_reported_as_sinks(driver: Driver) -> None:
    driver.hello(b"sink", "reader", sink="totals")

    clients = driver.scheduler.status(driver.now)["clients"]

    kinds = {c["name"]: c["kind"] for c in clients}  # type: ignore[attr-defined]
    assert kinds[sink_recipient("totals")] == "sink" and kinds["alice"] == "client"

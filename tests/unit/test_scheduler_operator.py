"""Operator commands and the broker's own bookkeeping of outcomes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ventilator import protocol as p
from ventilator.errors import (
    FunctionNotFound,
    TaskError,
    TaskRaised,
    TaskRejected,
    TaskTimeout,
)
from ventilator.notices import OperatorActed
from ventilator.policy import Limits
from ventilator.scheduler import (
    RETRY_PAYLOAD_BYTES,
    RETRY_SESSION,
    FailedTask,
    Scope,
    sink_recipient,
)
from ventilator.serialization import pack_error, pack_value

from .driver import (
    CLIENT,
    FUNCTION,
    Driver,
    assignments,
    error_report,
    notices,
    results,
    sent,
    task,
)

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


def batch_whose_worker_died(driver: Driver, task_id: int) -> None:
    driver.submit(task(task_id, flags=p.Flags.BATCH))
    [batch] = assignments(driver.ready(W1, worker_id=f"w{task_id}"), W1)
    driver.done(W1, batch, p.Status.CRASHED)


def test_a_batch_handed_back_to_its_map_is_no_failure_to_list_or_retry(
    driver: Driver,
) -> None:
    batch_whose_worker_died(driver, 1)

    listed = operate(driver, p.ListFailed(10))
    retried = operate(driver, p.Retry([], "retried"))
    status = driver.scheduler.status(driver.now)

    assert (listed["failed"], listed["kept"]) == ([], 0)
    assert retried["retried"] == []
    assert status["recent_failures"] == []
    totals = status["totals"]
    assert (totals["failed"], totals["split"]) == (0, 1)  # type: ignore[index]


def test_an_item_of_a_split_batch_that_kills_its_worker_is_a_failure(
    driver: Driver,
) -> None:
    batch_whose_worker_died(driver, 1)
    driver.submit(task(2, flags=p.Flags.SPLIT))
    [item] = assignments(driver.ready(W1, worker_id="w2"), W1)
    [again] = assignments(driver.done(W1, item, p.Status.CRASHED), W1)
    driver.done(W1, again, p.Status.CRASHED)

    [record] = operate(driver, p.ListFailed(10))["failed"]

    assert (record["task_id"], record["outcome"]) == (2, "poison")
    assert driver.scheduler.totals()["failed"] == 1


# A map's batch of several items, as a client that splits such batches sends it.
SPLITTABLE_BATCH = p.Flags.BATCH | p.Flags.SPLITTABLE
TIMED_OUT = (p.Status.TIMEOUT, TaskTimeout("TaskTimeout", "ran past its 1s"))
RESULT_TOO_LARGE = (
    p.Status.REJECTED,
    TaskRejected("ResultTooLarge", "the result is over max_payload_bytes"),
)


def batch_that_failed_whole(
    driver: Driver,
    task_id: int,
    ending: tuple[p.Status, TaskError],
    flags: int = SPLITTABLE_BATCH,
) -> None:
    driver.submit(task(task_id, flags=flags))
    [batch] = assignments(driver.ready(W1, worker_id=f"w{task_id}"), W1)
    status, error = ending
    driver.done(W1, batch, status, pack_error(error))


@pytest.mark.parametrize("ending", [TIMED_OUT, RESULT_TOO_LARGE])
def test_a_batch_its_map_splits_after_it_failed_whole_is_no_failure(
    driver: Driver, ending: tuple[p.Status, TaskError]
) -> None:
    batch_that_failed_whole(driver, 1, ending)

    listed = operate(driver, p.ListFailed(10))
    retried = operate(driver, p.Retry([], "retried"))
    status = driver.scheduler.status(driver.now)

    assert (listed["failed"], listed["kept"]) == ([], 0)
    assert retried["retried"] == []
    assert status["recent_failures"] == []
    totals = status["totals"]
    assert (totals["failed"], totals["split"]) == (0, 1)  # type: ignore[index]


@pytest.mark.parametrize("ending", [TIMED_OUT, RESULT_TOO_LARGE])
def test_a_timed_out_batch_of_a_client_that_does_not_say_it_splits_is_a_failure(
    driver: Driver, ending: tuple[p.Status, TaskError]
) -> None:
    # An older client: it splits such batches too, but the broker cannot know.
    batch_that_failed_whole(driver, 1, ending, flags=p.Flags.BATCH)

    [record] = operate(driver, p.ListFailed(10))["failed"]

    assert record["task_id"] == 1
    totals = driver.scheduler.totals()
    assert (totals["failed"], totals["split"]) == (1, 0)


@pytest.mark.parametrize(
    "ending",
    [
        (p.Status.NOT_FOUND, FunctionNotFound("FunctionNotFound", "jobs:work")),
        (p.Status.REJECTED, TaskRejected("PickleNotAllowed", "no pickles here")),
        (p.Status.RAISED, TaskRaised("ValueError", "the batch itself was bad")),
    ],
)
def test_a_splittable_batch_is_a_failure_when_its_map_would_not_split_it(
    driver: Driver, ending: tuple[p.Status, TaskError]
) -> None:
    # Every item alone would fail the same way, so its map does not split it.
    batch_that_failed_whole(driver, 1, ending)

    [record] = operate(driver, p.ListFailed(10))["failed"]

    assert (record["task_id"], record["outcome"]) == (1, ending[0].name.lower())
    assert driver.scheduler.totals()["split"] == 0


def test_a_retried_batch_is_no_longer_splittable_as_no_map_awaits_it(
    driver: Driver,
) -> None:
    not_found = (p.Status.NOT_FOUND, FunctionNotFound("FunctionNotFound", "x"))
    batch_that_failed_whole(driver, 1, not_found)
    operate(driver, p.Retry([], "retried"))
    [rerun] = assignments(driver.ready(W1, worker_id="w-again"), W1)

    status, error = TIMED_OUT
    driver.done(W1, rerun, status, pack_error(error))

    assert rerun.flags == p.Flags.BATCH
    [record] = operate(driver, p.ListFailed(10))["failed"]
    assert record["outcome"] == "timeout"
    assert driver.scheduler.totals()["split"] == 0


def test_a_split_batch_remembered_as_failed_by_an_older_broker_is_dropped(
    driver: Driver,
) -> None:
    error = pack_error(TaskRaised("PoisonTask", "the worker process died"))
    record = FailedTask(
        7, "alice", 7, FUNCTION, p.Status.POISON, error, 0.0, b"", p.Flags.BATCH, None
    )

    driver.scheduler.restore_failure(record)
    effects = driver.flush()

    assert list(driver.scheduler.failed) == []
    assert effects.unfailed == [7]


def test_status_says_a_full_broker_accepts_no_new_task() -> None:
    # Tester 23's broker at max_queued_tasks refused every new task, and
    # status, with /health, said nothing of it.
    driver = Driver(limits=Limits(max_queued_tasks=2))
    driver.hello()
    driver.submit(task(1))
    assert driver.scheduler.status(driver.now)["not_accepting"] is None

    driver.submit(task(2))

    not_accepting = driver.scheduler.status(driver.now)["not_accepting"]
    assert isinstance(not_accepting, str) and "max_queued_tasks" in not_accepting


def test_status_names_the_queues_no_worker_serves(driver: Driver) -> None:
    driver.submit(task(1), task(2, function="jobs:unserved"))
    driver.ready(W1)  # serves FUNCTION, and takes its task

    driver.submit(task(3))
    status = driver.scheduler.status(driver.now)

    assert status["unserved"] == ["jobs:unserved"]


def test_status_counts_outcomes_and_shows_recent_failures(driver: Driver) -> None:
    fail(driver, 1)
    driver.submit(task(2, function="jobs:unserved"))
    driver.cancel(2)
    driver.submit(task(3, function="not a function name"))  # refused, uncounted

    status = driver.scheduler.status(driver.now)

    assert status["totals"] == {
        "submitted": 2,
        "restored": 0,
        "completed": 0,
        "failed": 1,
        "cancelled": 1,
        "split": 0,
        "rejected": 1,
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


def test_an_operator_command_that_changes_things_is_a_notice_for_the_log(
    driver: Driver,
) -> None:
    # A tester found no line in the broker's log of a purge: who dropped the
    # work, and when, was nowhere to be read afterwards.
    driver.submit(task(1), task(2))

    purged = driver.client(OPERATOR, p.Purge(FUNCTION))
    listed = driver.client(OPERATOR, p.ListFailed())

    assert notices(purged, OperatorActed) == [
        OperatorActed("operator", p.Purge(FUNCTION), {"purged": 2})
    ]
    assert notices(listed, OperatorActed) == []  # asking changes nothing


def test_purge_leaves_running_tasks_alone(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    driver.ready(W1)

    report = operate(driver, p.Purge(FUNCTION))

    assert report == {"purged": 1}
    assert driver.scheduler.status(driver.now)["running"] == {FUNCTION: 1}


def departed_with(driver: Driver, results_waiting: int, queued: int) -> None:
    """Alice leaves results waiting and tasks queued, then vanishes."""
    driver.submit(*[task(i) for i in range(1, results_waiting + 1)])
    work = assignments(driver.ready(W1, capacity=results_waiting), W1)
    for assignment in work:
        driver.done(W1, assignment)
    driver.worker(W1, p.Bye())
    driver.submit(*[task(100 + i) for i in range(queued)])
    driver.unreachable(CLIENT)


def test_purging_a_session_that_left_drops_its_results_and_queued_tasks(
    driver: Driver,
) -> None:
    departed_with(driver, results_waiting=2, queued=3)

    report = operate(driver, p.Purge(session="alice"))

    assert report == {
        "session": "alice",
        **{"results": 2, "expired": 0, "queued": 3, "running": 0, "for_sinks": 0},
    }
    assert not driver.scheduler.tasks
    assert "alice" not in driver.scheduler.recipients
    assert driver.scheduler.totals()["cancelled"] == 3


def test_purging_a_session_counts_its_expired_results_apart() -> None:
    # Tester 36: status said results_waiting 9, results_expired 1, and the
    # purge said it dropped 10 results waiting for delivery.
    driver = Driver(Limits(result_ttl_s=2.0))
    driver.hello()
    driver.hello(OPERATOR, "operator")
    driver.submit(task(1), task(2))
    first, second = assignments(driver.ready(W1, capacity=2), W1)
    driver.unreachable(CLIENT)
    driver.done(W1, first)
    driver.tick(1.5)
    driver.done(W1, second)
    driver.tick(1.0)  # the first result is past its TTL: a tombstone
    status = driver.scheduler.status(driver.now)
    assert (status["results_waiting"], status["results_expired"]) == (1, 1)

    report = operate(driver, p.Purge(session="alice"))

    assert (report["results"], report["expired"]) == (1, 1)
    assert not driver.scheduler.tasks


def test_purging_a_session_stops_its_running_tasks_in_one_release_per_worker(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    work = assignments(driver.ready(W1, capacity=2), W1)
    driver.unreachable(CLIENT)

    effects = driver.client(OPERATOR, p.Purge(session="alice"))

    [reply] = sent(effects, OPERATOR, p.OperatorReply)
    assert reply.report["running"] == 2
    [release] = sent(effects, W1, p.Release)
    assert sorted(release.tickets) == sorted((a.ticket, a.attempt) for a in work)
    assert not driver.scheduler.tasks
    assert not results(driver.done(W1, work[0]))  # crossed the RELEASE: dropped


def test_purging_a_connected_session_is_refused(driver: Driver) -> None:
    driver.submit(task(1))

    report = operate(driver, p.Purge(session="alice"))

    assert "connected" in str(report["refused"])
    assert len(driver.scheduler.tasks) == 1


def test_purging_a_session_leaves_other_sessions_and_sinks_alone(
    driver: Driver,
) -> None:
    driver.hello(OPERATOR, "bob")
    driver.submit(task(1), peer=OPERATOR)
    driver.hello(b"sink", "reader", sink="totals")
    driver.submit(task(2, sink="totals"))
    [one, two] = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, one)
    driver.done(W1, two)
    driver.unreachable(CLIENT)
    driver.unreachable(b"sink")

    report = operate(driver, p.Purge(session="alice"))

    # alice's task to the sink "totals" is the sink's to drop, but hers.
    assert report == {
        "session": "alice",
        **{"results": 0, "expired": 0, "queued": 0, "running": 0, "for_sinks": 1},
    }
    assert len(driver.scheduler.tasks) == 2


def test_refusal_at_the_task_limit_says_what_the_broker_holds() -> None:
    driver = Driver(Limits(max_queued_tasks=4))
    driver.hello()
    driver.hello(OPERATOR, "operator")
    departed_with(driver, results_waiting=3, queued=1)

    effects = driver.submit(task(9), peer=OPERATOR)

    message = error_report(results(effects, OPERATOR)[0])["message"]
    assert "4 tasks" in message and "max_queued_tasks" in message
    assert "1 queued, 0 running, 3 results waiting for delivery" in message
    assert "purge --session" in message


def test_cancel_by_id_says_what_became_of_the_task(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    driver.ready(W1)  # takes task 1

    outcomes = [
        operate(driver, p.CancelTask("alice", task_id))["outcome"]
        for task_id in (1, 2, 2, 77)
    ]

    assert outcomes == ["cancelled", "cancelled", "cancelled already", "unknown"]


def test_cancelling_a_running_task_stops_it_on_its_worker_and_tells_its_client(
    driver: Driver,
) -> None:
    # A tester's hung task (no timeout) could not be stopped: cancel said
    # "it is running, and will finish", which a hung task never does.
    driver.submit(task(1))
    [held] = assignments(driver.ready(W1), W1)

    effects = driver.client(OPERATOR, p.CancelTask("alice", 1))
    delivered = results(effects) + results(driver.flush())

    [reply] = sent(effects, OPERATOR, p.OperatorReply)
    assert isinstance(reply, p.OperatorReply)
    assert reply.report["outcome"] == "cancelled"
    [release] = sent(effects, W1, p.Release)
    assert isinstance(release, p.Release)
    assert list(release.tickets) == [(held.ticket, held.attempt)]
    assert [r.status for r in delivered] == [p.Status.CANCELLED]
    assert driver.scheduler.status(driver.now)["running"] == {}


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


# --- within a scope: a client with limited rights (a key's .functions file) ------

MINE, THEIRS = b"mine", b"theirs"
SECRET = "jobs:secret"


def own_scope(*functions: str) -> Scope:
    """The scope of the sessions named ``k1.*`` that may submit `functions`."""
    return Scope("k1.", lambda function, flags: function in functions)


def operate_within(driver: Driver, scope: Scope, command: p.Command) -> dict[str, Any]:
    [reply] = sent(driver.client(MINE, command, scope), MINE, p.OperatorReply)
    assert isinstance(reply, p.OperatorReply)
    return reply.report


def fail_for(driver: Driver, peer: bytes, task_id: int, function: str) -> int:
    """Run a task of `peer` to a failure; return its ticket."""
    driver.submit(task(task_id, function=function), peer=peer)
    [assignment] = assignments(
        driver.ready(W1, services=[function], worker_id=f"w-{peer!r}-{task_id}"), W1
    )
    error = pack_error(TaskRaised("ValueError", f"bad input {task_id}"))
    driver.done(W1, assignment, p.Status.RAISED, error)
    return assignment.ticket


@pytest.fixture
def tenants() -> Driver:
    """Two sessions of two keys, and a failure each."""
    driver = Driver()
    driver.hello(MINE, "k1.s")
    driver.hello(THEIRS, "k2.s")
    fail_for(driver, MINE, 1, FUNCTION)
    fail_for(driver, THEIRS, 1, SECRET)
    return driver


def test_status_within_a_scope_shows_only_its_sessions_and_functions(
    tenants: Driver,
) -> None:
    tenants.ready(b"w-both", services=[FUNCTION, SECRET], capacity=0)
    tenants.submit(task(2, function=SECRET), peer=THEIRS)
    tenants.submit(task(3), peer=THEIRS)

    [reply] = sent(
        tenants.client(MINE, p.StatusRequest(), own_scope(FUNCTION)),
        MINE,
        p.StatusReply,
    )
    mine = reply.status  # type: ignore[attr-defined]
    everything = tenants.scheduler.status(tenants.now)

    assert mine["scope"] == "k1."
    assert [c["name"] for c in mine["clients"]] == ["k1.s"]
    assert [f["session"] for f in mine["recent_failures"]] == ["k1.s"]
    assert mine["queued"] == {FUNCTION: 1}  # every client's tasks of its function
    assert [w["services"] for w in mine["workers"]] == [[FUNCTION]]
    assert mine["totals"] == everything["totals"]
    assert {c["name"] for c in everything["clients"]} == {"k1.s", "k2.s"}  # type: ignore[attr-defined]
    assert "scope" not in everything


def test_status_within_a_scope_names_no_other_clients_running_task(
    tenants: Driver,
) -> None:
    tenants.submit(task(2), peer=THEIRS)
    tenants.ready(b"w-shared", services=[FUNCTION])

    mine = operate_status_within(tenants, own_scope(FUNCTION))

    [worker] = [w for w in mine["workers"] if w["id"] == "w-shared"]
    assert worker["oldest_running_s"] is not None
    assert worker["oldest_task"] is None  # k2.s's task: not its business


def operate_status_within(driver: Driver, scope: Scope) -> dict[str, Any]:
    [reply] = sent(driver.client(MINE, p.StatusRequest(), scope), MINE, p.StatusReply)
    return reply.status  # type: ignore[attr-defined, no-any-return]


def test_failed_and_retry_within_a_scope_reach_only_its_sessions_failures(
    tenants: Driver,
) -> None:
    scope = own_scope(FUNCTION)
    theirs = next(r.ticket for r in tenants.scheduler.failed if r.session == "k2.s")

    listed = operate_within(tenants, scope, p.ListFailed(10))
    refused = operate_within(tenants, scope, p.Retry([theirs], "retried"))
    retried = operate_within(tenants, scope, p.Retry([], "retried"))

    assert [r["session"] for r in listed["failed"]] == ["k1.s"] and listed["kept"] == 1
    assert refused["retried"] == []
    assert "this client's sessions" in dict(refused["refused"])[theirs]
    assert len(retried["retried"]) == 1 and retried["refused"] == []
    # The rerun is the client's own: its failure is the client's to retry too.
    [rerun] = assignments(tenants.ready(W1, worker_id="w-again"), W1)
    error = pack_error(TaskRaised("ValueError", "still bad"))
    tenants.done(W1, rerun, p.Status.RAISED, error)
    again = operate_within(tenants, scope, p.ListFailed(10))["failed"]
    assert [r["session"] for r in again] == [scope.retry_session]
    assert [r.session for r in tenants.scheduler.failed] == [
        "k2.s",
        "k1.ventilator:retry",
    ]


def test_a_retry_within_a_scope_is_checked_against_its_rights(
    tenants: Driver,
) -> None:
    ticket = next(r.ticket for r in tenants.scheduler.failed if r.session == "k1.s")

    report = operate_within(tenants, own_scope(SECRET), p.Retry([ticket], "retried"))

    assert report["retried"] == []
    assert "may not submit" in dict(report["refused"])[ticket]
    assert len(tenants.scheduler.failed) == 2


def test_a_retry_refused_within_a_scope_says_so_of_its_own_failures_only(
    tenants: Driver,
) -> None:
    # The shell refuses the sink; another key's failure is still refused as
    # not the client's, which no sink right would change.
    mine = next(r.ticket for r in tenants.scheduler.failed if r.session == "k1.s")
    theirs = next(r.ticket for r in tenants.scheduler.failed if r.session == "k2.s")
    scope = replace(own_scope(FUNCTION), retry_refusal="not into that sink")

    report = operate_within(tenants, scope, p.Retry([mine, theirs], "retried"))

    assert report["retried"] == []
    refused = dict(report["refused"])
    assert refused[mine] == "not into that sink"
    assert "this client's sessions" in refused[theirs]


def test_a_failed_mdp_request_is_named_as_its_queue_and_metrics_name_it() -> None:
    error = pack_value({"type": "MdpError", "message": "bad reply"})
    record = FailedTask(
        1,
        "mdp:0a",
        1,
        "badret",
        p.Status.RAISED,
        error,
        0.0,
        None,
        int(p.Flags.RAW),
        None,
    )

    assert record.report(1.0)["function"] == "mdp:badret"

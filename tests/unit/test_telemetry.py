"""Telemetry: per-turn counts become snapshots, and snapshots become metrics."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ventilator import protocol as p
from ventilator import telemetry as telemetry_module
from ventilator.broker import Broker, BrokerConfig
from ventilator.effects import Effects
from ventilator.errors import TaskRaised, TaskTimeout
from ventilator.journal import open_journal
from ventilator.logs import REMOTE_TRACEBACK, JsonFormatter
from ventilator.policy import Limits
from ventilator.scheduler import Task
from ventilator.serialization import BatchPacker, pack_batch_outcomes, pack_error
from ventilator.telemetry import BUCKETS_S, Telemetry, metrics_registry

from .driver import FUNCTION, Driver, assignments, task

W1 = b"worker-1"


def run_one_turn_each(driver: Driver, telemetry: Telemetry) -> None:
    """Three tasks: two succeed after 0.2 s of work, one raises."""
    telemetry.record(driver.submit(task(1), task(2), task(3)))
    running = assignments(driver.ready(W1, capacity=3), W1)
    driver.now += 0.5
    outcomes = [
        p.Outcome(a.ticket, a.attempt, status, b"r", 0.2)
        for a, status in zip(
            running, [p.Status.OK, p.Status.OK, p.Status.RAISED], strict=True
        )
    ]
    telemetry.record(driver.worker(W1, p.Done(outcomes)))
    telemetry.publish(driver.now, driver.scheduler)


def samples(
    telemetry: Telemetry,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics_registry(lambda: telemetry.latest)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_functions_past_the_label_limit_are_counted_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tester 26 named 20,000 functions from one client: /metrics grew to
    # 61 MB, about 40 series a name, for as long as the broker ran.
    monkeypatch.setattr(telemetry_module, "MAX_FUNCTION_LABELS", 3)
    driver, telemetry = Driver(), Telemetry()
    driver.hello()

    for number in range(5):
        telemetry.record(driver.submit(task(number, function=f"typo{number}:f")))
    telemetry.publish(driver.now, driver.scheduler)

    submitted = {
        dict(labels)["function"]: value
        for (name, labels), value in samples(telemetry).items()
        if name == "ventilator_tasks_submitted_total"
    }
    assert submitted == {"typo0:f": 1, "typo1:f": 1, "typo2:f": 1, "(other)": 2}


def test_counters_and_histograms_follow_the_tasks_finished() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()

    run_one_turn_each(driver, telemetry)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    assert metrics[("ventilator_tasks_submitted_total", function)] == 3
    assert metrics[("ventilator_tasks_completed_total", function)] == 2
    raised = function | {("outcome", "raised")}
    assert metrics[("ventilator_tasks_failed_total", raised)] == 1
    assert metrics[("ventilator_task_duration_seconds_count", function)] == 3
    assert abs(metrics[("ventilator_task_duration_seconds_sum", function)] - 0.6) < 1e-9
    le_025 = function | {("le", "0.25")}
    assert metrics[("ventilator_task_duration_seconds_bucket", le_025)] == 3
    assert metrics[("ventilator_workers_connected", frozenset())] == 1


def test_history_samples_completions_per_interval() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    telemetry.publish(driver.now, driver.scheduler)  # the first, empty sample

    run_one_turn_each(driver, telemetry)
    telemetry.publish(driver.now + 1.0, driver.scheduler)  # a second has passed

    assert telemetry.latest is not None
    last = telemetry.latest.history[-1]
    assert (last["completed"], last["failed"]) == (2, 1)
    assert abs(last["duration_mean_s"] - 0.2) < 1e-9


def test_nothing_is_published_before_it_is_due() -> None:
    driver, telemetry = Driver(), Telemetry(publish_every_s=10.0)
    telemetry.publish(driver.now, driver.scheduler)
    first = telemetry.latest

    telemetry.publish(driver.now + 1.0, driver.scheduler)

    assert telemetry.latest is first
    assert tuple(sorted(BUCKETS_S)) == BUCKETS_S


def test_json_log_lines_are_single_json_objects_with_the_exception() -> None:
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        record = logging.LogRecord(
            "ventilator.broker",
            logging.ERROR,
            __file__,
            1,
            "lost %d tasks",
            (3,),
            sys.exc_info(),
        )

    line = JsonFormatter().format(record)

    entry = json.loads(line)
    assert "\n" not in line
    assert (entry["level"], entry["message"]) == ("ERROR", "lost 3 tasks")
    assert "disk on fire" in entry["exception"]


def test_a_traceback_from_another_process_goes_where_an_exception_s_would() -> None:
    # A task process's import traceback was glued into a JSON line's message,
    # where a log shipper looks for it under "exception".
    remote = "Traceback ...\nImportError: on purpose\n"
    record = logging.LogRecord(
        "ventilator.pool",
        logging.ERROR,
        __file__,
        1,
        "cannot start%s",
        (f"\n{remote}",),
        None,
    )
    record.__dict__[REMOTE_TRACEBACK] = remote

    entry = json.loads(JsonFormatter().format(record))

    assert entry["message"] == "cannot start"
    assert entry["exception"] == "Traceback ...\nImportError: on purpose"


def test_a_json_line_carries_the_message_s_key_value_fields_as_fields() -> None:
    # Tester 22: the ticket, function and client of a failure were only
    # inside the message text, where a log shipper cannot filter on them.
    record = logging.LogRecord(
        "ventilator.broker",
        logging.WARNING,
        __file__,
        1,
        "task failed as poison ticket=%d function=%s client=%s; it ran %s",
        (42, "tasks:crash", "alice-1", "3 times (max_attempts=3)"),
        None,
    )

    entry = json.loads(JsonFormatter().format(record))

    assert entry["fields"] == {
        "ticket": 42,
        "function": "tasks:crash",
        "client": "alice-1",
    }
    assert entry["message"].startswith("task failed as poison ticket=42")


def test_a_json_line_without_fields_has_none() -> None:
    record = logging.LogRecord(
        "ventilator.broker", logging.INFO, __file__, 1, "plain words", (), None
    )

    assert "fields" not in json.loads(JsonFormatter().format(record))


# --- items: a batch of map counts each of its items --------------------------------


def batch_of(task_id: int, items: list[object]) -> p.TaskSpec:
    payload = BatchPacker().batch([BatchPacker().item(item) for item in items])
    return task(task_id, payload=payload, flags=p.Flags.BATCH)


def test_items_of_a_batch_are_counted_one_by_one_beside_the_task() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    telemetry.publish(driver.now, driver.scheduler)  # the first, empty sample
    telemetry.record(driver.submit(batch_of(1, list(range(20))), task(2)))
    running = assignments(driver.ready(W1, capacity=2), W1)
    raised = TaskRaised("ValueError", "bad item").to_wire()
    outcomes = [[p.Status.OK.value, i] for i in range(17)] + [[1, raised]] * 3
    batch_result = pack_batch_outcomes(0.01, outcomes)
    done = [
        p.Outcome(a.ticket, a.attempt, p.Status.OK, batch_result if a.flags else b"r")
        for a in running
    ]

    telemetry.record(driver.worker(W1, p.Done(done)))
    telemetry.publish(driver.now + 1.0, driver.scheduler)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    failed = function | {("outcome", "raised")}
    assert metrics[("ventilator_items_submitted_total", function)] == 21
    assert metrics[("ventilator_items_completed_total", function)] == 18
    assert metrics[("ventilator_items_failed_total", failed)] == 3
    assert metrics[("ventilator_tasks_submitted_total", function)] == 2
    assert metrics[("ventilator_tasks_completed_total", function)] == 2
    assert telemetry.latest is not None
    last = telemetry.latest.history[-1]
    assert (last["completed"], last["failed"]) == (18, 3)
    assert (last["tasks_completed"], last["tasks_failed"]) == (2, 0)
    assert telemetry.latest.status["items"] == {
        "submitted": 21,
        "completed": 18,
        "failed": 3,
        "cancelled": 0,
        "split": 0,
        "retried": 0,
    }


def test_an_item_its_map_retries_counts_as_failed_once_when_it_ends() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    batch = batch_of(1, ["a", "b", "c"])
    telemetry.record(driver.submit(replace(batch, retries=1)))
    [running] = assignments(driver.ready(W1), W1)
    raised = TaskRaised("KeyError", "c").to_wire()
    outcomes = [[p.Status.OK.value, "a"], [p.Status.OK.value, "b"], [1, raised]]
    result = pack_batch_outcomes(0.01, outcomes)
    telemetry.record(driver.done(W1, running, payload=result))
    # Its map runs the item that raised alone, with one retry fewer: none.
    submitted = driver.submit(task(2, retries=0))
    telemetry.record(submitted)
    [alone] = assignments(submitted, W1)

    error = pack_error(TaskRaised("KeyError", "c"))
    telemetry.record(driver.done(W1, alone, p.Status.RAISED, error))
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    assert (
        metrics[("ventilator_items_failed_total", function | {("outcome", "raised")})]
        == 1
    )
    assert metrics[("ventilator_items_retried_total", function)] == 1
    assert metrics[("ventilator_items_completed_total", function)] == 2
    assert telemetry.latest is not None
    items = telemetry.latest.status["items"]
    assert (items["failed"], items["retried"], items["submitted"]) == (1, 1, 4)


def test_items_a_batch_left_unrun_at_its_budget_count_split() -> None:
    # Its map sends them again, as new submissions: counted nowhere in the
    # batch, they made submitted items exceed every ending (tester 24: 5 of
    # 9.7 million items unaccounted for).
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    telemetry.record(driver.submit(batch_of(1, ["a", "b", "c", "d"])))
    [running] = assignments(driver.ready(W1), W1)
    ran = [[p.Status.OK.value, "a"], [p.Status.OK.value, "b"]]

    telemetry.record(driver.done(W1, running, payload=pack_batch_outcomes(0.2, ran)))
    telemetry.publish(driver.now, driver.scheduler)

    assert telemetry.latest is not None
    items = telemetry.latest.status["items"]
    assert (items["submitted"], items["completed"], items["split"]) == (4, 2, 2)


def test_a_batch_handed_back_to_its_map_counts_split_not_failed() -> None:
    driver, telemetry = Driver(Limits(max_attempts=1)), Telemetry()
    driver.hello()
    telemetry.record(driver.submit(batch_of(1, ["a", "b", "c", "d"])))
    [running] = assignments(driver.ready(W1), W1)

    crashed = p.Outcome(running.ticket, running.attempt, p.Status.CRASHED, b"")
    telemetry.record(driver.worker(W1, p.Done([crashed])))
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    assert metrics[("ventilator_items_split_total", function)] == 4
    assert metrics[("ventilator_tasks_split_total", function)] == 1
    assert not [name for name, _ in metrics if name.endswith("_failed_total")]
    assert telemetry.latest is not None
    items = telemetry.latest.status["items"]
    assert (items["failed"], items["split"]) == (0, 4)
    assert telemetry.latest.history[-1]["tasks_failed"] == 0


@pytest.mark.parametrize(
    ("flags", "split"),
    [(p.Flags.BATCH | p.Flags.SPLITTABLE, True), (p.Flags.BATCH, False)],
)
def test_a_timed_out_batch_counts_split_only_if_its_client_said_it_splits_it(
    flags: int, split: bool
) -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    telemetry.publish(driver.now, driver.scheduler)  # the first, empty sample
    spec = replace(batch_of(1, ["a", "b", "c", "d"]), flags=flags)
    telemetry.record(driver.submit(spec))
    [running] = assignments(driver.ready(W1), W1)
    error = pack_error(TaskTimeout("TaskTimeout", "ran past its 1s"))

    telemetry.record(driver.done(W1, running, p.Status.TIMEOUT, error))
    driver.now += telemetry.sample_every_s
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    timeout = function | {("outcome", "timeout")}
    assert metrics.get(("ventilator_items_split_total", function), 0) == 4 * split
    assert metrics.get(("ventilator_tasks_split_total", function), 0) == split
    assert metrics.get(("ventilator_items_failed_total", timeout), 0) == 4 * (not split)
    assert telemetry.latest is not None
    items = telemetry.latest.status["items"]
    assert (items["failed"], items["split"]) == (4 * (not split), 4 * split)
    assert telemetry.latest.history[-1]["tasks_failed"] == (not split)


def test_tasks_restored_from_the_journal_count_as_submitted(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "journal.db")
    waiting = Task(1, "alice", 1, FUNCTION, b"\x91\x01", 0, None, 0, "alice")
    journal.commit([waiting], [], [])
    journal.close()
    config = BrokerConfig(
        frontend="tcp://127.0.0.1:*",
        backend="tcp://127.0.0.1:*",
        journal=str(tmp_path / "journal.db"),
        telemetry=True,
    )
    broker = Broker(config)

    broker.bind()
    broker.stop()
    broker.serve()  # returns at once, closing everything

    assert broker.telemetry is not None
    assert broker.telemetry.submitted == {FUNCTION: 1}


def test_a_restored_task_its_worker_takes_back_counts_in_both_histograms() -> None:
    # Tester 36 saw fewer in the histograms than completed after a restart.
    # After one, a worker that still runs a task takes it back as it returns:
    # it ran for as long as the worker says, and waited from its restore.
    driver, telemetry = Driver(), Telemetry()
    restored = Task(7, "alice", 7, FUNCTION, b"\x91\x01", 0, None, 0, "alice")
    driver.scheduler.restore(restored, driver.now)
    telemetry.record(Effects(accepted=[restored]))  # as the broker's replay does
    driver.hello()
    named = p.Assignment(7, 3, FUNCTION, b"")
    driver.now += 0.5
    telemetry.record(driver.ready(W1, held=[named]))

    telemetry.record(driver.done(W1, named, duration_s=0.2))
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    function = frozenset({("function", FUNCTION)})
    assert metrics[("ventilator_tasks_completed_total", function)] == 1
    assert metrics[("ventilator_task_duration_seconds_count", function)] == 1
    assert metrics[("ventilator_task_duration_seconds_sum", function)] == 0.2
    assert metrics[("ventilator_task_queue_wait_seconds_count", function)] == 1
    assert metrics[("ventilator_task_queue_wait_seconds_sum", function)] == 0.5


def test_worker_slots_are_the_slots_declared_and_credit_is_apart() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.ready(W1, capacity=47, slots=4)  # adaptive prefetch: credit grows
    driver.ready(b"worker-2", capacity=6)  # a fixed --prefetch declares no slots
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    assert metrics[("ventilator_worker_slots", frozenset())] == 4
    assert metrics[("ventilator_worker_credit", frozenset())] == 47 + 6


def test_a_worker_that_serves_nothing_is_counted_apart_not_in_slots_or_credit() -> None:
    # Tester 36: a worker whose task processes could not start registered
    # without functions, and its slots counted as usable: /metrics looked the
    # same as for a worker that ran tasks, so no alert could fire.
    driver, telemetry = Driver(), Telemetry()
    driver.ready(W1, capacity=4, slots=2)
    driver.ready(b"worker-2", capacity=8, slots=8, services=[])
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    gauges = {
        name.removeprefix("ventilator_"): value
        for (name, _), value in metrics.items()
        if name.startswith(("ventilator_worker_", "ventilator_workers_"))
    }
    assert gauges == {
        "workers_connected": 2,
        "workers_not_serving": 1,
        "worker_slots": 2,
        "worker_credit": 4,
    }


def test_a_broker_refusing_every_new_task_says_so_in_a_gauge() -> None:
    # Tester 36: only /health and status said "not_accepting"; the refused
    # counter rises only once a client's task fails.
    driver, telemetry = Driver(Limits(max_queued_tasks=1)), Telemetry()
    driver.hello()
    telemetry.publish(driver.now, driver.scheduler)
    accepting = samples(telemetry)[("ventilator_not_accepting", frozenset())]

    driver.submit(task(1))  # the broker is full now
    telemetry.publish(driver.now + 1.0, driver.scheduler)

    refusing = samples(telemetry)[("ventilator_not_accepting", frozenset())]
    assert (accepting, refusing) == (0, 1)


def test_oldest_running_task_is_a_gauge_per_worker_holding_a_task() -> None:
    driver, telemetry = Driver(), Telemetry()
    driver.hello()
    driver.ready(W1, capacity=1, slots=1)
    driver.ready(b"worker-2", capacity=1, slots=1, services=["jobs:none"])
    driver.submit(task(1))
    driver.now += 2.5
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    oldest = {
        dict(labels)["worker"]: value
        for (name, labels), value in metrics.items()
        if name == "ventilator_oldest_running_task_seconds"
    }
    assert oldest == {"worker-1": 2.5}


def test_a_draining_worker_has_no_room_in_slots_or_credit() -> None:
    # It takes no new task: a queue waiting on it alone must read as no room.
    driver, telemetry = Driver(), Telemetry()
    driver.ready(W1, capacity=4, slots=2)
    driver.ready(b"worker-2", capacity=8, slots=8)
    driver.worker(b"worker-2", p.Drain())
    telemetry.publish(driver.now, driver.scheduler)

    metrics = samples(telemetry)
    assert metrics[("ventilator_worker_slots", frozenset())] == 2
    assert metrics[("ventilator_worker_credit", frozenset())] == 4
    assert metrics[("ventilator_workers_not_serving", frozenset())] == 0

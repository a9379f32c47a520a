"""Operator commands and logs against a running broker: failed, retry, purge,
cancel, --log-format json."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

import ventilator
from ventilator._words import counted
from ventilator.broker import Broker, BrokerConfig
from ventilator.policy import Limits
from ventilator.scheduler import RETRY_SESSION

from .conftest import (
    MORE_TASKS,
    START_TIMEOUT_S,
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    free_port,
    json_lines,
    log_of,
    run_cli,
    status_when,
    wait_for_workers,
    wait_until,
)

UNSERVED = f"{MORE_TASKS}:cube"  # no worker in these tests serves it


def failed_once(client: ventilator.Client) -> None:
    future = client.submit(f"{TASKS}:fail", "on purpose")
    with pytest.raises(ventilator.TaskRaised):
        future.result(30)


@pytest.fixture
def worker_client(launch: Launcher, broker: BrokerProcess) -> ventilator.Client:
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    return client


def test_failed_lists_a_failure_with_its_reason(
    processes: Processes, broker: BrokerProcess, worker_client: ventilator.Client
) -> None:
    failed_once(worker_client)

    listed = run_cli(processes, "failed", "--connect", broker.frontend, "--json")
    table = run_cli(processes, "failed", "--connect", broker.frontend)

    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert (record["session"], record["outcome"]) == (worker_client.session, "raised")
    assert record["message"] == "failed on purpose: on purpose"
    assert "Traceback" in record["traceback"]
    assert str(record["ticket"]) in table.stdout and "raised" in table.stdout


def test_retry_reruns_a_failed_task_for_the_sink(
    processes: Processes, broker: BrokerProcess, worker_client: ventilator.Client
) -> None:
    failed_once(worker_client)
    [first] = worker_client.failed()

    retried = run_cli(processes, "retry", "--all", "--connect", broker.frontend)

    assert retried.returncode == 0, retried.stderr
    # The rerun fails the same way: it is now the broker's own failed task.
    [again] = wait_until(
        lambda: [f for f in worker_client.failed() if f["session"] == RETRY_SESSION],
        30,
        "the rerun to fail again",
    )
    assert again["task_id"] == first["ticket"]
    with ventilator.Sink("retried", broker.frontend) as sink:
        result = next(iter(sink.results(idle_timeout_s=10)))
    assert (result.session, result.task_id) == (RETRY_SESSION, first["ticket"])
    assert isinstance(result.error, ventilator.TaskRaised)


def test_failed_tasks_outlive_a_broker_restart_and_can_be_retried(
    launch: Launcher, tmp_path: Path
) -> None:
    restartable: dict[str, Any] = {
        "frontend": f"tcp://127.0.0.1:{free_port()}",
        "backend": f"tcp://127.0.0.1:{free_port()}",
        "durability": "process",
        "journal": tmp_path / "journal.db",
    }
    first = launch.broker(**restartable)
    launch.worker(first)
    client = launch.client(first)
    wait_for_workers(client, 1)
    failed_once(client)
    [before] = client.failed()

    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)
    second = launch.broker(**restartable)
    observer = launch.client(second)
    [after] = observer.failed()

    assert {k: v for k, v in after.items() if k != "failed_s_ago"} == {
        k: v for k, v in before.items() if k != "failed_s_ago"
    }
    assert after["failed_s_ago"] >= before["failed_s_ago"]
    report = observer.retry([after["ticket"]], "retried")
    assert report["retried"] == [after["ticket"]]


def test_retry_of_an_unknown_ticket_says_so_and_exits_1(
    processes: Processes, broker: BrokerProcess
) -> None:
    retried = run_cli(processes, "retry", "424242", "--connect", broker.frontend)

    assert retried.returncode == 1
    assert "424242" in retried.stderr
    # Nothing reran: no word of a sink its results would go to.
    assert retried.stdout.strip() == "retried 0 tasks"


def test_purge_asks_first_and_cancels_the_queue_with_yes(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    client = launch.client(broker)
    futures = [client.submit(UNSERVED, x) for x in range(3)]
    status_when(client, lambda s: s["queued"].get(UNSERVED) == 3, 10, "3 queued")

    declined = run_cli(
        processes, "purge", UNSERVED, "--connect", broker.frontend, input_text="n\n"
    )
    assert declined.returncode == 1
    assert client.status()["queued"] == {UNSERVED: 3}

    purged = run_cli(
        processes, "purge", UNSERVED, "--yes", "--connect", broker.frontend
    )

    assert purged.returncode == 0, purged.stderr
    assert "3" in purged.stdout
    wait_until(lambda: all(f.cancelled() for f in futures), 10, "futures cancelled")
    assert client.status()["queued"] == {}
    with pytest.raises(CancelledError):
        futures[0].result(0)


def test_purge_with_nothing_waiting_asks_nothing(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    client = launch.client(broker)
    client.submit(UNSERVED, 1).cancel()  # known to the broker, nothing waits
    status_when(client, lambda s: not s["queued"], 10, "nothing queued")

    purged = run_cli(
        processes, "purge", UNSERVED, "--connect", broker.frontend, input_text=""
    )

    assert "Cancel the" not in purged.stdout + purged.stderr
    assert "Aborted" not in purged.stderr


def test_cancel_by_id_cancels_a_queued_task_and_reports_unknown_ones(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    client = launch.client(broker)
    future = client.submit(UNSERVED, 2)
    status_when(client, lambda s: s["queued"].get(UNSERVED) == 1, 10, "one queued")
    task_id = str(future.task_id)  # type: ignore[attr-defined]

    cancelled = run_cli(
        processes,
        "cancel",
        client.session,
        task_id,
        "--yes",
        "--connect",
        broker.frontend,
    )
    unknown = run_cli(
        processes, "cancel", client.session, "1", "--yes", "--connect", broker.frontend
    )
    nobody = run_cli(
        processes, "cancel", "nobody", "1", "--yes", "--connect", broker.frontend
    )

    assert cancelled.returncode == 0, cancelled.stderr
    wait_until(future.cancelled, 10, "the future to be cancelled")
    assert unknown.returncode == 1 and "no such task" in unknown.stdout
    assert nobody.returncode == 1 and "knows no session" in nobody.stdout


def test_cancel_by_id_stops_a_hung_task_on_its_worker(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    # A tester's task with no timeout hung on the only slot; cancel said "it
    # is running, and will finish", and nothing but killing its client and
    # purging the session stopped it.
    launch.worker(broker, concurrency=1)
    client = launch.client(broker)
    hung = client.submit(f"{TASKS}:hang")
    status_when(client, lambda s: s["running"], 10, "the task to run")

    cancelled = run_cli(
        processes,
        "cancel",
        client.session,
        str(hung.task_id),  # type: ignore[attr-defined]
        "--yes",
        "--connect",
        broker.frontend,
    )

    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    wait_until(hung.cancelled, 10, "the hung task's future to be cancelled")
    # Its slot is free again: the next task runs.
    assert client.submit(f"{TASKS}:square", 5).result(20) == 25


def test_json_logs_are_one_object_per_line_with_lifecycle_events(
    processes: Processes, launch: Launcher
) -> None:
    broker = launch.broker("--log-level", "INFO", "--log-format", "json")
    worker = launch.worker(broker)
    client = launch.client(broker)
    [row] = wait_for_workers(client, 1)["workers"]

    def logged() -> list[dict[str, str]]:
        lines = json_lines(log_of(broker.process))
        return [line for line in lines if row["id"] in line["message"]]

    wait_until(logged, 10, "a log line naming the worker")
    launch.processes.stop(worker.process)
    wait_until(lambda: len(logged()) >= 2, 10, "the worker's leaving to be logged")
    lines = json_lines(log_of(broker.process))
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any("journal replay" in line["message"] for line in lines)
    assert {line["level"] for line in lines} <= {"INFO", "WARNING"}


def test_a_client_that_closes_is_logged_as_left_with_nothing_kept(
    processes: Processes, launch: Launcher
) -> None:
    broker = launch.broker("--log-level", "INFO", "--log-format", "json")
    launch.worker(broker)
    client = launch.client(broker)
    # One that worked: a session that only asked leaves at DEBUG.
    assert client.submit(f"{TASKS}:square", 3).result(timeout=30) == 9
    session = client.session

    client.close()

    def departure() -> list[str]:
        lines = json_lines(log_of(broker.process))
        return [
            line["message"]
            for line in lines
            if f"client={session}" in line["message"]
            and "joined" not in line["message"]
        ]

    [message] = wait_until(departure, 10, "the client's leaving to be logged")
    assert "left" in message and "keeping" not in message


def test_map_progress_bar_shows_rate_and_eta(processes: Processes) -> None:
    completed = run_cli(
        processes,
        "map",
        f"{TASKS}:square",
        "--workers",
        "1",
        "--progress",
        input_text="\n".join(str(i) for i in range(20)) + "\n",
    )

    assert completed.returncode == 0, completed.stderr
    assert len(json_lines(completed.stdout)) == 20  # the bar never touches stdout
    assert "ETA" in completed.stderr and "/s" in completed.stderr


def test_map_passes_its_log_options_to_the_embedded_broker(
    processes: Processes,
) -> None:
    completed = run_cli(
        processes,
        "map",
        f"{TASKS}:square",
        "--workers",
        "1",
        "--log-level",
        "INFO",
        "--log-format",
        "json",
        input_text="3\n",
    )

    assert completed.returncode == 0, completed.stderr
    records = [
        json.loads(line)
        for line in completed.stderr.splitlines()
        if line.startswith("{")
    ]
    assert {"ventilator.broker", "ventilator.worker"} <= {r["logger"] for r in records}


def test_results_of_a_session_that_left_are_dropped_with_purge_session(
    processes: Processes, launch: Launcher
) -> None:
    broker = launch.broker("--max-queued-tasks", "3")
    departed = launch.client(broker)
    for x in range(3):
        departed.submit(UNSERVED, x)
    status_when(departed, lambda s: s["queued"].get(UNSERVED) == 3, 10, "3 queued")
    departed.close()  # its results are kept for it: it may come back
    frontend = ("--connect", broker.frontend)
    run_cli(processes, "purge", UNSERVED, "--yes", *frontend)
    newcomer = launch.client(broker)

    with pytest.raises(ventilator.TaskRejected) as refused:
        newcomer.submit(UNSERVED, 9).result(10)
    dropped = run_cli(
        processes, "purge", "--session", departed.session, "--yes", *frontend
    )

    message = str(refused.value)
    assert "0 queued, 0 running, 3 results waiting for delivery" in message
    assert dropped.returncode == 0, dropped.stderr
    assert "dropped 3 results" in dropped.stdout
    assert newcomer.status()["results_waiting"] == 0
    newcomer.submit(UNSERVED, 9)  # accepted: nothing holds the room any more
    status_when(newcomer, lambda s: s["queued"].get(UNSERVED) == 1, 10, "1 queued")


def test_purge_session_counts_the_expired_results_it_drops_apart(
    processes: Processes, launch: Launcher
) -> None:
    # Tester 36: with status showing results_waiting 9 and results_expired 1,
    # the purge said it dropped 10 results waiting for delivery.
    broker = launch.broker("--max-queued-tasks", "3", "--orphan-grace-s", "0.2")
    departed = launch.client(broker)
    for x in range(3):
        departed.submit(UNSERVED, x)
    status_when(departed, lambda s: s["queued"].get(UNSERVED) == 3, 10, "3 queued")
    departed.close()
    frontend = ("--connect", broker.frontend)
    run_cli(processes, "purge", UNSERVED, "--yes", *frontend)  # 3 results wait
    newcomer = launch.client(broker)
    # Full, until the departed session is away past its grace: then the
    # broker makes room from its results, which leave tombstones.
    status_when(newcomer, lambda s: s["not_accepting"] is None, 10, "room to make")
    newcomer.submit(UNSERVED, 9)
    held = status_when(
        newcomer, lambda s: s["results_expired"] > 0, 10, "a result dropped for room"
    )

    dropped = run_cli(
        processes, "purge", "--session", departed.session, "--yes", *frontend
    )

    assert dropped.returncode == 0, dropped.stderr
    waiting, expired = held["results_waiting"], held["results_expired"]
    assert waiting + expired == 3
    said = f"dropped {counted(waiting, 'result')} waiting for delivery, "
    assert said + counted(expired, "expired result") in dropped.stdout
    assert newcomer.status()["results_expired"] == 0


def test_results_waiting_for_a_sink_nobody_receives_are_dropped_with_purge_sink(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    launch.worker(broker)
    sender = launch.client(broker)
    for x in range(3):
        sender.submit(f"{TASKS}:square", x, sink="nobody2").result(START_TIMEOUT_S)
    status_when(sender, lambda s: s["results_waiting"] == 3, 10, "3 results waiting")
    sender.close()  # its results count against it: a purge of it says where
    frontend = ("--connect", broker.frontend)

    by_session = run_cli(processes, "purge", "--session", "nobody2", "--yes", *frontend)
    by_sender = run_cli(
        processes, "purge", "--session", sender.session, "--yes", *frontend
    )
    by_sink = run_cli(processes, "purge", "--sink", "nobody2", "--yes", *frontend)

    assert by_session.returncode == 1
    assert "ventilator purge --sink nobody2" in by_session.stderr
    assert by_sender.returncode == 1
    assert "the results of 3 of its tasks wait for sinks" in by_sender.stderr
    assert by_sink.returncode == 0, by_sink.stderr
    assert "dropped 3 results" in by_sink.stdout
    assert launch.client(broker).status()["results_waiting"] == 0


@pytest.fixture
def short_ttl_broker() -> Iterator[str]:
    """A broker in this process whose results expire after a second, with
    room for 3 tasks; its frontend's endpoint. (The CLI has no option for
    the result TTL.)"""
    limits = Limits(heartbeat_interval_s=0.2, result_ttl_s=1.0, max_queued_tasks=3)
    broker = Broker(
        BrokerConfig(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            durability="memory",
            limits=limits,
        )
    )
    broker.bind()
    thread = threading.Thread(target=broker.serve, name="broker", daemon=True)
    thread.start()
    yield broker.frontend_endpoint
    broker.stop()
    thread.join(START_TIMEOUT_S)


def test_expired_results_of_a_session_that_left_hold_no_room_and_are_forgotten(
    short_ttl_broker: str, launch: Launcher
) -> None:
    departed = launch.client(short_ttl_broker)
    for x in range(3):
        departed.submit(UNSERVED, x)
    status_when(departed, lambda s: s["queued"].get(UNSERVED) == 3, 10, "3 queued")
    departed.close()
    newcomer = launch.client(short_ttl_broker)
    newcomer.purge(UNSERVED)  # 3 "cancelled" results wait for the departed

    expired = status_when(
        newcomer, lambda s: s["results_expired"] == 3, 10, "3 results expired"
    )
    newcomer.submit(UNSERVED, 9)  # accepted: the expired results hold no room
    status_when(newcomer, lambda s: s["queued"].get(UNSERVED) == 1, 10, "1 queued")
    forgotten = status_when(
        newcomer, lambda s: s["results_expired"] == 0, 10, "tombstones forgotten"
    )

    assert expired["results_waiting"] == 0
    [gone] = [c for c in expired["clients"] if c["name"] == departed.session]
    assert gone["pending"] + gone["unacknowledged"] == gone["expired"] == 3
    assert departed.session not in [c["name"] for c in forgotten["clients"]]


def test_purge_session_of_a_connected_session_is_refused(
    processes: Processes, broker: BrokerProcess, launch: Launcher
) -> None:
    client = launch.client(broker)
    client.submit(UNSERVED, 1)
    status_when(client, lambda s: s["queued"].get(UNSERVED) == 1, 10, "1 queued")

    refused = run_cli(
        processes,
        "purge",
        "--session",
        client.session,
        "--yes",
        "--connect",
        broker.frontend,
    )

    assert refused.returncode == 1
    assert "connected" in refused.stderr
    assert client.status()["queued"] == {UNSERVED: 1}


@pytest.mark.parametrize(
    "what",
    [["nocolon"], ["--session", "nosuchsession"], ["--sink", "nosuchsink"]],
    ids=["function", "session", "sink"],
)
def test_purge_of_something_the_broker_does_not_know_says_nothing_matched(
    processes: Processes, broker: BrokerProcess, what: list[str]
) -> None:
    purged = run_cli(processes, "purge", *what, "--yes", "--connect", broker.frontend)

    assert purged.returncode == 1, purged.stdout
    assert "nothing matched" in purged.stderr
    # One outcome, said once: no count of nothing on stdout beside the error.
    assert purged.stdout == ""


def test_purge_session_followed_by_an_option_is_a_usage_error(
    processes: Processes, broker: BrokerProcess
) -> None:
    purged = run_cli(
        processes, "purge", "--session", "--connect", broker.frontend, "--yes"
    )

    assert purged.returncode == 2
    assert "--session" in purged.stderr


def test_a_sighup_as_soon_as_the_broker_announced_itself_reloads_not_kills_it(
    launch: Launcher,
) -> None:
    # Its handlers were installed after it printed its endpoints: a SIGHUP from
    # a supervisor that waits for that line could land in between, and a
    # SIGHUP nobody handles ends the process.
    broker = launch.broker("--log-level", "info")

    broker.process.send_signal(signal.SIGHUP)

    wait_until(
        lambda: "reload asked for" in log_of(broker.process),
        10,
        "the broker to take the SIGHUP as a reload",
    )
    assert broker.process.poll() is None

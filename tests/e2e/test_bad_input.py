"""Bad input to the client and the CLI: it fails at once, alone and clearly, and
nothing else hangs. Real broker, worker and client processes."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ventilator
from ventilator import protocol as p

from . import tasks
from .conftest import (
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    free_port,
    json_lines,
    log_of,
    run_cli,
    status_when,
    ventilator_argv,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0
LONG_NAME = "m:" + "f" * 300


@pytest.fixture
def served_client(launch: Launcher, broker: BrokerProcess) -> ventilator.Client:
    """A client of a broker with one thread-pool worker of the e2e tasks."""
    launch.worker(broker, pool="thread", concurrency=2)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    return client


# --- #1, #2: fields the broker's decoder refuses ----------------------------------


@pytest.mark.parametrize(
    ("function", "options", "field"),
    [
        (tasks.square, {"sink": ""}, "sink"),
        (tasks.square, {"sink": "s" * 300}, "sink"),
        (LONG_NAME, {}, "function"),
        (tasks.square, {"retries": 2**64}, "retries"),
        (tasks.square, {"retries": 10**30}, "retries"),
        (tasks.square, {"retries": 1.5}, "retries"),
        (tasks.square, {"retries": True}, "retries"),
        (tasks.square, {"timeout_s": math.inf}, "timeout_s"),
        (tasks.square, {"timeout_s": math.nan}, "timeout_s"),
        (tasks.square, {"timeout_s": 0}, "timeout_s"),
    ],
)
def test_a_task_field_the_broker_would_refuse_fails_at_submit_naming_it(
    served_client: ventilator.Client,
    function: Any,
    options: dict[str, Any],
    field: str,
) -> None:
    good = [served_client.submit(tasks.square, i) for i in range(20)]

    with pytest.raises(ventilator.UsageError, match=field):
        served_client.submit(function, 1, **options)
    with pytest.raises(ventilator.UsageError, match=field):
        list(served_client.map(function, [1, 2], **options))

    good += [served_client.submit(tasks.square, i) for i in range(20, 40)]
    assert [f.result(RESULT_TIMEOUT_S) for f in good] == [i * i for i in range(40)]


def test_a_submit_the_broker_refuses_as_malformed_fails_its_bad_task_alone(
    served_client: ventilator.Client,
) -> None:
    # What the client's own checks would refuse, slipped past them into one
    # SUBMIT with good tasks: as a client with other rules (a bug) would send.
    specs = [p.TaskSpec(0, f"{TASKS}:square", pack(i)) for i in range(30)]
    specs.insert(15, p.TaskSpec(0, f"{TASKS}:square", pack(1), sink=""))
    futures = served_client._enqueue(specs, served_client._future)

    bad = futures.pop(15)
    with pytest.raises(ventilator.TaskRejected, match="sink must be 1 to 256"):
        bad.result(RESULT_TIMEOUT_S)
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(30)]


def test_a_failed_io_thread_fails_pending_futures_and_later_calls_naming_why(
    launch: Launcher, broker: BrokerProcess
) -> None:
    client = launch.client(broker)  # no worker: the first task stays pending
    waiting = client.submit(tasks.square, 2)
    # A spec the wire cannot carry, past the checks: encoding it raises in the
    # I/O thread, as a bug of ours there would.
    unsendable = p.TaskSpec(0, f"{TASKS}:square", pack(3), retries=2**64)
    [broken] = client._enqueue([unsendable], client._future)

    for future in (waiting, broken):
        with pytest.raises(ventilator.ClientBroken, match="OverflowError"):
            future.result(RESULT_TIMEOUT_S)
    with pytest.raises(ventilator.ClientBroken, match="OverflowError"):
        client.submit(tasks.square, 4)
    with pytest.raises(ventilator.ClientBroken):
        client.status(timeout_s=RESULT_TIMEOUT_S)
    client.close()


def pack(*args: Any) -> bytes:
    from ventilator.serialization import pack_call

    return pack_call(args, {})


# --- #3: one item over the payload limit ------------------------------------------


@pytest.fixture
def small_broker(launch: Launcher) -> BrokerProcess:
    """A broker that refuses payloads over 1000 bytes, with one worker."""
    broker = launch.broker("--max-payload-bytes", "1000")
    launch.worker(broker, pool="thread")
    return broker


def items_with_a_big_one() -> Iterator[bytes]:
    yield from (b"a", b"x" * 5000, b"b")


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_outcomes_fails_only_the_item_over_the_payload_limit(
    launch: Launcher, small_broker: BrokerProcess, chunksize: int | None
) -> None:
    client = launch.client(small_broker)
    wait_for_workers(client, 1)

    outcomes = list(
        client.map_outcomes(tasks.echo, items_with_a_big_one(), chunksize=chunksize)
    )

    assert [o.value for o in outcomes] == [b"a", None, b"b"]
    assert outcomes[0].error is None and outcomes[2].error is None
    assert isinstance(outcomes[1].error, ventilator.TaskRejected)
    assert "max_payload_bytes" in str(outcomes[1].error)


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_raises_for_the_item_over_the_payload_limit_only_at_its_turn(
    launch: Launcher, small_broker: BrokerProcess, chunksize: int | None
) -> None:
    client = launch.client(small_broker)
    wait_for_workers(client, 1)
    results = client.map(tasks.echo, items_with_a_big_one(), chunksize=chunksize)

    assert next(results) == b"a"
    with pytest.raises(ventilator.TaskRejected, match="max_payload_bytes"):
        next(results)


def test_cli_map_gives_a_line_over_the_payload_limit_its_own_error_record(
    processes: Processes, small_broker: BrokerProcess
) -> None:
    big = '"' + "x" * 5000 + '"'
    lines = f"1\n{big}\n2\n"

    done = run_cli(
        processes,
        "map",
        f"{TASKS}:echo",
        "--connect",
        small_broker.frontend,
        input_text=lines,
    )

    assert done.returncode == 1, done.stderr
    records = json_lines(done.stdout)
    assert [r.get("result") for r in records] == [1, None, 2]
    assert "max_payload_bytes" in records[1]["error"]["message"]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("map", LONG_NAME),
        ("map", f"{TASKS}:square", "--sink", "s" * 300),
        ("map", f"{TASKS}:square", "--retries", str(2**64)),
        ("map", f"{TASKS}:square", "--timeout-s", "1e300"),
        ("exec", "--retries", str(2**64), "echo"),
    ],
)
def test_cli_refuses_a_name_or_option_every_task_would_be_refused_for(
    processes: Processes, broker: BrokerProcess, args: tuple[str, ...]
) -> None:
    done = run_cli(processes, *args, "--connect", broker.frontend, input_text="1\n2\n")

    assert done.returncode == 2, done.stderr
    # The broker's rule, or the option's own range where the CLI bounds it.
    assert "must be" in done.stderr or "is not in the range" in done.stderr


# --- #8: a function nobody serves -----------------------------------------------


def test_embedded_cli_map_refuses_a_function_its_module_does_not_have(
    processes: Processes,
) -> None:
    done = run_cli(processes, "map", f"{TASKS}:nosuch", input_text="3\n")

    assert done.returncode == 2
    assert "nosuch" in done.stderr


def test_a_client_is_told_once_that_no_worker_serves_its_function(
    launch: Launcher, broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ventilator.client")
    client = launch.client(broker)
    function = f"{TASKS}:square"

    futures = [client.submit(function, i) for i in range(3)]
    wait_until(lambda: notices(caplog, function), 10, "the unserved notice")
    futures += [client.submit(function, i) for i in range(3, 6)]
    client.status()  # answered after the second SUBMIT was read

    assert len(notices(caplog, function)) == 1
    assert not any(f.done() for f in futures)  # they wait, as before
    launch.worker(broker, pool="thread")
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(6)]


def test_a_wait_that_times_out_says_what_the_broker_said_of_its_function(
    launch: Launcher, broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Tester 24 typed a function's name wrong: result(timeout=4) raised a bare
    # TimeoutError, the reason only in a log line printed once, long before.
    caplog.set_level(logging.WARNING, logger="ventilator.client")
    client = launch.client(broker)
    function = f"{TASKS}:sqaure"
    future = client.submit(function, 3)
    wait_until(lambda: notices(caplog, function), 10, "the unserved notice")

    with pytest.raises(TimeoutError) as waited:
        future.result(timeout=0.01)

    assert f"task {future.task_id} ({function})" in str(waited.value)
    assert f"no connected worker serves {function}" in str(waited.value)
    with pytest.raises(TimeoutError, match="no connected worker serves"):
        future.exception(timeout=0.01)


def notices(caplog: pytest.LogCaptureFixture, function: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if function in r.getMessage() and "no connected worker" in r.getMessage()
    ]


def test_cli_map_with_connect_says_no_worker_serves_the_function(
    processes: Processes, broker: BrokerProcess
) -> None:
    argv = ventilator_argv("map", f"{TASKS}:square", "--connect", broker.frontend)
    process = processes.start("cli", argv, stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(b"3\n")
    process.stdin.close()

    wait_until(
        lambda: "no connected worker serves" in log_of(process),
        10,
        "the CLI to say that no worker serves the function",
    )
    assert process.poll() is None  # the task waits for a worker


# --- #7: the wrong socket -------------------------------------------------------


def test_status_against_the_backend_says_it_is_not_a_frontend_at_once(
    processes: Processes, broker: BrokerProcess
) -> None:
    done = run_cli(
        processes, "status", "--connect", broker.backend, "--timeout-s", "30"
    )

    assert done.returncode == 1
    assert "not a broker's frontend" in done.stderr
    assert "no answer" not in done.stderr


# A client asked at random points of its handshake with a backend: the question
# must fail at once whether the backend's refusal of HELLO came before it or after.
MISDIRECTED_ROUNDS = 300
AT_ONCE_S = 2.0
NOT_A_FRONTEND = "not a broker's frontend"


def test_a_question_to_the_backend_fails_at_once_however_late_it_is_asked(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ventilator.client")

    for round_number in range(MISDIRECTED_ROUNDS):
        # Counted before the client starts: its refusal may be logged at once.
        told_before = len(errors_of_client(caplog))
        with ventilator.Client(broker.backend) as client:
            if round_number % 2:
                # The order the race lost: the refusal is in before the question.
                wait_for_another_error(caplog, told_before)
            started = time.monotonic()
            with pytest.raises(ventilator.NetworkError, match=NOT_A_FRONTEND):
                client.status(timeout_s=5 * AT_ONCE_S)
            assert time.monotonic() - started < AT_ONCE_S, f"round {round_number}"


def test_tasks_sent_to_the_backend_fail_at_once_naming_the_frontend(
    broker: BrokerProcess,
) -> None:
    with ventilator.Client(broker.backend) as client:
        before = client.submit(tasks.square, 3)
        started = time.monotonic()
        with pytest.raises(ventilator.NetworkError, match=NOT_A_FRONTEND):
            before.result(timeout=5 * AT_ONCE_S)
        # Submitted once the backend is known for one: failed as promptly.
        after = client.submit(tasks.square, 4)
        with pytest.raises(ventilator.NetworkError, match="this task was not run"):
            after.result(timeout=5 * AT_ONCE_S)
        with pytest.raises(ventilator.NetworkError, match=NOT_A_FRONTEND):
            list(client.map(tasks.square, range(10)))

    assert time.monotonic() - started < 3 * AT_ONCE_S


# A client beating fast, to have five beats answered at once. By default three
# unanswered beats (60 ms) are silence: a backend that slow to answer on a
# loaded machine made it warn "broker silent", which this test is not about.
FAST_BEAT_S = 0.02
FAST_BEAT_LIVENESS = 100  # 2 s


def test_a_client_beating_at_the_backend_gets_no_worker_advice(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ventilator.client")

    with ventilator.Client(
        broker.backend, heartbeat_interval_s=FAST_BEAT_S, liveness=FAST_BEAT_LIVENESS
    ) as client:
        with pytest.raises(ventilator.NetworkError, match=NOT_A_FRONTEND):
            client.status(timeout_s=10)
        # Each beat the backend answers as a worker's is noted at DEBUG only.
        wait_until(
            lambda: len(records_of_client(caplog, logging.DEBUG)) >= 5,
            10,
            "the backend to answer five of the client's heartbeats",
        )

    assert records_of_client(caplog, logging.WARNING) == []
    assert len(errors_of_client(caplog)) == 1


def records_of_client(
    caplog: pytest.LogCaptureFixture, level: int
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "ventilator.client" and r.levelno == level
    ]


def errors_of_client(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return records_of_client(caplog, logging.ERROR)


def wait_for_another_error(caplog: pytest.LogCaptureFixture, told_before: int) -> None:
    """Wait until the clients logged more ERRORs than `told_before`."""
    wait_until(
        lambda: len(errors_of_client(caplog)) > told_before,
        10,
        "the client to hear that the backend refused its HELLO",
    )


def test_a_worker_connected_to_the_frontend_says_so(
    launch: Launcher, broker: BrokerProcess
) -> None:
    misdirected = dataclasses.replace(broker, backend=broker.frontend)

    worker = launch.worker(misdirected, pool="thread")

    wait_until(
        lambda: "is --connect the broker's backend?" in log_of(worker.process),
        10,
        "the worker to say it talks to a frontend",
    )


def test_a_session_name_with_a_control_character_is_refused_where_it_is_given() -> None:
    forged = "s\n2026-01-01 00:00:00,000 ERROR ventilator.broker: FORGED"

    with pytest.raises(ventilator.UsageError, match="control character"):
        ventilator.Client(f"tcp://127.0.0.1:{free_port()}", session=forged)


def test_a_broker_whose_journal_disk_lacks_room_refuses_new_tasks_and_stays_up(
    launch: Launcher, tmp_path: Path
) -> None:
    # More room than any disk has: the broker must take it for a full disk.
    broker = launch.broker(
        "--journal-min-free-bytes",
        str(2**62),
        durability="process",
        journal=tmp_path / "journal.db",
    )
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    refused = client.submit(tasks.echo, 1)

    with pytest.raises(ventilator.TaskRejected, match="--journal-min-free-bytes"):
        refused.result(RESULT_TIMEOUT_S)
    assert client.status()["workers"]  # still serving
    assert "journal disk nearly full" in log_of(broker.process)
    assert broker.process.poll() is None


def test_a_broker_whose_journal_is_deleted_refuses_new_tasks_and_runs_the_held_ones(
    launch: Launcher, tmp_path: Path
) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    broker = launch.broker(durability="process", journal=folder / "journal.db")
    client = launch.client(broker)
    held = [client.submit(tasks.echo, n) for n in range(3)]
    status_when(client, lambda status: sum(status["queued"].values()) == 3, 10, "3")

    shutil.rmtree(folder)

    def refused() -> str | None:
        # Accepted, a task waits for a worker: no answer within the second.
        try:
            client.submit(tasks.echo, "late").result(1)
        except ventilator.TaskRejected as exc:
            return str(exc)
        except TimeoutError:
            return None
        return None

    reason = wait_until(refused, 10, "new tasks to be refused")
    assert "journal" in reason and "restart" in reason
    assert "is gone" in log_of(broker.process)
    launch.worker(broker)
    assert [f.result(RESULT_TIMEOUT_S) for f in held] == [0, 1, 2]

"""Status against a real broker stays bounded however many workers and
functions there are: the most relevant are listed, and exact counts cover the
rest, in the answer and in `ventilator status`."""

from __future__ import annotations

import time

import pytest
import zmq

from ventilator import protocol as p
from ventilator._notice_log import LOSSES_LOGGED_PER_S
from ventilator.status import STATUS_QUEUES, STATUS_SERVICES, STATUS_WORKERS

from .conftest import (
    FAST_HEARTBEAT_S,
    MORE_TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    named_once_counted,
    run_cli,
)

ANSWER_TIMEOUT_S = 20.0
# The raw workers below never heartbeat: a slow beat keeps them registered
# (for three beats) while the test asks.
SLOW_HEARTBEAT_S = 10.0
MORE_WORKERS = 150
MORE_FUNCTIONS = 30


@pytest.fixture
def slow_broker(launch: Launcher) -> BrokerProcess:
    return launch.broker(heartbeat_interval_s=SLOW_HEARTBEAT_S)


def register_raw_workers(
    context: zmq.Context[zmq.Socket[bytes]],
    broker: BrokerProcess,
    readies: list[p.Ready],
) -> list[zmq.Socket[bytes]]:
    """One DEALER per READY, each welcomed by the broker within a deadline."""
    sockets = []
    for ready in readies:
        socket = context.socket(zmq.DEALER)
        socket.connect(broker.backend)
        socket.send_multipart(p.encode(ready))
        sockets.append(socket)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    for index, socket in enumerate(sockets):
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and socket.poll(left_ms), f"{index} of {len(sockets)}"
        welcome = p.decode(socket.recv_multipart(), p.TO_WORKER)
        assert isinstance(welcome, p.Welcome), welcome
    return sockets


def test_status_lists_a_bounded_number_of_workers_and_counts_them_all(
    slow_broker: BrokerProcess,
    launch: Launcher,
    processes: Processes,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # Every worker serves more functions than a listed worker shows.
    services = [f"{MORE_TASKS}:f{i}" for i in range(STATUS_SERVICES + 20)]
    count = STATUS_WORKERS + MORE_WORKERS
    readies = [p.Ready(f"raw-{i}", services, 4, False, 2) for i in range(count)]
    # One serves nothing, as a worker whose task processes cannot start.
    readies.append(p.Ready("broken", [], 4, False, 2, "imports fail"))
    # Kept open to the end: the broker drops a worker whose socket closed at
    # the first heartbeat it cannot send.
    registered = register_raw_workers(context, slow_broker, readies)

    status = launch.client(slow_broker).status(ANSWER_TIMEOUT_S)
    shown = run_cli(processes, "status", "--connect", slow_broker.frontend)

    assert len(status["workers"]) == STATUS_WORKERS
    counts = status["worker_counts"]
    assert counts["all"] == count + 1 and counts["listed"] == STATUS_WORKERS
    assert counts["not_serving"] == 1 and counts["slots"] == 2 * (count + 1)
    # Listed first: the one with something to fix.
    assert status["workers"][0]["id"] == "broken"
    listed = status["workers"][1]
    assert len(listed["services"]) == STATUS_SERVICES
    assert listed["service_count"] == len(services)
    assert shown.returncode == 0, shown.stderr
    words = " ".join(shown.stdout.split())  # captions wrap to the table's width
    assert f"workers ({count + 1})" in words
    assert f"and {count + 1 - STATUS_WORKERS} more" in words
    assert not any(socket.closed for socket in registered)


def test_status_lists_a_bounded_number_of_functions_and_counts_them_all(
    broker: BrokerProcess, launch: Launcher, processes: Processes
) -> None:
    client = launch.client(broker)
    functions = [f"{MORE_TASKS}:unserved{i}" for i in range(STATUS_QUEUES + 30)]
    busiest = functions[-1]
    futures = [client.submit(function) for function in functions]
    futures += [client.submit(busiest) for _ in range(4)]
    # Answered after the SUBMITs on the same connection: all are queued.
    status = client.status(ANSWER_TIMEOUT_S)
    shown = run_cli(processes, "status", "--connect", broker.frontend)

    assert len(status["queued"]) == STATUS_QUEUES
    assert status["queued"][busiest] == 5
    assert status["queue_counts"] == {
        "all": len(functions),
        "queued": len(futures),
        "retrying": 0,
        "running": 0,
        "listed": STATUS_QUEUES,
    }
    assert shown.returncode == 0, shown.stderr
    words = " ".join(shown.stdout.split())  # captions wrap to the table's width
    assert f"and {len(functions) - STATUS_QUEUES} more" in words


def test_purge_of_a_function_status_does_not_list_asks_without_a_count(
    broker: BrokerProcess, launch: Launcher, processes: Processes
) -> None:
    client = launch.client(broker)
    functions = [f"{MORE_TASKS}:unserved{i}" for i in range(STATUS_QUEUES + 1)]
    for function in functions:
        client.submit(function)
    queued = client.status(ANSWER_TIMEOUT_S)["queued"]
    (unlisted,) = [function for function in functions if function not in queued]

    connect = ("--connect", broker.frontend)
    asked = run_cli(processes, "purge", unlisted, *connect, input_text="n\n")
    purged = run_cli(processes, "purge", unlisted, "--yes", *connect)

    # Not "the 0 tasks": the broker did not say how many wait.
    assert "Cancel every task of" in asked.stdout, asked.stdout
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 task" in purged.stdout


def test_many_workers_lost_at_once_are_a_few_lines_and_a_count(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    broker = launch.broker(
        "--log-level",
        "INFO",
        "--log-format",
        "json",
        heartbeat_interval_s=FAST_HEARTBEAT_S,
    )
    count = 60
    readies = [p.Ready(f"lost-{i}", [f"{MORE_TASKS}:cube"], 1) for i in range(count)]
    started = time.monotonic()
    for socket in register_raw_workers(context, broker, readies):
        socket.close(linger=0)  # all gone at once, as in a network cut

    named = named_once_counted(
        broker.process,
        "worker lost worker=lost-",
        "more workers lost",
        ANSWER_TIMEOUT_S,
    )
    at_most = LOSSES_LOGGED_PER_S * (time.monotonic() - started + 2)
    assert 1 <= len(named) <= min(at_most, count // 2), len(named)

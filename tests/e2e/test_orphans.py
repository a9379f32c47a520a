"""Against a real broker: clients that submit and crash without reading fill
it with results; once their sessions have had no client for `orphan_grace_s`,
the broker makes room from those results and another client's tasks run."""

from __future__ import annotations

import sys

import ventilator
from ventilator.errors import TaskRejected

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    BrokerProcess,
    Launcher,
    Processes,
    log_of,
    status_when,
    wait_until,
)

RESULT_TIMEOUT_S = 30.0
CRASHED_CLIENTS = 4
TASKS_EACH = 50
MAX_QUEUED_TASKS = CRASHED_CLIENTS * TASKS_EACH  # full of their results
GRACE_S = 0.5

# A client that submits tasks, sees the broker holds them all, and exits at
# once (os._exit: no BYE, no close) without reading a result.
CRASHING_CLIENT_SCRIPT = """
import os, sys, time, ventilator
address, session, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = ventilator.Client(address, session=session, heartbeat_interval_s=0.1)
for x in range(count):
    client.submit("tests.e2e.tasks:square", x)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    status = client.status(timeout_s=20)
    [mine] = [c for c in status["clients"] if c["name"] == session]
    if mine["tasks"] == count:
        os._exit(0)
    time.sleep(0.05)  # within the broker's quota of questions a second
os._exit(1)
"""


def crash_after_submitting(processes: Processes, broker: BrokerProcess, n: int) -> None:
    """Run one crashing client to its end; it must have seen its tasks held."""
    session = f"crashed-{n}"
    argv = [sys.executable, "-c", CRASHING_CLIENT_SCRIPT]
    argv += [broker.frontend, session, str(TASKS_EACH)]
    child = processes.start(f"client-{session}", argv)
    assert child.wait(RESULT_TIMEOUT_S) == 0, log_of(child)


def runs_a_task(client: ventilator.Client) -> bool:
    """Whether a task of `client` is accepted and runs; False if refused."""
    try:
        return client.submit(tasks.square, 7).result(RESULT_TIMEOUT_S) == 49
    except TaskRejected:
        return False


def test_results_of_crashed_clients_make_room_for_a_new_client_after_the_grace(
    launch: Launcher, processes: Processes
) -> None:
    broker = launch.broker(
        "--max-queued-tasks",
        str(MAX_QUEUED_TASKS),
        "--orphan-grace-s",
        str(GRACE_S),
        heartbeat_interval_s=FAST_HEARTBEAT_S,
    )
    for n in range(CRASHED_CLIENTS):
        crash_after_submitting(processes, broker, n)
    launch.worker(broker)
    observer = launch.client(broker)
    status_when(
        observer,
        lambda s: s["results_waiting"] == MAX_QUEUED_TASKS,
        RESULT_TIMEOUT_S,
        "the broker full of the crashed clients' results",
    )

    newcomer = launch.client(broker)
    wait_until(
        lambda: runs_a_task(newcomer), RESULT_TIMEOUT_S, "a new client's task run"
    )
    futures = [newcomer.submit(tasks.square, x) for x in range(20)]
    squares = [future.result(RESULT_TIMEOUT_S) for future in futures]

    assert squares == [x * x for x in range(20)]
    status = observer.status(RESULT_TIMEOUT_S)
    assert status["results_expired"] > 0  # tombstones, for the crashed clients
    assert "orphan_grace_s" in log_of(broker.process)  # the operator was told

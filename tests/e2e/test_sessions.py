"""Sessions against a real broker: one live client holds a session at a time."""

from __future__ import annotations

import gc
import logging
import select
import signal
import subprocess
import sys
import time

import pytest

import ventilator
from ventilator import protocol as p

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    BrokerProcess,
    Launcher,
    Processes,
    WorkerProcess,
    status_when,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0


@pytest.fixture
def fast_broker(launch: Launcher) -> BrokerProcess:
    """A broker beating every 0.2 s, so that its clients beat every 0.1 s and
    a refused one gives up after 3 x 3 x 0.1 s."""
    return launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)


@pytest.fixture
def worker(launch: Launcher, fast_broker: BrokerProcess) -> WorkerProcess:
    """One worker that runs two tasks at a time."""
    worker = launch.worker(fast_broker, concurrency=2)
    wait_for_workers(launch.client(fast_broker), 1)
    return worker


def read_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The next line `process` prints, within a deadline."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    ready: list[object] = []
    while not ready:
        left_s = deadline - time.monotonic()
        assert left_s > 0, f"no line from the child in {timeout_s:g}s"
        ready, _, _ = select.select([process.stdout], [], [], left_s)
    return process.stdout.readline().decode().strip()


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the clients of this test logged about being refused their session."""
    return [
        record
        for record in caplog.records
        if record.name == "ventilator.client" and p.SESSION_IN_USE in record.message
    ]


def test_a_second_live_client_of_a_session_is_refused_and_the_first_keeps_it(
    launch: Launcher,
    fast_broker: BrokerProcess,
    worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ventilator.client")
    first = launch.client(fast_broker, session="same")
    first.status(RESULT_TIMEOUT_S)  # answered: the session is first's
    first_futures = [first.submit(tasks.sleep_for, 0.05) for _ in range(20)]

    second = launch.client(fast_broker, session="same")
    second_futures = [second.submit(tasks.square, i) for i in range(20)]

    # Before, each HELLO took the session from the other on every message, and
    # the first client's results went to the second one, which kept them.
    assert [f.result(RESULT_TIMEOUT_S) for f in first_futures] == [0.05] * 20
    for future in second_futures:
        with pytest.raises(ventilator.SessionInUse, match="session 'same'"):
            future.result(RESULT_TIMEOUT_S)
    with pytest.raises(ventilator.SessionInUse):
        second.status(RESULT_TIMEOUT_S)  # a question waits no longer than a task
    assert len(refusals(caplog)) == 1, "the refusal is logged once per client"


def test_a_refused_client_takes_the_session_over_once_its_holder_closed(
    launch: Launcher,
    fast_broker: BrokerProcess,
    worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ventilator.client")
    first = launch.client(fast_broker, session="same")
    owed = [first.submit(tasks.slow_echo, i, 0.5) for i in range(4)]
    first.status(RESULT_TIMEOUT_S)  # answered: the session is first's
    # Waits 3 x 10 x 0.1 s for the session: time enough to see first close.
    second = launch.client(fast_broker, session="same", liveness=10)
    own = second.submit(tasks.square, 3)
    wait_until(lambda: refusals(caplog), RESULT_TIMEOUT_S, "the second one refused")

    first.close()  # says BYE with its tasks still running: their results wait

    assert own.result(RESULT_TIMEOUT_S) == 9
    collected = list(second.collect(count=len(owed), timeout_s=RESULT_TIMEOUT_S))
    assert sorted(f.task_id for f in collected) == sorted(f.task_id for f in owed)
    assert sorted(f.result(0) for f in collected) == [0, 1, 2, 3]


# A client stopped (SIGSTOP) past the broker's liveness (0.6 s) while its
# results come: more than an ACK batch of them (1,024), so that on its return
# the broker may hear its ACK before anything else; 1 kB each.
PAUSED_CLIENT_TASKS = 1100
PAUSED_CLIENT_SCRIPT = """
import sys
import ventilator
from tests.e2e import tasks
address, session, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with ventilator.Client(address, session=session) as client:
    futures = [client.submit(tasks.echo, "x" * 1000) for _ in range(count)]
    print("submitted", flush=True)
    values = [future.result(60) for future in futures]
    print("got", sum(len(value) == 1000 for value in values), flush=True)
"""


def test_a_client_paused_past_its_liveness_leaves_no_result_to_deliver_again(
    launch: Launcher, processes: Processes, fast_broker: BrokerProcess
) -> None:
    launch.worker(fast_broker, concurrency=4)
    observer = launch.client(fast_broker)
    child = processes.start(
        "paused-client",
        [
            sys.executable,
            "-c",
            PAUSED_CLIENT_SCRIPT,
            fast_broker.frontend,
            "paused",
            str(PAUSED_CLIENT_TASKS),
        ],
        stdout=subprocess.PIPE,
    )
    assert read_line(child, RESULT_TIMEOUT_S) == "submitted"
    status_when(
        observer,
        lambda status: status["totals"]["submitted"] == PAUSED_CLIENT_TASKS,
        RESULT_TIMEOUT_S,
        "the broker accepting the tasks of the client to pause",
    )

    child.send_signal(signal.SIGSTOP)
    try:
        status_when(
            observer,
            lambda status: (
                any(
                    c["name"] == "paused" and not c["connected"]
                    for c in status["clients"]
                )
                and not any(status["queued"].values())
                and not any(status["running"].values())
            ),
            RESULT_TIMEOUT_S,
            "the broker giving the paused client up, every result finished",
        )
    finally:
        child.send_signal(signal.SIGCONT)

    assert read_line(child, RESULT_TIMEOUT_S) == f"got {PAUSED_CLIENT_TASKS}"
    assert child.wait(RESULT_TIMEOUT_S) == 0
    # Every result was acknowledged: none waits for a later collect().
    status_when(
        observer,
        lambda status: status["results_waiting"] == 0,
        RESULT_TIMEOUT_S,
        "the broker forgetting every result of the paused client",
    )
    with launch.client(fast_broker, session="paused") as later:
        assert list(later.collect(timeout_s=1.0)) == []


# A collector that takes its results one at a time, each when told to on its
# stdin, printing the id of each it took: it is killed (-9) between two.
SLOW_COLLECTOR_SCRIPT = """
import sys
import ventilator
address, session, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = ventilator.Client(address, session=session, liveness=10)
results = client.collect(count=count, timeout_s=60)
for line in sys.stdin:
    print(next(results).task_id, flush=True)
"""
COLLECTED_RESULTS = 40
TAKEN_BEFORE_KILL = 5


def test_results_a_killed_collector_had_not_taken_go_to_the_next_one(
    launch: Launcher, processes: Processes, fast_broker: BrokerProcess
) -> None:
    launch.worker(fast_broker, concurrency=2)
    with launch.client(fast_broker, session="collected") as submitter:
        owed = [submitter.submit(tasks.square, i) for i in range(COLLECTED_RESULTS)]
    observer = launch.client(fast_broker)
    collector = processes.start(
        "slow-collector",
        [
            sys.executable,
            "-c",
            SLOW_COLLECTOR_SCRIPT,
            fast_broker.frontend,
            "collected",
            str(COLLECTED_RESULTS),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert collector.stdin is not None
    taken = set()
    for _ in range(TAKEN_BEFORE_KILL):
        collector.stdin.write(b"next\n")
        collector.stdin.flush()
        taken.add(int(read_line(collector, RESULT_TIMEOUT_S)))
    # Every result went to the collector, which holds most of them untaken.
    status_when(
        observer,
        lambda status: any(
            c["name"] == "collected" and c["connected"] and c["pending"] == 0
            for c in status["clients"]
        ),
        RESULT_TIMEOUT_S,
        "every result of the session sent to the collector",
    )

    collector.kill()
    collector.wait(RESULT_TIMEOUT_S)

    with launch.client(fast_broker, session="collected", liveness=10) as later:
        wanted = {future.task_id for future in owed}
        seen = set(taken)
        for future in later.collect(timeout_s=3.0):
            seen.add(future.task_id)
            if seen == wanted:
                break
    assert seen == wanted, f"{len(wanted - seen)} results lost with the collector"


def test_results_a_dropped_collector_had_not_taken_go_to_the_next_one(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker)
    with launch.client(broker, session="dropped") as submitter:
        owed = {submitter.submit(tasks.square, i).task_id for i in range(5)}
    observer = launch.client(broker)
    collector = ventilator.Client(broker.frontend, session="dropped")
    taken = next(collector.collect(count=1, timeout_s=RESULT_TIMEOUT_S)).task_id
    status_when(
        observer,
        lambda status: any(
            c["name"] == "dropped" and c["connected"] and c["pending"] == 0
            for c in status["clients"]
        ),
        RESULT_TIMEOUT_S,
        "every result of the session sent to the collector",
    )

    del collector  # holding 4 results it was sent and did not yield
    gc.collect()

    with launch.client(broker, session="dropped") as later:
        rest = {f.task_id for f in later.collect(count=4, timeout_s=RESULT_TIMEOUT_S)}
    assert rest | {taken} == owed


def test_a_resumed_session_whose_results_fill_the_window_says_collect_frees_it(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    broker = launch.broker("--client-window", "3")
    with launch.client(broker, session="full") as first:
        for n in range(3):
            first.submit(tasks.square, n)
    # Accepted before it left; they run now, for the session.
    launch.worker(broker, pool="thread")

    resumed = launch.client(broker, session="full")
    status_when(
        resumed,
        lambda status: [c["unacknowledged"] for c in status["clients"]] == [3],
        RESULT_TIMEOUT_S,
        "the session's results to reach the resumed client",
    )
    with caplog.at_level(logging.WARNING, logger="ventilator.client"):
        late = resumed.submit(tasks.square, 7)
        wait_until(
            lambda: any("wait for collect()" in r.message for r in caplog.records),
            RESULT_TIMEOUT_S,
            "the resumed client to say why its task waits",
        )
    assert not late.done()
    collected = list(resumed.collect(count=3, timeout_s=RESULT_TIMEOUT_S))

    assert sorted(f.result() for f in collected) == [0, 1, 4]
    assert late.result(RESULT_TIMEOUT_S) == 49

"""Cancelled work stays cancelled: a task its client cancelled while a worker
ran it is not run again when that worker dies or the broker restarts."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

import ventilator
from ventilator import protocol as p
from ventilator._runs import CANCEL_SETTLE_S

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    MORE_TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    ProcessId,
    free_port,
    log_of,
    paused,
    restartable_broker,
    run_cli,
    stand_in_broker,
    status_when,
    ventilator_argv,
    wait_for_workers,
    wait_until,
)

# Long enough that a rerun of it would hold the only slot past the probe's wait.
LONG_S = 60.0
PROBE_TIMEOUT_S = 20.0
SLEEP_FOR = f"{tasks.__name__}:sleep_for"
UNSERVED = f"{MORE_TASKS}:cube"  # no worker serves it: sent, it stays queued


def cancel_while_running(client: ventilator.Client) -> None:
    """Submit a long task, wait until a worker runs it, cancel it."""
    future = client.submit(tasks.sleep_for, LONG_S)
    status_when(
        client,
        lambda status: status["running"].get(SLEEP_FOR) == 1,
        10,
        "the long task to run",
    )
    assert future.cancel()
    # The broker reads a connection's commands in order: once it answers a
    # question asked after the CANCEL, it has the cancellation.
    client.status()


def test_cancelled_running_task_is_not_rerun_when_its_worker_dies(
    launch: Launcher,
) -> None:
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    victim = launch.worker(broker, pool="thread")
    client = launch.client(broker)
    wait_for_workers(client, 1)
    cancel_while_running(client)

    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(10)
    launch.worker(broker, pool="thread")

    # Requeued, it would go first to the new worker's only slot, for LONG_S.
    assert client.submit(tasks.square, 3).result(PROBE_TIMEOUT_S) == 9
    # Until the broker has given up the killed worker, its task counts as
    # running there; only then does "not requeued" mean anything.
    status = status_when(
        client,
        lambda status: len(status["workers"]) == 1,
        PROBE_TIMEOUT_S,
        "the killed worker to be given up",
    )
    assert (status["queued"], status["running"]) == ({}, {})
    assert status["totals"]["cancelled"] == 1


def test_cancelled_running_task_is_not_queued_again_by_a_restarted_broker(
    launch: Launcher, tmp_path: Path
) -> None:
    options = restartable_broker(tmp_path)
    first = launch.broker(**options)
    launch.worker(first, pool="thread")
    client = launch.client(first)
    wait_for_workers(client, 1)
    cancel_while_running(client)

    kill(first)
    second = launch.broker(**options)

    status = launch.client(second).status()
    assert (status["queued"], status["totals"]["restored"]) == ({}, 0)
    assert status["results_waiting"] == 0


def kill(broker: BrokerProcess) -> None:
    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(10)


# How soon a map whose broker died ends once interrupted: it waits
# CANCEL_SETTLE_S for the broker to confirm its cancellations. It used to
# wait 10 s more, as close() does, for a durable broker to confirm
# acceptances that could not come either.
INTERRUPTED_EXIT_S = CANCEL_SETTLE_S + 5


def interrupt_a_map_whose_broker_died(
    processes: Processes, launch: Launcher, broker: BrokerProcess
) -> str:
    """Run a map of three lines no worker serves, kill its broker, then ^C the
    map; return what the map said, once it ended soon after."""
    command = processes.start(
        "map",
        ventilator_argv("map", UNSERVED, "--connect", broker.frontend),
        stdin=subprocess.PIPE,
    )
    command.stdin.write(b"1\n2\n3\n")
    command.stdin.flush()  # and left open: the map waits for more lines
    status = status_when(
        launch.client(broker),
        lambda status: status["queued"].get(UNSERVED) == 3,
        20,
        "the map's three tasks",
    )
    # Named for whoever reads status: the command, its host and process.
    run_session = f"map-{socket.gethostname()}-{command.pid}-"
    assert any(c["name"].startswith(run_session) for c in status["clients"])

    kill(broker)
    command.send_signal(signal.SIGINT)

    assert command.wait(INTERRUPTED_EXIT_S) == 130
    return log_of(command)


def test_interrupted_map_says_when_its_cancellation_reached_no_broker(
    processes: Processes, launch: Launcher
) -> None:
    said = interrupt_a_map_whose_broker_died(processes, launch, launch.broker())

    assert (
        "interrupted after 0 lines (0 failed); could not reach the broker to " in said
    )
    assert "could not reach the broker to cancel the tasks of 3 unfinished" in said
    assert "unfinished lines cancelled" not in said
    # A broker with no journal, killed, kept nothing: "may still run there"
    # holds only while it runs.
    assert "may still run there while it runs (it has no journal)" in said


def test_interrupted_map_with_its_broker_down_names_the_purge_of_its_session(
    processes: Processes, launch: Launcher, tmp_path: Path
) -> None:
    options = restartable_broker(tmp_path)
    first = launch.broker(**options)
    said = interrupt_a_map_whose_broker_died(processes, launch, first)

    # Before, the run said the tasks may still run, but not for which session
    # nor how to drop them: their results waited a day for nobody.
    named = re.search(r"`ventilator (purge --session [^`]+)`", said)
    assert named is not None, said
    assert "it has no journal" not in said  # this one keeps them
    second = launch.broker(**options)
    purged = run_cli(processes, *shlex.split(named.group(1)))

    assert purged.returncode == 0, purged.stderr
    assert launch.client(second).status()["queued"] == {}


def test_an_interrupted_map_does_not_wait_for_acceptances_its_broker_cannot_give(
    processes: Processes, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # A durable broker that took the map's tasks and stopped answering (it
    # died, or stands still): a tester's map, sent SIGTERM, took 10-20 s to
    # end, waiting for a confirmation after the cancellations went unanswered.
    stand_in, frontend = stand_in_broker(context)
    command = processes.start(
        "map",
        ventilator_argv("map", UNSERVED, "--connect", frontend),
        stdin=subprocess.PIPE,
    )
    peer, *_ = stand_in.recv_multipart()  # its HELLO
    welcome = p.Welcome(100, 1 << 20, 1.0, durable=True)
    stand_in.send_multipart([peer, *p.encode(welcome)])
    command.stdin.write(b"1\n2\n3\n")
    command.stdin.flush()
    wait_until(
        lambda: stand_in.poll(100) and _submitted(stand_in),
        20,
        "the map's tasks to reach the broker (which will never confirm them)",
    )
    wait_until(lambda: "reconnecting" in log_of(command), 20, "the broker found silent")

    command.send_signal(signal.SIGINT)

    assert command.wait(INTERRUPTED_EXIT_S) == 130
    assert "could not reach the broker to cancel" in log_of(command)


def _submitted(stand_in: zmq.Socket[bytes]) -> bool:
    """Whether the message waiting is a SUBMIT; the map's first question (is
    a broker there?) is answered, everything else ignored."""
    peer, *frames = stand_in.recv_multipart()
    command = p.decode(frames, frozenset(p.Cmd))
    if isinstance(command, p.StatusRequest):
        stand_in.send_multipart([peer, *p.encode(p.StatusReply({}))])
    return isinstance(command, p.Submit)


def queued_after_a_question(client: ventilator.Client) -> int:
    """How many unserved tasks the broker holds once it answered a question,
    which the client asks after everything it had to send."""
    return int(client.status(20)["queued"].get(UNSERVED, 0))


def test_tasks_cancelled_before_the_broker_welcomed_the_client_never_reach_it(
    launch: Launcher,
) -> None:
    frontend = f"tcp://127.0.0.1:{free_port()}"
    client = launch.client(frontend)  # no broker there yet: never welcomed
    futures = [client.submit(UNSERVED, i) for i in range(20)]

    assert all(future.cancel() for future in futures)
    launch.broker(frontend=frontend)

    assert queued_after_a_question(client) == 0
    assert all(future.cancelled() for future in futures)


def test_tasks_cancelled_while_the_client_reconnects_never_reach_the_broker(
    launch: Launcher,
) -> None:
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    client = launch.client(broker)
    client.status()
    with paused(broker.pid):
        # The client reconnects once the paused broker was silent too long;
        # until the broker welcomes it again, it holds back its submissions.
        wait_until(lambda: not client._io._welcomed, 10, "the client to reconnect")
        futures = [client.submit(UNSERVED, i) for i in range(20)]
        assert all(future.cancel() for future in futures)

    assert queued_after_a_question(client) == 0


def test_task_sent_then_cancelled_during_a_reconnect_is_cancelled_after_its_resend(
    launch: Launcher,
) -> None:
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    client = launch.client(broker)
    client.status()
    with paused(broker.pid):
        # Sent to the paused broker, never accepted: resent after the reconnect.
        future = client.submit(UNSERVED, 1)
        wait_until(lambda: not client._io._welcomed, 10, "the client to reconnect")
        assert future.cancel()

    status_when(
        client,
        lambda status: status["queued"].get(UNSERVED, 0) == 0,
        10,
        "the cancelled task to leave the queue",
    )
    assert future.cancelled()


def test_only_the_cancelled_of_the_tasks_held_before_welcome_stay_unsent(
    launch: Launcher,
) -> None:
    frontend = f"tcp://127.0.0.1:{free_port()}"
    client = launch.client(frontend)
    futures = [client.submit(UNSERVED, i) for i in range(20)]

    assert all(future.cancel() for future in futures[1::2])
    launch.broker(frontend=frontend)

    assert queued_after_a_question(client) == 10
    assert not any(future.done() for future in futures[::2])


def test_a_cancel_its_broker_died_without_reading_is_sent_to_the_restarted_one(
    launch: Launcher, tmp_path: Path
) -> None:
    options = restartable_broker(tmp_path, heartbeat_interval_s=FAST_HEARTBEAT_S)
    first = launch.broker(**options)
    client = launch.client(first)
    future = client.submit(UNSERVED, 1)
    assert queued_after_a_question(client) == 1  # journalled: a restart keeps it

    # Stopped, the broker reads nothing more: the CANCEL dies with it.
    os.kill(first.pid, signal.SIGSTOP)
    assert future.cancel()
    kill(first)
    second = launch.broker(**options)

    status = status_when(
        launch.client(second),
        lambda status: status["totals"]["cancelled"] == 1,
        PROBE_TIMEOUT_S,
        "the restarted broker to hear the cancellation again",
    )
    assert status["totals"]["restored"] == 1
    assert status["queued"] == {}
    wait_until(
        lambda: not client._io._unconfirmed_cancels,
        PROBE_TIMEOUT_S,
        "the client to hear the cancellation confirmed",
    )


def test_a_running_tasks_cancel_is_confirmed_by_a_receipt(launch: Launcher) -> None:
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker, pool="thread")
    client = launch.client(broker)
    wait_for_workers(client, 1)

    cancel_while_running(client)

    # No result answers it: the task runs on, for nobody. A question asked
    # after it, at a heartbeat, confirms it, so the client keeps nothing.
    wait_until(
        lambda: not client._io._unconfirmed_cancels,
        PROBE_TIMEOUT_S,
        "the client to hear the running task's cancellation confirmed",
    )


def session_entry(status: dict[str, Any], session: str) -> dict[str, Any] | None:
    """What the broker's status says of `session`, if it still lists it."""
    return next((c for c in status["clients"] if c["name"] == session), None)


def test_a_client_that_cancels_and_leaves_leaves_no_cancelled_results(
    launch: Launcher, broker: BrokerProcess
) -> None:
    leaving = launch.client(broker)
    futures = [leaving.submit(UNSERVED, x) for x in range(300)]
    for future in futures:
        future.cancel()
    leaving.close()  # at once: the broker's "cancelled" answers find it gone

    observer = launch.client(broker)
    status = status_when(
        observer,
        lambda s: session_entry(s, leaving.session) is None,
        10,
        "the session that cancelled and left to be forgotten",
    )
    assert status["queued"].get(UNSERVED, 0) == 0


def test_closing_a_client_cancels_the_maps_it_left_open(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, pool="thread", concurrency=1)
    client = launch.client(broker)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)

    still_open = client.map(tasks.sleep_for, [0.05] * 400, chunksize=1)
    assert next(still_open) == 0.05
    client.close()  # the map is still referenced, never closed

    status_when(
        observer,
        lambda s: s["queued"].get(SLEEP_FOR, 0) == 0,
        10,
        "the open map's queued tasks to be cancelled",
    )
    with pytest.raises(ventilator.ClientClosed, match="closed while this map ran"):
        next(still_open)


def test_cancelling_a_running_task_stops_it_and_frees_its_slot(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    launch.worker(broker, concurrency=1)  # task processes, one slot
    client = launch.client(broker)
    wait_for_workers(client, 1)
    runs, never = tmp_path / "runs", tmp_path / "never-released"
    runs.mkdir()
    running = client.submit(tasks.run_counted, str(runs), str(never))
    wait_until(lambda: any(runs.iterdir()), PROBE_TIMEOUT_S, "the task to start")
    [marker] = list(runs.iterdir())
    task_process = ProcessId.of(int(marker.name.split("-")[1]))
    assert task_process is not None

    assert running.cancel()

    # The only slot is free again: the next task runs, without the release.
    assert client.submit(tasks.square, 7).result(PROBE_TIMEOUT_S) == 49
    wait_until(
        lambda: not task_process.alive(),
        PROBE_TIMEOUT_S,
        "the cancelled task's process to be stopped",
    )
    assert len(list(runs.iterdir())) == 1, "the cancelled task ran again"


def test_a_map_whose_client_another_thread_closes_raises_rather_than_ends(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, pool="thread", concurrency=1)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    results = client.map(tasks.sleep_for, [0.05] * 200, chunksize=4)
    assert next(results) == 0.05

    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(PROBE_TIMEOUT_S)

    # Batches travel, so the map may still hold a few results; then it must
    # say the client was closed, not end as if those were all.
    with pytest.raises(ventilator.ClientClosed, match="closed while this map ran"):
        for _ in results:
            pass


def test_cancelled_futures_count_as_done_for_wait_and_as_completed(
    launch: Launcher, broker: BrokerProcess
) -> None:
    client = launch.client(broker)
    with client.executor() as pool:
        futures = [pool.submit(UNSERVED, x) for x in range(3)]
        assert all(future.cancel() for future in futures)

        done, not_done = concurrent.futures.wait(futures, timeout=PROBE_TIMEOUT_S)
        completed = list(
            concurrent.futures.as_completed(futures, timeout=PROBE_TIMEOUT_S)
        )

    assert (len(done), len(not_done), len(completed)) == (3, 0, 3)
    assert all(future.cancelled() for future in futures)


def test_a_map_left_at_its_first_item_leaves_no_results_for_its_session(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, concurrency=2)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)

    # Tiny tasks finish faster than the map reads them: when it is left, most
    # are done, their results on their way or waiting for the session.
    with launch.client(broker, session="left-early") as client:
        for _ in client.map(tasks.square, range(20_000), chunksize=1):
            break

    def holds_nothing(status: dict[str, Any]) -> bool:
        row = [c for c in status["clients"] if c["name"] == "left-early"]
        return not row or not (row[0]["pending"] or row[0]["unacknowledged"])

    status_when(observer, holds_nothing, 10, "no result left for the session")


def test_a_worker_says_the_cancels_of_its_running_tasks_once_then_less_often(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # Tester 20: a client that cancels a lot made each worker log two INFO
    # lines per cancelled running task, about 37 a minute.
    worker = launch.worker(broker, concurrency=1, extra=["--log-level", "info"])
    client = launch.client(broker)
    wait_for_workers(client, 1)

    for _ in range(3):
        cancel_while_running(client)  # the next starts once the slot is free
    assert client.submit(tasks.square, 3).result(PROBE_TIMEOUT_S) == 9

    log = log_of(worker.process)
    assert log.count("the broker took back 1 task") == 1, log
    assert log.count("stopping task process") == 1, log

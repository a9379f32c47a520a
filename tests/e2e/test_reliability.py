"""Faults on purpose: killed workers, crashing and overrunning tasks, garbage on
the wire, a broker restart, a client that went quiet."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import ventilator
from tests.leftovers import pid_file
from ventilator import broker as broker_module
from ventilator import protocol as p
from ventilator.serialization import pack_value

from . import broken_child_tasks, process_tasks, tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    MORE_TASKS,
    START_TIMEOUT_S,
    TASKS,
    BrokerProcess,
    ClusterError,
    Launcher,
    Processes,
    ProcessId,
    WorkerProcess,
    descendants,
    free_port,
    json_records,
    log_of,
    read_json_line,
    stand_in_broker,
    status_when,
    ventilator_argv,
    wait_for_workers,
    wait_until,
)
from .conftest import paused as stopped
from .test_dashboard import SETTLE_S, metrics

RESULT_TIMEOUT_S = 20.0


@pytest.fixture
def fast_broker(launch: Launcher) -> BrokerProcess:
    """A broker that takes a worker for dead after 3 x 0.2 s of silence."""
    return launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)


@pytest.fixture
def thread_workers(launch: Launcher, fast_broker: BrokerProcess) -> list[WorkerProcess]:
    """Two workers whose tasks run in threads: a SIGKILL leaves no orphans."""
    workers = [
        launch.worker(fast_broker, concurrency=2, pool="thread"),
        launch.worker(fast_broker, concurrency=2, pool="thread"),
    ]
    wait_for_workers(launch.client(fast_broker), 2)
    return workers


def kill_while_holding_tasks(client: ventilator.Client, victim: WorkerProcess) -> None:
    """SIGKILL `victim` once the broker shows it running tasks."""
    status_when(
        client,
        lambda status: (victim.entry(status) or {}).get("running"),
        10,
        "the victim to hold tasks",
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(10)


# --- dead workers, crashing and overrunning tasks ---------------------------------


def test_tasks_of_a_killed_worker_still_reach_the_client(
    launch: Launcher, fast_broker: BrokerProcess, thread_workers: list[WorkerProcess]
) -> None:
    client = launch.client(fast_broker)
    futures = [client.submit(tasks.slow_echo, i, 0.3) for i in range(16)]

    kill_while_holding_tasks(client, thread_workers[0])

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == list(range(16))
    status = status_when(
        client,
        lambda status: len(status["workers"]) == 1,
        10,
        "the broker to forget the dead worker",
    )
    assert thread_workers[0].entry(status) is None
    assert (status["queued"], status["running"]) == ({}, {})


def test_tasks_of_a_killed_worker_reach_a_sink_exactly_once(
    launch: Launcher, fast_broker: BrokerProcess, thread_workers: list[WorkerProcess]
) -> None:
    client = launch.client(fast_broker)
    for i in range(16):
        client.submit(tasks.slow_echo, i, 0.3, sink="exactly-once")

    kill_while_holding_tasks(client, thread_workers[0])
    status_when(
        client, lambda status: status["results_waiting"] == 16, 20, "all 16 results"
    )

    received: list[ventilator.SinkResult] = []
    with ventilator.Sink(
        "exactly-once", fast_broker.frontend, heartbeat_interval_s=0.1
    ) as sink:
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while len(received) < 16 and time.monotonic() < deadline:
            received.extend(sink.results(idle_timeout_s=1.0))
        # A result delivered twice would arrive within this idle window.
        received.extend(sink.results(idle_timeout_s=1.0))

    assert sorted(result.value for result in received) == list(range(16))
    assert len({result.task_id for result in received}) == 16
    assert client.status()["results_waiting"] == 0


def test_task_processes_end_with_a_worker_killed_outright(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    victim = launch.worker(fast_broker, concurrency=1)
    client = launch.client(fast_broker)
    wait_for_workers(client, 1)
    client.submit(tasks.sleep_for, 600)
    status_when(
        client,
        lambda status: (victim.entry(status) or {}).get("running"),
        10,
        "the task to start",
    )
    task_processes = descendants(victim.pid)
    assert task_processes, "a process pool worker without a task process"

    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(10)

    try:
        wait_until(
            lambda: not any(p.alive() for p in task_processes),
            10,
            "the dead worker's task processes to end",
        )
    finally:
        for orphan in task_processes:  # what a failed test would leave behind
            if orphan.alive():
                os.kill(orphan.pid, signal.SIGKILL)


def test_task_that_kills_its_process_every_time_fails_as_poison(
    launch: Launcher,
) -> None:
    broker = launch.broker("--max-attempts", "2")
    worker = launch.worker(broker, concurrency=2)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    poison = client.submit(tasks.crash, 9)
    others = [client.submit(tasks.square, i) for i in range(20)]

    error = poison.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.PoisonTask)
    assert "max_attempts=2" in error.message
    assert "(exit code 9)" in error.message  # how it died, as the worker saw
    assert [f.result(RESULT_TIMEOUT_S) for f in others] == [i * i for i in range(20)]
    assert worker.process.poll() is None


def test_task_that_kills_its_process_runs_max_attempts_times_among_quick_ones(
    launch: Launcher, tmp_path: Path
) -> None:
    # Quick tasks of the same function travel to the task processes in
    # batches, the poison ones among them: each of its deaths must count, the
    # first in a batch included. Each run of a poison task appends a line.
    broker = launch.broker("--max-attempts", "3")
    launch.worker(broker, concurrency=3)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    runs = tmp_path / "runs"
    xs = [*range(400), -1, *range(400), -2, *range(400), -3, *range(400)]

    futures = [
        client.submit(tasks.crash_on_negative_counted, [x, str(runs)]) for x in xs
    ]

    for x, future in zip(xs, futures, strict=True):
        if x < 0:
            error = future.exception(RESULT_TIMEOUT_S)
            assert isinstance(error, ventilator.PoisonTask)
            assert "its task process died 3 times" in error.message
        else:
            assert future.result(RESULT_TIMEOUT_S) == x * x
    assert runs.read_text().count("ran") == 3 * 3


def test_commands_of_a_task_that_killed_its_process_end_with_it(
    launch: Launcher, tmp_path: Path
) -> None:
    broker = launch.broker("--max-attempts", "1")
    launch.worker(broker, "tests.e2e.process_tasks")
    client = launch.client(broker)
    wait_for_workers(client, 1)
    with pid_file(tmp_path) as pids:
        command = ["sh", "-c", pids.sleeper()]

        poison = client.submit(process_tasks.start_then_die, [command], str(pids.path))

        assert isinstance(poison.exception(RESULT_TIMEOUT_S), ventilator.PoisonTask)
        assert len(pids.recorded()) == 1
        wait_until(lambda: not pids.alive(), 5, "the dead task's command to go")


def test_worker_whose_task_processes_cannot_start_hands_its_tasks_on(
    launch: Launcher, broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its module imports in the worker, not in its task processes: a deploy
    # broken under a running worker, as each new child meets it.
    monkeypatch.setenv(broken_child_tasks.BREAK_CHILDREN, "1")
    broken = launch.worker(broker, broken_child_tasks.__name__, concurrency=2)
    monkeypatch.delenv(broken_child_tasks.BREAK_CHILDREN)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    futures = [client.submit(broken_child_tasks.double, i) for i in range(10)]

    status = status_when(
        client,
        lambda status: (broken.entry(status) or {}).get("services") == [],
        RESULT_TIMEOUT_S,
        "the broken worker to serve no function",
    )
    problem = broken.entry(status)["problem"]  # type: ignore[index]
    assert "cannot start" in problem and "on purpose" in problem
    launch.worker(broker, broken_child_tasks.__name__)

    # Handed back unblamed: not one PoisonTask, though each child died.
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [2 * i for i in range(10)]
    assert "on purpose" in log_of(broken.process)  # the cause, in its log
    assert broken.process.poll() is None


def test_task_past_its_timeout_fails_and_the_worker_keeps_serving(
    launch: Launcher, broker: BrokerProcess
) -> None:
    worker = launch.worker(broker, concurrency=1)
    client = launch.client(broker)
    worker_id = worker.entry(wait_for_workers(client, 1))["id"]  # type: ignore[index]

    overrun = client.submit(tasks.sleep_for, 60, timeout_s=0.5)

    error = overrun.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.TaskTimeout)
    assert "0.5s" in error.message
    _, parent = client.submit(tasks.whereabouts, 0).result(RESULT_TIMEOUT_S)
    assert parent == worker.pid
    assert [w["id"] for w in client.status()["workers"]] == [worker_id]


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_task_past_its_timeout_is_a_warning_in_its_worker_s_log(
    launch: Launcher, broker: BrokerProcess, pool: str
) -> None:
    # The client hears TaskTimeout; the operator must find it in the worker's
    # log too, whichever pool ran the task.
    worker = launch.worker(broker, pool=pool, extra=JSON_LOG)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    overrun = client.submit(tasks.hang, timeout_s=0.5)

    assert isinstance(overrun.exception(RESULT_TIMEOUT_S), ventilator.TaskTimeout)
    wait_until(
        lambda: [
            r
            for r in json_records(worker.process)
            if r["level"] == "WARNING" and "timeout" in r["message"]
        ],
        RESULT_TIMEOUT_S,
        "a warning of the timeout in the worker's log",
    )


def test_task_that_ran_past_its_timeout_while_its_worker_stood_still_fails(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    # The worker could not stop it in time (paused, as by a long GC or a
    # swapped-out host); the task process ran on and reported success.
    worker = launch.worker(broker, concurrency=1)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    finished = tmp_path / "finished"

    # The task stops its worker itself: stopped from here once the task was
    # seen running, a loaded machine let the worker stop it in time first.
    overrun = client.submit(
        tasks.stop_worker_sleep_then_touch, 1.0, str(finished), timeout_s=0.5
    )
    try:
        wait_until(finished.exists, RESULT_TIMEOUT_S, "the task to end")
    finally:
        os.kill(worker.pid, signal.SIGCONT)

    error = overrun.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.TaskTimeout)
    assert "0.5s" in error.message


def test_thread_pool_frees_the_slots_of_tasks_that_hang_past_their_timeout(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # Threads cannot be stopped: without fresh threads in their slots, two hung
    # tasks would hold the only two slots for ever and square(4) never ran.
    launch.worker(broker, concurrency=2, pool="thread")
    client = launch.client(broker)
    wait_for_workers(client, 1)

    hung = [client.submit(tasks.hang, i, timeout_s=0.5) for i in range(6)]
    after = client.submit(tasks.square, 4)

    assert after.result(RESULT_TIMEOUT_S) == 16
    for future in hung:
        error = future.exception(RESULT_TIMEOUT_S)
        assert isinstance(error, ventilator.TaskTimeout)
        assert "could not be stopped" in error.message
        assert "result will be dropped" in error.message


def test_a_task_that_hangs_holds_up_no_other_clients_tasks_on_its_worker(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # A tester's hung task (no timeout) held its task process; the batch the
    # worker had written to that process's pipe behind it waited with it,
    # while the worker's other process idled and the other client waited.
    launch.worker(broker, concurrency=2)
    hanging = launch.client(broker)
    other = launch.client(broker)
    wait_for_workers(other, 1)
    hanging.submit(tasks.hang)

    for round_ in range(3):  # a round ends only if every task came back
        numbers = range(round_ * 200, (round_ + 1) * 200)
        futures = [other.submit(tasks.square, x) for x in numbers]
        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [x * x for x in numbers]


def test_tasks_held_behind_slots_that_hang_go_to_a_worker_with_room(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # A tester's worker held tiny tasks behind two that hung (no timeout),
    # for ever, while a second worker idled. One function for both, so that
    # they queue in the order sent: the two long ones take both slots, and
    # the worker, having learnt the function is short, holds the next. A
    # timeout makes a task travel to its process alone, not in a batch with
    # tiny ones (they would wait behind it in its batch).
    first = launch.worker(broker, concurrency=2, extra=("--log-level", "INFO"))
    client = launch.client(broker)
    wait_for_workers(client, 1)
    assert sum(client.map(tasks.sleep_for, [0] * 3000, chunksize=1)) == 0

    hung = [client.submit(tasks.sleep_for, 3600, timeout_s=3600) for _ in range(2)]
    tiny = [client.submit(tasks.sleep_for, 0) for _ in range(500)]
    launch.worker(broker, concurrency=2)

    assert [f.result(RESULT_TIMEOUT_S) for f in tiny] == [0] * 500
    assert not any(f.done() for f in hung)
    assert "every slot is busy with a long task" in log_of(first.process)


# --- garbage on the wire ----------------------------------------------------------


def real_messages() -> list[list[bytes]]:
    """Well-formed messages of every kind, to be cut into garbage."""
    commands: list[p.Command] = [
        p.Hello("garbage-session"),
        p.Submit([p.TaskSpec(1, f"{TASKS}:square", b"\x91\x03")]),
        p.Ack([("", 1)]),
        p.Cancel([1, 2]),
        p.Ready("garbage-worker", [f"{TASKS}:square"], 4),
        p.Done([p.Outcome(1, 1, p.Status.OK, b"\x09")]),
        p.Tasks([p.Assignment(1, 1, f"{TASKS}:square", b"\x91\x03")]),
        p.Results([p.ResultEntry(1, p.Status.OK, b"\x09")]),
    ]
    return [[bytes(frame) for frame in p.encode(c)] for c in commands]


def garbage(rng: random.Random) -> Iterator[list[bytes]]:
    """Messages broken in a different way each time."""
    samples = real_messages()
    while True:
        frames = list(rng.choice(samples))
        way = rng.randrange(5)
        if way == 0:  # random frames
            count = rng.randint(1, 6)
            yield [rng.randbytes(rng.randint(0, 64)) for _ in range(count)]
        elif way == 1:  # our header, then noise
            yield [p.HEADER, rng.randbytes(1), rng.randbytes(rng.randint(0, 64))]
        elif way == 2:  # the body cut short: never valid msgpack
            yield [*frames[:2], frames[2][: rng.randrange(len(frames[2]))]]
        elif way == 3:  # frames missing at the end
            yield frames[: rng.randrange(1, len(frames))]
        else:  # a payload frame too many
            yield [*frames, rng.randbytes(8)]


def test_a_burst_of_garbage_is_counted_in_the_log_once_it_is_over(
    broker: BrokerProcess,
) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(broker.frontend)
        for _ in range(20):
            sock.send_multipart([b"garbage"])
        # Answered: the broker read the burst.
        assert sock.poll(RESULT_TIMEOUT_S * 1000), "the broker never answered"
    finally:
        sock.close(linger=0)
        context.term()

    # One line for the first; the rest counted on a line of their own, not
    # held back until the next burst.
    wait_until(
        lambda: "19 more refused messages not logged" in log_of(broker.process),
        RESULT_TIMEOUT_S,
        "the broker to count the refusals it did not log",
    )


def test_garbage_on_both_sockets_does_not_disturb_a_running_client(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    client = launch.client(broker)
    rng = random.Random(20240601)
    context = zmq.Context()
    noisy: list[zmq.Socket[bytes]] = []
    try:
        for endpoint in (broker.frontend, broker.backend) * 3:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            noisy.append(sock)

        messages = garbage(rng)
        futures = []
        for i in range(500):
            futures.append(client.submit(tasks.square, i))
            if i % 5 == 0:
                for sock in noisy:
                    sock.send_multipart(next(messages))

        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [
            i * i for i in range(500)
        ]
        # The broker read the garbage, and told each sender what was wrong.
        for sock in noisy:
            assert sock.poll(5000), "the broker never answered a garbage sender"
            reply = p.decode(sock.recv_multipart(), p.TO_CLIENT | p.TO_WORKER)
            assert isinstance(reply, p.Error)
    finally:
        for sock in noisy:
            sock.close(linger=0)
        context.term()

    assert broker.process.poll() is None
    assert len(client.status()["workers"]) == 2


def test_thread_pool_worker_told_to_leave_at_once_exits_while_a_task_runs(
    launch: Launcher, broker: BrokerProcess
) -> None:
    worker = launch.worker(broker, pool="thread")
    client = launch.client(broker)
    wait_for_workers(client, 1)
    client.submit(tasks.sleep_for, 60)
    status_when(client, lambda status: status["running"], 10, "the task to start")

    worker.process.terminate()  # the first signal: finish what you hold
    status_when(
        client,
        lambda status: (worker.entry(status) or {}).get("draining", True),
        10,
        "the worker to drain",
        ClusterError,
    )
    worker.process.terminate()  # the second: leave at once
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(5)
        assert worker.process.poll() is not None, "the worker is still running"
    finally:
        if worker.process.poll() is None:
            worker.process.kill()


# --- broker restarts and quiet clients --------------------------------------------


def kill_broker(broker: BrokerProcess) -> None:
    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(10)


def test_worker_registers_again_with_a_restarted_broker(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    first = launch.broker(**restartable)
    worker = launch.worker(first)
    wait_for_workers(launch.client(first), 1)

    kill_broker(first)
    second = launch.broker(**restartable)
    client = launch.client(second)

    status_when(client, worker.entry, 10, "the worker to return")
    assert client.submit(tasks.square, 5).result(RESULT_TIMEOUT_S) == 25


def test_worker_registers_once_with_a_restarted_broker_it_sent_much_to(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    # Outcomes and beats sent while the broker was down each earn an
    # "unknown_worker" from the new one; answering each with a READY made the
    # broker take back, each time, the tasks it had just handed over.
    first = launch.broker(**restartable)
    worker = launch.worker(first, concurrency=2, extra=JSON_LOG)
    client = launch.client(first, heartbeat_interval_s=0.5)
    futures = [client.submit(tasks.sleep_for, 0.02) for _ in range(400)]
    wait_until(lambda: sum(f.done() for f in futures) >= 20, 20, "some results")

    kill_broker(first)
    launch.broker(**restartable)

    assert [f.result(60) for f in futures] == [0.02] * 400
    # Once, and as news rather than a fault: a broker restart is expected to
    # forget its workers, and the worker saw its connection made anew.
    assert registering_again_levels(worker) == ["INFO"], log_of(worker.process)


def test_a_worker_taken_for_dead_on_its_connection_warns_as_it_registers_again(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    worker = launch.worker(fast_broker, extra=JSON_LOG)
    client = launch.client(fast_broker)
    wait_for_workers(client, 1)

    with stopped(worker.pid):
        status_when(
            client,
            lambda status: not status["workers"],
            10,
            "the broker to take the stopped worker for dead",
        )
    status_when(client, worker.entry, 10, "the worker to register again")

    # Its connection stayed up: the broker gave up on it, a fault to look at.
    assert registering_again_levels(worker) == ["WARNING"], log_of(worker.process)


def test_sink_registers_again_with_a_restarted_broker_saying_so_once_as_news(
    processes: Processes, launch: Launcher, restartable: dict[str, Any]
) -> None:
    first = launch.broker(**restartable)
    launch.worker(first)
    argv = ventilator_argv("sink", "restarts", "--connect", first.frontend, *JSON_LOG)
    sink = processes.start("sink", argv, stdout=subprocess.PIPE)
    launch.client(first).submit(tasks.square, 2, sink="restarts")
    assert read_json_line(sink, RESULT_TIMEOUT_S)["result"] == 4

    kill_broker(first)
    second = launch.broker(**restartable)
    launch.client(second).submit(tasks.square, 3, sink="restarts")
    assert read_json_line(sink, RESULT_TIMEOUT_S)["result"] == 9
    processes.stop(sink)

    # A broker restart is expected: once, as news. Before, each message the
    # sink had sent meanwhile earned a WARNING (three in a millisecond).
    assert registering_again_levels(sink) == ["INFO"], log_of(sink)


JSON_LOG = ("--log-format", "json", "--log-level", "INFO")


def registering_again_levels(
    peer: WorkerProcess | subprocess.Popen[bytes],
) -> list[str]:
    """The levels of a worker's or sink's log records about registering again."""
    process = peer.process if isinstance(peer, WorkerProcess) else peer
    records = [
        json.loads(line)
        for line in log_of(process).splitlines()
        if line.startswith("{")
    ]
    return [r["level"] for r in records if "registering again" in r["message"]]


def test_journalled_tasks_run_after_the_broker_is_killed_and_restarted(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    first = launch.broker(**restartable)
    submitter = launch.client(first)
    futures = [submitter.submit(f"{MORE_TASKS}:cube", i) for i in range(3)]
    # Nobody serves it yet.
    status_when(
        submitter,
        lambda status: status["queued"].get(f"{MORE_TASKS}:cube") == 3,
        10,
        "three accepted tasks",
    )

    kill_broker(first)
    second = launch.broker(**restartable)
    observer = launch.client(second)
    assert observer.status()["queued"] == {f"{MORE_TASKS}:cube": 3}

    launch.worker(second, MORE_TASKS)
    # The submitter opens its session again with the new broker and collects.
    assert [f.result(20) for f in futures] == [0, 1, 8]


def test_large_journalled_payloads_survive_the_broker_killed_and_restarted(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    # Large payloads live in the journal's segment files, not its rows.
    blobs = [bytes([i]) * (200_000 + i) for i in range(3)]
    first = launch.broker(**restartable)
    submitter = launch.client(first)
    futures = [submitter.submit(f"{MORE_TASKS}:identity", blob) for blob in blobs]
    status_when(
        submitter,
        lambda status: status["queued"].get(f"{MORE_TASKS}:identity") == 3,
        10,
        "three accepted tasks",
    )

    kill_broker(first)
    second = launch.broker(**restartable)
    launch.worker(second, MORE_TASKS)

    assert [f.result(20) for f in futures] == blobs


def test_broker_that_cannot_write_its_journal_says_so_and_exits(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    broker = launch.broker(**restartable)
    # Where the first large payload's segment goes, a file: the write fails.
    Path(f"{restartable['journal']}.blobs").write_text("not a folder")
    client = launch.client(broker)
    client.submit(f"{MORE_TASKS}:identity", b"x" * 100_000)

    code = broker.process.wait(RESULT_TIMEOUT_S)
    client.close(timeout_s=0)  # its task was never accepted: nothing to wait for
    log = log_of(broker.process)
    assert code == 1
    assert f"cannot write journal {str(restartable['journal'])!r}" in log
    assert "Traceback" not in log


def test_broker_whose_journal_lost_its_blob_folder_refuses_to_start(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    first = launch.broker(**restartable)
    submitter = launch.client(first)
    submitter.submit(f"{MORE_TASKS}:identity", b"x" * 100_000)
    status_when(submitter, lambda s: s["queued"], 10, "an accepted task")
    kill_broker(first)
    submitter.close(timeout_s=0)
    blobs = Path(f"{restartable['journal']}.blobs")
    for segment in blobs.iterdir():
        segment.unlink()
    blobs.rmdir()

    with pytest.raises(ClusterError, match="exited with 2") as refused:
        launch.broker(**restartable)
    assert "cannot open journal" in str(refused.value)
    assert blobs.name in str(refused.value)


def test_client_gets_its_results_after_the_broker_is_killed_and_restarted(
    launch: Launcher, restartable: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ventilator.client")
    first = launch.broker(**restartable)
    # Beats every 2 s, so it waits 6 s before it calls the broker silent: far
    # longer than the restart takes.
    client = launch.client(first, heartbeat_interval_s=2.0)
    futures = [client.submit(f"{MORE_TASKS}:cube", i) for i in range(3)]
    status_when(
        client,
        lambda status: status["queued"].get(f"{MORE_TASKS}:cube") == 3,
        10,
        "three accepted tasks",
        ClusterError,
    )

    kill_broker(first)
    second = launch.broker(**restartable)
    launch.worker(second, MORE_TASKS)

    assert [f.result(5) for f in futures] == [0, 1, 8]
    # Opening its session again is what a restart asks of it, not a fault.
    hellos = [
        r
        for r in caplog.records
        if r.name == "ventilator.client" and "HELLO again" in r.getMessage()
    ]
    assert hellos
    assert all(r.levelno == logging.INFO for r in hellos)


# A client in its own process: prints its session, waits for a line on stdin,
# then runs one task and prints the result.
PAUSABLE_CLIENT = """
import json, sys
import ventilator
from tests.e2e import tasks

with ventilator.Client(sys.argv[1], heartbeat_interval_s=0.1) as client:
    print(json.dumps(client.session), flush=True)
    sys.stdin.readline()
    print(json.dumps(client.submit(tasks.square, 3).result(10)), flush=True)
"""


def start_pausable_client(
    launch: Launcher, broker: BrokerProcess
) -> tuple[subprocess.Popen[bytes], ventilator.Client, Callable[[Any], Any]]:
    """A worker, an observing client, and a PAUSABLE_CLIENT process the broker
    has heard; return the process, the observer, and a status predicate
    saying whether that client is connected (None: not listed)."""
    launch.worker(broker, pool="thread")
    observer = launch.client(broker)
    wait_for_workers(observer, 1)
    paused = launch.processes.start(
        "client",
        [sys.executable, "-c", PAUSABLE_CLIENT, broker.frontend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    session = read_json_line(paused, START_TIMEOUT_S)

    def connected(status: dict[str, Any]) -> bool | None:
        rows = [c["connected"] for c in status["clients"] if c["name"] == session]
        return rows[0] if rows else None

    status_when(observer, connected, 10, "the client to say hello", ClusterError)
    return paused, observer, connected


def test_client_paused_past_its_expiry_gets_its_results_when_it_resumes(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    paused, observer, connected = start_pausable_client(launch, fast_broker)
    with stopped(paused.pid):
        status_when(
            observer,
            lambda status: connected(status) is False,
            10,
            "the broker to take the paused client for gone",
            ClusterError,
        )
    paused.stdin.write(b"go\n")
    paused.stdin.flush()

    assert read_json_line(paused, 15) == 9


def test_a_paused_client_does_not_blame_the_broker_for_its_own_silence(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    paused, _, _ = start_pausable_client(launch, fast_broker)

    # Over ten times its 0.1 s heartbeat: past its liveness of the broker.
    pause_for(paused.pid, PAUSE_S)
    paused.stdin.write(b"go\n")
    paused.stdin.flush()

    assert read_json_line(paused, 15) == 9
    assert "silent" not in log_of(paused)
    assert "reconnecting" not in log_of(paused)


def test_a_broker_in_memory_warns_of_the_journal_it_leaves_aside(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    first = launch.broker(**restartable)
    client = launch.client(first)
    client.submit(tasks.echo, 1)  # no worker: it waits in the journal
    status_when(client, lambda status: status["queued"], 10, "the task queued")
    client.close()
    kill_broker(first)

    in_memory = launch.broker(
        "--journal", str(restartable["journal"]), durability="memory"
    )

    assert "journal" in log_of(in_memory.process)
    assert "are not served by this broker" in log_of(in_memory.process)


# --- pauses: a process that stood still is not a dead one ------------------------


# Over three times the 0.6 s that 3 x FAST_HEARTBEAT_S of silence takes to make a
# peer presumed dead.
PAUSE_S = 2.0


def pause_for(pid: int, seconds: float) -> None:
    """Stop `pid` for `seconds`, as a VM freeze or swapping would: the sleep is
    the length of the fault, not a wait for something to happen."""
    with stopped(pid):
        time.sleep(seconds)


def start_blocking_task(
    client: ventilator.Client, folder: Path
) -> tuple[ventilator.Future, Path]:
    """Submit a task that runs until its release file exists; return once it
    started, with that file's path."""
    started, release = folder / "started", folder / "release"
    future = client.submit(tasks.wait_for_file, str(started), str(release))
    wait_until(started.exists, RESULT_TIMEOUT_S, "the task to start")
    return future, release


def test_a_paused_broker_blames_no_task_for_its_own_silence(
    launch: Launcher, tmp_path: Path
) -> None:
    broker = launch.broker("--max-attempts", "1", heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    future, release = start_blocking_task(client, tmp_path)

    pause_for(broker.pid, PAUSE_S)
    release.touch()

    # With max_attempts=1 a single death counted against it fails it as poison.
    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert client.failed() == []


def test_peers_that_said_the_broker_was_silent_say_when_it_answers_again(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    worker = launch.worker(broker, extra=("--log-level", "info"))
    client = launch.client(broker)
    wait_for_workers(client, 1)
    caplog.set_level(logging.INFO, logger="ventilator.client")

    pause_for(broker.pid, PAUSE_S)

    assert client.submit(tasks.square, 3).result(RESULT_TIMEOUT_S) == 9
    said = [record.getMessage() for record in caplog.records]
    assert any("broker silent" in line for line in said), said
    assert any("broker answered again after" in line for line in said), said
    wait_until(
        lambda: "broker answered again after" in log_of(worker.process),
        RESULT_TIMEOUT_S,
        "the worker to say the broker answers again",
    )


def test_handshakes_cut_short_by_a_broker_pause_are_no_warning_once_peers_are_back(
    launch: Launcher,
) -> None:
    # While the broker stands still, its peers give up on their connections
    # and open new ones; on SIGCONT it accepts the abandoned ones already
    # closed (libzmq: HANDSHAKE_FAILED_NO_DETAIL), then the new ones succeed.
    broker = launch.broker(*JSON_LOG, heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    pause_for(broker.pid, PAUSE_S)

    assert client.submit(tasks.square, 3).result(RESULT_TIMEOUT_S) == 9
    said = wait_until(
        lambda: handshake_records(broker), RESULT_TIMEOUT_S, "a word on handshakes"
    )
    # A line per socket (clients', workers'), each at INFO: nothing to do.
    assert {r["level"] for r in said} == {"INFO"}, said


def test_a_tcp_health_check_on_the_broker_s_port_is_no_warning(
    launch: Launcher,
) -> None:
    # A load balancer opens and closes a plain TCP connection, no ZMTP; before,
    # with no handshake succeeding after it, the broker warned ten seconds on.
    broker = launch.broker(*JSON_LOG)
    host, port = broker.frontend.removeprefix("tcp://").rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=RESULT_TIMEOUT_S).close()

    settle_s = broker_module.HANDSHAKE_SETTLE_S
    said = wait_until(
        lambda: handshake_records(broker), settle_s + RESULT_TIMEOUT_S, "a word on it"
    )
    assert {r["level"] for r in said} == {"INFO"}, said


def handshake_records(broker: BrokerProcess) -> list[dict[str, Any]]:
    """The broker's log records about handshakes, of a broker logging JSON."""
    return [r for r in json_records(broker.process) if "handshake" in r["message"]]


def test_a_paused_worker_does_not_blame_the_broker_for_its_own_silence(
    launch: Launcher,
) -> None:
    # The test is the broker: it sees which connection each command comes on.
    context = zmq.Context()
    backend = context.socket(zmq.ROUTER)
    backend.setsockopt(zmq.LINGER, 0)
    try:
        port = backend.bind_to_random_port("tcp://127.0.0.1")
        worker = launch.processes.start(
            "worker",
            ventilator_argv(
                "worker",
                TASKS,
                "--connect",
                f"tcp://127.0.0.1:{port}",
                "--heartbeat-interval-s",
                str(FAST_HEARTBEAT_S),
            ),
        )
        connection, ready = receive_from_worker(backend)
        assert isinstance(ready, p.Ready)
        backend.send_multipart([connection, *p.encode(fast_welcome())])
        # Two beats later, a turn of its loop has read the WELCOME; each is
        # answered, as a broker beats.
        for _ in range(2):
            assert receive_from_worker(backend) == (connection, p.Heartbeat())
            backend.send_multipart([connection, *p.encode(p.Heartbeat())])

        pause_for(worker.pid, PAUSE_S)

        # Answered as a live broker answers, it keeps to its connection: a
        # READY would be a new one, opened because it blamed us for its pause.
        for _ in range(5):
            sender, command = receive_from_worker(backend)
            assert (sender, command) == (connection, p.Heartbeat())
            backend.send_multipart([connection, *p.encode(p.Heartbeat())])
    finally:
        backend.close(linger=0)
        context.term()


def receive_from_worker(backend: zmq.Socket[bytes]) -> tuple[bytes, p.Command]:
    assert backend.poll(RESULT_TIMEOUT_S * 1000), "the worker sent nothing"
    connection, *frames = backend.recv_multipart()
    return connection, p.decode(frames, p.FROM_WORKER)


def fast_welcome() -> p.Welcome:
    return p.Welcome(
        window=100,
        max_payload_bytes=1 << 20,
        heartbeat_interval_s=FAST_HEARTBEAT_S,
    )


# --- a worker that comes back keeps what it still holds -----------------------------


def start_counted_task(
    client: ventilator.Client, folder: Path
) -> tuple[ventilator.Future, Path, Path]:
    """Submit a task that leaves a marker in a folder per run and runs until
    its release file exists; return once it started, with both paths."""
    runs, release = folder / "runs", folder / "release"
    runs.mkdir(parents=True)
    future = client.submit(tasks.run_counted, str(runs), str(release))
    wait_until(lambda: any(runs.iterdir()), RESULT_TIMEOUT_S, "the task to start")
    return future, runs, release


def runs_once_idle(client: ventilator.Client, runs: Path) -> int:
    """How many times the task ran, once no worker holds or waits for any."""
    status_when(
        client,
        lambda status: (
            not status["queued"] and all(w["held"] == 0 for w in status["workers"])
        ),
        RESULT_TIMEOUT_S,
        "every worker idle",
    )
    return len(list(runs.iterdir()))


def fast_broker_with_a_worker(
    launch: Launcher,
) -> tuple[BrokerProcess, ventilator.Client]:
    """A broker of fast heartbeats with one worker registered, and a client."""
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    return broker, client


def test_a_task_running_while_the_broker_is_paused_past_liveness_runs_once(
    launch: Launcher, tmp_path: Path
) -> None:
    # The worker takes the paused broker for gone and registers again, on a
    # new connection, naming the task it still runs.
    broker, client = fast_broker_with_a_worker(launch)
    future, runs, release = start_counted_task(client, tmp_path)

    pause_for(broker.pid, PAUSE_S)
    release.touch()

    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert runs_once_idle(client, runs) == 1


# Far more than loopback's socket buffers hold.
LARGE = 24 * 1024 * 1024


def test_a_task_that_ends_while_the_broker_is_paused_past_liveness_runs_once(
    launch: Launcher, tmp_path: Path
) -> None:
    # Its result goes to the paused broker on a connection the worker then
    # gives up on; the worker must deliver it again on the next one. A large
    # result, as the kernel's buffers would hold a small one for the broker.
    broker, client = fast_broker_with_a_worker(launch)
    runs, release = tmp_path / "runs", tmp_path / "release"
    runs.mkdir()
    future = client.submit(tasks.run_counted_large, str(runs), str(release), LARGE)
    wait_until(lambda: any(runs.iterdir()), RESULT_TIMEOUT_S, "the task to start")

    with stopped(broker.pid):
        release.touch()
        time.sleep(PAUSE_S)  # the length of the fault, past the worker's liveness

    assert len(future.result(RESULT_TIMEOUT_S)) == LARGE
    assert runs_once_idle(client, runs) == 1


def test_a_task_that_ends_while_the_broker_is_down_runs_once_after_a_restart(
    launch: Launcher, restartable: dict[str, Any], tmp_path: Path
) -> None:
    # The journal brings the task back unfinished: the worker's result never
    # reached a broker, and the worker must name it and deliver it again.
    first, future, runs, release = counted_task_on_a_journal(
        launch, restartable, tmp_path
    )

    kill_broker(first)
    release.touch()
    time.sleep(PAUSE_S)  # the length of the outage, past the worker's liveness
    second = launch.broker(**restartable)

    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert runs_once_idle(launch.client(second), runs) == 1


def test_a_worker_stops_a_task_it_named_that_the_broker_gave_to_another(
    launch: Launcher, fast_broker: BrokerProcess, tmp_path: Path
) -> None:
    # Paused past liveness, the worker is taken for dead and its task goes to
    # another worker; back, it names the task, and must stop running it.
    first = launch.worker(fast_broker)
    client = launch.client(fast_broker)
    wait_for_workers(client, 1)
    future, runs, release = start_counted_task(client, tmp_path)
    (first_run,) = runs.iterdir()
    launch.worker(fast_broker)
    wait_for_workers(client, 2)

    pause_for(first.pid, PAUSE_S)
    wait_until(lambda: len(list(runs.iterdir())) == 2, RESULT_TIMEOUT_S, "a rerun")

    task_process = int(first_run.name.split("-")[1])
    wait_until(
        lambda: not Path(f"/proc/{task_process}").exists(),
        RESULT_TIMEOUT_S,
        "the first worker to stop the task it no longer has",
    )
    # Its slot is free: a task that only it can run now (the other worker
    # runs the released task) is not held behind the stopped one.
    assert client.submit(tasks.square, 7).result(RESULT_TIMEOUT_S) == 49
    release.touch()
    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert runs_once_idle(client, runs) == 2


def restart_under_a_running_task(
    launch: Launcher, restartable: dict[str, Any], folder: Path, *broker_args: str
) -> tuple[BrokerProcess, ventilator.Client, ventilator.Future, Path, Path]:
    """Start a counted task on a worker, then kill its broker and start
    another on the same journal (with `broker_args`); return the new broker,
    a client of it, and the task's future, runs folder and release file."""
    first, future, runs, release = counted_task_on_a_journal(
        launch, restartable, folder
    )

    kill_broker(first)
    second = launch.broker(*broker_args, **restartable)
    return second, launch.client(second), future, runs, release


def wait_for_the_worker_back_holding_its_task(observer: ventilator.Client) -> None:
    status_when(
        observer,
        lambda status: [w["held"] for w in status["workers"]] == [1],
        RESULT_TIMEOUT_S,
        "the worker back, holding its task",
    )


def counted_task_on_a_journal(
    launch: Launcher, restartable: dict[str, Any], folder: Path
) -> tuple[BrokerProcess, ventilator.Future, Path, Path]:
    """A broker on a journal, and a counted task running on its one worker
    (see start_counted_task): the broker, the future, runs and release."""
    broker = launch.broker(**restartable)
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    future, runs, release = start_counted_task(client, folder)
    return broker, future, runs, release


def test_a_task_running_while_the_broker_is_killed_and_restarted_runs_once(
    launch: Launcher, restartable: dict[str, Any], tmp_path: Path
) -> None:
    _, observer, future, runs, release = restart_under_a_running_task(
        launch, restartable, tmp_path
    )
    # The journal brought the task back; the worker names it as it registers.
    wait_for_the_worker_back_holding_its_task(observer)
    release.touch()

    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert runs_once_idle(observer, runs) == 1


def test_a_task_its_worker_took_back_after_a_restart_is_in_both_histograms(
    launch: Launcher, restartable: dict[str, Any], tmp_path: Path
) -> None:
    # Tester 36 saw 2 fewer in each histogram's count than tasks completed
    # after a kill -9 restart, and blamed the tasks workers took back.
    second, observer, future, runs, release = restart_under_a_running_task(
        launch, restartable, tmp_path, "--http", "127.0.0.1:0"
    )
    wait_for_the_worker_back_holding_its_task(observer)
    release.touch()
    assert future.result(RESULT_TIMEOUT_S) == "released"

    function = (("function", f"{TASKS}:run_counted"),)
    counts = {
        (name, function): 1
        for name in (
            "ventilator_tasks_completed_total",
            "ventilator_task_duration_seconds_count",
            "ventilator_task_queue_wait_seconds_count",
        )
    }
    wait_until(
        lambda: all(metrics(second).get(key) == n for key, n in counts.items()),
        SETTLE_S,
        f"/metrics to show {counts}",
    )
    assert runs_once_idle(observer, runs) == 1


def test_a_restored_task_waits_for_its_worker_rather_than_run_twice(
    launch: Launcher, restartable: dict[str, Any], tmp_path: Path
) -> None:
    second, observer, future, runs, release = restart_under_a_running_task(
        launch, restartable, tmp_path
    )
    # A worker new to the task, there first: it must not be given it while the
    # worker that runs it comes back.
    launch.worker(second)
    status_when(
        observer,
        lambda status: sorted(w["held"] for w in status["workers"]) == [0, 1],
        RESULT_TIMEOUT_S,
        "both workers registered, the task with its first one",
    )
    release.touch()

    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert runs_once_idle(observer, runs) == 1


def test_a_worker_naming_a_task_leased_to_another_does_not_get_it(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    function = f"{TASKS}:run_counted"
    runs, release = tmp_path / "runs", tmp_path / "release"
    runs.mkdir()
    client = launch.client(broker)

    context = zmq.Context()
    thief = context.socket(zmq.DEALER)
    thief.setsockopt(zmq.LINGER, 0)
    try:
        # The thief is given the task first, which tells it its ticket; it
        # leaves, and the task goes to a real worker at its next attempt.
        thief.connect(broker.backend)
        thief.send_multipart(p.encode(p.Ready("thief", [function], 1)))
        assert isinstance(receive(thief), p.Welcome)
        future = client.submit(tasks.run_counted, str(runs), str(release))
        given = receive(thief)
        assert isinstance(given, p.Tasks)
        ticket = given.tasks[0].ticket
        thief.send_multipart(p.encode(p.Bye()))
        launch.worker(broker)
        wait_until(lambda: any(runs.iterdir()), RESULT_TIMEOUT_S, "the task to run")

        # Back, it names the task at the attempt the real worker runs, and
        # reports a result for it.
        leased = p.Outcome(ticket, 2, p.Status.OK, pack_value("stolen"))
        thief.send_multipart(
            p.encode(p.Ready("thief", [function], 1, held=[(ticket, 2)]))
        )
        assert isinstance(receive(thief), p.Welcome)
        assert receive(thief) == p.Release([(ticket, 2)])  # not its task: stop it
        thief.send_multipart(p.encode(p.Done([leased])))
        # Answered in order: once welcomed again, its DONE was read before.
        thief.send_multipart(p.encode(p.Ready("thief", [function], 1)))
        assert isinstance(receive(thief), p.Welcome)
        release.touch()

        assert future.result(RESULT_TIMEOUT_S) == "released"
    finally:
        thief.close(linger=0)
        context.term()
    assert runs_once_idle(client, runs) == 1


def test_a_restarted_broker_without_a_journal_hands_out_no_ticket_twice(
    launch: Launcher, tmp_path: Path
) -> None:
    # A worker still runs the first broker's first task when a second broker,
    # which remembers nothing, takes its place. The second broker's first
    # task must not share that task's number: the first one's result, late,
    # would be taken for its own.
    endpoints = {
        "frontend": f"tcp://127.0.0.1:{free_port()}",
        "backend": f"tcp://127.0.0.1:{free_port()}",
    }
    first = launch.broker(**endpoints)
    launch.worker(first, concurrency=2)
    earlier = launch.client(first)
    wait_for_workers(earlier, 1)
    start_counted_task(earlier, tmp_path / "earlier")
    earlier.close()

    kill_broker(first)
    second = launch.broker(**endpoints)
    client = launch.client(second)
    wait_for_workers(client, 1)
    future, runs, release = start_counted_task(client, tmp_path / "later")
    (tmp_path / "earlier" / "release").touch()
    # It runs where the earlier task ran, once that one has reported.
    assert client.submit(tasks.square, 7).result(RESULT_TIMEOUT_S) == 49

    assert not future.done()
    release.touch()
    assert future.result(RESULT_TIMEOUT_S) == "released"
    assert len(list(runs.iterdir())) == 1


@pytest.mark.parametrize(
    ("held", "words"),
    [
        ({"1": 1}, "held must be list"),
        ([[1]], "list of 2 fields"),
        ([[1, "1"]], "attempt must be int"),
        ([[1, 0]], "attempt 0"),
        ([[1, 1], [1, 2]], "more than once"),
        ([[ticket, 1] for ticket in range(p.MAX_HELD_TICKETS + 1)], "more than"),
    ],
)
def test_a_ready_with_a_malformed_held_list_is_refused_and_others_are_served(
    launch: Launcher, broker: BrokerProcess, held: Any, words: str
) -> None:
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    body = ["forger", [f"{TASKS}:square"], 1, False, None, None, held]

    context = zmq.Context()
    forger = context.socket(zmq.DEALER)
    forger.setsockopt(zmq.LINGER, 0)
    try:
        forger.connect(broker.backend)
        forger.send_multipart([p.HEADER, bytes([p.Cmd.READY]), msgpack.packb(body)])
        refusal = receive(forger)
    finally:
        forger.close(linger=0)
        context.term()

    assert isinstance(refusal, p.Error)
    assert words in refusal.message
    assert client.submit(tasks.square, 7).result(RESULT_TIMEOUT_S) == 49
    assert "forger" not in [w["id"] for w in client.status()["workers"]]


def receive(sock: zmq.Socket[bytes]) -> p.Command:
    """The broker's next answer on `sock`, its heartbeats skipped."""
    while True:
        assert sock.poll(RESULT_TIMEOUT_S * 1000), "the broker sent nothing"
        command = p.decode(sock.recv_multipart(), p.TO_WORKER)
        if not isinstance(command, p.Heartbeat):
            return command


# --- a worker told to leave at once ---------------------------------------------------


def process_of_run(marker: Path) -> ProcessId:
    """The task process that left `marker` (see tasks.run_counted)."""
    process = ProcessId.of(int(marker.name.split("-")[1]))
    assert process is not None, f"the process of {marker.name} is gone already"
    return process


def test_a_worker_leaving_at_once_stops_its_tasks_before_they_run_elsewhere(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    leaving = launch.worker(broker, concurrency=1)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    future, runs, release = start_counted_task(client, tmp_path)
    [first_run] = list(runs.iterdir())
    first_process = process_of_run(first_run)
    launch.worker(broker, concurrency=1)
    wait_for_workers(client, 2)

    leaving.process.send_signal(signal.SIGQUIT)  # leave at once

    wait_until(lambda: len(list(runs.iterdir())) == 2, 30, "the task to run again")
    # Stopped before its worker said BYE, so before the other could start it.
    assert not first_process.alive()
    assert leaving.process.wait(20) == 0, log_of(leaving.process)
    release.touch()
    assert future.result(RESULT_TIMEOUT_S) == "released"


def test_a_client_whose_hello_died_with_its_broker_says_it_again_to_the_next(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # A broker killed after reading a client's HELLO and before its WELCOME:
    # the next broker on that address answered the client's heartbeats with
    # "hello_first", which an unwelcomed client ignored. Hearing answers, it
    # never called the broker silent, so it never said HELLO again: its
    # tasks waited for ever (a tester's kill -9 loop, 88 results undelivered).
    stand_in, frontend = stand_in_broker(context)
    client = launch.client(frontend)
    future = client.submit(tasks.square, 3)

    assert stand_in.poll(RESULT_TIMEOUT_S * 1000), "no HELLO reached the stand-in"
    stand_in.recv_multipart()
    stand_in.close(linger=0)  # dies without a word, as after kill -9
    broker = launch.broker(frontend=frontend)
    launch.worker(broker)

    assert future.result(RESULT_TIMEOUT_S) == 9


def test_the_broker_warns_of_each_task_that_failed_as_poison_or_timed_out(
    launch: Launcher,
) -> None:
    # An operator reading the broker's log at its default level (WARNING)
    # found neither the poison task nor the timed-out ones: their clients
    # heard, the broker's log never named them.
    broker = launch.broker("--max-attempts", "1")
    launch.worker(broker)
    client = launch.client(broker)
    poison = client.submit(tasks.crash)
    late = client.submit(tasks.sleep_for, 30, timeout_s=0.5)

    assert isinstance(poison.exception(RESULT_TIMEOUT_S), ventilator.PoisonTask)
    assert isinstance(late.exception(RESULT_TIMEOUT_S), ventilator.TaskTimeout)
    tickets = {record["function"]: record["ticket"] for record in client.failed()}
    wait_until(
        lambda: all(
            f"ticket={tickets[f'{TASKS}:{name}']} function={TASKS}:{name}"
            in log_of(broker.process)
            for name in ("crash", "sleep_for")
        ),
        RESULT_TIMEOUT_S,
        "the broker's log to name both failed tasks",
    )
    assert "WARNING" in log_of(broker.process)


def test_a_poison_task_s_strikes_survive_a_broker_restart(
    launch: Launcher, restartable: dict[str, Any], tmp_path: Path
) -> None:
    # Strikes were kept in memory only: each restart of the broker gave a task
    # that kills its process max_attempts more runs (a tester's kill loop saw
    # one run 4 times with max_attempts=3).
    runs, release = tmp_path / "runs", tmp_path / "release"
    runs.mkdir()
    first = launch.broker("--max-attempts", "2", **restartable)
    launch.worker(first)
    client = launch.client(first)
    poison = client.submit(tasks.crash_counted_after_release, str(runs), str(release))
    wait_until(lambda: len(list(runs.iterdir())) == 2, 20, "the second run to start")

    kill_broker(first)  # its first strike on disk, its second run under way
    launch.broker("--max-attempts", "2", **restartable)
    release.touch()

    error = poison.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.PoisonTask), error
    assert "died 2 times" in error.message
    assert len(list(runs.iterdir())) == 2


def test_a_client_says_hello_once_to_a_burst_of_hello_first(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # A restarted broker answers each message it gets before the client's
    # HELLO with "hello_first": a tester saw three HELLOs within a
    # millisecond, and the broker logged the one client joining three times.
    stand_in, frontend = stand_in_broker(context)
    launch.client(frontend, heartbeat_interval_s=5.0)
    peer, *_ = stand_in.recv_multipart()
    welcome = p.Welcome(window=16, max_payload_bytes=1 << 20, heartbeat_interval_s=5.0)
    stand_in.send_multipart([peer, *p.encode(welcome)])

    first = p.Error("hello_first", "send HELLO before any other command")
    for _ in range(3):
        stand_in.send_multipart([peer, *p.encode(first)])
    hellos = []
    while stand_in.poll(1000):  # the answers to all three, and a margin
        _, *frames = stand_in.recv_multipart()
        hellos.append(p.decode(frames, frozenset(p.Cmd)))

    assert [type(command) for command in hellos] == [p.Hello]

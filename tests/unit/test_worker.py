"""The worker's credit, as a broker's backend socket sees it: real ZeroMQ on
loopback, the run times fed in as the pool would report them."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.e2e import tasks
from ventilator import protocol as p
from ventilator.errors import UsageError
from ventilator.pool import ThreadPool
from ventilator.serialization import pack_call
from ventilator.worker import CREDIT_INTERVAL_S, Worker, WorkerConfig

TASKS = "tests.e2e.tasks"
RECEIVE_TIMEOUT_MS = 5000


@pytest.fixture
def backend() -> Iterator[tuple[zmq.Socket[bytes], int]]:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, port
    router.close(linger=0)
    context.term()


def commands_received(router: zmq.Socket[bytes]) -> list[p.Command]:
    """Every command the worker sent, once its BYE (sent last) arrived."""
    commands: list[p.Command] = []
    while not commands or not isinstance(commands[-1], p.Bye):
        assert router.poll(RECEIVE_TIMEOUT_MS), f"no BYE after {commands}"
        _routing_id, *frames = router.recv_multipart()
        commands.append(p.decode(frames, p.FROM_WORKER))
    return commands


def credits(commands: list[p.Command]) -> list[int]:
    return [c.capacity for c in commands if isinstance(c, p.Credit)]


def connected_worker(port: int) -> Worker:
    """A worker of two slots, connected to the test's broker socket at `port`."""
    config = WorkerConfig((TASKS,), connect=f"tcp://127.0.0.1:{port}", concurrency=2)
    worker = Worker(config, zmq.Context.instance())
    worker._connect(0.0)
    return worker


def test_a_worker_registers_in_a_line_telling_its_slots_from_its_credit(
    backend: tuple[zmq.Socket[bytes], int], caplog: pytest.LogCaptureFixture
) -> None:
    _router, port = backend
    with caplog.at_level(logging.INFO, logger="ventilator.worker"):
        worker = connected_worker(port)
        worker._capacity = 64  # as tiny tasks grow it
        worker._register(1.0)
    worker._leave()

    first, again = (
        r.getMessage().split()
        for r in caplog.records
        if "registering" in r.getMessage()
    )
    assert {"slots=2", "credit=2"} <= set(first)
    assert {"slots=2", "credit=64"} <= set(again)


def test_a_worker_wakes_when_the_broker_s_silence_passes_its_limit(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    # Checked only at its beats, a silence of 3 intervals was noticed up to an
    # interval late: 3 to 4 s after a broker was killed, with 1 s beats.
    _router, port = backend
    worker = connected_worker(port)
    worker._pool = ThreadPool(1, [TASKS], allow_pickle=False)
    now = time.monotonic()
    silence_limit_s = worker.config.heartbeat_interval_s * worker.config.liveness
    try:
        worker._broker.registering(now - silence_limit_s + 0.5)  # gone in 0.5 s
        timeout_ms = worker._poll_timeout_ms(next_beat=now + 0.9)
    finally:
        worker._leave()  # closes the pool too

    assert timeout_ms <= 500


def run_times(
    worker: Worker, durations_s: list[float], start: float, step_s: float
) -> None:
    """Report one task per duration, one every `step_s` from `start`."""
    for index, duration_s in enumerate(durations_s):
        worker._task_s.observe(duration_s)
        worker._adjust_credit(start + index * step_s)


def test_run_times_that_jitter_cost_at_most_one_credit_a_second(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    router, port = backend
    worker = connected_worker(port)
    # Tiny tasks, and now and then a few slowed down by a busy machine: the
    # credit wanted swings between 20 and 512, 30 times in 0.7 s.
    jitter = ([1e-5] * 20 + [5e-3] * 3) * 30
    run_times(worker, jitter, start=10.0, step_s=0.001)
    worker._leave()

    sent = credits(commands_received(router))

    assert 1 <= len(sent) <= 1 + int(0.7 / CREDIT_INTERVAL_S)


def test_tasks_turning_long_lower_the_credit_at_once(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    router, port = backend
    worker = connected_worker(port)
    run_times(worker, [1e-5] * 5, start=10.0, step_s=0.001)
    # Within the same second: long tasks must not be hoarded meanwhile.
    run_times(worker, [2.0] * 10, start=10.01, step_s=0.001)
    worker._leave()

    sent = credits(commands_received(router))

    assert sent[0] > worker.config.concurrency
    assert sent[-1] == worker.config.concurrency


def test_credit_grows_at_once_as_tasks_turn_out_tiny(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    router, port = backend
    worker = connected_worker(port)
    # A first task slowed by a cold start, then tiny ones, within 30 ms: the
    # credit must grow to near its ceiling (within the half that is not worth
    # a message) without waiting out CREDIT_INTERVAL_S.
    run_times(worker, [2e-3] + [1e-5] * 30, start=10.0, step_s=0.001)
    worker._leave()

    sent = credits(commands_received(router))

    ceiling = worker.config.concurrency * worker.config.prefetch_policy.most
    assert sent[0] < ceiling / 1.5 <= sent[-1]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("heartbeat_interval_s", 0.0),
        ("heartbeat_interval_s", -2.0),
        ("liveness", 0),
        ("concurrency", 0),
        ("prefetch", 0),
        ("worker_id", "mdp:echo"),  # the broker's name for its MDP workers
    ],
)
def test_worker_config_refuses_nonsense_naming_the_setting(
    setting: str, value: float
) -> None:
    with pytest.raises(UsageError, match=setting):
        WorkerConfig(modules=("json",), **{setting: value})  # type: ignore[arg-type]


def test_a_stop_at_once_leaves_without_announcing_a_drain(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    router, port = backend
    config = WorkerConfig((TASKS,), connect=f"tcp://127.0.0.1:{port}", concurrency=1)
    worker = Worker(config, zmq.Context.instance())
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        assert router.poll(RECEIVE_TIMEOUT_MS), "no READY from the worker"
        worker.stop(at_once=True)  # as SIGQUIT does, while the worker waits

        commands = commands_received(router)
    finally:
        worker.stop(at_once=True)
        serving.join(RECEIVE_TIMEOUT_MS / 1000)

    assert not serving.is_alive()
    assert not any(isinstance(c, p.Drain) for c in commands), commands


def test_a_worker_registering_again_names_and_keeps_the_tasks_it_holds(
    backend: tuple[zmq.Socket[bytes], int], tmp_path: Path
) -> None:
    router, port = backend
    worker = connected_worker(port)
    worker._pool = pool = ThreadPool(1, [TASKS], allow_pickle=False)
    release = tmp_path / "release"
    tasks = [
        p.Assignment(ticket, 1, f"{TASKS}:wait_for_file", call)
        for ticket, call in (
            (7, pack_call((str(tmp_path / "a"), str(release)), {})),
            (9, pack_call((str(tmp_path / "b"), str(release)), {})),
        )
    ]
    try:
        worker._handle(p.Tasks(tasks), 0.0)  # one runs, one waits for the slot
        worker._register(1.0)
        readies = [c for c in commands_until_ready(router, 2) if isinstance(c, p.Ready)]
        held_after = pool.load()
    finally:
        release.touch()
        worker._leave()  # closes the pool too

    assert [list(ready.held) for ready in readies] == [[], [(7, 1), (9, 1)]]
    assert held_after == 2


def commands_until_ready(router: zmq.Socket[bytes], readies: int) -> list[p.Command]:
    """What the worker sent, up to its `readies`-th READY."""
    commands: list[p.Command] = []
    while sum(isinstance(c, p.Ready) for c in commands) < readies:
        assert router.poll(RECEIVE_TIMEOUT_MS), f"no READY after {commands}"
        _routing_id, *frames = router.recv_multipart()
        commands.append(p.decode(frames, p.FROM_WORKER))
    return commands


def test_results_the_broker_had_already_are_not_told_as_tasks_taken_back(
    backend: tuple[zmq.Socket[bytes], int], caplog: pytest.LogCaptureFixture
) -> None:
    # After a broker pause the worker sends its results again, and the broker
    # tells it to drop those it had: before, "the broker took back 25 tasks".
    _router, port = backend
    worker = connected_worker(port)
    worker._pool = ThreadPool(1, [TASKS], allow_pickle=False)
    try:
        with caplog.at_level(logging.INFO, logger="ventilator.worker"):
            worker._handle(p.Release([(7, 1), (9, 1)]), 0.0)
    finally:
        worker._leave()

    [said] = [r for r in caplog.records if r.name == "ventilator.worker"]
    assert said.levelno == logging.INFO
    assert "took back" not in said.getMessage()


def test_a_worker_whose_every_thread_is_stuck_hands_its_tasks_back(
    backend: tuple[zmq.Socket[bytes], int],
) -> None:
    # It registers again serving nothing, with the reason, as a worker whose
    # task processes cannot start does: the broker gives what it held to
    # others, and its status says why.
    router, port = backend
    worker = connected_worker(port)
    worker._pool = ThreadPool(1, [TASKS], allow_pickle=False, max_stuck=0)
    tasks.RELEASE_HANGS.clear()
    try:
        hang = p.Assignment(1, 1, f"{TASKS}:hang", pack_call((), {}), 0, 0.05)
        worker._pool.submit(hang, time.monotonic())
        deadline = time.monotonic() + 10
        while not worker._pool.collect(time.monotonic()):
            assert time.monotonic() < deadline, "the hung task never timed out"
            timeout_at = worker._pool.next_deadline() or deadline
            select.select(worker._pool.fds(), [], [], timeout_at - time.monotonic())
        worker._follow_pool(time.monotonic())
    finally:
        tasks.RELEASE_HANGS.set()
        worker._leave()

    *_, ready = [c for c in commands_received(router) if isinstance(c, p.Ready)]
    assert ready.services == []
    assert ready.problem is not None and "stuck" in ready.problem, ready.problem

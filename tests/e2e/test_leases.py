"""What a worker may keep: timeouts the broker enforces, and credit it caps.

The misbehaving workers here are raw sockets speaking the worker protocol: a
real worker would not misbehave so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

import ventilator
from ventilator import protocol as p

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    TASKS,
    BrokerProcess,
    Launcher,
    status_when,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0


class RawWorker:
    """A worker that registers, heartbeats and takes tasks, but never
    answers one: its own thread owns its socket."""

    def __init__(self, backend: str, ready: p.Ready, beat_s: float) -> None:
        self.ready = ready
        self.given: list[int] = []  # tickets, as TASKS brought them
        self.errors: list[str] = []  # the codes of ERRORs it was sent
        self._backend = backend
        self._beat_s = beat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RawWorker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self._backend)
            sock.send_multipart(p.encode(self.ready))
            self._serve(sock)
        finally:
            sock.close(linger=0)
            context.term()

    def _serve(self, sock: zmq.Socket[bytes]) -> None:
        beat_at = 0.0
        while not self._stop.is_set():
            if sock.poll(self._beat_s * 500):
                self._note(p.decode(sock.recv_multipart(), p.TO_WORKER))
            if time.monotonic() >= beat_at:
                sock.send_multipart(p.encode(p.Heartbeat()))
                beat_at = time.monotonic() + self._beat_s

    def _note(self, command: p.Command) -> None:
        if isinstance(command, p.Tasks):
            self.given.extend(a.ticket for a in command.tasks)
        elif isinstance(command, p.Error):
            self.errors.append(command.code)


@pytest.fixture
def fast_broker(launch: Launcher) -> BrokerProcess:
    return launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)


@pytest.fixture
def hung_worker(fast_broker: BrokerProcess) -> Iterator[RawWorker]:
    ready = p.Ready("hung", [f"{TASKS}:square"], 5)
    with RawWorker(fast_broker.backend, ready, FAST_HEARTBEAT_S / 2) as worker:
        yield worker


def test_a_worker_that_heartbeats_but_never_answers_keeps_no_task_past_its_timeout(
    launch: Launcher, fast_broker: BrokerProcess, hung_worker: RawWorker
) -> None:
    client = launch.client(fast_broker)
    status_when(client, lambda s: s["workers"], RESULT_TIMEOUT_S, "the raw worker")
    timeout_s = 1.0
    started = time.monotonic()
    futures = [client.submit(tasks.square, i, timeout_s=timeout_s) for i in range(4)]

    for future in futures:
        with pytest.raises(ventilator.TaskTimeout, match="did not report it"):
            future.result(RESULT_TIMEOUT_S)
    took_s = time.monotonic() - started
    assert len(hung_worker.given) == 4
    # Not before its timeout; well before the worker would be taken for
    # dead, which it never is: it heartbeats.
    assert timeout_s <= took_s < RESULT_TIMEOUT_S


def test_a_worker_that_reports_its_own_timeout_is_believed(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    launch.worker(fast_broker)
    client = launch.client(fast_broker)
    future = client.submit(tasks.hang, timeout_s=0.5)

    with pytest.raises(ventilator.TaskTimeout) as raised:
        future.result(RESULT_TIMEOUT_S)
    assert "did not report it" not in str(raised.value)
    assert client.submit(tasks.square, 3, timeout_s=5.0).result(RESULT_TIMEOUT_S) == 9


def test_a_worker_declaring_a_capacity_over_the_limit_is_refused(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    client = launch.client(fast_broker)
    ready = p.Ready("greedy", [f"{TASKS}:square"], 1_000_000)
    with RawWorker(fast_broker.backend, ready, FAST_HEARTBEAT_S / 2) as greedy:
        wait_until(lambda: greedy.errors, RESULT_TIMEOUT_S, "the broker's refusal")
    assert greedy.errors[0] == "malformed"
    assert not client.status(RESULT_TIMEOUT_S)["workers"]


def test_a_worker_that_declares_no_slots_gets_no_more_than_its_share(
    launch: Launcher, fast_broker: BrokerProcess
) -> None:
    client = launch.client(fast_broker)
    ready = p.Ready("hoarder", [f"{TASKS}:square"], p.MAX_CAPACITY)
    with RawWorker(fast_broker.backend, ready, FAST_HEARTBEAT_S / 2) as hoarder:
        status_when(client, lambda s: s["workers"], RESULT_TIMEOUT_S, "the hoarder")
        launch.worker(fast_broker)
        launch.worker(fast_broker)
        wait_for_workers(client, 3)
        futures = [client.submit(tasks.square, i) for i in range(300)]

        # The real workers run everything the hoarder was not given.
        wait_until(
            lambda: sum(f.done() for f in futures) == 300 - len(hoarder.given),
            RESULT_TIMEOUT_S,
            "the real workers to run the rest",
        )
        assert len(hoarder.given) <= 120, len(hoarder.given)

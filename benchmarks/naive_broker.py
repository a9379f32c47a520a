"""Naive pyzmq broker: the baseline that ventilator is benchmarked against.

Design
------
Three kinds of process, all on tcp://127.0.0.1 with ports picked at random::

    client DEALER --> frontend ROUTER [broker] backend ROUTER <-- worker DEALER (xN)

* A worker connects and sends ``[READY, credit]`` (credit 8). The broker appends
  the worker's identity to a deque once per unit of credit.
* The client sends one message per task, ``[task-id, msgpack payload]``; the
  frontend ROUTER prefixes the client's identity. The broker pops one credit and
  forwards ``[client-id, task-id, payload]`` to that worker. While the deque is
  empty the broker stops reading the frontend, so back-pressure reaches the
  client through ZeroMQ's queues.
* The worker runs the named workload inline and replies
  ``[client-id, task-id, msgpack result]``. The broker returns the credit to the
  deque and routes the reply to the client named in the first frame.

Why this is the baseline
------------------------
It is the design most people would write in an afternoon from the zguide's
load-balancing broker pattern: one message and one broker hop per task, no
batching, no pickling, no result store, no heartbeats and no retries. Anything
ventilator does per task costs time on top of this, and anything it batches is
time this design cannot save, so the figures here are the wire limit of a
simple Python design on this machine: the number the product is compared with.

Shutdown
--------
The parent keeps the only write end of a pipe whose read end every child polls
next to its sockets. Closing the write end makes the read end readable (EOF),
so every child leaves its loop, closes its sockets with linger=0 and terminates
its context. Children also exit if the parent dies. Processes that do not exit
before a deadline are terminated, then killed, by PID.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeAlias

import msgpack
import zmq

log = logging.getLogger(__name__)

HOST = "tcp://127.0.0.1"
READY = b"READY"  # ROUTER-generated identities start with 0x00, so no clash.
WORKER_CREDIT = 8
CLIENT_WINDOW = 256  # Tasks a client keeps in flight; below the default HWM.
WARMUP_TASKS = 100
DRAIN_LIMIT = 1024  # Messages read per socket per poll, so neither side starves.
STARTUP_TIMEOUT_S = 15.0
RESULT_TIMEOUT_MS = 10_000  # A lost message fails the run instead of hanging it.
EXIT_GRACE_S = 3.0
TERMINATE_GRACE_S = 2.0

WORKLOADS: dict[str, Callable[[Any], Any]] = {
    "square": lambda x: x * x,
    "length": len,
}

_SPAWN = multiprocessing.get_context("spawn")

Socket: TypeAlias = "zmq.Socket[bytes]"


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _configure_logging(level: int) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s",
    )


def _task_id(index: int) -> bytes:
    return index.to_bytes(4, "little")


def _task_index(task_id: bytes) -> int:
    return int.from_bytes(task_id, "little")


def _stop_requested(events: dict[Any, int], stop: Connection) -> bool:
    return stop.fileno() in events


def _drain(sock: Socket, limit: int) -> Iterator[list[bytes]]:
    """Yield up to ``limit`` multipart messages already queued on ``sock``."""
    for _ in range(limit):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def _bind_router(ctx: zmq.Context[Socket]) -> tuple[Socket, int]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # Raise on unroutable, never drop.
    port = sock.bind_to_random_port(HOST)
    return sock, port


# --------------------------------------------------------------------------- #
# Broker process
# --------------------------------------------------------------------------- #


class _Broker:
    """Credit-based load balancer between one frontend and one backend ROUTER."""

    def __init__(self, frontend: Socket, backend: Socket) -> None:
        self.frontend = frontend
        self.backend = backend
        self.credits: deque[bytes] = deque()
        self.workers: set[bytes] = set()

    def forward_requests(self) -> None:
        for client_id, task_id, payload in _drain(self.frontend, len(self.credits)):
            worker_id = self.credits.popleft()
            self.backend.send_multipart([worker_id, client_id, task_id, payload])

    def handle_worker_messages(self) -> None:
        for worker_id, *frames in _drain(self.backend, DRAIN_LIMIT):
            if frames[0] == READY:
                self.register(worker_id, int(frames[1]))
            else:
                self.credits.append(worker_id)
                self.route_reply(frames)

    def register(self, worker_id: bytes, credit: int) -> None:
        self.workers.add(worker_id)
        self.credits.extend([worker_id] * credit)
        log.debug("worker %s ready with credit %d", worker_id.hex(), credit)

    def route_reply(self, frames: list[bytes]) -> None:
        try:
            self.frontend.send_multipart(frames)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("client %s gone; reply dropped", frames[0].hex())


def _broker_loop(
    broker: _Broker, stop: Connection, status: Connection, n_workers: int
) -> None:
    everything = zmq.Poller()  # Used while some worker has credit.
    workers_only = zmq.Poller()  # Used while none has: leave requests queued.
    for poller in (everything, workers_only):
        poller.register(broker.backend, zmq.POLLIN)
        poller.register(stop.fileno(), zmq.POLLIN)
    everything.register(broker.frontend, zmq.POLLIN)
    announced = False
    while True:
        poller = everything if broker.credits else workers_only
        events = dict(poller.poll())
        if _stop_requested(events, stop):
            return
        if broker.backend in events:
            broker.handle_worker_messages()
        if broker.frontend in events:
            broker.forward_requests()
        if not announced and len(broker.workers) >= n_workers:
            status.send(("ready", len(broker.workers)))
            announced = True


def _broker_main(
    status: Connection, stop: Connection, n_workers: int, log_level: int
) -> None:
    """Process entry point: bind, report ports, broker until told to stop."""
    _configure_logging(log_level)
    ctx = zmq.Context()
    try:
        frontend, frontend_port = _bind_router(ctx)
        backend, backend_port = _bind_router(ctx)
        status.send(("ports", frontend_port, backend_port))
        log.info("broker on ports %d/%d", frontend_port, backend_port)
        _broker_loop(_Broker(frontend, backend), stop, status, n_workers)
    except KeyboardInterrupt:
        log.debug("broker interrupted")
    finally:
        ctx.destroy(linger=0)  # Closes every socket with linger=0, then terms.
        status.close()


# --------------------------------------------------------------------------- #
# Worker process
# --------------------------------------------------------------------------- #


def _run_task(payload: bytes) -> bytes:
    name, argument = msgpack.unpackb(payload)
    result: bytes = msgpack.packb(WORKLOADS[name](argument))
    return result


def _worker_loop(sock: Socket, stop: Connection) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(stop.fileno(), zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if _stop_requested(events, stop):
            return
        for client_id, task_id, payload in _drain(sock, WORKER_CREDIT):
            sock.send_multipart([client_id, task_id, _run_task(payload)])


def _worker_main(backend: str, stop: Connection, log_level: int) -> None:
    """Process entry point: connect, announce credit, serve until told to stop."""
    _configure_logging(log_level)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(backend)
        sock.send_multipart([READY, str(WORKER_CREDIT).encode()])
        _worker_loop(sock, stop)
    except KeyboardInterrupt:
        log.debug("worker interrupted")
    finally:
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# Process management
# --------------------------------------------------------------------------- #


def _await_status(status: Connection, kind: str, deadline: float) -> tuple[Any, ...]:
    """Receive the broker's next status message, which must be of ``kind``."""
    if not status.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"broker did not report {kind!r} in time")
    try:
        message: tuple[Any, ...] = status.recv()
    except EOFError:
        raise RuntimeError(f"broker exited before reporting {kind!r}") from None
    if message[0] != kind:
        raise RuntimeError(f"expected {kind!r} from broker, got {message!r}")
    return message


def _stop_processes(processes: list[BaseProcess]) -> None:
    """Join, then terminate, then kill (by PID) each process, with deadlines."""
    deadline = time.monotonic() + EXIT_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            log.warning("pid %s did not exit; terminating", proc.pid)
            proc.terminate()
            proc.join(TERMINATE_GRACE_S)
    for proc in processes:
        if proc.is_alive():
            log.warning("pid %s ignored SIGTERM; killing", proc.pid)
            proc.kill()
            proc.join()
        proc.close()


@contextmanager
def running_cluster(workers: int) -> Iterator[str]:
    """Start a broker and ``workers`` workers; yield the client address.

    Yields only once the broker has reported, over its status pipe, that every
    worker has said READY; raises TimeoutError if that takes too long.
    """
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    level = logging.getLogger().getEffectiveLevel()
    status_read, status_write = _SPAWN.Pipe(duplex=False)
    stop_read, stop_write = _SPAWN.Pipe(duplex=False)
    processes: list[BaseProcess] = []
    try:
        broker = _SPAWN.Process(
            target=_broker_main,
            args=(status_write, stop_read, workers, level),
            name="naive-broker",
        )
        broker.start()
        processes.append(broker)
        status_write.close()  # The broker now holds the only write end.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        _, frontend_port, backend_port = _await_status(status_read, "ports", deadline)
        for index in range(workers):
            worker = _SPAWN.Process(
                target=_worker_main,
                args=(f"{HOST}:{backend_port}", stop_read, level),
                name=f"naive-worker-{index}",
            )
            worker.start()
            processes.append(worker)
        _await_status(status_read, "ready", deadline)
        yield f"{HOST}:{frontend_port}"
    finally:
        stop_write.close()  # EOF on every child's stop pipe: leave the loop.
        _stop_processes(processes)
        stop_read.close()
        status_read.close()


@contextmanager
def _client(address: str) -> Iterator[Socket]:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, RESULT_TIMEOUT_MS)
        sock.connect(address)
        yield sock
    finally:
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# Client side of the benchmarks
# --------------------------------------------------------------------------- #


def _square_payload(index: int) -> bytes:
    payload: bytes = msgpack.packb(("square", index))
    return payload


def _run_pipelined(
    client: Socket, n_tasks: int, payload_for: Callable[[int], bytes]
) -> tuple[list[bytes], float]:
    """Submit ``n_tasks`` with ``CLIENT_WINDOW`` in flight; return results, wall."""
    results: list[bytes] = [b""] * n_tasks
    sent = received = 0
    start = time.perf_counter()
    while received < n_tasks:
        while sent < n_tasks and sent - received < CLIENT_WINDOW:
            client.send_multipart([_task_id(sent), payload_for(sent)])
            sent += 1
        task_id, result = client.recv_multipart()
        results[_task_index(task_id)] = result
        received += 1
    return results, time.perf_counter() - start


def _round_trip(client: Socket, index: int, payload: bytes) -> bytes:
    client.send_multipart([_task_id(index), payload])
    task_id, result = client.recv_multipart()
    if _task_index(task_id) != index:
        raise RuntimeError(f"sent task {index}, got reply for {_task_index(task_id)}")
    return result


def _warm_up(client: Socket) -> None:
    """Push a few tasks through every hop so connections exist before timing."""
    _run_pipelined(client, WARMUP_TASKS, _square_payload)


def _check_results(results: list[bytes], expected: Callable[[int], Any]) -> None:
    for index, result in enumerate(results):
        if not result:
            raise RuntimeError(f"task {index}: no result received")
        if msgpack.unpackb(result) != expected(index):
            raise RuntimeError(f"task {index}: wrong result {result!r}")


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


# --------------------------------------------------------------------------- #
# Public benchmarks
# --------------------------------------------------------------------------- #


def throughput_tiny(n_tasks: int = 20000, workers: int = 2) -> dict[str, float]:
    """Tiny ``x*x`` tasks, pipelined; time from first submit to last result."""
    with running_cluster(workers) as address, _client(address) as client:
        _warm_up(client)
        results, wall = _run_pipelined(client, n_tasks, _square_payload)
    _check_results(results, lambda index: index * index)
    return {"tasks_per_s": n_tasks / wall, "wall_s": wall}


def latency_sequential(n_tasks: int = 2000, workers: int = 2) -> dict[str, float]:
    """One ``x*x`` task at a time; round-trip latency in microseconds."""
    samples_us: list[float] = []
    with running_cluster(workers) as address, _client(address) as client:
        _warm_up(client)
        for index in range(n_tasks):
            payload = _square_payload(index)
            start = time.perf_counter()
            result = _round_trip(client, index, payload)
            samples_us.append((time.perf_counter() - start) * 1e6)
            if msgpack.unpackb(result) != index * index:
                raise RuntimeError(f"task {index}: wrong result {result!r}")
    samples_us.sort()
    return {
        "p50_us": _percentile(samples_us, 0.50),
        "p99_us": _percentile(samples_us, 0.99),
        "mean_us": statistics.fmean(samples_us),
    }


def bytes_throughput(
    n_tasks: int = 2000, size: int = 100 * 1024, workers: int = 2
) -> dict[str, float]:
    """Each task carries ``size`` bytes; the worker returns their length.

    The argument is msgpack-packed per task, as a real client would have to.
    ``mb_per_s`` counts argument bytes delivered to workers, in 10**6 bytes/s.
    """
    blob = bytes(size)
    with running_cluster(workers) as address, _client(address) as client:
        _warm_up(client)
        results, wall = _run_pipelined(
            client, n_tasks, lambda _: msgpack.packb(("length", blob))
        )
    _check_results(results, lambda _: size)
    return {"tasks_per_s": n_tasks / wall, "mb_per_s": n_tasks * size / wall / 1e6}


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"{'benchmark':<22} {'metric':<12} {'value':>14}")
    print("-" * 50)
    for name, figures in rows:
        for position, (metric, value) in enumerate(figures.items()):
            label = name if position == 0 else ""
            digits = 1 if abs(value) >= 100 else 3
            print(f"{label:<22} {metric:<12} {value:>14,.{digits}f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    args = parser.parse_args()
    _configure_logging(logging.INFO if args.verbose else logging.WARNING)
    rows = [
        ("throughput_tiny", throughput_tiny()),
        ("latency_sequential", latency_sequential()),
        ("bytes_throughput", bytes_throughput()),
    ]
    _print_table(rows)


if __name__ == "__main__":
    main()

"""What B's round trip costs for each hand-off, in bare pyzmq.

    python -m benchmarks.hops [--round-trips 2000]

Benchmark B (one task at a time) is bound by the hand-offs on its path, each a
wake-up of another thread or process. The naive broker's round trip has four:
client, broker, worker, broker, client. Ventilator's had two more on each side:
the client's caller handed the task to its I/O thread and was woken by it, and
the worker hands the task to a task process over a pipe and reads it back. (A
lone task is now sent by the caller itself; only the wake-up back remains.)

This runs the naive topology with no per-task logic at all (no ids, journal,
credit or encoding beyond one msgpack), then adds those hand-offs one kind at a
time, and prints the p50 and p99 of each. The difference between the rows is
the floor those hand-offs put under B on this machine, whatever code runs
around them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import zmq

HOST = "tcp://127.0.0.1"
WARMUP = 200
# Ventilator's own layout: a worker's task runs in a child process; a client's
# socket belongs to an I/O thread.
SHAPES = {
    "naive (4 hand-offs)": (False, False),
    "+ task process (6)": (True, False),
    "+ client I/O thread (6)": (False, True),
    "+ both (8)": (True, True),
}

_SPAWN = multiprocessing.get_context("spawn")


def _broker(frontend_port: int, backend_port: int) -> None:
    """Forward each request to the one worker and each reply to its client."""
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    frontend.bind(f"{HOST}:{frontend_port}")
    backend = context.socket(zmq.ROUTER)
    backend.bind(f"{HOST}:{backend_port}")
    worker = backend.recv_multipart()[0]  # its hello
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is frontend:
                client, body = frontend.recv_multipart()
                if body == b"stop":
                    return
                backend.send_multipart([worker, client, body])
            else:
                _, client, body = backend.recv_multipart()
                frontend.send_multipart([client, body])


def _square(body: bytes) -> bytes:
    value = msgpack.unpackb(body)
    squared: bytes = msgpack.packb(value * value)
    return squared


def _task_process(pipe: socket.socket) -> None:
    """Run each task that comes down the pipe; send its result back."""
    while body := pipe.recv(65536):
        pipe.sendall(_square(body))


def _worker(backend_port: int, in_child: bool) -> None:
    context = zmq.Context()
    backend = context.socket(zmq.DEALER)
    backend.connect(f"{HOST}:{backend_port}")
    backend.send(b"hello")
    run: Callable[[bytes], bytes] = _square
    if in_child:
        ours, theirs = socket.socketpair()
        child = _SPAWN.Process(target=_task_process, args=(theirs,))
        child.start()

        def run(body: bytes) -> bytes:
            ours.sendall(body)
            return ours.recv(65536)

    while True:
        client, body = backend.recv_multipart()
        backend.send_multipart([client, run(body)])


class _DirectClient:
    """The caller's own thread sends and receives."""

    def __init__(self, context: zmq.Context[Any], endpoint: str) -> None:
        self._socket = context.socket(zmq.DEALER)
        self._socket.connect(endpoint)

    def call(self, value: int) -> Any:
        self._socket.send(msgpack.packb(value))
        return msgpack.unpackb(self._socket.recv())

    def close(self) -> None:
        self._socket.send(b"stop")
        self._socket.close(linger=1000)


class _ThreadedClient:
    """An I/O thread owns the socket; callers hand it work through a queue and
    a wake-up pipe, and wait on an event, as most client libraries do."""

    def __init__(self, context: zmq.Context[Any], endpoint: str) -> None:
        self._socket = context.socket(zmq.DEALER)
        self._socket.connect(endpoint)
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        self._reply: list[bytes] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def call(self, value: int) -> Any:
        self._done.clear()
        self._outbox.put(msgpack.packb(value))
        os.write(self._wake_write, b"x")
        self._done.wait()
        return msgpack.unpackb(self._reply.pop())

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while True:
            for item, _ in poller.poll():
                if item is self._socket:
                    self._reply.append(self._socket.recv())
                    self._done.set()
                else:
                    os.read(self._wake_read, 64)
                    body = self._outbox.get()
                    self._socket.send(body)
                    if body == b"stop":
                        return

    def close(self) -> None:
        self._outbox.put(b"stop")
        os.write(self._wake_write, b"x")
        self._thread.join()
        self._socket.close(linger=1000)


@contextmanager
def _topology(in_child: bool) -> Iterator[str]:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        frontend_port, backend_port = a.getsockname()[1], b.getsockname()[1]
    broker = _SPAWN.Process(target=_broker, args=(frontend_port, backend_port))
    broker.start()
    worker = _SPAWN.Process(target=_worker, args=(backend_port, in_child))
    worker.start()
    try:
        yield f"{HOST}:{frontend_port}"
        broker.join(10)
    finally:
        for process in (worker, broker):
            if process.is_alive():
                process.kill()
            process.join()
        for child in multiprocessing.active_children():
            child.kill()


def measure(in_child: bool, threaded: bool, round_trips: int) -> dict[str, float]:
    context = zmq.Context()
    with _topology(in_child) as endpoint:
        kind = _ThreadedClient if threaded else _DirectClient
        client = kind(context, endpoint)
        for i in range(WARMUP):
            client.call(i)
        times = []
        for i in range(round_trips):
            started = time.perf_counter()
            if client.call(i) != i * i:
                raise RuntimeError(f"wrong result for {i}")
            times.append(time.perf_counter() - started)
        client.close()
    context.term()
    times.sort()
    return {
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    figures = {}
    print(f"{'topology':28} {'p50 µs':>8} {'p99 µs':>8}")
    for name, (in_child, threaded) in SHAPES.items():
        figures[name] = measure(in_child, threaded, args.round_trips)
        row = figures[name]
        print(f"{name:28} {row['p50_us']:8,.0f} {row['p99_us']:8,.0f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()

"""A Majordomo (7/MDP 0.1) client and worker for the tests, written from the
specification alone (rfc.zeromq.org/spec/7), not from any implementation.

The worker also runs as a process, so that tests can SIGKILL it::

    python -m tests.mdp_peers ENDPOINT SERVICE [--delay-s S] [--tag TAG]
        [--heartbeat-s S]

It echoes each request's body (plus a frame TAG, if given) after `delay-s`, and
prints one JSON line per request it receives: {"received": n}.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

CLIENT = b"MDPC01"
WORKER = b"MDPW01"
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = (bytes((n,)) for n in range(1, 6))

Handler = Callable[[list[bytes]], list[bytes]]


class MdpClient:
    """An MDP client on a DEALER (asynchronous: any number of requests
    outstanding, never resent) or a REQ socket (one request at a time)."""

    def __init__(
        self, context: zmq.Context[Any], endpoint: str, socket_type: int = zmq.DEALER
    ) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._envelope = [b""] if socket_type == zmq.DEALER else []

    def send(self, service: bytes, *body: bytes) -> None:
        self.socket.send_multipart([*self._envelope, CLIENT, service, *body])

    def recv(self, timeout_s: float) -> tuple[bytes, list[bytes]]:
        """The next reply as (service, body).

        Raises:
            TimeoutError: none within `timeout_s`.
            AssertionError: the reply is not a well-formed MDP client REPLY.
        """
        if not self.socket.poll(timeout_s * 1000):
            raise TimeoutError(f"no MDP reply within {timeout_s:g}s")
        frames = self.socket.recv_multipart()
        if self._envelope:
            assert frames[:1] == [b""], frames
            frames = frames[1:]
        assert len(frames) >= 3, frames
        assert frames[0] == CLIENT, frames
        return frames[1], frames[2:]

    def request(
        self, service: bytes, *body: bytes, timeout_s: float = 10.0
    ) -> list[bytes]:
        """Send one request and return its reply body; the service must match."""
        self.send(service, *body)
        replied_service, reply = self.recv(timeout_s)
        assert replied_service == service, (replied_service, service)
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)


class MdpWorker:
    """An MDP worker: READY, then REQUEST/REPLY, heartbeats both ways; a new
    socket and READY again after DISCONNECT or a silent broker."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        service: bytes,
        handler: Handler,
        heartbeat_s: float = 2.5,
        liveness: int = 3,
    ) -> None:
        self._context = context
        self._endpoint = endpoint
        self._service = service
        self._handler = handler
        self._heartbeat_s = heartbeat_s
        self._liveness = liveness
        self._socket: zmq.Socket[bytes] | None = None
        self._broker_seen = 0.0
        self._sent = 0.0
        self.registrations = 0

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self._endpoint)
        self._send(READY, self._service)
        self.registrations += 1
        self._broker_seen = time.monotonic()

    def _send(self, command: bytes, *frames: bytes) -> None:
        assert self._socket is not None
        self._socket.send_multipart([b"", WORKER, command, *frames])
        self._sent = time.monotonic()

    def serve(self, keep_going: Callable[[], bool]) -> None:
        """Serve requests while `keep_going()`; then say DISCONNECT and close."""
        self._connect()
        try:
            while keep_going():
                self._turn()
        finally:
            if self._socket is not None:
                self._send(DISCONNECT)
                self._socket.close(linger=100)

    def _turn(self) -> None:
        assert self._socket is not None
        if self._socket.poll(min(self._heartbeat_s, 0.1) * 1000):
            self._broker_seen = time.monotonic()
            self._handle(self._socket.recv_multipart())
        elif time.monotonic() - self._broker_seen > self._heartbeat_s * self._liveness:
            self._connect()  # the broker went silent: start a new conversation
            return
        if time.monotonic() - self._sent >= self._heartbeat_s:
            self._send(HEARTBEAT)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[0] != b"" or frames[1] != WORKER:
            raise AssertionError(f"not an MDP worker message: {frames!r}")
        command = frames[2]
        if command == REQUEST:
            if len(frames) < 6 or frames[4] != b"":
                raise AssertionError(f"malformed REQUEST: {frames!r}")
            address, body = frames[3], frames[5:]
            self._send(REPLY, address, b"", *self._handler(body))
        elif command == DISCONNECT:
            self._connect()
        elif command != HEARTBEAT:
            raise AssertionError(f"unexpected command from the broker: {frames!r}")


# Set while a request is being worked on.
busy = threading.Event()


def _echo(delay_s: float, tag: bytes | None) -> Handler:
    received = 0

    def handle(body: list[bytes]) -> list[bytes]:
        nonlocal received
        received += 1
        print(json.dumps({"received": received}), flush=True)
        busy.set()
        time.sleep(delay_s)  # the work itself: a slow service, not a wait
        busy.clear()
        return [*body, tag] if tag is not None else body

    return handle


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("service")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--heartbeat-s", type=float, default=2.5)
    args = parser.parse_args(argv)

    stopping = False

    def stop(signum: int, frame: Any) -> None:
        # Between requests, leave the loop cleanly; in the middle of a slow
        # one, leave now: a test's teardown must not wait out its delay.
        nonlocal stopping
        stopping = True
        if busy.is_set():
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    tag = args.tag.encode() if args.tag is not None else None
    context: zmq.Context[Any] = zmq.Context()
    worker = MdpWorker(
        context,
        args.endpoint,
        args.service.encode(),
        _echo(args.delay_s, tag),
        heartbeat_s=args.heartbeat_s,
    )
    try:
        worker.serve(lambda: not stopping)
    finally:
        context.term()


if __name__ == "__main__":
    main(sys.argv[1:])

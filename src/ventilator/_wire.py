"""Socket chores shared by the peers (client, worker, sink): send and receive
commands without blocking, and never let a malformed frame escape."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import zmq

from . import protocol as p
from .errors import ProtocolError, UsageError

log = logging.getLogger(__name__)


def receive(
    socket: zmq.Socket[bytes], allowed: frozenset[p.Cmd]
) -> Iterator[p.Command]:
    """Yield every command waiting on `socket`; log and skip malformed ones."""
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield p.decode(frames, allowed)
        except ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)


def send(socket: zmq.Socket[bytes], command: p.Command) -> bool:
    """Send without blocking; False if the broker is not reachable right now.

    Callers resend what matters when the broker is back (on its WELCOME), so a
    message dropped here is not lost work.
    """
    try:
        frames = p.encode(command)
        socket.send_multipart(frames, zmq.NOBLOCK, copy=p.small(frames))
    except zmq.Again:
        log.debug("could not send %s: broker not reachable", type(command).__name__)
        return False
    return True


def check_endpoint(context: zmq.Context[Any], address: str, what: str) -> None:
    """Refuse an address ZeroMQ cannot connect to at all, naming it.

    A typo (``foo``, a port that is not a number) would otherwise surface as a
    traceback in a background thread and a client that waits for ever. Only
    the syntax is checked: connecting never waits for the peer, nor resolves
    a host name here.

    Raises:
        UsageError: the address is malformed.
    """
    probe = context.socket(zmq.DEALER)
    try:
        probe.connect(address)
    except zmq.ZMQError as exc:
        reason = zmq.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(
            f"{what} {address!r} is not an address to connect to ({reason}); "
            "expected e.g. tcp://127.0.0.1:5555"
        ) from None
    finally:
        probe.close(linger=0)

"""Socket chores shared by the peers (client, worker, sink): send and receive
commands without blocking, and never let a malformed frame escape."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

from . import protocol as p
from .errors import ProtocolError

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

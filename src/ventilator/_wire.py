"""Socket chores shared by the peers (client, worker, sink): send and receive
commands without blocking, and never let a malformed frame escape."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import cast

import zmq

from . import protocol as p
from .errors import ProtocolError, UsageError

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def receive(
    socket: zmq.Socket[bytes], allowed: frozenset[p.Cmd], lend_large: bool = False
) -> Iterator[p.Command]:
    """Yield every command waiting on `socket`; log and skip malformed ones.

    Frames arrive as bytes, except with `lend_large`: then frames of at least
    `protocol.ZERO_COPY_BYTES` stay the zmq.Frame libzmq received, uncopied,
    for a caller that only passes payloads on.

    ZMQ_EVENTS says when the socket is empty: cheaper than a receive that
    fails with `zmq.Again`, and it leaves the socket's descriptor ready to
    announce the next message.
    """
    while has_input(socket):
        try:
            frames = _receive_frames(socket, lend_large)
        except zmq.Again:
            return
        try:
            yield p.decode(frames, allowed)
        except ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)


def _receive_frames(socket: zmq.Socket[bytes], lend_large: bool) -> list[p.Payload]:
    # Frame.more rather than recv_multipart's ZMQ_RCVMORE: one call less a frame.
    frames: list[p.Payload] = []
    more = True
    while more:
        frame = socket.recv(_NOBLOCK, copy=False)
        more = frame.more
        lend = lend_large and len(frame) >= p.ZERO_COPY_BYTES
        frames.append(frame if lend else frame.bytes)
    return frames


def has_input(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits on `socket`, by its ZMQ_EVENTS."""
    return bool(cast(int, socket.getsockopt(_EVENTS)) & _POLLIN)


def send(socket: zmq.Socket[bytes], command: p.Command) -> bool:
    """Send without blocking; False if the broker is not reachable right now.

    Callers resend what matters when the broker is back (on its WELCOME), so a
    message dropped here is not lost work.
    """
    frames = p.encode(command)
    copy = p.small(frames)
    try:
        # Frame by frame, as send_multipart does, but with the flags as plain
        # ints: pyzmq's flag enums cost more per frame than the send itself.
        # Only the first frame can be refused; libzmq takes the rest.
        for frame in frames[:-1]:
            socket.send(frame, _NOBLOCK_MORE, copy=copy)
        socket.send(frames[-1], _NOBLOCK, copy=copy)
    except zmq.Again:
        log.debug("could not send %s: broker not reachable", type(command).__name__)
        return False
    return True


def check_endpoint(address: str, what: str) -> None:
    """Refuse an address no one could connect to, naming it.

    A typo (``foo``, a port that is not a number) would otherwise surface as a
    traceback in a background thread and a client that waits for ever. Only
    the form is checked, here rather than by a trial connect(), which would
    open a real connection to the broker and drop it half-way.

    Raises:
        UsageError: the address is malformed.
    """
    transport, separator, rest = address.partition("://")
    problem = None
    if not separator or not rest:
        problem = "no transport://, as in tcp://HOST:PORT"
    elif transport not in _TRANSPORTS:
        problem = f"unknown transport {transport!r}"
    elif transport == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port.isdigit() and 0 < int(port) < 65536):
            problem = "tcp needs HOST:PORT with a port from 1 to 65535"
    if problem is not None:
        raise UsageError(
            f"{what} {address!r} is not an address to connect to ({problem}); "
            "expected e.g. tcp://127.0.0.1:5555"
        )


# What ZeroMQ can connect over.
_TRANSPORTS = frozenset({"tcp", "ipc", "inproc", "pgm", "epgm", "ws", "wss", "vmci"})

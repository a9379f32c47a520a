"""How a worker and its task processes talk: a small header, then raw payloads.

A message is a fixed prefix giving the sizes of the two parts that follow, a
msgpack list of rows (one per task or outcome, its payload's size last), then
the payloads back to back, as they are. A 100 KiB argument is neither pickled
nor copied in Python on its way to a child: `frame` only lists the buffers, and
one scatter-gather call (`sendmsg`) writes them.

The worker's end never blocks (see pool.ProcessPool): an `Outbox` keeps what
the socket did not take yet, an `Inbox` puts together messages that arrive in
pieces. The child's end blocks (`read_message`, `write_message`).

A child's first message says it imported its modules: empty, it is ready; with
one row ``[CANNOT_START, reason]`` and the traceback as its payload, it cannot
import them and leaves. After that, each message answers a batch, a row per
task; an empty one answers a batch the worker took back, none of it run (see
`_progress`). A batch may be answered in parts: a message whose first row is
``[EARLY]`` (with an empty payload) answers the next tasks of the running
batch, while a later one of it runs long (see `_child`).
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import IO, Any, TypeAlias

import msgpack

__all__ = [
    "CANNOT_START",
    "EARLY",
    "Inbox",
    "Message",
    "Outbox",
    "frame",
    "read_message",
    "write_message",
]

# Bytes, or a buffer of bytes: a memoryview of bytes, a zmq.Frame.
Buffer: TypeAlias = Any
# Rows (without their sizes) and the payload of each row.
Message: TypeAlias = tuple[list[list[Any]], list[Buffer]]

CANNOT_START = "cannot_start"
EARLY = "early"

_PREFIX = struct.Struct("!II")  # header bytes, payload bytes
# Buffers in one sendmsg call: well under Linux's IOV_MAX of 1024.
_MAX_BUFFERS = 512
# Payloads smaller than this in all are copied into one buffer.
_JOIN_BELOW_BYTES = 64 * 1024
# Bytes an Inbox asks the socket for at once.
_CHUNK_BYTES = 256 * 1024


def frame(rows: Sequence[Sequence[Any]], payloads: Sequence[Buffer]) -> list[Buffer]:
    """A message as the buffers to write in order.

    Large payloads are not copied; small ones are joined into one buffer,
    which costs less than a buffer each, in Python and in the kernel.
    """
    rows_with_sizes = [
        [*row, len(payload)] for row, payload in zip(rows, payloads, strict=True)
    ]
    header = msgpack.packb(rows_with_sizes)
    body_bytes = sum(map(len, payloads))
    prefix = _PREFIX.pack(len(header), body_bytes)
    if body_bytes < _JOIN_BELOW_BYTES:
        return [b"".join([prefix, header, *payloads])]
    return [prefix + header, *payloads]


def _split(rows: list[list[Any]], body: Buffer) -> Message:
    """Cut `body` into the payloads the rows' trailing sizes announce."""
    if len(rows) == 1:
        *fields, _size = rows[0]
        return [fields], [body]

    view = memoryview(body)
    payloads: list[Buffer] = []
    start = 0
    for row in rows:
        size = row.pop()
        payloads.append(view[start : start + size])
        start += size
    if start != len(view):
        raise ValueError(f"the rows announce {start} payload bytes, not {len(view)}")
    return rows, payloads


# --- the child's end: blocking -----------------------------------------------------


def read_message(stream: IO[bytes]) -> Message:
    """The next message; EOFError when the worker closed its end."""
    head_bytes, body_bytes = _PREFIX.unpack(_read_exactly(stream, _PREFIX.size))
    # Header and payloads in one read; the payloads stay views of it.
    rest = memoryview(_read_exactly(stream, head_bytes + body_bytes))
    rows = msgpack.unpackb(rest[:head_bytes])
    return _split(rows, rest[head_bytes:])


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


def write_message(
    sock: socket.socket, rows: Sequence[Sequence[Any]], payloads: Sequence[Buffer]
) -> None:
    """Write a whole message, waiting for the socket as long as it takes."""
    buffers = frame(rows, payloads)
    if len(buffers) == 1:
        sock.sendall(buffers[0])  # the usual small message, in one call
        return
    outbox = Outbox(sock)
    outbox.put(buffers)
    while outbox:
        outbox.flush()


# --- the worker's end: never blocking ----------------------------------------------


class Outbox:
    """Buffers waiting to be written to a socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending: deque[memoryview] = deque()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def put(self, buffers: Iterable[Buffer]) -> None:
        self._pending.extend(map(memoryview, buffers))

    def clear(self) -> None:
        self._pending.clear()

    def flush(self) -> None:
        """Write what the socket takes now.

        Raises:
            OSError: the peer is gone (BrokenPipeError, ConnectionResetError).
        """
        pending = self._pending
        while pending:
            try:
                if len(pending) == 1:  # the usual small batch: no iovec to build
                    written = self._sock.send(pending[0])
                else:
                    written = self._sock.sendmsg(islice(pending, _MAX_BUFFERS))
            except BlockingIOError:
                return
            self._drop(written)

    def _drop(self, written: int) -> None:
        pending = self._pending
        while written and written >= len(pending[0]):
            written -= len(pending.popleft())
        if written:
            pending[0] = pending[0][written:]


class Inbox:
    """Messages read from a non-blocking socket, put together from the pieces."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._received = bytearray()
        self._chunk = bytearray(_CHUNK_BYTES)

    def read(self) -> list[Message]:
        """The messages complete so far, oldest first.

        Raises:
            EOFError: the peer closed its end, and all it sent was read.
            ValueError: a message is malformed.
        """
        closed = self._receive()
        messages = self._complete_messages()
        if closed and not messages:
            raise EOFError
        return messages

    def _receive(self) -> bool:
        """Append what the socket holds; True if the peer closed its end."""
        while True:
            try:
                count = self._sock.recv_into(self._chunk)
            except BlockingIOError:
                return False
            if count == 0:
                return True
            self._received += memoryview(self._chunk)[:count]
            if count < len(self._chunk):
                return False  # drained: the next poll says when more arrives

    def _complete_messages(self) -> list[Message]:
        messages = []
        start = 0
        with memoryview(self._received) as received:
            while len(received) - start >= _PREFIX.size:
                head_bytes, body_bytes = _PREFIX.unpack_from(received, start)
                head_at = start + _PREFIX.size
                body_at = head_at + head_bytes
                end = body_at + body_bytes
                if end > len(received):
                    break
                rows = msgpack.unpackb(received[head_at:body_at])
                messages.append(_split(rows, bytes(received[body_at:end])))
                start = end
        del self._received[:start]
        return messages

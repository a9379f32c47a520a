"""The pipe between a worker and its task processes, over real socket pairs."""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterator

import msgpack
import pytest

from ventilator._framing import (
    Inbox,
    Message,
    Outbox,
    frame,
    read_message,
    write_message,
)

BIG = bytes(range(256)) * 1200  # about 300 KiB: more than a socket buffer holds


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    worker_end, child_end = socket.socketpair()
    worker_end.setblocking(False)
    yield worker_end, child_end
    worker_end.close()
    child_end.close()


def as_bytes(message: Message) -> tuple[list[list[object]], list[bytes]]:
    rows, payloads = message
    return rows, [bytes(payload) for payload in payloads]


def test_a_batch_crosses_whole_with_each_payload_in_its_place(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, child_end = pair
    rows = [["mod:f", 0], ["mod:g", 2], ["mod:h", 0]]
    payloads = [b"first", b"", BIG]
    received: list[Message] = []
    reader = threading.Thread(
        target=lambda: received.append(read_message(child_end.makefile("rb")))
    )
    reader.start()

    outbox = Outbox(worker_end)
    outbox.put(frame(rows, payloads))
    while outbox:
        outbox.flush()  # never blocks: loops until the reader took it all
    reader.join(timeout=30)

    assert as_bytes(received[0]) == (rows, payloads)


def test_inbox_puts_together_a_message_that_arrives_a_byte_at_a_time(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, child_end = pair
    sender = socket.socketpair()
    try:
        write_message(sender[0], [[0, 0.5], [1, 0.25]], [b"result", b"error"])
        wire = sender[1].recv(65536)
    finally:
        sender[0].close()
        sender[1].close()
    inbox = Inbox(worker_end)

    seen: list[Message] = []
    for index in range(len(wire)):
        child_end.send(wire[index : index + 1])
        seen += inbox.read()

    assert [as_bytes(m) for m in seen] == [
        ([[0, 0.5], [1, 0.25]], [b"result", b"error"])
    ]


def test_inbox_hands_over_what_arrived_before_it_reports_the_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, child_end = pair

    def last_words_then_exit() -> None:
        write_message(child_end, [[0, 0.1]], [BIG])
        write_message(child_end, [[1, 0.2]], [b"last words"])
        child_end.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=last_words_then_exit)
    writer.start()
    inbox = Inbox(worker_end)

    messages: list[Message] = []
    with pytest.raises(EOFError):
        while True:
            select.select([worker_end], [], [], 10.0)
            messages += inbox.read()
    writer.join(timeout=30)

    assert [as_bytes(m) for m in messages] == [
        ([[0, 0.1]], [BIG]),
        ([[1, 0.2]], [b"last words"]),
    ]


def test_a_child_reading_after_the_worker_closed_gets_end_of_file(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, child_end = pair
    worker_end.shutdown(socket.SHUT_WR)

    with pytest.raises(EOFError):
        read_message(child_end.makefile("rb"))


def test_rows_that_announce_more_bytes_than_came_are_malformed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, child_end = pair
    # Two rows claiming 3 + 3 bytes, with a body of 5.
    header = msgpack.packb([[0, 0.1, 3], [0, 0.1, 3]])
    child_end.sendall(struct.pack("!II", len(header), 5) + header + b"12345")

    with pytest.raises(ValueError, match="announce 6 payload bytes"):
        Inbox(worker_end).read()

"""The sink's own loop, without a broker: what it does about its output."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import ventilator
from ventilator import protocol as p
from ventilator.serialization import pack_value
from ventilator.sink import SINK_ACK_EVERY

WAIT_S = 10.0


@pytest.fixture
def nobody() -> str:
    """A loopback address nobody listens on: the sink never hears a broker,
    as when it waits for one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def test_a_sink_stops_waiting_once_the_reader_of_its_output_left(
    context: zmq.Context[zmq.Socket[bytes]], nobody: str
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with (
            ventilator.Sink("unread", nobody, context=context) as sink,
            pytest.raises(BrokenPipeError),
        ):
            # Not watching its output, it would wait out the idle timeout and
            # end with StopIteration instead.
            next(sink.results(idle_timeout_s=WAIT_S, output_fd=write_end))
    finally:
        os.close(write_end)


def test_a_sink_writing_to_a_regular_file_waits_as_before(
    context: zmq.Context[zmq.Socket[bytes]], tmp_path: Path, nobody: str
) -> None:
    with (
        (tmp_path / "out").open("w") as output,
        ventilator.Sink("filed", nobody, context=context) as sink,
    ):
        received = list(sink.results(idle_timeout_s=0.3, output_fd=output.fileno()))

    assert received == []


def test_a_sink_acknowledges_a_long_burst_as_it_goes(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # A sink that started late took the whole backlog the broker sent in one
    # read, and acknowledged it only once every result of it was written: a
    # tester's kill -9 after 5,481 lines had all 5,481 written again.
    stand_in = context.socket(zmq.ROUTER)
    port = stand_in.bind_to_random_port("tcp://127.0.0.1")
    backlog = [
        p.ResultEntry(task_id, p.Status.OK, pack_value(task_id), origin="alice")
        for task_id in range(2000)
    ]
    try:
        with ventilator.Sink(
            "late", f"tcp://127.0.0.1:{port}", context=context
        ) as sink:
            peer, *_ = stand_in.recv_multipart()  # its HELLO
            welcome = p.Welcome(
                window=10_000, max_payload_bytes=1 << 20, heartbeat_interval_s=1.0
            )
            stand_in.send_multipart([peer, *p.encode(welcome)])
            stand_in.send_multipart([peer, *p.encode(p.Results(backlog))])
            results = sink.results(idle_timeout_s=WAIT_S)
            written = [next(results).task_id for _ in range(1500)]
            acknowledged = acknowledged_by(stand_in, WAIT_S)
            results.close()
    finally:
        stand_in.close(linger=0)

    assert written == list(range(1500))
    assert len(acknowledged) >= 1500 - SINK_ACK_EVERY
    assert acknowledged <= {("alice", task_id) for task_id in written}


def acknowledged_by(router: zmq.Socket[bytes], wait_s: float) -> set[tuple[str, int]]:
    """The results acknowledged in the ACKs that reached `router` by now."""
    keys: set[tuple[str, int]] = set()
    while router.poll(int(wait_s * 1000) if not keys else 100):
        _peer, *frames = router.recv_multipart()
        command = p.decode(frames, p.FROM_CLIENT)
        if isinstance(command, p.Ack):
            keys.update(command.keys)
    return keys

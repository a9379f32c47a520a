"""The sink's own loop, without a broker: what it does about its output."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import ventilator

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

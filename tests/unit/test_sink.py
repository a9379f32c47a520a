"""The sink's own loop, without a broker: what it does about its output."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import ventilator

# Nothing listens here: the sink never hears a broker, as when it waits for one.
NOBODY = "tcp://127.0.0.1:9"
WAIT_S = 10.0


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def test_a_sink_stops_waiting_once_the_reader_of_its_output_left(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    started = time.monotonic()
    try:
        with (
            ventilator.Sink("unread", NOBODY, context=context) as sink,
            pytest.raises(BrokenPipeError),
        ):
            next(sink.results(idle_timeout_s=WAIT_S, output_fd=write_end))
    finally:
        os.close(write_end)

    assert time.monotonic() - started < WAIT_S / 2


def test_a_sink_writing_to_a_regular_file_waits_as_before(
    context: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    with (
        (tmp_path / "out").open("w") as output,
        ventilator.Sink("filed", NOBODY, context=context) as sink,
    ):
        received = list(sink.results(idle_timeout_s=0.3, output_fd=output.fileno()))

    assert received == []

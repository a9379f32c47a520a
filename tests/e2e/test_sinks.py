"""Sinks against a real broker: one process receives a sink at a time."""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest

import ventilator

from . import tasks
from .conftest import (
    BrokerProcess,
    Launcher,
    Processes,
    WorkerProcess,
    json_lines,
    json_records,
    log_of,
    paused,
    read_json_line,
    status_when,
    ventilator_argv,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0


def sink_connected(client: ventilator.Client, name: str) -> None:
    def connected(status: dict[str, object]) -> bool:
        clients = status["clients"]
        assert isinstance(clients, list)
        return any(c["name"] == f"sink:{name}" and c["connected"] for c in clients)

    status_when(client, connected, RESULT_TIMEOUT_S, f"sink {name} connected")


def test_second_receiver_of_a_sink_is_refused_and_the_first_keeps_it(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    client = launch.client(broker)
    with ventilator.Sink("totals", broker.frontend, heartbeat_interval_s=0.1) as first:
        sink_connected(client, "totals")

        # Three heartbeats pass while it is refused (the old fault), and the
        # broker has 1.5 s to answer its first ask, even on a loaded machine.
        second = ventilator.Sink(
            "totals", broker.frontend, heartbeat_interval_s=0.5, taken_wait_s=2.0
        )
        with second, pytest.raises(ventilator.UsageError, match="another process"):
            list(second.results(idle_timeout_s=RESULT_TIMEOUT_S))

        # Ten heartbeats of the first one went by while the second one asked:
        # before, each would have taken the name back from the other.
        for i in range(5):
            client.submit(tasks.square, i, sink="totals")
        received = list(itertools.islice(first.results(RESULT_TIMEOUT_S), 5))

    assert sorted(r.value for r in received) == [0, 1, 4, 9, 16]


def test_a_refused_second_receiver_warns_only_that_the_sink_is_taken(
    launch: Launcher, broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, past three heartbeats without a WELCOME it also said that no
    # broker answered, though the broker had answered every ask with a refusal.
    client = launch.client(broker)
    with ventilator.Sink("totals", broker.frontend, heartbeat_interval_s=0.1):
        sink_connected(client, "totals")
        # Three heartbeats pass while it is refused (the old fault), and the
        # broker has 1.5 s to answer its first ask, even on a loaded machine.
        second = ventilator.Sink(
            "totals", broker.frontend, heartbeat_interval_s=0.5, taken_wait_s=2.0
        )
        with (
            caplog.at_level(logging.WARNING, logger="ventilator.sink"),
            second,
            pytest.raises(ventilator.UsageError, match="another process"),
        ):
            list(second.results(idle_timeout_s=RESULT_TIMEOUT_S))

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ventilator.sink" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, warnings  # that it is taken, asking again


def test_a_sink_name_is_free_again_once_its_receiver_closed(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    client = launch.client(broker)
    with ventilator.Sink("totals", broker.frontend, heartbeat_interval_s=0.1):
        sink_connected(client, "totals")
    client.submit(tasks.square, 7, sink="totals").result(RESULT_TIMEOUT_S)

    with ventilator.Sink(
        "totals", broker.frontend, heartbeat_interval_s=0.1, taken_wait_s=1.0
    ) as successor:
        [result] = list(itertools.islice(successor.results(RESULT_TIMEOUT_S), 1))

    assert result.value == 49


# A sink whose output stops being read: results of 10 kB, a few dozen of them,
# overflow the 64 kB of a pipe, and the sink blocks on its writes long past the
# broker's liveness (a fifth of a second apart, three beats).
SLOW_SINK_HEARTBEAT_S = 0.2
SLOW_SINK_LIVENESS_S = 3 * SLOW_SINK_HEARTBEAT_S
SLOW_SINK_RESULTS = 60
SLOW_SINK_RESULT_CHARS = 10_000
# What the test reads at most: every result three times over.
SLOW_SINK_READ_CAP_BYTES = 3 * SLOW_SINK_RESULTS * (SLOW_SINK_RESULT_CHARS + 200)


def sink_is_away(client: ventilator.Client, name: str) -> None:
    def away(status: dict[str, object]) -> bool:
        clients = status["clients"]
        assert isinstance(clients, list)
        return any(c["name"] == f"sink:{name}" and not c["connected"] for c in clients)

    status_when(client, away, RESULT_TIMEOUT_S, f"the broker giving sink {name} up")


def read_until_eof(
    process: subprocess.Popen[bytes], cap_bytes: int, timeout_s: float
) -> bytes:
    """What `process` writes to its stdout until it closes it, within a
    deadline and `cap_bytes` (past which a runaway writer is cut off)."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    chunks: list[bytes] = []
    read = 0
    deadline = time.monotonic() + timeout_s
    while read < cap_bytes:
        left_s = deadline - time.monotonic()
        assert left_s > 0, f"no end of the sink's output in {timeout_s:g}s"
        ready, _, _ = select.select([descriptor], [], [], left_s)
        if not ready:
            continue
        chunk = os.read(descriptor, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        read += len(chunk)
    return b"".join(chunks)


def start_slow_sink(
    launch: Launcher, processes: Processes
) -> tuple[ventilator.Client, subprocess.Popen[bytes]]:
    """A `ventilator sink slow` whose output nobody reads yet, sent results
    enough to block it, and a client of its broker."""
    broker = launch.broker(heartbeat_interval_s=SLOW_SINK_HEARTBEAT_S)
    launch.worker(broker, concurrency=2)
    client = launch.client(broker)
    sink = processes.start(
        "sink",
        ventilator_argv(
            "sink", "slow", "--connect", broker.frontend, "--idle-timeout-s", "3"
        ),
        stdout=subprocess.PIPE,
    )
    sink_connected(client, "slow")
    text = "x" * SLOW_SINK_RESULT_CHARS
    for _ in range(SLOW_SINK_RESULTS):
        client.submit(tasks.echo, text, sink="slow")
    return client, sink


def assert_written_once(sink: subprocess.Popen[bytes]) -> None:
    output = read_until_eof(sink, SLOW_SINK_READ_CAP_BYTES, 4 * RESULT_TIMEOUT_S)
    task_ids = [line["task_id"] for line in json_lines(output.decode())]
    assert len(task_ids) == SLOW_SINK_RESULTS, "results missing or written twice"
    assert len(set(task_ids)) == SLOW_SINK_RESULTS


def sink_row(client: ventilator.Client, name: str) -> dict[str, Any]:
    [row] = [c for c in client.status()["clients"] if c["name"] == f"sink:{name}"]
    return row


def test_a_sink_whose_output_blocks_shows_connected_with_its_results_waiting(
    launch: Launcher, processes: Processes
) -> None:
    client, sink = start_slow_sink(launch, processes)
    # Nobody reads its output: it blocks writing, every result sent to it.
    status_when(
        client,
        lambda status: status["totals"]["completed"] == SLOW_SINK_RESULTS,
        RESULT_TIMEOUT_S,
        "every task of the slow sink finished",
    )

    # Before, it went silent while it wrote, and status called it gone after
    # one liveness period; watched over five, it is alive with results waiting.
    watched_until = time.monotonic() + 5 * SLOW_SINK_LIVENESS_S
    while time.monotonic() < watched_until:
        row = sink_row(client, "slow")
        assert row["connected"], f"a busy sink shown as gone: {row}"
        assert row["pending"] + row["unacknowledged"] > 0, row
        time.sleep(SLOW_SINK_HEARTBEAT_S / 2)  # the pace of the watch

    assert_written_once(sink)


def test_a_sink_paused_past_its_liveness_writes_each_result_once(
    launch: Launcher, processes: Processes
) -> None:
    client, sink = start_slow_sink(launch, processes)
    # Stopped, it cannot beat: the broker gives it up, then takes it back as
    # it speaks again on the same connection, without sending anything twice.
    with paused(sink.pid):
        sink_is_away(client, "slow")

    assert_written_once(sink)


def test_a_sender_to_an_absent_sink_is_slowed_and_nobody_else(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    # As a tester saw it: one client sending to a sink nobody received had
    # twice its window accepted, and another client's plain submit was then
    # refused for the broker's total.
    broker = launch.broker("--client-window", "20", "--max-queued-tasks", "50")
    launch.worker(broker)
    sender, other = launch.client(broker), launch.client(broker)
    wait_for_workers(other, 1)
    sent: list[Future[Any]] = []

    def send() -> None:  # blocks once the sender's window is full
        sent.extend(sender.submit(tasks.square, i, sink="nobody") for i in range(40))

    with caplog.at_level(logging.WARNING, logger="ventilator.client"):
        sending = threading.Thread(target=send, daemon=True)
        sending.start()
        held = status_when(
            other,
            lambda status: (
                _row(status, sender.session_at_broker)["waiting_for_room"] == 20
            ),
            RESULT_TIMEOUT_S,
            "the sender's tasks past its window waiting for room",
        )
        served = other.submit(tasks.square, 7).result(RESULT_TIMEOUT_S)
        with ventilator.Sink("nobody", broker.frontend) as sink:
            received = list(itertools.islice(sink.results(RESULT_TIMEOUT_S), 40))
        sending.join(RESULT_TIMEOUT_S)

    assert _row(held, sender.session_at_broker)["tasks"] == 20
    assert served == 49
    assert sorted(r.value for r in received) == [i * i for i in range(40)]
    assert [f.result(RESULT_TIMEOUT_S) for f in sent] == [None] * 40  # none refused
    told = [r for r in caplog.records if "'nobody'" in r.getMessage()]
    assert len(told) == 1, "the sender was not told once that nobody receives"


def _row(status: dict[str, Any], name: str) -> dict[str, Any]:
    """The status row of client or sink `name`, with nothing held or waiting
    for what it does not say (not listed, or a broker that predates it)."""
    rows = [row for row in status["clients"] if row["name"] == name]
    return {"tasks": 0, "waiting_for_room": 0, **(rows[0] if rows else {})}


def start_sink_command(
    processes: Processes, broker: BrokerProcess, name: str, *options: str
) -> subprocess.Popen[bytes]:
    argv = ventilator_argv("sink", name, "--connect", broker.frontend, *options)
    return processes.start("sink", argv, stdout=subprocess.PIPE)


def all_acknowledged(client: ventilator.Client, name: str) -> None:
    def taken(status: dict[str, Any]) -> bool:
        row = _row(status, f"sink:{name}")
        return row.get("pending") == 0 and row.get("unacknowledged") == 0

    status_when(client, taken, RESULT_TIMEOUT_S, f"sink {name} acknowledging all")


def received_by_successor(broker: BrokerProcess, name: str, count: int) -> list[Any]:
    """The values a new receiver of sink `name` gets, once the old one left."""
    with ventilator.Sink(name, broker.frontend) as successor:
        results = list(itertools.islice(successor.results(RESULT_TIMEOUT_S), count))
    return sorted(r.value for r in results)


def test_a_sink_whose_reader_left_ends_quietly_and_keeps_what_it_did_not_write(
    launch: Launcher, processes: Processes
) -> None:
    # As `ventilator sink x | head -3` ends: before, with 1 (click's own
    # EPIPE handling), and nothing said of what became of the results.
    broker = launch.broker()
    launch.worker(broker)
    client = launch.client(broker)
    sink = start_sink_command(processes, broker, "piped")
    for i in range(3):
        client.submit(tasks.square, i, sink="piped")
    read = [read_json_line(sink, RESULT_TIMEOUT_S)["result"] for _ in range(3)]
    all_acknowledged(client, "piped")

    assert sink.stdout is not None
    sink.stdout.close()  # the reader leaves, as head does after its lines
    for i in range(3, 8):
        client.submit(tasks.square, i, sink="piped")

    assert sink.wait(RESULT_TIMEOUT_S) == 128 + signal.SIGPIPE, log_of(sink)
    assert "Traceback" not in log_of(sink)
    assert "Error" not in log_of(sink)
    assert sorted(read) == [0, 1, 4]
    # What it could not write was not acknowledged: the next receiver has it.
    assert received_by_successor(broker, "piped", 5) == [9, 16, 25, 36, 49]


def test_a_sink_that_cannot_write_its_output_says_so_and_keeps_the_results(
    launch: Launcher, processes: Processes
) -> None:
    broker = launch.broker()
    launch.worker(broker)
    client = launch.client(broker)
    sink = start_sink_command(processes, broker, "full", "--output", "/dev/full")
    sink_connected(client, "full")
    for i in range(3):
        client.submit(tasks.square, i, sink="full")

    assert sink.wait(RESULT_TIMEOUT_S) == 1, log_of(sink)
    said = log_of(sink)
    assert "Traceback" not in said
    assert "/dev/full" in said
    assert "No space left on device" in said
    assert received_by_successor(broker, "full", 3) == [0, 1, 4]


def test_a_sink_whose_reader_left_while_it_waited_ends_at_once_and_frees_its_name(
    launch: Launcher, processes: Processes
) -> None:
    # As `ventilator sink x | true`: before, it found out only at its next
    # write, and held the name until then (for ever, with nothing to write).
    broker = launch.broker()
    launch.worker(broker)
    client = launch.client(broker)
    sink = start_sink_command(processes, broker, "unread")
    sink_connected(client, "unread")

    assert sink.stdout is not None
    sink.stdout.close()  # the reader leaves; no result comes to write

    assert sink.wait(RESULT_TIMEOUT_S) == 128 + signal.SIGPIPE, log_of(sink)
    assert "Traceback" not in log_of(sink)
    assert "Error" not in log_of(sink)
    client.submit(tasks.square, 7, sink="unread")
    assert received_by_successor(broker, "unread", 1) == [49]  # the name is free


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)]
)
def test_a_sink_command_stopped_by_a_signal_says_goodbye_to_the_broker(
    launch: Launcher, processes: Processes, signum: int, status: int
) -> None:
    # An operator stops a sink with SIGTERM (systemd, kill) or Ctrl-C: the
    # broker must log a sink that left, not one it could no longer reach.
    broker = launch.broker("--log-format", "json", "--log-level", "INFO")
    client = launch.client(broker)
    sink = start_sink_command(processes, broker, "stopped")
    sink_connected(client, "stopped")

    sink.send_signal(signum)

    assert sink.wait(RESULT_TIMEOUT_S) == status, log_of(sink)
    assert "Traceback" not in log_of(sink)
    departures = wait_until(
        lambda: [
            record["message"]
            for record in json_records(broker.process)
            if "sink:stopped" in record["message"] and "joined" not in record["message"]
        ],
        RESULT_TIMEOUT_S,
        "the broker to note the sink's departure",
    )
    assert all(" left " in line for line in departures), departures


def test_a_sink_whose_broker_falls_silent_says_so_and_then_goes_on(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    # It used to say only that no broker answered, and only before its first
    # WELCOME: a sink whose broker stopped waited for ever, saying nothing.
    caplog.set_level(logging.WARNING, logger="ventilator.sink")
    broker = launch.broker(heartbeat_interval_s=0.2)
    client = launch.client(broker)
    launch.worker(broker)
    with ventilator.Sink("quiet", broker.frontend, heartbeat_interval_s=0.2) as sink:
        sink_connected(client, "quiet")

        with paused(broker.pid):
            # Three beats of silence, then the warning, well within this.
            assert list(sink.results(idle_timeout_s=3.0)) == []
        client.submit(tasks.square, 7, sink="quiet").result(RESULT_TIMEOUT_S)
        [result] = list(itertools.islice(sink.results(RESULT_TIMEOUT_S), 1))

    said = [r.getMessage() for r in caplog.records]
    assert any("broker silent for" in line and "sink=quiet" in line for line in said)
    assert result.value == 49

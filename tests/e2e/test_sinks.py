"""Sinks against a real broker: one process receives a sink at a time."""

from __future__ import annotations

import itertools

import pytest

import ventilator

from . import tasks
from .conftest import BrokerProcess, Launcher, WorkerProcess, status_when

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

        second = ventilator.Sink(
            "totals", broker.frontend, heartbeat_interval_s=0.1, taken_wait_s=1.0
        )
        with second, pytest.raises(ventilator.UsageError, match="another process"):
            list(second.results(idle_timeout_s=RESULT_TIMEOUT_S))

        # Ten heartbeats of the first one went by while the second one asked:
        # before, each would have taken the name back from the other.
        for i in range(5):
            client.submit(tasks.square, i, sink="totals")
        received = list(itertools.islice(first.results(RESULT_TIMEOUT_S), 5))

    assert sorted(r.value for r in received) == [0, 1, 4, 9, 16]


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

"""The broker's loop against real peers: no message waits for a tick to be read.

The loop waits on the sockets' ZMQ_FD descriptors, which a send can quietly
disarm (see `Broker._poller`); every tick checks every socket as a backstop.
With ticks half a minute apart, a wake-up the loop missed would hold a round
trip until the next tick, far past the deadlines below.
"""

from __future__ import annotations

import threading

import ventilator

from . import tasks
from .conftest import Launcher, wait_for_workers

SLOW_TICK_S = 30.0
RESULT_TIMEOUT_S = 10.0
ROUND_TRIPS = 150  # a multiple of WAVE
CLIENTS = 4
WAVE = 3


def _round_trips(client: ventilator.Client, first: int) -> list[float]:
    return [
        client.submit(tasks.square, i).result(RESULT_TIMEOUT_S)
        for i in range(first, first + ROUND_TRIPS)
    ]


def test_sequential_round_trips_never_wait_for_a_tick(launch: Launcher) -> None:
    broker = launch.broker(heartbeat_interval_s=SLOW_TICK_S)
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    assert _round_trips(client, 0) == [i * i for i in range(ROUND_TRIPS)]


def _waves(client: ventilator.Client, first: int) -> list[float]:
    results: list[float] = []
    for start in range(first, first + ROUND_TRIPS, WAVE):
        futures = [client.submit(tasks.square, i) for i in range(start, start + WAVE)]
        results += [future.result(RESULT_TIMEOUT_S) for future in futures]
    return results


def test_clients_interleaving_round_trips_never_wait_for_a_tick(
    launch: Launcher,
) -> None:
    # Several clients with a few tasks each in flight, and two workers:
    # messages keep arriving on both sockets while the broker sends on them,
    # which is when a send can swallow a wake-up.
    broker = launch.broker(heartbeat_interval_s=SLOW_TICK_S)
    launch.worker(broker, concurrency=2)
    launch.worker(broker, concurrency=2)
    clients = [launch.client(broker) for _ in range(CLIENTS)]
    wait_for_workers(clients[0], 2)
    results: dict[int, list[float]] = {}
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = _waves(clients[index], index * ROUND_TRIPS)
        except BaseException as exc:  # reported by the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ROUND_TRIPS * RESULT_TIMEOUT_S)

    assert failures == []
    for index in range(CLIENTS):
        first = index * ROUND_TRIPS
        expected = [i * i for i in range(first, first + ROUND_TRIPS)]
        assert results[index] == expected

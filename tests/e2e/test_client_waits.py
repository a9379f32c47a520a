"""Waits that cannot end say so: a done-callback that waits on the client, a
question to a broker that does not answer, a broker that never answered."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

import ventilator

from . import tasks
from .conftest import BrokerProcess, Launcher, free_port

CALLBACK_TIMEOUT_S = 20.0


def test_a_done_callback_waiting_on_a_pending_task_gets_a_usage_error_not_a_hang(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, pool="thread")
    client = launch.client(broker)
    raised: list[BaseException] = []
    chained: list[ventilator.TaskFuture] = []
    called = threading.Event()

    def chain(done: ventilator.TaskFuture) -> None:
        try:
            chained.append(client.submit(tasks.square, done.result()))
            chained[0].result()
        except BaseException as exc:
            raised.append(exc)
        finally:
            called.set()

    client.submit(tasks.square, 3).add_done_callback(chain)

    assert called.wait(CALLBACK_TIMEOUT_S)
    assert len(raised) == 1 and isinstance(raised[0], ventilator.UsageError)
    assert "I/O thread" in str(raised[0])
    # The client still works: the chained task and a later one complete.
    assert chained[0].result(CALLBACK_TIMEOUT_S) == 81
    assert client.submit(tasks.square, 4).result(CALLBACK_TIMEOUT_S) == 16


def test_a_done_callback_may_read_the_done_future_it_is_given(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, pool="thread")
    client = launch.client(broker)
    seen: list[object] = []
    called = threading.Event()

    def record(done: ventilator.TaskFuture) -> None:
        seen.extend([done.result(), done.exception()])
        called.set()

    client.submit(tasks.square, 5).add_done_callback(record)

    assert called.wait(CALLBACK_TIMEOUT_S)
    assert seen == [25, None]


def test_status_without_a_broker_times_out_naming_the_address_and_the_wait(
    launch: Launcher,
) -> None:
    client = launch.client(f"tcp://127.0.0.1:{free_port()}")

    with pytest.raises(ventilator.BrokerTimeout) as caught:
        client.status(timeout_s=0.5)

    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, ventilator.VentilatorError)
    message = str(caught.value)
    assert client.address in message and "0.5s" in message


def test_status_timing_out_leaves_no_question_behind(launch: Launcher) -> None:
    client = launch.client(f"tcp://127.0.0.1:{free_port()}")

    for _ in range(3):
        with pytest.raises(ventilator.BrokerTimeout):
            client.status(timeout_s=0.1)

    assert not client._handover.questions


def test_a_client_that_never_reached_a_broker_does_not_call_it_silent(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    client = launch.client(address, heartbeat_interval_s=0.05, liveness=2)

    with (
        caplog.at_level(logging.WARNING, logger="ventilator.client"),
        pytest.raises(ventilator.BrokerTimeout),
    ):
        client.status(timeout_s=0.5)

    reconnects = [r for r in caplog.records if address in r.getMessage()]
    assert reconnects
    assert not any("silent" in r.getMessage() for r in reconnects)


def _in_a_done_callback(
    client: ventilator.Client, call: Callable[[], object]
) -> BaseException | None:
    """What `call` raised when made from a done-callback; None if nothing."""
    raised: list[BaseException | None] = []
    called = threading.Event()

    def callback(done: ventilator.TaskFuture) -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)
        finally:
            called.set()

    client.submit(tasks.square, 2).add_done_callback(callback)
    assert called.wait(CALLBACK_TIMEOUT_S), "the callback never ended"
    return raised[0]


@pytest.mark.parametrize("call", ["map", "map one by one", "collect", "close"])
def test_a_done_callback_that_would_wait_on_the_client_gets_a_usage_error(
    launch: Launcher, broker: BrokerProcess, call: str
) -> None:
    launch.worker(broker, pool="thread")
    client = launch.client(broker)
    calls: dict[str, Callable[[], object]] = {
        "map": lambda: list(client.map(tasks.square, [1, 2])),
        "map one by one": lambda: list(client.map(tasks.square, [1], chunksize=1)),
        "collect": lambda: list(client.collect(timeout_s=1)),
        "close": client.close,
    }

    raised = _in_a_done_callback(client, calls[call])

    assert isinstance(raised, ventilator.UsageError)
    assert f"{call.split()[0]}()" in str(raised) and "I/O thread" in str(raised)
    assert client.submit(tasks.square, 4).result(CALLBACK_TIMEOUT_S) == 16


def test_an_executors_shutdown_waiting_in_a_done_callback_gets_a_usage_error(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, pool="thread", concurrency=2)
    client = launch.client(broker)
    executor = client.executor()
    executor.submit(tasks.hang)  # the callback's task runs beside it

    raised = _in_a_done_callback(client, executor.shutdown)

    assert isinstance(raised, ventilator.UsageError)
    assert "shutdown(wait=True)" in str(raised)
    # Not waiting is fine there.
    assert _in_a_done_callback(client, lambda: executor.shutdown(wait=False)) is None

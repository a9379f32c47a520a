"""AsyncClient beyond submit and map, against a real broker and worker:
map_outcomes, collect, and the operator questions, awaited on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import ventilator
from ventilator.security import fingerprint, read_public_key

from . import tasks
from .conftest import (
    MORE_TASKS,
    TASKS,
    BrokerProcess,
    Launcher,
    WorkerProcess,
    free_port,
    status_when,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0
UNSERVED = f"{MORE_TASKS}:cube"  # no worker in these tests serves it
T = TypeVar("T")


def run_with(
    broker: BrokerProcess,
    body: Callable[[ventilator.AsyncClient], Awaitable[T]],
    **options: Any,
) -> T:
    """`body` awaited with an AsyncClient of `broker`, on a loop of its own,
    under the results' deadline."""

    async def main() -> T:
        async with ventilator.AsyncClient(broker.frontend, **options) as client:
            return await asyncio.wait_for(body(client), RESULT_TIMEOUT_S)

    return asyncio.run(main())


@pytest.fixture
def worker(launch: Launcher, broker: BrokerProcess) -> WorkerProcess:
    worker = launch.worker(broker, pool="thread", concurrency=2)
    wait_for_workers(launch.client(broker), 1)
    return worker


def queued_unserved(launch: Launcher, broker: BrokerProcess, count: int) -> Any:
    """A client (left open) with `count` tasks queued that no worker serves."""
    client = launch.client(broker)
    futures = [client.submit(UNSERVED, x) for x in range(count)]
    status_when(
        client, lambda s: s["queued"].get(UNSERVED) == count, 10, f"{count} queued"
    )
    return client, futures


# --- map_outcomes -----------------------------------------------------------------


def test_async_map_outcomes_reports_every_item_in_order_without_raising(
    broker: BrokerProcess, worker: WorkerProcess
) -> None:
    async def outcomes(client: ventilator.AsyncClient) -> list[ventilator.ItemOutcome]:
        items = [1, 0, 4, 2]
        return [o async for o in client.map_outcomes(tasks.reciprocal, items)]

    received = run_with(broker, outcomes)

    assert [o.value for o in received] == [1.0, None, 0.25, 0.5]
    assert [o.error is None for o in received] == [True, False, True, True]
    error = received[1].error
    assert isinstance(error, ventilator.TaskRaised)
    assert isinstance(error, ZeroDivisionError)  # the function's own, built in


# --- collect ----------------------------------------------------------------------


def test_async_collect_yields_what_an_earlier_client_of_the_session_left(
    launch: Launcher, broker: BrokerProcess
) -> None:
    earlier = launch.client(broker)
    left = [earlier.submit(tasks.square, x) for x in range(5)]
    earlier.close()  # accepted, not run: no worker yet
    launch.worker(broker, pool="thread")

    async def collected(client: ventilator.AsyncClient) -> list[Any]:
        return [f async for f in client.collect(count=5, timeout_s=RESULT_TIMEOUT_S)]

    futures = run_with(broker, collected, session=earlier.session)

    assert sorted(f.task_id for f in futures) == sorted(f.task_id for f in left)
    assert sorted(f.result(0) for f in futures) == [x * x for x in range(5)]


def test_a_cancelled_async_collect_takes_no_result_with_it(
    launch: Launcher, broker: BrokerProcess
) -> None:
    earlier = launch.client(broker)
    left = [earlier.submit(tasks.square, x) for x in range(3)]
    earlier.close()

    async def cancel_then_collect(client: ventilator.AsyncClient) -> list[Any]:
        waiting = asyncio.ensure_future(anext(client.collect()))
        await until_listening(client, True)
        waiting.cancel()
        await until_listening(client, False)
        assert waiting.cancelled()
        # The results come only now, after the cancelled collect stopped.
        launch.worker(broker, pool="thread")
        return [f async for f in client.collect(count=3, timeout_s=RESULT_TIMEOUT_S)]

    futures = run_with(broker, cancel_then_collect, session=earlier.session)

    assert sorted(f.task_id for f in futures) == sorted(f.task_id for f in left)


async def until_listening(client: ventilator.AsyncClient, listening: bool) -> None:
    """Wait, on the loop, until a collect of `client` listens for results (or,
    with False, until none does any more), for at most RESULT_TIMEOUT_S."""
    deadline = asyncio.get_running_loop().time() + RESULT_TIMEOUT_S
    while bool(client._client._handover.collect_listeners) != listening:
        assert asyncio.get_running_loop().time() < deadline, f"listening={listening}"
        await asyncio.sleep(0.001)


def test_async_collect_stops_when_nothing_came_within_its_timeout(
    broker: BrokerProcess,
) -> None:
    async def collected(client: ventilator.AsyncClient) -> list[Any]:
        return [f async for f in client.collect(timeout_s=0.2)]

    assert run_with(broker, collected) == []


# --- operator questions -----------------------------------------------------------


def test_async_failed_lists_a_failure_and_retry_runs_it_again(
    broker: BrokerProcess, worker: WorkerProcess
) -> None:
    async def fail_then_retry(
        client: ventilator.AsyncClient,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        with pytest.raises(ventilator.TaskRaised):
            await client.submit(f"{TASKS}:fail", "on purpose")
        failures = await client.failed()
        return failures, await client.retry([failures[0]["ticket"]])

    failures, retried = run_with(broker, fail_then_retry)

    [failure] = failures
    assert (failure["outcome"], failure["message"]) == (
        "raised",
        "failed on purpose: on purpose",
    )
    assert retried["retried"] == [failure["ticket"]]
    assert retried["sink"] == "retried"


def test_async_purge_cancels_the_queued_tasks_of_a_function(
    launch: Launcher, broker: BrokerProcess
) -> None:
    _, futures = queued_unserved(launch, broker, 3)

    purged = run_with(broker, lambda client: client.purge(UNSERVED))

    assert purged == 3
    wait_until(lambda: all(f.cancelled() for f in futures), 10, "the futures cancelled")


def test_async_cancel_task_cancels_another_sessions_queued_task(
    launch: Launcher, broker: BrokerProcess
) -> None:
    submitter, [future] = queued_unserved(launch, broker, 1)

    outcome = run_with(
        broker,
        lambda client: client.cancel_task(submitter.session, future.task_id),
    )

    assert outcome == "cancelled"
    wait_until(future.cancelled, 10, "the future to be cancelled")


def test_async_purge_session_drops_what_a_departed_session_left(
    launch: Launcher, broker: BrokerProcess
) -> None:
    departed, _ = queued_unserved(launch, broker, 2)
    departed.close()

    dropped = run_with(broker, lambda client: client.purge_session(departed.session))

    assert dropped == {
        "results": 0,
        "expired": 0,
        "queued": 2,
        "running": 0,
        "for_sinks": 0,
    }


def test_async_purge_session_of_a_connected_session_is_a_usage_error(
    launch: Launcher, broker: BrokerProcess
) -> None:
    connected, _ = queued_unserved(launch, broker, 1)

    with pytest.raises(ventilator.UsageError):
        run_with(broker, lambda client: client.purge_session(connected.session))


def test_async_status_gives_up_after_its_timeout_without_a_broker() -> None:
    async def status() -> None:
        address = f"tcp://127.0.0.1:{free_port()}"
        async with ventilator.AsyncClient(address) as client:
            await client.status(timeout_s=0.2)

    with pytest.raises(ventilator.BrokerTimeout):
        asyncio.run(status())


def test_an_async_client_names_its_session_as_the_broker_does_under_curve(
    tmp_path: Path,
) -> None:
    public, secret = ventilator.generate_keys("alice", tmp_path)
    broker_public, _ = ventilator.generate_keys("broker", tmp_path)
    address = f"tcp://127.0.0.1:{free_port()}"  # no broker need answer

    async def name_it() -> str:
        async with ventilator.AsyncClient(
            address, session="s", secret_key=secret, broker_key=broker_public
        ) as client:
            return client.session_at_broker

    # What purge_session and cancel_task take under CURVE.
    assert asyncio.run(name_it()) == f"{fingerprint(read_public_key(public))}.s"


def test_cancelling_an_item_by_item_async_map_stops_the_item_it_awaited(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    launch.worker(broker, concurrency=1)  # task processes, one slot
    wait_for_workers(launch.client(broker), 1)
    runs, never = tmp_path / "runs", tmp_path / "never-released"
    runs.mkdir()

    async def cancel_while_awaiting(client: ventilator.AsyncClient) -> Any:
        items = [(str(runs), str(never))] * 3
        mapped = client.map(tasks.run_counted_item, items, chunksize=1)
        consumer = asyncio.ensure_future(anext(mapped))
        while not any(runs.iterdir()):  # the first item runs: it is awaited
            await asyncio.sleep(0.01)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await mapped.aclose()
        # The only slot is free again only if the awaited item was stopped.
        return await client.submit(tasks.square, 6)

    assert run_with(broker, cancel_while_awaiting) == 36
    assert len(list(runs.iterdir())) == 1


def test_async_submits_waiting_for_room_leave_questions_and_close_free(
    broker: BrokerProcess,
) -> None:
    # Tasks nobody serves: the window of 2 stays full, and 28 submits wait.
    # Waiting in the loop's default executor, they took every thread it has,
    # and status() and close() queued behind them for as long as they waited.
    async def ask_while_full(client: ventilator.AsyncClient) -> Any:
        submits = [asyncio.ensure_future(client.submit(UNSERVED, x)) for x in range(30)]
        while client._client._handover.in_window < 2:  # the first two went
            await asyncio.sleep(0.01)

        status = await client.status(timeout_s=5)
        await client.close()
        outcomes = await asyncio.gather(*submits, return_exceptions=True)
        return status, outcomes

    status, outcomes = run_with(broker, ask_while_full, window=2)

    assert status["queued"] == {UNSERVED: 2}
    assert all(isinstance(o, ventilator.ClientClosed) for o in outcomes)


def test_a_bad_chunksize_or_option_is_refused_when_map_is_called(
    broker: BrokerProcess,
) -> None:
    # As Client.map: at the call, not at the first `async for` step.
    async def body(client: ventilator.AsyncClient) -> list[str]:
        refused = []
        for call in (
            lambda: client.map(tasks.square, [1], chunksize=0),
            lambda: client.map(tasks.square, [1], timeout_s=-1),
            lambda: client.map_outcomes(tasks.square, [1], chunksize=1.5),
        ):
            with pytest.raises(ventilator.UsageError) as error:
                call()
            refused.append(str(error.value))
        return refused

    refused = run_with(broker, body)

    assert "chunksize" in refused[0] and "timeout_s" in refused[1]
    assert "chunksize" in refused[2]

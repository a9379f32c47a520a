"""A map's batch that failed whole and that its map ran again item by item, as
the broker's books show it: not failed, not for `retry`, its items counted once
by their own outcome. And a batch from a client that does not say it splits
(an older one), as before."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

import ventilator
from ventilator import _wire
from ventilator import protocol as p
from ventilator.serialization import BatchPacker

from . import tasks
from .conftest import TASKS, BrokerProcess, Launcher, wait_for_workers, wait_until
from .test_client import raw_results
from .test_dashboard import SETTLE_S, api, metrics

SLEEP_FOR = f"{TASKS}:sleep_for"
# 40 items in batches of 10 (`chunksize`) under a timeout of 1 s per item: the
# third batch holds the one slow item, times out as a whole, and is split.
SLOW_ITEM = 20
SECONDS = [0.0] * SLOW_ITEM + [3.0] + [0.0] * 19


@pytest.fixture
def web_broker(launch: Launcher) -> BrokerProcess:
    return launch.broker("--http", "127.0.0.1:0")


def counted(broker: BrokerProcess, expected: dict[Any, float]) -> None:
    """Wait until /metrics shows every sample of `expected` with its value."""

    def shown() -> bool:
        samples = metrics(broker)
        return all(samples.get(key, 0) == value for key, value in expected.items())

    wait_until(shown, SETTLE_S, f"/metrics to show {expected}")


def test_a_map_batch_that_timed_out_is_split_and_only_its_slow_item_failed(
    launch: Launcher, web_broker: BrokerProcess
) -> None:
    launch.worker(web_broker, concurrency=2)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)

    outcomes = list(
        client.map_outcomes(tasks.sleep_for, SECONDS, chunksize=10, timeout_s=1)
    )
    [record] = client.failed()
    totals = client.status()["totals"]

    assert [i for i, o in enumerate(outcomes) if o.error is not None] == [SLOW_ITEM]
    assert isinstance(outcomes[SLOW_ITEM].error, ventilator.TaskTimeout)
    assert record["outcome"] == "timeout"
    assert (totals["failed"], totals["split"]) == (1, 1)
    function = (("function", SLEEP_FOR),)
    counted(
        web_broker,
        {
            # 4 batches and the 10 items of the one split, each a task.
            ("ventilator_tasks_submitted_total", function): 14,
            ("ventilator_tasks_completed_total", function): 12,
            ("ventilator_tasks_split_total", function): 1,
            ("ventilator_tasks_failed_total", (*function, ("outcome", "timeout"))): 1,
            ("ventilator_items_submitted_total", function): 50,
            ("ventilator_items_completed_total", function): 39,
            ("ventilator_items_split_total", function): 10,
            ("ventilator_items_failed_total", (*function, ("outcome", "timeout"))): 1,
        },
    )
    items = api(web_broker, "status")["items"]
    assert (items["failed"], items["split"], items["completed"]) == (1, 10, 39)
    assert client.retry()["retried"] == [record["ticket"]]


def test_a_map_batch_whose_result_was_over_the_limit_is_split_not_failed(
    launch: Launcher,
) -> None:
    broker = launch.broker("--max-payload-bytes", "1000")
    launch.worker(broker, pool="thread")
    client = launch.client(broker)
    wait_for_workers(client, 1)

    # Each result fits alone; the three together do not.
    results = list(client.map(tasks.make_bytes, [400, 400, 400], chunksize=3))
    totals = client.status()["totals"]

    assert results == [b"r" * 400] * 3
    assert (totals["failed"], totals["split"], totals["completed"]) == (0, 1, 3)
    assert client.failed() == []
    assert client.retry()["retried"] == []


def test_a_timed_out_batch_of_a_client_that_does_not_say_it_splits_fails_as_before(
    launch: Launcher,
    web_broker: BrokerProcess,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # An older client's map batch: BATCH without SPLITTABLE.
    launch.worker(web_broker)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)
    packer = BatchPacker()
    payload = packer.batch([packer.item(seconds) for seconds in (0.0, 3.0, 0.0)])
    batch = p.TaskSpec(7, SLEEP_FOR, payload, p.Flags.BATCH, timeout_s=1)
    older = context.socket(zmq.DEALER)
    older.setsockopt(zmq.LINGER, 0)
    older.connect(web_broker.frontend)

    _wire.send(older, p.Hello("older-client"))
    _wire.send(older, p.Submit([batch]))
    entries = raw_results(older, count=1)
    [record] = client.failed()
    totals = client.status()["totals"]

    assert entries[7].status is p.Status.TIMEOUT
    assert (record["session"], record["task_id"]) == ("older-client", 7)
    assert (totals["failed"], totals["split"]) == (1, 0)
    function = (("function", SLEEP_FOR),)
    counted(
        web_broker,
        {
            ("ventilator_items_failed_total", (*function, ("outcome", "timeout"))): 3,
            ("ventilator_items_split_total", function): 0,
        },
    )

"""The tables `ventilator status` prints, from reports made up here."""

from __future__ import annotations

from typing import Any

from ventilator._status_view import _long_running, clients_table, queues_table


def client(name: str, connected: bool, pending: int) -> dict[str, Any]:
    return {
        "name": name,
        "connected": connected,
        "tasks": 0,
        "pending": pending,
        "unacknowledged": 0,
    }


def test_results_kept_for_a_session_not_connected_come_with_how_to_drop_them() -> None:
    # Tester 20: every client killed mid-map left its results at the broker
    # for a day, counted in its limits; the table showed them with no hint.
    table = clients_table([client("gone", False, 465), client("here", True, 3)], None)

    assert "purge --session NAME" in str(table.caption)


def test_no_hint_while_every_session_with_results_is_connected() -> None:
    table = clients_table([client("here", True, 3), client("idle", False, 0)], None)

    assert "purge" not in str(table.caption)


def test_a_queue_no_worker_serves_is_marked_and_named_in_the_caption() -> None:
    # A tester's typo (t22tasks:wrok) showed as "20 queued, 0 on workers",
    # like any slow queue, and its tasks waited for ever.
    report = {
        "queued": {"jobs:wrok": 20, "jobs:work": 3},
        "running": {"jobs:work": 2},
        "unserved": ["jobs:wrok"],
        "queue_counts": {"all": 2, "listed": 2, "queued": 23, "running": 2},
    }

    table = queues_table(report)

    names = list(table.columns[0].cells)
    assert "no worker serves it" in str(names[0]) and "jobs:wrok" in str(names[0])
    assert "no worker serves it" not in str(names[1])
    assert "no connected worker serves jobs:wrok" in str(table.caption)


def worker(running_s: float | None, task: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": "vm.12.ab", "oldest_running_s": running_s, "oldest_task": task}


def test_a_task_running_long_is_named_with_the_command_that_cancels_it() -> None:
    # Tester 36 found no way to learn a hung task's id, which `cancel` needs.
    hung = {"session": "map-vm-1", "task_id": 7, "function": "jobs:crawl"}

    lines = _long_running(
        [worker(75.0, hung), worker(3.0, {**hung, "task_id": 8})],
        "tcp://10.0.0.5:5555",
    )

    [line] = lines
    assert "jobs:crawl" in line and "1m15s" in line
    # The broker asked, not the default one.
    command = "ventilator cancel map-vm-1 7 --connect tcp://10.0.0.5:5555"
    assert f"`{command}` ends it" in line


def test_no_task_is_named_of_another_client_or_an_older_broker() -> None:
    assert (
        _long_running([worker(75.0, None), {"id": "w", "oldest_running_s": 80.0}]) == []
    )

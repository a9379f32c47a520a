"""The tables `ventilator status` prints, from reports made up here."""

from __future__ import annotations

from typing import Any

from ventilator._status_view import clients_table, queues_table


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

"""The tables `ventilator status` prints, from reports made up here."""

from __future__ import annotations

from typing import Any

from ventilator.cli import _clients_table


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
    table = _clients_table([client("gone", False, 465), client("here", True, 3)], None)

    assert "purge --session NAME" in str(table.caption)


def test_no_hint_while_every_session_with_results_is_connected() -> None:
    table = _clients_table([client("here", True, 3), client("idle", False, 0)], None)

    assert "purge" not in str(table.caption)

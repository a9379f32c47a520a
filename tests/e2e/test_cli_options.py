"""Numeric options refuse nonsense before anything starts, naming the option."""

from __future__ import annotations

import pytest

from ventilator import Client, Sink, local
from ventilator.errors import UsageError

from .conftest import Processes, free_port, run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["broker", "--heartbeat-interval-s", "0"],
        ["broker", "--heartbeat-interval-s", "-1"],
        ["broker", "--heartbeat-interval-s", "nan"],
        ["broker", "--max-payload-bytes", "-5"],
        ["broker", "--client-window", "0"],
        ["broker", "--max-attempts", "0"],
        ["broker", "--max-queued-tasks", "0"],
        ["broker", "--max-queued-bytes", "0"],
        ["broker", "--client-max-bytes", "0"],
        ["broker", "--mdp-heartbeat", "inf"],
        ["worker", "json", "--heartbeat-interval-s", "0"],
        ["worker", "json", "--heartbeat-interval-s", "-2"],
        ["worker", "json", "--concurrency", "0"],
        ["status", "--timeout-s", "0"],
        ["sink", "s", "--idle-timeout-s", "-1"],
    ],
)
def test_a_nonsense_number_is_a_usage_error_naming_its_option(
    processes: Processes, args: list[str]
) -> None:
    option = next(arg for arg in args if arg.startswith("--"))
    unused = f"tcp://127.0.0.1:{free_port()}"
    # Every command would start (and some would wait) if the value got through.
    where = ["--frontend", unused, "--backend", f"tcp://127.0.0.1:{free_port()}"]
    extra = [*where, "--durability", "memory"] if args[0] == "broker" else []

    completed = run_cli(processes, *args, *extra)

    assert completed.returncode == 2, completed.stderr
    assert option in completed.stderr


def test_a_nonsense_number_from_the_environment_names_the_variable(
    processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VENTILATOR_BROKER_CLIENT_WINDOW", "0")

    completed = run_cli(processes, "broker", "--durability", "memory")

    assert completed.returncode == 2, completed.stderr
    assert "VENTILATOR_BROKER_CLIENT_WINDOW" in completed.stderr


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"heartbeat_interval_s": 0.0}, "heartbeat_interval_s"),
        ({"liveness": 0}, "liveness"),
        ({"window": 0}, "window"),
    ],
)
def test_client_refuses_nonsense_naming_the_argument(
    settings: dict[str, float], named: str
) -> None:
    with pytest.raises(UsageError, match=named):
        Client(f"tcp://127.0.0.1:{free_port()}", **settings)  # type: ignore[arg-type]


def test_sink_refuses_a_heartbeat_of_zero() -> None:
    with pytest.raises(UsageError, match="heartbeat_interval_s"):
        Sink("s", f"tcp://127.0.0.1:{free_port()}", heartbeat_interval_s=0.0)


def test_local_refuses_fewer_than_one_worker() -> None:
    with pytest.raises(UsageError, match="workers"):
        local(-1, ["json"])

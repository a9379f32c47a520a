"""Numeric options refuse nonsense before anything starts, naming the option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from ventilator import Client, Sink, local
from ventilator.cli import cli
from ventilator.errors import UsageError

from .conftest import Processes, free_port, json_lines, run_cli


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


def test_a_broker_that_cannot_open_its_journal_says_so_without_a_usage_banner(
    processes: Processes, tmp_path: Path
) -> None:
    # The command line was right: "Usage: ventilator broker [OPTIONS]" and
    # "Try --help" above the journal's error sent an operator to the options.
    journal = tmp_path / "journal.db"
    journal.write_text("not a database\n")
    where = ["--frontend", f"tcp://127.0.0.1:{free_port()}"]
    where += ["--backend", f"tcp://127.0.0.1:{free_port()}"]

    completed = run_cli(processes, "broker", "--journal", str(journal), *where)

    assert completed.returncode == 2, completed.stderr
    assert "Error: cannot open journal" in completed.stderr
    assert "Usage:" not in completed.stderr, completed.stderr


@pytest.mark.parametrize(
    ("args", "bound"),
    [
        (["map", "--workers", "5000", "json:dumps"], "4096"),
        (["exec", "--workers", "5000", "--", "true"], "4096"),
        (["worker", "json", "--concurrency", "5000"], "4096"),
        (["map", "--timeout-s", "1e12", "json:dumps"], "31536000"),
        (["exec", "--timeout-s", "1e12", "--", "true"], "31536000"),
        (["broker", "--max-payload-bytes", str(10**20)], str(2**62)),
        (["broker", "--client-window", str(10**20)], str(2**62)),
    ],
)
def test_a_number_past_its_bound_is_a_usage_error_naming_its_option_and_bound(
    processes: Processes, args: list[str], bound: str
) -> None:
    option = next(arg for arg in args if arg.startswith("--"))
    where = ["--frontend", f"tcp://127.0.0.1:{free_port()}"]
    where += ["--backend", f"tcp://127.0.0.1:{free_port()}"]
    extra = [*where, "--durability", "memory"] if args[0] == "broker" else []

    completed = run_cli(processes, *args, *extra)

    # Before, `map --workers 5000` started its cluster, whose worker refused
    # "concurrency", an option the user never typed: exit 1.
    assert completed.returncode == 2, completed.stderr
    assert option in completed.stderr
    assert bound in completed.stderr
    assert "embedded process" not in completed.stderr


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


@pytest.mark.parametrize(
    "variable", ["VENTILATOR_LOG_LEVEL", "VENTILATOR_MAP_LOG_LEVEL"]
)
def test_a_bad_log_level_from_the_environment_names_the_variable(
    processes: Processes, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # Named as every other option's variable: after the option, not its
    # parameter ("level"), which the user never sees.
    monkeypatch.setenv(variable, "LOUD")

    completed = run_cli(processes, "map", "json:dumps", "--workers", "1")

    assert completed.returncode == 2, completed.stderr
    assert variable in completed.stderr


def test_the_logging_of_a_command_comes_from_its_variables(
    processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VENTILATOR_MAP_LOG_LEVEL", "INFO")
    monkeypatch.setenv("VENTILATOR_MAP_LOG_FORMAT", "json")

    completed = run_cli(
        processes, "map", "json:dumps", "--workers", "1", input_text="1\n"
    )

    assert completed.returncode == 0, completed.stderr
    # The embedded broker logs its start at INFO, as one JSON object.
    records = json_lines(
        "\n".join(line for line in completed.stderr.splitlines() if line[:1] == "{")
    )
    assert any(record["level"] == "INFO" for record in records), completed.stderr


def test_keys_generate_takes_the_logging_options_after_it(
    processes: Processes, tmp_path: Path
) -> None:
    completed = run_cli(
        processes,
        "keys",
        "generate",
        "k",
        "--dir",
        str(tmp_path),
        "--log-level",
        "INFO",
        "--log-format",
        "json",
    )

    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "k.key").exists()


def _commands(group: click.Group) -> Iterator[click.Command]:
    for command in group.commands.values():
        yield command
        if isinstance(command, click.Group):
            yield from _commands(command)


def test_every_command_takes_the_logging_options() -> None:
    for command in _commands(cli):
        options = {opt for param in command.params for opt in param.opts}
        assert {"--log-level", "--log-format"} <= options, command.name


def test_every_option_has_help_text() -> None:
    for command in [cli, *_commands(cli)]:
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.opts[0]}"


@pytest.mark.parametrize("command", ["map", "exec"])
def test_connect_timeout_help_says_it_is_ignored_without_connect(command: str) -> None:
    # Not an error: a variable may set it for every run, embedded ones too.
    [option] = [
        p for p in cli.commands[command].params if p.name == "connect_timeout_s"
    ]
    assert "ignored without --connect" in str(option.help)

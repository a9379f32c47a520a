"""A sink name that no sink could register is refused where it is given: on
submit (client, CLI and broker alike) and when a sink starts."""

from __future__ import annotations

import pytest

import ventilator

from .conftest import TASKS, BrokerProcess, Processes, free_port, run_cli

UNRECEIVABLE = ["a\nb", "x\x1by", "s" * 300]


@pytest.mark.parametrize("name", UNRECEIVABLE)
def test_submit_to_a_sink_no_sink_could_register_is_refused_at_once(
    client: ventilator.Client, name: str
) -> None:
    with pytest.raises(ventilator.UsageError, match="cannot submit this task: sink"):
        client.submit(f"{TASKS}:square", 3, sink=name)

    assert client.status()["results_waiting"] == 0


def test_map_with_such_a_sink_is_a_usage_error_before_any_line_runs(
    processes: Processes, broker: BrokerProcess
) -> None:
    mapped = run_cli(
        processes,
        "map",
        f"{TASKS}:square",
        "--sink",
        "x\x1by",
        "--connect",
        broker.frontend,
        input_text="3\n",
    )

    assert mapped.returncode == 2
    assert "control character" in mapped.stderr


@pytest.mark.parametrize("name", UNRECEIVABLE)
def test_sink_with_a_name_the_broker_would_refuse_is_refused_at_once(
    name: str,
) -> None:
    with pytest.raises(ventilator.UsageError, match="cannot receive this sink"):
        ventilator.Sink(name, f"tcp://127.0.0.1:{free_port()}")


def test_sink_command_with_an_over_long_name_is_a_usage_error(
    processes: Processes,
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody there: it must not wait

    received = run_cli(processes, "sink", "s" * 300, "--connect", address)

    assert received.returncode == 2
    assert "1 to 256 characters" in received.stderr

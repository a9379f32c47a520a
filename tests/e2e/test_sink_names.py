"""A sink name that no sink could register is refused where it is given: on
submit (client, CLI and broker alike) and when a sink starts. Sessions and sinks
are separate namespaces: no client session takes the name a sink's results wait
under."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

import ventilator
from ventilator import _wire
from ventilator import protocol as p

from . import tasks
from .conftest import (
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    WorkerProcess,
    free_port,
    run_cli,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0

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


@pytest.mark.parametrize("session", ["sink:s5", "mdp:titanic", "ventilator:retry"])
def test_a_client_session_named_like_a_sink_is_refused_naming_the_rule(
    session: str,
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody there: it must not wait

    with pytest.raises(ventilator.UsageError, match="'sink:' or 'mdp:'"):
        ventilator.Client(address, session=session)


def test_a_foreign_client_cannot_take_a_sink_s_results_by_its_session_name(
    launch: Launcher,
    broker: BrokerProcess,
    two_workers: list[WorkerProcess],
    context: zmq.Context[Any],
) -> None:
    sender = launch.client(broker)
    for x in range(3):
        sender.submit(tasks.square, x, sink="s5").result(RESULT_TIMEOUT_S)
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(broker.frontend)

    # What an older client, or one not ours, says: our checks are not in it.
    _wire.send(raw, p.Hello("sink:s5"))
    answers = raw_answers(raw, until=lambda c: isinstance(c, p.Error | p.Welcome))
    with ventilator.Sink("s5", broker.frontend) as sink:
        received = sorted(r.value for r in sink.results(idle_timeout_s=2.0))

    [answer] = [c for c in answers if isinstance(c, p.Error | p.Welcome)]
    assert isinstance(answer, p.Error) and answer.code == p.RESERVED_NAME
    assert not [c for c in answers if isinstance(c, p.Results)]
    assert received == [0, 1, 4]


def raw_answers(
    socket: zmq.Socket[bytes], until: Any, timeout_s: float = RESULT_TIMEOUT_S
) -> list[p.Command]:
    """What `socket` receives until a command for which `until` holds, and
    for a short while after (a result that follows a refusal counts too)."""
    received: list[p.Command] = []

    def answered() -> bool:
        if socket.poll(100):
            received.extend(_wire.receive(socket, p.TO_CLIENT))
        return any(until(command) for command in received)

    wait_until(answered, timeout_s, "an answer on a raw socket")
    while socket.poll(300):
        received.extend(_wire.receive(socket, p.TO_CLIENT))
    return received

"""Against a real broker: a session's unread results are bounded by its own
client_max_bytes, so a client that never reads cannot take the broker from
everyone; and one SUBMIT past what a session could ever be given room for is
refused whole, without stalling the broker for its other clients."""

from __future__ import annotations

import time

import msgpack
import zmq

from ventilator import protocol as p

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    run_cli,
    status_when,
    wait_for_workers,
)

RESULT_TIMEOUT_S = 30.0
CLIENT_MAX_BYTES = 1_000_000
RESULT_BYTES = 100_000
TASK_COUNT = 40  # 4 MB of results if all ran: four times the room
MAKE_BYTES = f"{TASKS}:make_bytes"


def raw_submit(
    socket: zmq.Socket[bytes], session: str, count: int, function: str, arg: object
) -> None:
    """Say HELLO as `session` and submit `count` tasks in one SUBMIT; read
    nothing back."""
    socket.send_multipart(p.encode(p.Hello(session, None, 1)))
    args = msgpack.packb([[arg], {}])
    specs = [p.TaskSpec(i, function, args) for i in range(1, count + 1)]
    socket.send_multipart(p.encode(p.Submit(specs)))


def client_entry(status: dict[str, object], session: str) -> dict[str, object]:
    clients = status["clients"]
    assert isinstance(clients, list)
    [entry] = [c for c in clients if c["name"] == session]
    return dict(entry)


def held_back_broker(launch: Launcher) -> BrokerProcess:
    return launch.broker(
        "--client-max-bytes",
        str(CLIENT_MAX_BYTES),
        "--max-queued-bytes",
        str(2 * CLIENT_MAX_BYTES),
        heartbeat_interval_s=FAST_HEARTBEAT_S,
    )


def test_a_client_that_never_reads_is_held_back_and_others_go_on(
    launch: Launcher,
    processes: Processes,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    broker = held_back_broker(launch)
    launch.worker(broker)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)
    careless = context.socket(zmq.DEALER)
    careless.connect(broker.frontend)

    raw_submit(careless, "careless", TASK_COUNT, MAKE_BYTES, RESULT_BYTES)

    status = status_when(
        observer,
        lambda s: any(c["name"] == "careless" and c["held_back"] for c in s["clients"]),
        RESULT_TIMEOUT_S,
        "the careless session held back",
    )
    # Another client is neither refused for max_queued_bytes nor kept waiting.
    assert observer.submit(tasks.square, 7).result(RESULT_TIMEOUT_S) == 49
    status = observer.status(RESULT_TIMEOUT_S)
    careless_now = client_entry(status, "careless")
    assert careless_now["held_back"]
    # The room, and what the worker's prefetched tasks returned past it.
    assert int(careless_now["result_bytes"]) <= 2 * CLIENT_MAX_BYTES
    assert status["queued"].get(MAKE_BYTES, 0) > 0, "the rest stay queued"
    # The operator's table says which client is held back, and why.
    shown = run_cli(processes, "status", "--connect", broker.frontend)
    assert "held: its unread results fill --client-max-bytes" in " ".join(
        shown.stdout.split()
    ), shown.stdout


def test_a_later_client_of_the_session_collects_everything(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    broker = held_back_broker(launch)
    launch.worker(broker)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)
    dead = context.socket(zmq.DEALER)
    dead.connect(broker.frontend)
    raw_submit(dead, "resumed", TASK_COUNT, MAKE_BYTES, RESULT_BYTES)
    status_when(
        observer,
        lambda s: any(c["name"] == "resumed" and c["held_back"] for c in s["clients"]),
        RESULT_TIMEOUT_S,
        "the session held back",
    )
    dead.close(linger=0)  # falls silent: the next client takes its session

    later = launch.client(broker, session="resumed")
    collected = list(later.collect(TASK_COUNT, timeout_s=RESULT_TIMEOUT_S))

    assert len(collected) == TASK_COUNT
    assert all(len(f.result(0)) == RESULT_BYTES for f in collected)


def test_a_submit_past_the_window_is_refused_whole_and_others_see_no_stall(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    window = 1000
    broker = launch.broker("--client-window", str(window))
    launch.worker(broker)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)
    hostile = context.socket(zmq.DEALER)
    hostile.connect(broker.frontend)

    started = time.monotonic()
    for _ in range(8):
        raw_submit(hostile, "hostile", 20 * window, f"{TASKS}:square", 2)
    assert observer.submit(tasks.square, 3).result(RESULT_TIMEOUT_S) == 9
    round_trip_s = time.monotonic() - started

    refusal = first_error(hostile)
    assert refusal.code == "size"
    assert f"over the {window} one message may carry" in refusal.message
    status = observer.status(RESULT_TIMEOUT_S)
    assert client_entry(status, "hostile")["tasks"] == 0
    # Eight SUBMITs of 20,000 tasks took the loop for seconds each before.
    assert round_trip_s < 5.0, round_trip_s


def first_error(socket: zmq.Socket[bytes]) -> p.Error:
    """The first ERROR on `socket` (WELCOMEs skipped), within a deadline."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and socket.poll(left_ms), "no ERROR came"
        command = p.decode(socket.recv_multipart(), p.TO_CLIENT)
        if isinstance(command, p.Error):
            return command

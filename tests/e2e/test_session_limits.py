"""Sessions against a real broker are forgotten when they hold nothing and are
bounded in number; status stays readable however many clients there are."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

import ventilator
from ventilator import protocol as p
from ventilator._notice_log import JOINS_LOGGED_PER_S
from ventilator.scheduler import SESSIONS_PER_CONNECTION
from ventilator.status import STATUS_CLIENTS

from . import tasks
from .conftest import (
    FAST_HEARTBEAT_S,
    MORE_TASKS,
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    named_once_counted,
    run_cli,
    status_when,
    wait_for_workers,
    wait_until,
)
from .test_sessions import read_line

RESULT_TIMEOUT_S = 20.0
GRACE_S = 0.5
UNSERVED = f"{MORE_TASKS}:cube"  # no worker in these tests serves it

# A client that runs one task and sees the broker has its acknowledgement (or
# only submits one nobody serves), says so, and waits to be killed: kill -9
# sends no BYE.
KILLED_CLIENT_SCRIPT = """
import sys, time, ventilator
address, session, function = sys.argv[1:4]
client = ventilator.Client(address, session=session, heartbeat_interval_s=0.1)
future = client.submit(function, 3)
if function.endswith(":square"):
    future.result(timeout=20)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    status = client.status(timeout_s=20)  # answered after the SUBMIT
    [mine] = [c for c in status["clients"] if c["name"] == session]
    if mine["pending"] + mine["unacknowledged"] == 0:
        break
    time.sleep(0.02)  # within the broker's quota of questions a second
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def fast_broker(launch: Launcher) -> BrokerProcess:
    """Beats every 0.2 s; forgets sessions 0.5 s after they were last heard."""
    return launch.broker(
        "--session-grace-s", str(GRACE_S), heartbeat_interval_s=FAST_HEARTBEAT_S
    )


def killed_client(
    processes: Processes, broker: BrokerProcess, session: str, function: str
) -> subprocess.Popen[bytes]:
    """A client process that ran (or queued) one task, killed with SIGKILL."""
    child = processes.start(
        f"client-{session}",
        [
            sys.executable,
            "-c",
            KILLED_CLIENT_SCRIPT,
            broker.frontend,
            session,
            function,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert read_line(child, RESULT_TIMEOUT_S) == "ready"
    child.kill()
    child.wait(RESULT_TIMEOUT_S)
    return child


def names(status: dict[str, object]) -> set[str]:
    clients = status["clients"]
    assert isinstance(clients, list)
    return {client["name"] for client in clients}


def raw_hello(
    socket: zmq.Socket[bytes], session: str, task_id: int | None = None
) -> None:
    """Say HELLO as `session` on `socket`, and submit an unserved task."""
    socket.send_multipart(p.encode(p.Hello(session, None, 1)))
    if task_id is not None:
        args = msgpack.packb([[task_id], {}])
        socket.send_multipart(p.encode(p.Submit([p.TaskSpec(task_id, UNSERVED, args)])))


def replies(socket: zmq.Socket[bytes], count: int, timeout_s: float) -> list[p.Command]:
    """The next `count` WELCOMEs and refusals on `socket` (notices of unserved
    functions left out), within a deadline."""
    answers: list[p.Command] = []
    deadline = time.monotonic() + timeout_s
    while len(answers) < count:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and socket.poll(left_ms), f"{len(answers)} of {count}"
        command = p.decode(socket.recv_multipart(), p.TO_CLIENT)
        refusal = isinstance(command, p.Error) and command.code != p.UNSERVED
        if refusal or isinstance(command, p.Welcome):
            answers.append(command)
    return answers


def test_clients_killed_without_bye_are_forgotten_unless_they_hold_a_task(
    launch: Launcher, processes: Processes, fast_broker: BrokerProcess
) -> None:
    launch.worker(fast_broker)
    observer = launch.client(fast_broker)
    wait_for_workers(observer, 1)

    for i in range(3):
        killed_client(processes, fast_broker, f"done-{i}", f"{TASKS}:square")
    killed_client(processes, fast_broker, "holding", UNSERVED)

    forgotten = status_when(
        observer,
        lambda status: not {"done-0", "done-1", "done-2"} & names(status),
        RESULT_TIMEOUT_S,
        "the killed clients that owed nothing forgotten",
    )
    # Forgotten in the same sweep, were it not holding its queued task.
    assert "holding" in names(forgotten)
    assert forgotten["queued"] == {UNSERVED: 1}


def test_a_connection_renaming_its_session_is_refused_past_a_few(
    fast_broker: BrokerProcess,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    socket = context.socket(zmq.DEALER)
    socket.connect(fast_broker.frontend)

    for i in range(SESSIONS_PER_CONNECTION + 1):
        raw_hello(socket, f"renamed-{i}", task_id=i)

    answers = replies(socket, SESSIONS_PER_CONNECTION + 1, RESULT_TIMEOUT_S)
    assert all(isinstance(a, p.Welcome) for a in answers[:-1])
    refusal = answers[-1]
    assert isinstance(refusal, p.Error)
    assert refusal.code == p.TOO_MANY_SESSIONS
    assert f"({SESSIONS_PER_CONNECTION})" in refusal.message


def test_a_client_past_max_sessions_is_refused_and_gets_in_once_there_is_room(
    launch: Launcher,
) -> None:
    broker = launch.broker("--max-sessions", "2", heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker)
    observer = launch.client(broker)
    wait_for_workers(observer, 1)
    second = launch.client(broker)
    second.status(RESULT_TIMEOUT_S)  # answered: it holds the second place
    third = launch.client(broker)

    refused = third.submit(tasks.square, 3)

    with pytest.raises(ventilator.SessionRefused, match="max_sessions=2"):
        refused.result(RESULT_TIMEOUT_S)
    second.close()  # says BYE owing nothing: forgotten at once
    assert third.submit(tasks.square, 4).result(RESULT_TIMEOUT_S) == 16


def test_status_lists_a_bounded_number_of_clients_and_counts_them_all(
    broker: BrokerProcess,
    launch: Launcher,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # The default broker remembers sessions a minute after they fall silent
    # (these raw ones never beat): all are still there when status is asked.
    count = STATUS_CLIENTS + 50
    sockets = [context.socket(zmq.DEALER) for _ in range(count)]
    for i, socket in enumerate(sockets):
        socket.connect(broker.frontend)
        raw_hello(socket, f"many-{i}")
    for socket in sockets:
        assert isinstance(replies(socket, 1, RESULT_TIMEOUT_S)[0], p.Welcome)
    observer = launch.client(broker)

    status = observer.status(RESULT_TIMEOUT_S)

    assert len(status["clients"]) == STATUS_CLIENTS
    assert status["client_counts"]["all"] == count + 1
    assert status["client_counts"]["listed"] == STATUS_CLIENTS
    # Listed first: the one asking, connected and heard last.
    assert status["clients"][0]["name"] == observer.session


def test_a_client_renaming_itself_in_a_loop_does_not_flood_the_log(
    launch: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    broker = launch.broker("--log-level", "INFO", "--log-format", "json")
    count = 200
    socket = context.socket(zmq.DEALER)
    socket.connect(broker.frontend)
    started = time.monotonic()
    for i in range(count):  # each holds nothing: left and forgotten at once
        raw_hello(socket, f"renamed-{i}")
        # An ACK (of nothing) is work: the join of a session that only said
        # HELLO is not logged at all.
        socket.send_multipart(p.encode(p.Ack([])))
    replies(socket, count, RESULT_TIMEOUT_S)
    # However slowly a busy machine let the broker take them: a few a second.
    at_most = JOINS_LOGGED_PER_S * (time.monotonic() - started + 2)

    # The joins held back are counted on a line of their own, a moment later.
    named = named_once_counted(
        broker.process, "renamed-", "more clients joined", RESULT_TIMEOUT_S
    )
    assert 1 <= len(named) <= min(at_most, count // 2), named


def serve_one_oversized_status(router: zmq.Socket[bytes]) -> None:
    """Play a broker: welcome a client, answer its STATUS past what it reads."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        if not router.poll(100):
            continue
        peer, *frames = router.recv_multipart()
        command = p.decode(frames, p.FROM_CLIENT)
        if isinstance(command, p.Hello):
            welcome = p.Welcome(100, 1 << 20, 1.0, durable=False)
            router.send_multipart([peer, *p.encode(welcome)])
        elif isinstance(command, p.StatusRequest):
            huge = p.StatusReply({"clients": "x" * (p.MAX_BODY_BYTES + 1)})
            router.send_multipart([peer, *p.encode(huge)])
            return


def test_a_status_answer_too_large_to_read_fails_at_once_saying_so(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    server = threading.Thread(target=serve_one_oversized_status, args=(router,))
    server.start()
    try:
        with ventilator.Client(f"tcp://127.0.0.1:{port}") as client:
            started = time.monotonic()
            with pytest.raises(ventilator.ProtocolError) as caught:
                client.status(timeout_s=RESULT_TIMEOUT_S)
            waited_s = time.monotonic() - started
    finally:
        server.join(RESULT_TIMEOUT_S)
    assert caught.value.code == "size"
    assert "could not be read" in str(caught.value)
    assert "timeout_s will not help" in str(caught.value)
    assert waited_s < RESULT_TIMEOUT_S / 2  # failed on arrival, not timed out


def test_purge_session_of_a_forgotten_session_says_nothing_matched(
    processes: Processes, launch: Launcher, fast_broker: BrokerProcess
) -> None:
    observer = launch.client(fast_broker)
    with launch.client(fast_broker, session="left") as left:
        left.status(RESULT_TIMEOUT_S)
    wait_until(
        lambda: "left" not in names(observer.status(RESULT_TIMEOUT_S)),
        RESULT_TIMEOUT_S,
        "the session that left forgotten",
    )

    purged = run_cli(
        processes,
        "purge",
        "--session",
        "left",
        "--yes",
        "--connect",
        fast_broker.frontend,
    )

    assert purged.returncode == 1
    assert purged.stdout == ""
    assert "nothing matched" in purged.stderr

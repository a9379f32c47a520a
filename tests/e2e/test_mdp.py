"""Majordomo (7/MDP, 8/MMI, 9/TSP) peers against a real broker process.

The MDP client and worker are the tests' own (`tests/mdp_peers.py`), written
from the specification. Workers that a test kills run as processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.e2e.conftest import (
    START_TIMEOUT_S,
    Launcher,
    Processes,
    free_port,
    log_of,
    read_json_line,
    ventilator_argv,
    wait_until,
)
from tests.mdp_peers import (
    CLIENT,
    DISCONNECT,
    HEARTBEAT,
    READY,
    REPLY,
    WORKER,
    MdpClient,
)

MDP_TASKS = "tests.e2e.mdp_tasks"
# Fast MDP heartbeats, so that deaths are noticed in a second, not 7.5 s.
BEAT_S = 0.2
REPLY_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class MdpBroker:
    process: subprocess.Popen[bytes]
    frontend: str
    backend: str
    mdp: str


def start_broker(
    processes: Processes,
    journal: Path | None = None,
    ports: tuple[int, int, int] | None = None,
    options: tuple[str, ...] = (),
) -> MdpBroker:
    """A broker with an MDP endpoint and fast MDP heartbeats."""
    frontend, backend, mdp = (
        [f"tcp://127.0.0.1:{port}" for port in ports]
        if ports
        else ["tcp://127.0.0.1:*"] * 3
    )
    argv = ventilator_argv(
        "broker",
        *("--frontend", frontend, "--backend", backend, "--mdp", mdp),
        *("--mdp-heartbeat", str(BEAT_S), "--mdp-liveness", "3"),
        *(("--journal", str(journal)) if journal else ("--durability", "memory")),
        "--announce",
        *options,
    )
    process = processes.start("broker", argv, stdout=subprocess.PIPE)
    endpoints = read_json_line(process, START_TIMEOUT_S)
    return MdpBroker(
        process, endpoints["frontend"], endpoints["backend"], endpoints["mdp"]
    )


def start_worker(
    processes: Processes,
    endpoint: str,
    service: str,
    delay_s: float = 0.0,
    tag: str | None = None,
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "tests.mdp_peers",
        endpoint,
        service,
        *("--delay-s", str(delay_s), "--heartbeat-s", str(BEAT_S)),
        *(("--tag", tag) if tag is not None else ()),
    ]
    return processes.start("mdp-worker", argv, stdout=subprocess.PIPE)


def client(
    context: zmq.Context[Any], endpoint: str, socket_type: int = zmq.DEALER
) -> MdpClient:
    return MdpClient(context, endpoint, socket_type)


def mmi(context: zmq.Context[Any], endpoint: str, service: bytes) -> bytes:
    asker = client(context, endpoint)
    try:
        return asker.request(b"mmi.service", service)[0]
    finally:
        asker.close()


def wait_for_service(context: zmq.Context[Any], endpoint: str, service: bytes) -> None:
    wait_until(
        lambda: mmi(context, endpoint, service) == b"200",
        START_TIMEOUT_S,
        f"a worker of {service!r}",
    )


@pytest.fixture
def broker(processes: Processes) -> MdpBroker:
    return start_broker(processes)


# --- round trips ------------------------------------------------------------------

BODIES = [
    [b"hello"],
    [b"a", b"", b"\x00\xff binary", b"x" * 100_000],
    [b""],
]


@pytest.mark.parametrize("socket_type", [zmq.DEALER, zmq.REQ], ids=["dealer", "req"])
def test_echo_round_trips_keep_multi_frame_bodies(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any], socket_type: int
) -> None:
    start_worker(processes, broker.mdp, "echo")
    wait_for_service(context, broker.mdp, b"echo")
    peer = client(context, broker.mdp, socket_type)

    for body in BODIES:
        assert peer.request(b"echo", *body, timeout_s=REPLY_TIMEOUT_S) == body


def test_mdp_peers_are_served_on_the_frontend_and_backend_too(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    start_worker(processes, broker.backend, "echo")
    wait_for_service(context, broker.frontend, b"echo")
    peer = client(context, broker.frontend)

    assert peer.request(b"echo", b"x", b"y", timeout_s=REPLY_TIMEOUT_S) == [
        b"x",
        b"y",
    ]


def test_three_workers_serve_five_clients_at_once(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    for number in range(3):
        start_worker(processes, broker.mdp, "echo", tag=f"w{number}")
    wait_until(
        lambda: len(_taggers(context, broker.mdp)) == 3,
        START_TIMEOUT_S,
        "three workers answering",
    )
    clients = [client(context, broker.mdp) for _ in range(5)]

    for number, peer in enumerate(clients):
        for request in range(20):
            peer.send(b"echo", f"c{number}".encode(), str(request).encode())
    answered_by: set[bytes] = set()
    for number, peer in enumerate(clients):
        replies = [peer.recv(REPLY_TIMEOUT_S) for _ in range(20)]
        bodies = sorted((body[0], int(body[1])) for _, body in replies)
        assert bodies == [(f"c{number}".encode(), r) for r in range(20)]
        answered_by |= {body[2] for _, body in replies}

    assert answered_by == {b"w0", b"w1", b"w2"}


def _taggers(context: zmq.Context[Any], endpoint: str) -> set[bytes]:
    """The tags of the workers that answered a burst of 12 requests."""
    peer = client(context, endpoint)
    try:
        for _ in range(12):
            peer.send(b"echo", b"who")
        return {peer.recv(REPLY_TIMEOUT_S)[1][-1] for _ in range(12)}
    finally:
        peer.close()


def test_mdp_and_ventilator_workers_serve_one_service(
    launch: Launcher, processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    start_worker(processes, broker.mdp, "tagged", tag="mdp")
    processes.start(
        "worker",
        ventilator_argv(
            "worker", MDP_TASKS, "--connect", broker.backend, "--pool", "thread"
        ),
    )
    peer = client(context, broker.mdp)
    seen: set[bytes] = set()

    def both_answered() -> bool:
        reply = peer.request(b"tagged", b"hi", timeout_s=REPLY_TIMEOUT_S)
        assert reply[0] == b"hi"
        seen.add(reply[-1])
        return seen == {b"mdp", b"ventilator"}

    wait_until(both_answered, START_TIMEOUT_S, "replies from both kinds of worker")
    assert peer.request(b"single", b"a", b"b", timeout_s=REPLY_TIMEOUT_S) == [b"a+b"]


def test_a_request_whose_handler_raised_gets_a_400_reply(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    processes.start(
        "worker",
        ventilator_argv(
            "worker", MDP_TASKS, "--connect", broker.backend, "--pool", "thread"
        ),
    )
    peer = client(context, broker.mdp)

    [status] = peer.request(b"refuse", b"a", b"b", timeout_s=REPLY_TIMEOUT_S)

    assert status == b"400 raised: ValueError: refused 2 frames"
    assert peer.request(b"single", b"a", b"b", timeout_s=REPLY_TIMEOUT_S) == [b"a+b"]
    # The client's news, as a task's that raised is: the broker logged a
    # WARNING per request (tester 25), which a failing service made a flood.
    assert "MDP request failed" not in log_of(broker.process)


# --- recovery ---------------------------------------------------------------------


def test_requests_of_a_killed_busy_worker_are_all_answered(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    slow = start_worker(processes, broker.mdp, "echo", delay_s=30.0)
    wait_for_service(context, broker.mdp, b"echo")
    peer = client(context, broker.mdp)  # asynchronous, never resends

    for number in range(5):
        peer.send(b"echo", str(number).encode())
    assert read_json_line(slow, START_TIMEOUT_S) == {"received": 1}
    slow.send_signal(signal.SIGKILL)
    slow.wait(START_TIMEOUT_S)
    start_worker(processes, broker.mdp, "echo")

    replies = sorted(int(peer.recv(REPLY_TIMEOUT_S)[1][0]) for _ in range(5))
    assert replies == [0, 1, 2, 3, 4]
    with pytest.raises(TimeoutError):
        peer.recv(1.0)  # and each exactly once


def test_a_busy_worker_is_not_expired_for_its_silence(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    # Busy for ten times the silence after which an idle worker is dead.
    worker = start_worker(processes, broker.mdp, "echo", delay_s=BEAT_S * 3 * 10)
    wait_for_service(context, broker.mdp, b"echo")
    peer = client(context, broker.mdp)

    assert peer.request(b"echo", b"slow", timeout_s=REPLY_TIMEOUT_S) == [b"slow"]
    peer.send(b"echo", b"next")
    assert read_json_line(worker, START_TIMEOUT_S) == {"received": 1}
    assert read_json_line(worker, REPLY_TIMEOUT_S) == {"received": 2}


# --- 8/MMI --------------------------------------------------------------------------


def test_mmi_answers_before_during_and_after_a_services_workers(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    assert mmi(context, broker.mdp, b"echo") == b"404"

    worker = start_worker(processes, broker.mdp, "echo")
    wait_for_service(context, broker.mdp, b"echo")
    worker.send_signal(signal.SIGKILL)
    worker.wait(START_TIMEOUT_S)

    wait_until(
        lambda: mmi(context, broker.mdp, b"echo") == b"404",
        START_TIMEOUT_S,
        "404 once the last worker died",
    )
    peer = client(context, broker.mdp)
    assert peer.request(b"mmi.other", b"echo") == [b"501"]
    assert peer.request(b"mmi.service", b"titanic.request") == [b"200"]


def test_a_worker_may_not_register_an_mmi_service(
    broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    worker = raw_dealer(context, broker.mdp)
    worker.send_multipart([b"", WORKER, READY, b"mmi.service"])

    assert receive(worker) == [b"", WORKER, DISCONNECT]
    assert mmi(context, broker.mdp, b"mmi.service") == b"200"  # still the broker's


# --- 9/TSP Titanic ------------------------------------------------------------------


def test_titanic_request_reply_close_across_broker_restarts(
    processes: Processes, context: zmq.Context[Any], tmp_path: Path
) -> None:
    journal = tmp_path / "journal.db"
    ports = (free_port(), free_port(), free_port())
    broker = start_broker(processes, journal, ports)
    peer = client(context, broker.mdp)

    status, uuid = peer.request(b"titanic.request", b"echo", b"hello", b"")
    assert status == b"200" and len(uuid) == 32
    assert peer.request(b"titanic.reply", uuid) == [b"300"]

    broker = restart(processes, broker, journal, ports)
    assert peer.request(b"titanic.reply", uuid, timeout_s=REPLY_TIMEOUT_S) == [b"300"]
    start_worker(processes, broker.mdp, "echo")
    wait_until(
        lambda: peer.request(b"titanic.reply", uuid)[0] == b"200",
        REPLY_TIMEOUT_S,
        "the stored reply",
    )

    broker = restart(processes, broker, journal, ports)
    expected = [b"200", b"hello", b""]
    assert peer.request(b"titanic.reply", uuid, timeout_s=REPLY_TIMEOUT_S) == expected
    assert peer.request(b"titanic.reply", uuid) == expected  # idempotent
    assert peer.request(b"titanic.close", uuid) == [b"200"]
    assert peer.request(b"titanic.reply", uuid)[0][:3] == b"400"
    assert peer.request(b"titanic.close", uuid) == [b"200"]  # idempotent too


def restart(
    processes: Processes,
    broker: MdpBroker,
    journal: Path,
    ports: tuple[int, int, int],
) -> MdpBroker:
    processes.stop(broker.process)
    return start_broker(processes, journal, ports)


def test_titanic_refuses_malformed_requests(
    broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    peer = client(context, broker.mdp)

    assert peer.request(b"titanic.request", b"echo")[0][:3] == b"400"
    assert peer.request(b"titanic.request", b"mmi.service", b"x")[0][:3] == b"400"
    assert peer.request(b"titanic.reply", b"not-a-uuid")[0][:3] == b"400"
    assert peer.request(b"titanic.reply", b"0" * 32)[0][:3] == b"400"
    assert peer.request(b"titanic.other", b"0" * 32) == [b"501"]


def test_requests_for_a_service_nobody_offers_are_bounded_and_expire(
    processes: Processes, context: zmq.Context[Any]
) -> None:
    options = ("--mdp-unserved-expiry", "1", "--mdp-unserved-per-service", "2")
    broker = start_broker(processes, options=options)
    peer = client(context, broker.mdp)
    for body in (b"1", b"2", b"3"):
        peer.send(b"nobody", body)

    service, [status] = peer.recv(REPLY_TIMEOUT_S)  # the third, refused at once
    assert service == b"nobody" and status.startswith(b"500 no worker offers")
    for _ in range(2):
        service, [status] = peer.recv(REPLY_TIMEOUT_S)
        assert service == b"nobody"
        assert status.startswith(b"400 expired: no worker offered 'nobody'")

    start_worker(processes, broker.mdp, "echo")
    wait_for_service(context, broker.mdp, b"echo")
    assert peer.request(b"echo", b"served", timeout_s=REPLY_TIMEOUT_S) == [b"served"]
    peer.close()


# --- malformed traffic ----------------------------------------------------------------


def raw_dealer(context: zmq.Context[Any], endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    if not sock.poll(timeout_s * 1000):
        raise TimeoutError(f"nothing within {timeout_s:g}s")
    return sock.recv_multipart()


BROKEN_WORKER_MESSAGES = [
    [b"", WORKER, HEARTBEAT],  # before READY
    [b"", WORKER, REPLY, b"1.1", b"", b"body"],  # before READY
    [b"", WORKER, READY, b"echo", b"extra"],
    [b"", WORKER, READY, b"\xff\xfe"],
    [b"", WORKER, b"\x09"],
    [b"", WORKER, b"\x02", b"a", b"", b"b"],  # REQUEST is the broker's
    [b"", WORKER],
]


@pytest.mark.parametrize("frames", BROKEN_WORKER_MESSAGES)
def test_a_worker_breaking_the_protocol_is_disconnected(
    broker: MdpBroker, context: zmq.Context[Any], frames: list[bytes]
) -> None:
    worker = raw_dealer(context, broker.mdp)
    worker.send_multipart(frames)

    assert receive(worker) == [b"", WORKER, DISCONNECT]


def test_second_ready_and_stray_reply_disconnect_a_registered_worker(
    broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    for second in ([READY, b"echo"], [REPLY, b"7.1", b"", b"x"]):
        worker = raw_dealer(context, broker.mdp)
        worker.send_multipart([b"", WORKER, READY, b"echo"])
        wait_for_service(context, broker.mdp, b"echo")

        worker.send_multipart([b"", WORKER, *second])

        frames = receive(worker)
        while frames == [b"", WORKER, HEARTBEAT]:
            frames = receive(worker)
        assert frames == [b"", WORKER, DISCONNECT]
        wait_until(
            lambda: mmi(context, broker.mdp, b"echo") == b"404",
            START_TIMEOUT_S,
            "the worker gone",
        )
        worker.close()


MALFORMED_REQUESTS = [
    ([b"", CLIENT], b"", b"at least one body frame"),
    ([b"", CLIENT, b"echo"], b"echo", b"at least one body frame"),
    ([b"", CLIENT, b"", b"body"], b"", b"a service name is 1 to 256 bytes"),
    ([b"", CLIENT, b"\xff", b"body"], b"\xff", b"must be UTF-8"),
    ([b"", CLIENT, b"a\nb", b"body"], b"a\nb", b"control character"),
]


def test_a_request_without_its_empty_first_frame_is_told_so_in_its_own_shape(
    broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    for endpoint in (broker.mdp, broker.frontend):
        dealer = raw_dealer(context, endpoint)
        dealer.send_multipart([CLIENT, b"echo", b"hi"])

        service_frames = receive(dealer)

        assert service_frames[:2] == [CLIENT, b"echo"], service_frames
        [status] = service_frames[2:]
        assert status.startswith(b"400 malformed request: "), status
        assert b"empty frame" in status, status
    assert broker.process.poll() is None


def test_malformed_client_requests_get_a_400_reply_and_service_goes_on(
    processes: Processes, broker: MdpBroker, context: zmq.Context[Any]
) -> None:
    garbage = raw_dealer(context, broker.mdp)
    for frames, _, _ in MALFORMED_REQUESTS:
        garbage.send_multipart(frames)
    for _, service, reason in MALFORMED_REQUESTS:
        reply = receive(garbage)
        assert reply[:3] == [b"", CLIENT, service], reply
        [status] = reply[3:]
        assert status.startswith(b"400 malformed request: "), status
        assert reason in status, status

    for frames in (
        [b"VNT1", b"\x01", b"\xc1"],  # ventilator's protocol on the MDP socket
        [b"junk"],
    ):
        garbage.send_multipart(frames)
    start_worker(processes, broker.mdp, "echo")
    wait_for_service(context, broker.mdp, b"echo")

    peer = client(context, broker.mdp)
    assert peer.request(b"echo", b"still here", timeout_s=REPLY_TIMEOUT_S) == [
        b"still here"
    ]
    with pytest.raises(TimeoutError):
        receive(garbage, 0.5)
    assert broker.process.poll() is None

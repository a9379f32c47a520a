"""Reading a ZeroMQ endpoint's mechanism from its greeting."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from ventilator._greeting import broker_mechanism

TIMEOUT_S = 5.0


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_a_plain_router_greets_with_null(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    assert broker_mechanism(f"tcp://127.0.0.1:{port}", TIMEOUT_S) == "NULL"


def test_a_curve_router_greets_with_curve_and_no_handshake_is_made(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = context.socket(zmq.ROUTER)
    router.curve_server = True
    _, router.curve_secretkey = zmq.curve_keypair()
    port = router.bind_to_random_port("tcp://127.0.0.1")
    monitor = router.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    )

    assert broker_mechanism(f"tcp://127.0.0.1:{port}", TIMEOUT_S) == "CURVE"
    # The broker saw no mechanism of ours to call a mismatch.
    assert not monitor.poll(200)


def test_an_ipc_endpoint_is_asked_too(
    context: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    router = context.socket(zmq.ROUTER)
    address = f"ipc://{tmp_path / 'broker'}"
    router.bind(address)

    assert broker_mechanism(address, TIMEOUT_S) == "NULL"


def test_a_refused_connection_says_nothing() -> None:
    with socket.socket() as bound:  # bound, not listening: refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]

        assert broker_mechanism(f"tcp://127.0.0.1:{port}", TIMEOUT_S) is None


def test_a_server_that_is_not_zeromq_says_nothing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_like_http() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        answering = threading.Thread(target=answer_like_http)
        answering.start()
        assert broker_mechanism(f"tcp://127.0.0.1:{port}", TIMEOUT_S) is None
        answering.join(TIMEOUT_S)


def test_a_server_that_never_answers_gives_up_at_the_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]

        assert broker_mechanism(f"tcp://127.0.0.1:{port}", 0.2) is None


@pytest.mark.parametrize("address", ["inproc://broker", "tcp://host:port"])
def test_an_address_it_cannot_ask_says_nothing(address: str) -> None:
    assert broker_mechanism(address, TIMEOUT_S) is None

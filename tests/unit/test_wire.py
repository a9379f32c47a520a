"""The address check every peer makes before it connects, and the rule for
messages a socket's descriptor does not announce."""

from __future__ import annotations

import pytest
import zmq

from ventilator._wire import InputCheck, check_endpoint
from ventilator.errors import UsageError


@pytest.mark.parametrize(
    "address",
    ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://broker:1", "ipc:///tmp/v"],
)
def test_well_formed_addresses_pass(address: str) -> None:
    check_endpoint(address, "the broker address")


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("broker:5555", "no transport://"),
        ("tcp://", "no transport://"),
        ("http://broker:80", "unknown transport 'http'"),
        ("tcp://127.0.0.1", "HOST:PORT"),
        ("tcp://127.0.0.1:notaport", "HOST:PORT"),
        ("tcp://127.0.0.1:70000", "from 1 to 65535"),
        ("tcp://:5555", "HOST:PORT"),
    ],
)
def test_malformed_address_is_refused_naming_it_and_why(
    address: str, problem: str
) -> None:
    with pytest.raises(UsageError, match=problem) as refused:
        check_endpoint(address, "the broker address")

    assert repr(address) in str(refused.value)


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:5555"]
)
def test_an_address_to_bind_may_ask_for_any_free_port(address: str) -> None:
    check_endpoint(address, "the frontend endpoint", to_bind=True)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_an_address_to_connect_to_needs_a_port(address: str) -> None:
    with pytest.raises(UsageError, match="port from 1 to 65535"):
        check_endpoint(address, "the broker address")


def test_a_malformed_address_to_bind_is_refused_as_one() -> None:
    with pytest.raises(UsageError, match="not an address to bind") as refused:
        check_endpoint("foo://bar", "the frontend endpoint", to_bind=True)

    assert "unknown transport 'foo'" in str(refused.value)


def test_input_check_asks_on_a_new_socket_and_after_each_send_only() -> None:
    context = zmq.Context()
    ours, theirs = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        ours.bind("inproc://input-check")
        theirs.connect("inproc://input-check")
        theirs.send(b"waiting")
        ours.poll(5000)  # the message has arrived
        check = InputCheck(ours)

        assert check.unannounced()  # a new socket: asked, and it waits
        assert not check.unannounced()  # not asked again until a send
        ours.send(b"hello")
        check.sent()
        assert check.unannounced()  # asked again: still waiting
    finally:
        ours.close(linger=0)
        theirs.close(linger=0)
        context.term()

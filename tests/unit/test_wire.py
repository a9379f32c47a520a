"""The address check every peer makes before it connects."""

from __future__ import annotations

import pytest

from ventilator._wire import check_endpoint
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

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

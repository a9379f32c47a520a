"""Ask a ZeroMQ endpoint which security mechanism it speaks, from its greeting.

When a broker closes a peer's handshakes without saying why, libzmq often
cannot tell the peer whether the two sides' mechanisms differ (a keyless
client at a CURVE broker) or its CURVE HELLO was not readable (a wrong broker
key): racing the broker's close, the peer's engine fails on a write before it
reads the broker's greeting. So the peer asks on a connection of its own.

ZMTP 3 (rfc.zeromq.org/spec/23) opens with a 64-byte greeting from each side:
a 10-byte signature, the version (major, minor), the mechanism's name in 20
bytes padded with zeros, the as-server flag and filler. libzmq sends the rest
of its greeting once it has read the other side's signature and major
version, before it knows the other side's mechanism: so sending those 11
bytes and reading 64 learns the mechanism without taking part in any
handshake. The broker sees a connection closed mid-handshake, which it
counts with the failed ones it already saw.
"""

from __future__ import annotations

import logging
import socket

__all__ = ["broker_mechanism"]

log = logging.getLogger(__name__)

# Signature (0xFF, 8 bytes of padding, 0x7F) and major version 3.
_OPENING = b"\xff" + bytes(8) + b"\x7f" + b"\x03"
_GREETING_BYTES = 64
_MECHANISM = slice(12, 32)
_VERSION_MAJOR = 10


def broker_mechanism(address: str, timeout_s: float) -> str | None:
    """The mechanism ("NULL", "CURVE", ...) the ZeroMQ endpoint at `address`
    greets with; None when it cannot be learnt within `timeout_s` (another
    transport, the endpoint gone, not ZMTP 3)."""
    target = _target(address)
    if target is None:
        return None
    try:
        with _connect(target, timeout_s) as connection:
            connection.sendall(_OPENING)
            greeting = _read(connection, _GREETING_BYTES)
    except OSError as exc:
        log.debug("could not read the greeting of %s: %s", address, exc)
        return None
    if len(greeting) < _GREETING_BYTES or greeting[_VERSION_MAJOR] < 3:
        return None
    return greeting[_MECHANISM].rstrip(b"\0").decode("ascii", "replace")


def _target(address: str) -> tuple[str, int] | str | None:
    """Where a tcp:// endpoint listens (host, port), or an ipc:// one's path;
    None for other transports."""
    transport, _, rest = address.partition("://")
    if transport == "ipc":
        # ZeroMQ names an abstract socket with a leading @; Linux with a NUL.
        return "\0" + rest[1:] if rest.startswith("@") else rest
    if transport != "tcp":
        return None
    rest = rest.rpartition(";")[2]  # after a source address, if one is given
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _connect(target: tuple[str, int] | str, timeout_s: float) -> socket.socket:
    if isinstance(target, tuple):
        return socket.create_connection(target, timeout=timeout_s)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout_s)
        connection.connect(target)
    except OSError:
        connection.close()
        raise
    return connection


def _read(connection: socket.socket, size: int) -> bytes:
    """Up to `size` bytes: fewer if the other end closes first."""
    received = b""
    while len(received) < size:
        chunk = connection.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received

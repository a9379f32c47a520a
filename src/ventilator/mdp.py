"""The Majordomo Protocol 0.1 (7/MDP) on the wire: frames in, messages out.

Frames as they arrive after the ROUTER's routing id::

    client REQUEST     ""  "MDPC01"  service  body...             (>= 4 frames)
    worker READY       ""  "MDPW01"  0x01  service                (exactly 4)
    worker REPLY       ""  "MDPW01"  0x03  client-address  ""  body...   (>= 6)
    worker HEARTBEAT   ""  "MDPW01"  0x04                         (exactly 3)
    worker DISCONNECT  ""  "MDPW01"  0x05                         (exactly 3)

and the broker sends REPLY to clients (same layout as REQUEST, carrying the
service name), REQUEST, HEARTBEAT and DISCONNECT to workers.

The leading empty frame is what tells MDP traffic apart from ventilator's own
(whose first frame is ``VNT1``), so both can share a socket.

Inside the broker an MDP body (any number of frames, any bytes) travels as one
task payload: a msgpack list of byte strings (`pack_body`). Tasks carrying such
a payload have the `protocol.Flags.RAW` flag and wait in the queue
`service_queue(name)`.

This module is pure: no sockets, no clock, no logging. `decode` raises only
`ProtocolError`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from .errors import ProtocolError
from .protocol import MAX_NAME_LENGTH, label_problem, unpack_failure

__all__ = [
    "CLIENT",
    "WORKER",
    "ClientRequest",
    "Command",
    "WorkerDisconnect",
    "WorkerHeartbeat",
    "WorkerReady",
    "WorkerReply",
    "client_reply",
    "decode",
    "is_mdp",
    "pack_body",
    "service_queue",
    "unpack_body",
    "worker_disconnect",
    "worker_heartbeat",
    "worker_request",
]

CLIENT = b"MDPC01"
WORKER = b"MDPW01"

# Queue names of MDP services. The prefix keeps MDP bodies away from ventilator
# workers' ordinary functions of the same name, which expect msgpack arguments.
QUEUE_PREFIX = "mdp:"

# Services the broker answers itself (8/MMI, 9/TSP); workers may not take them.
RESERVED_PREFIXES = ("mmi.", "titanic.")


class Command(enum.IntEnum):
    """MDP/Worker command bytes."""

    READY = 1
    REQUEST = 2
    REPLY = 3
    HEARTBEAT = 4
    DISCONNECT = 5


@dataclass(frozen=True, slots=True)
class ClientRequest:
    service: str
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WorkerReady:
    service: str


@dataclass(frozen=True, slots=True)
class WorkerReply:
    address: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    pass


@dataclass(frozen=True, slots=True)
class WorkerDisconnect:
    pass


Message: TypeAlias = (
    ClientRequest | WorkerReady | WorkerReply | WorkerHeartbeat | WorkerDisconnect
)


def service_queue(service: str) -> str:
    """The scheduler queue where requests for MDP `service` wait."""
    return QUEUE_PREFIX + service


def is_reserved(service: str) -> bool:
    """Whether `service` belongs to the broker itself (MMI, Titanic)."""
    return service.startswith(RESERVED_PREFIXES)


def is_mdp(frames: Sequence[Any]) -> bool:
    """Whether `frames` (routing id removed) look like MDP/0.1, client or worker."""
    return (
        len(frames) >= 2
        and len(frames[0]) == 0
        and bytes(frames[1]) in (CLIENT, WORKER)
    )


def lacks_delimiter(frames: Sequence[Any]) -> bool:
    """Whether `frames` (routing id removed) are MDP/0.1 without the empty
    frame it starts with: sent from a DEALER that left out REQ's envelope."""
    return len(frames) >= 1 and bytes(frames[0]) in (CLIENT, WORKER)


def is_worker(frames: Sequence[Any]) -> bool:
    """Whether `frames` carry the MDP/Worker header (checked by `is_mdp` first)."""
    return len(frames) >= 2 and bytes(frames[1]) == WORKER


# --- decoding -------------------------------------------------------------------


def decode(frames: Sequence[Any]) -> Message:
    """Turn received frames (routing id removed) into an MDP message.

    Raises:
        ProtocolError: not MDP/0.1, a wrong frame count, an unknown or
            broker-only command, or a service name that is not 1 to 256 bytes
            of UTF-8.
    """
    if not is_mdp(frames):
        raise ProtocolError("not an MDP/0.1 message", "header")
    if bytes(frames[1]) == CLIENT:
        return _client_request(frames)
    return _worker_message(frames)


def _client_request(frames: Sequence[Any]) -> ClientRequest:
    if len(frames) < 4:
        raise ProtocolError(
            f"an MDP client REQUEST has a service and at least one body frame; "
            f"got {len(frames)} frames",
            "frames",
        )
    return ClientRequest(service_name(frames[2]), _body(frames[3:]))


def _worker_message(frames: Sequence[Any]) -> Message:
    if len(frames) < 3:
        raise ProtocolError("an MDP worker message needs a command frame", "frames")
    command = _command(bytes(frames[2]))
    if command is Command.READY:
        _count(frames, 4, "READY")
        return WorkerReady(service_name(frames[3]))
    if command is Command.REPLY:
        return _worker_reply(frames)
    if command is Command.HEARTBEAT:
        _count(frames, 3, "HEARTBEAT")
        return WorkerHeartbeat()
    if command is Command.DISCONNECT:
        _count(frames, 3, "DISCONNECT")
        return WorkerDisconnect()
    raise ProtocolError(f"{command.name} is the broker's command", "command")


def _worker_reply(frames: Sequence[Any]) -> WorkerReply:
    if len(frames) < 6:
        raise ProtocolError(
            f"an MDP REPLY has an address, an empty frame and a body; "
            f"got {len(frames)} frames",
            "frames",
        )
    if len(frames[4]):
        raise ProtocolError("the frame after a REPLY's address must be empty", "frames")
    return WorkerReply(bytes(frames[3]), _body(frames[5:]))


def _command(raw: bytes) -> Command:
    if len(raw) != 1:
        raise ProtocolError("an MDP command frame is exactly one byte", "command")
    try:
        return Command(raw[0])
    except ValueError:
        raise ProtocolError(f"unknown MDP command byte {raw[0]}", "command") from None


def _count(frames: Sequence[Any], expected: int, what: str) -> None:
    if len(frames) != expected:
        raise ProtocolError(
            f"an MDP {what} has exactly {expected} frames, got {len(frames)}", "frames"
        )


def service_name(frame: Any) -> str:
    """A service name frame as text.

    Raises:
        ProtocolError: empty, longer than 256 bytes, not UTF-8, or with a
            control character (service names reach logs and status tables).
    """
    raw = bytes(frame)
    if not raw or len(raw) > MAX_NAME_LENGTH:
        raise ProtocolError(
            f"a service name is 1 to {MAX_NAME_LENGTH} bytes, got {len(raw)}",
            "service",
        )
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(
            f"a service name must be UTF-8, got {raw[:32]!r}", "service"
        ) from None
    problem = label_problem(name, "service name")
    if problem is not None:
        raise ProtocolError(problem, "service")
    return name


def _body(frames: Sequence[Any]) -> tuple[bytes, ...]:
    return tuple(bytes(frame) for frame in frames)


# --- encoding -------------------------------------------------------------------


def client_reply(service: str | bytes, body: Sequence[bytes]) -> list[bytes]:
    """The frames of a REPLY to an MDP client (routing id not included); a
    service given as bytes is sent as it is (the frame a client sent)."""
    frame = service.encode() if isinstance(service, str) else service
    return [b"", CLIENT, frame, *body]


def worker_request(address: bytes, body: Sequence[bytes]) -> list[bytes]:
    """The frames of a REQUEST to an MDP worker; it echoes `address` back."""
    return [b"", WORKER, bytes((Command.REQUEST,)), address, b"", *body]


def worker_heartbeat() -> list[bytes]:
    return [b"", WORKER, bytes((Command.HEARTBEAT,))]


def worker_disconnect() -> list[bytes]:
    return [b"", WORKER, bytes((Command.DISCONNECT,))]


# --- bodies as task payloads ------------------------------------------------------


def pack_body(frames: Sequence[bytes]) -> bytes:
    """One payload holding every frame of an MDP body, exactly as sent."""
    return msgpack.packb([bytes(frame) for frame in frames], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_body(payload: Any) -> list[bytes]:
    """The frames `pack_body` packed.

    Raises:
        ProtocolError: the payload is not a msgpack list of byte strings.
    """
    try:
        frames = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises a family of unrelated types
        raise ProtocolError(
            f"not a packed MDP body: {unpack_failure(exc)}", "body"
        ) from exc
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise ProtocolError("a packed MDP body is a list of byte strings", "body")
    return frames

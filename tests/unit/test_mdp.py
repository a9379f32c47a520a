"""The MDP codec: frames of 7/MDP in, messages out; garbage only as ProtocolError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ventilator import mdp
from ventilator.errors import ProtocolError

C, W = mdp.CLIENT, mdp.WORKER
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = (bytes((n,)) for n in range(1, 6))


def test_a_client_request_keeps_every_body_frame() -> None:
    message = mdp.decode([b"", C, b"echo", b"a", b"", b"\x00\xff"])

    assert message == mdp.ClientRequest("echo", (b"a", b"", b"\x00\xff"))


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"", W, READY, b"echo"], mdp.WorkerReady("echo")),
        ([b"", W, REPLY, b"7.1", b"", b"x", b""], mdp.WorkerReply(b"7.1", (b"x", b""))),
        ([b"", W, HEARTBEAT], mdp.WorkerHeartbeat()),
        ([b"", W, DISCONNECT], mdp.WorkerDisconnect()),
    ],
)
def test_worker_commands_decode(frames: list[bytes], expected: mdp.Message) -> None:
    assert mdp.decode(frames) == expected


@pytest.mark.parametrize(
    "frames",
    [
        [b"VNT1", b"\x01", b""],
        [b"", b"MDPC02", b"echo", b"x"],
        [b"", C, b"echo"],
        [b"", C, b"", b"x"],
        [b"", C, b"\xff", b"x"],
        [b"", C, b"s" * 257, b"x"],
        [b"", C, b"echo\n2026-01-01 ERROR ventilator: FORGED", b"x"],
        [b"", C, b"\x00" * 256, b"x"],
        [b"", W, READY, b"echo\r\n"],
        [b"", W],
        [b"", W, b"\x01\x01", b"echo"],
        [b"", W, b"\x09"],
        [b"", W, REQUEST, b"a", b"", b"x"],
        [b"", W, READY],
        [b"", W, READY, b"echo", b"more"],
        [b"", W, REPLY, b"a", b""],
        [b"", W, REPLY, b"a", b"not empty", b"x"],
        [b"", W, HEARTBEAT, b"x"],
        [b"", W, DISCONNECT, b"x"],
    ],
)
def test_malformed_frames_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        mdp.decode(frames)


@given(st.lists(st.binary(max_size=8), max_size=8))
def test_decode_raises_nothing_but_protocol_error(frames: list[bytes]) -> None:
    for prefix in ([], [b""], [b"", C], [b"", W]):
        with contextlib.suppress(ProtocolError):
            mdp.decode([*prefix, *frames])


def test_mdp_is_told_apart_from_ventilator_by_its_first_frames() -> None:
    assert mdp.is_mdp([b"", C, b"echo", b"x"])
    assert mdp.is_mdp([b"", W, HEARTBEAT])
    assert not mdp.is_mdp([b"VNT1", b"\x01", b""])
    assert not mdp.is_mdp([b"", b"MDPW02", b"\x01"])
    assert not mdp.is_mdp([b""])


def test_encoders_lay_out_the_frames_of_the_spec() -> None:
    assert mdp.client_reply("echo", [b"a", b""]) == [b"", C, b"echo", b"a", b""]
    assert mdp.worker_request(b"1.2", [b"x"]) == [b"", W, REQUEST, b"1.2", b"", b"x"]
    assert mdp.worker_heartbeat() == [b"", W, HEARTBEAT]
    assert mdp.worker_disconnect() == [b"", W, DISCONNECT]


@given(st.lists(st.binary(max_size=64), max_size=10))
def test_a_packed_body_unpacks_to_the_same_frames(frames: list[bytes]) -> None:
    assert mdp.unpack_body(mdp.pack_body(frames)) == frames


@pytest.mark.parametrize("payload", [b"\xc1", b"\x91\x01", b"\xa3abc", b""])
def test_a_payload_that_is_not_a_packed_body_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        mdp.unpack_body(payload)


def test_broker_services_are_reserved() -> None:
    assert mdp.is_reserved("mmi.service")
    assert mdp.is_reserved("titanic.request")
    assert not mdp.is_reserved("echo")
    assert mdp.service_queue("echo") == "mdp:echo"

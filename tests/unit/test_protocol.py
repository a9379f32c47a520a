"""Frames in, typed commands out, and back; garbage in, ProtocolError out."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ventilator import protocol as p
from ventilator.errors import ProtocolError

EVERY_COMMAND = frozenset(p.Cmd)

EXAMPLES: list[p.Command] = [
    p.Hello("session-1"),
    p.Hello("session-1", sink="totals"),
    p.Hello("session-1", instance=2**30),
    p.Hello("session-1", shared=p.SharedAsk("/dev/shm/probe", "token", 2**25)),
    p.Welcome(100, 1024, 0.5, durable=False),
    p.Welcome(100, 1024, 0.5, client_max_bytes=4096),
    p.Welcome(100, 1024, 0.5, durable=False, arena="/dev/shm/v-1-a/1.arena"),
    p.Submit(
        [
            p.TaskSpec(1, "jobs:square", b"\x91\x07"),
            p.TaskSpec(2, "jobs:square", b"", p.Flags.PICKLED, 2.5, 3, "totals"),
        ]
    ),
    p.Accepted([1, 2, 3]),
    p.Accepted([]),
    p.Results(
        [
            p.ResultEntry(1, p.Status.OK, b"\x31"),
            p.ResultEntry(2, p.Status.RAISED, b"report", origin="session-2"),
        ]
    ),
    p.Ack([("", 1), ("session-2", 2)]),
    p.Cancel([4, 5]),
    p.StatusRequest(),
    p.StatusReply({"workers": [], "queued": {"jobs:square": 3}}),
    p.ListFailed(50),
    p.Retry([3, 9], "retried"),
    p.Retry([], "retried"),
    p.Purge("jobs:square"),
    p.Purge(session="departed"),
    p.CancelTask("session-1", 42),
    p.OperatorReply({"retried": [1], "refused": [[2, "not remembered"]]}),
    p.Heartbeat(),
    p.Error("hello_first", "send HELLO first"),
    p.Bye(),
    p.Drain(),
    p.Credit(16),
    p.Release([(7, 1), (9, 3)]),
    p.Ready("worker-1", ["jobs:square", "jobs:cube"], 4, allow_pickle=True),
    p.Ready("worker-2", [], 2, slots=2, problem="task processes cannot start: x"),
    p.Ready("worker-3", ["jobs:square"], 2, held=[(7, 1), (9, 3)]),
    p.Ready("worker-4", [], 1, problem="x", held=[(7, 2)]),
    p.Ready("worker-5", ["jobs:square"], 2, shared=p.SharedAsk("/dev/shm/p", "t")),
    p.Tasks(
        [
            p.Assignment(7, 1, "jobs:square", b"args"),
            p.Assignment(8, 2, "jobs:cube", b"more", p.Flags.PICKLED, 1.5),
        ]
    ),
    p.Done(
        [
            p.Outcome(7, 1, p.Status.OK, b"49", 0.25),
            p.Outcome(8, 2, p.Status.TIMEOUT, b"report", 1.5),
        ]
    ),
    p.Done([]),
]


def frames(cmd: p.Cmd, body: Any, *payloads: bytes) -> list[bytes]:
    """Hand-made frames, for messages `encode` would never produce."""
    return [p.HEADER, bytes((cmd,)), msgpack.packb(body), *payloads]


def refusal(raw: list[Any], allowed: frozenset[p.Cmd] = EVERY_COMMAND) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        p.decode(raw, allowed)
    return caught.value


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("command", EXAMPLES, ids=lambda c: type(c).__name__)
def test_every_command_survives_encode_and_decode(command: p.Command) -> None:
    assert p.decode(p.encode(command), EVERY_COMMAND) == command


def test_payload_frames_travel_as_separate_frames_untouched() -> None:
    payloads = [b"\x00" * 3, b"", b"\xff\xfe"]
    tasks = [p.TaskSpec(i, "jobs:f", data) for i, data in enumerate(payloads)]

    raw = p.encode(p.Submit(tasks))

    assert raw[:2] == [p.HEADER, bytes((p.Cmd.SUBMIT,))]
    assert raw[3:] == payloads


def test_decode_accepts_memoryview_frames() -> None:
    raw = [memoryview(f) for f in p.encode(p.Cancel([1]))]

    assert p.decode(raw, p.FROM_CLIENT) == p.Cancel([1])


def test_every_command_byte_has_a_codec_and_a_socket() -> None:
    sockets = p.FROM_CLIENT | p.FROM_WORKER | p.TO_CLIENT | p.TO_WORKER

    assert sockets == frozenset(p.Cmd)
    assert {p.encode(c)[1][0] for c in EXAMPLES} == set(p.Cmd)


def test_encode_refuses_what_is_not_a_command() -> None:
    with pytest.raises(TypeError, match="not a ventilator command"):
        p.encode("HELLO")  # type: ignore[arg-type]


# --- malformed frames: each fault has its code ----------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2])
def test_too_few_frames_are_refused(count: int) -> None:
    error = refusal(p.encode(p.Heartbeat())[:count])

    assert error.code == "frames"
    assert f"got {count}" in str(error)


def test_wrong_header_is_refused() -> None:
    error = refusal([b"MDPC01", bytes((p.Cmd.HEARTBEAT,)), msgpack.packb(None)])

    assert error.code == "header"
    assert "MDPC01" in str(error)


@pytest.mark.parametrize("command_frame", [b"", b"\x01\x01"])
def test_command_frame_of_the_wrong_length_is_refused(command_frame: bytes) -> None:
    error = refusal([p.HEADER, command_frame, msgpack.packb(None)])

    assert error.code == "command"
    assert "one byte" in str(error)


@pytest.mark.parametrize("byte", [0, 13, 15, 31, 255])
def test_unknown_command_byte_is_refused(byte: int) -> None:
    error = refusal([p.HEADER, bytes((byte,)), msgpack.packb(None)])

    assert error.code == "command"
    assert str(byte) in str(error)


@pytest.mark.parametrize(
    ("command", "allowed"),
    [
        (p.Ready("w", ["f"], 1), p.FROM_CLIENT),
        (p.Done([]), p.FROM_CLIENT),
        (p.Welcome(1, 1, 1.0), p.FROM_CLIENT),
        (p.Hello("s"), p.FROM_WORKER),
        (p.Submit([p.TaskSpec(1, "f", b"")]), p.FROM_WORKER),
        (p.Tasks([]), p.FROM_WORKER),
        (p.Submit([p.TaskSpec(1, "f", b"")]), p.TO_CLIENT),
        (p.Done([]), p.TO_WORKER),
        (p.Drain(), p.FROM_CLIENT),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, frozenset) else "",
)
def test_command_not_accepted_on_that_socket_is_refused(
    command: p.Command, allowed: frozenset[p.Cmd]
) -> None:
    error = refusal(p.encode(command), allowed)

    assert error.code == "command"
    assert "not accepted on this socket" in str(error)


@pytest.mark.parametrize(
    "body", [b"", b"\xc1", b"\xc1\xc1\xc1", b"\x92\x01", b"\x91\x01\x02"]
)
def test_body_that_is_not_msgpack_is_refused_saying_why(body: bytes) -> None:
    error = refusal([p.HEADER, bytes((p.Cmd.HEARTBEAT,)), body])

    assert error.code == "body"
    assert "msgpack" in str(error)
    assert says_what_was_wrong(error)


def test_a_reserved_msgpack_byte_is_named_in_the_refusal() -> None:
    error = refusal([p.HEADER, bytes((p.Cmd.HELLO,)), b"\xc1\xc1\xc1"])

    assert "0xc1" in str(error)


def test_body_with_non_string_map_keys_is_refused() -> None:
    error = refusal(frames(p.Cmd.HELLO, {1: "x"}))

    assert error.code == "body"


def test_body_over_the_size_limit_is_refused_before_unpacking() -> None:
    body = b"\xc1" * (p.MAX_BODY_BYTES + 1)  # would not unpack either

    error = refusal([p.HEADER, bytes((p.Cmd.HEARTBEAT,)), body])

    assert error.code == "size"


def test_submit_of_more_tasks_than_allowed_is_refused_before_unpacking() -> None:
    payloads = [b""] * 5
    body = b"\xc1"  # would not unpack: the count alone refuses it

    with pytest.raises(ProtocolError) as caught:
        p.decode([p.HEADER, bytes((p.Cmd.SUBMIT,)), body, *payloads], EVERY_COMMAND, 4)

    assert caught.value.code == "size"
    assert "5 tasks" in str(caught.value) and "4" in str(caught.value)


def test_submit_of_as_many_tasks_as_allowed_is_decoded() -> None:
    tasks = [p.TaskSpec(i, "jobs:f", b"") for i in range(4)]

    decoded = p.decode(p.encode(p.Submit(tasks)), EVERY_COMMAND, 4)

    assert isinstance(decoded, p.Submit) and len(decoded.tasks) == 4


def test_submit_past_the_protocol_limit_is_refused_by_default() -> None:
    payloads = [b""] * (p.MAX_SUBMIT_TASKS + 1)

    error = refusal([p.HEADER, bytes((p.Cmd.SUBMIT,)), b"\xc1", *payloads])

    assert error.code == "size"


# --- wrong body shapes and types ------------------------------------------------------

TASK_ROW = [1, "jobs:f", 0, None, 0, None]
READY_BODY = ["worker-1", ["jobs:f"], 2, False]


@pytest.mark.parametrize(
    ("cmd", "body", "payload_count", "words"),
    [
        (p.Cmd.HELLO, ["session"], 0, "HELLO body must be dict"),
        (p.Cmd.HELLO, {"sink": "x"}, 0, "session must be str"),
        (p.Cmd.HELLO, {"session": 5}, 0, "session must be str"),
        (p.Cmd.HELLO, {"session": "s", "sink": ""}, 0, "sink must be 1 to 256"),
        (p.Cmd.HELLO, {"session": "s"}, 1, "takes no payload frames"),
        (p.Cmd.WELCOME, [1, 2, 3], 0, "list of 4 to 6 fields"),
        (p.Cmd.WELCOME, [1, 2, 3.0, True, -1], 0, "client_max_bytes must be"),
        (p.Cmd.WELCOME, [1, 2, "3", True], 0, "heartbeat_interval_s must be"),
        (p.Cmd.WELCOME, [1, 2, 3.0, 1], 0, "durable must be bool"),
        (p.Cmd.SUBMIT, {"tasks": []}, 0, "SUBMIT body must be list"),
        (p.Cmd.SUBMIT, [TASK_ROW[:5]], 1, "list of 6 fields"),
        (p.Cmd.SUBMIT, [["1", *TASK_ROW[1:]]], 1, "task_id must be int"),
        (p.Cmd.SUBMIT, [[1, 7, *TASK_ROW[2:]]], 1, "function must be str"),
        (p.Cmd.SUBMIT, [[1, "f", 0, "soon", 0, None]], 1, "timeout_s must be"),
        (p.Cmd.SUBMIT, [[1, "f", 0, 0, 0, None]], 1, "timeout_s must be positive"),
        (p.Cmd.SUBMIT, [[1, "f", 0, -1.5, 0, None]], 1, "timeout_s must be positive"),
        (p.Cmd.SUBMIT, [[1, "f", 0, None, 0, 3]], 1, "sink must be str"),
        (p.Cmd.SUBMIT, [[1, "f", 0.5, None, 0, None]], 1, "flags must be int"),
        (p.Cmd.ACCEPTED, [1, "2"], 0, "task_id must be int"),
        (p.Cmd.RESULTS, [[1, 0]], 1, "list of 3 fields"),
        (p.Cmd.RESULTS, [[1, 99, ""]], 1, "unknown status 99"),
        (p.Cmd.RESULTS, [[1, 0, None]], 1, "origin must be str"),
        (p.Cmd.ACK, [["", 1, 2]], 0, "ACK entry must be a list of 2"),
        (p.Cmd.ACK, [[None, 1]], 0, "origin must be str"),
        (p.Cmd.ACK, {"": 1}, 0, "ACK body must be list"),
        (p.Cmd.CANCEL, 5, 0, "CANCEL body must be list"),
        (p.Cmd.CANCEL, [1], 1, "takes no payload frames"),
        (p.Cmd.STATUS_REPLY, [1], 0, "STATUS_REPLY body must be dict"),
        (p.Cmd.HEARTBEAT, None, 1, "takes no payload frames"),
        (p.Cmd.DRAIN, None, 1, "takes no payload frames"),
        (p.Cmd.ERROR, ["code"], 0, "list of 2 fields"),
        (p.Cmd.ERROR, ["code", 5], 0, "message must be str"),
        (p.Cmd.READY, READY_BODY[:3], 0, "list of 4 to 8 fields"),
        (p.Cmd.READY, [*READY_BODY, None, None, {}], 0, "held must be list"),
        (p.Cmd.READY, [*READY_BODY, None, None, [7]], 0, "held entry"),
        (p.Cmd.READY, [*READY_BODY, None, None, [[7]]], 0, "list of 2 fields"),
        (p.Cmd.READY, [*READY_BODY, None, None, [[7, "1"]]], 0, "attempt must be"),
        (p.Cmd.READY, [*READY_BODY, None, None, [[-7, 1]]], 0, "ticket must be"),
        (p.Cmd.READY, [*READY_BODY, None, None, [[7, 0]]], 0, "attempt 0"),
        (
            p.Cmd.READY,
            [*READY_BODY, None, None, [[7, 1], [7, 2]]],
            0,
            "ticket 7 more than once",
        ),
        (
            p.Cmd.READY,
            [*READY_BODY, None, None, [[t, 1] for t in range(p.MAX_HELD_TICKETS + 1)]],
            0,
            f"more than {p.MAX_HELD_TICKETS}",
        ),
        (p.Cmd.READY, [*READY_BODY, None, 5], 0, "problem must be str"),
        (p.Cmd.READY, [*READY_BODY, None, "x" * 1001], 0, "longer than 1000"),
        (p.Cmd.READY, ["w", "jobs:f", 2, False], 0, "services must be list"),
        (p.Cmd.READY, ["w", [""], 2, False], 0, "service must be 1 to 256"),
        (p.Cmd.READY, ["w", ["f"], 0, False], 0, "capacity must be at least 1"),
        (
            p.Cmd.READY,
            ["w", ["f"], 1_000_000, False],
            0,
            f"capacity 1000000 is over the most a worker may declare "
            f"({p.MAX_CAPACITY})",
        ),
        (
            p.Cmd.READY,
            ["w", ["f"], 2, False, p.MAX_SLOTS + 1],
            0,
            f"slots {p.MAX_SLOTS + 1} is over the most",
        ),
        (p.Cmd.CREDIT, p.MAX_CAPACITY + 1, 0, "capacity 65537 is over the most"),
        (p.Cmd.READY, ["w", ["f"], 2, "yes"], 0, "allow_pickle must be bool"),
        (p.Cmd.TASKS, [[1, 1, "f", 0]], 1, "list of 5 fields"),
        (p.Cmd.TASKS, [[1, "1", "f", 0, None]], 1, "attempt must be int"),
        (p.Cmd.DONE, [[1, 1, 0, "fast"]], 1, "duration_s must be"),
        (p.Cmd.DONE, [[1, 1, 0]], 1, "list of 4 fields"),
        (p.Cmd.LIST_FAILED, -1, 0, "limit must be a non-negative"),
        (p.Cmd.RETRY, [[1], ""], 0, "sink must be 1 to 256"),
        (p.Cmd.RETRY, [1, "retried"], 0, "tickets must be list"),
        (p.Cmd.RETRY, [["1"], "retried"], 0, "ticket must be int"),
        (p.Cmd.PURGE, None, 0, "function must be str"),
        (p.Cmd.CANCEL_TASK, ["s"], 0, "CANCEL_TASK must be a list of 2"),
        (p.Cmd.CANCEL_TASK, ["s", "7"], 0, "task_id must be int"),
        (p.Cmd.OPERATOR_REPLY, [], 0, "OPERATOR_REPLY body must be dict"),
    ],
)
def test_body_of_the_wrong_shape_is_refused_naming_the_field(
    cmd: p.Cmd, body: Any, payload_count: int, words: str
) -> None:
    error = refusal(frames(cmd, body, *[b"x"] * payload_count))

    assert error.code == "malformed"
    assert words in str(error)


@pytest.mark.parametrize(
    ("cmd", "body"),
    [
        (p.Cmd.SUBMIT, [TASK_ROW, [2, *TASK_ROW[1:]]]),
        (p.Cmd.RESULTS, [[1, 0, ""]]),
        (p.Cmd.TASKS, [[1, 1, "f", 0, None], [2, 1, "f", 0, None]]),
        (p.Cmd.DONE, [[1, 1, 0, 0.1]]),
    ],
)
@pytest.mark.parametrize("payload_count", [0, 3])
def test_payload_count_must_match_the_entries(
    cmd: p.Cmd, body: list[Any], payload_count: int
) -> None:
    error = refusal(frames(cmd, body, *[b"x"] * payload_count))

    assert error.code == "malformed"
    assert f"{payload_count} payload frames" in str(error)


@pytest.mark.parametrize(
    ("cmd", "body", "payloads"),
    [
        (p.Cmd.SUBMIT, [[True, *TASK_ROW[1:]]], 1),
        (p.Cmd.SUBMIT, [[1, "f", 0, None, False, None]], 1),
        (p.Cmd.SUBMIT, [[1, "f", 0, True, 0, None]], 1),
        (p.Cmd.CANCEL, [False], 0),
        (p.Cmd.RESULTS, [[1, True, ""]], 1),
        (p.Cmd.READY, ["w", ["f"], True, False], 0),
        (p.Cmd.WELCOME, [True, 1, 1.0, True], 0),
        (p.Cmd.DONE, [[1, 1, 0, True]], 1),
    ],
)
def test_bool_where_a_number_is_expected_is_refused(
    cmd: p.Cmd, body: Any, payloads: int
) -> None:
    error = refusal(frames(cmd, body, *[b"x"] * payloads))

    assert "got True" in str(error) or "got False" in str(error)


@pytest.mark.parametrize(
    ("cmd", "body", "payloads"),
    [
        (p.Cmd.SUBMIT, [[-1, *TASK_ROW[1:]]], 1),
        (p.Cmd.SUBMIT, [[1, "f", 0, None, -2, None]], 1),
        (p.Cmd.CANCEL, [-5], 0),
        (p.Cmd.ACK, [["", -1]], 0),
        (p.Cmd.READY, ["w", ["f"], -3, False], 0),
        (p.Cmd.WELCOME, [-1, 1, 1.0, True], 0),
        (p.Cmd.TASKS, [[1, -1, "f", 0, None]], 1),
        (p.Cmd.HELLO, {"session": "s", "instance": -1}, 0),
    ],
)
def test_negative_count_is_refused(cmd: p.Cmd, body: Any, payloads: int) -> None:
    error = refusal(frames(cmd, body, *[b"x"] * payloads))

    assert "non-negative" in str(error)


def test_hello_of_a_client_that_predates_instances_is_decoded_without_one() -> None:
    raw = frames(p.Cmd.HELLO, {"session": "s", "sink": None})

    hello = p.decode(raw, EVERY_COMMAND)

    assert hello == p.Hello("s", instance=None)


def test_hello_with_an_instance_that_is_not_a_number_is_refused() -> None:
    error = refusal(frames(p.Cmd.HELLO, {"session": "s", "instance": "1"}))

    assert "instance" in str(error)


def test_count_of_64_bits_or_more_is_refused() -> None:
    error = refusal(frames(p.Cmd.CANCEL, [2**64 - 1]))

    assert "64-bit" in str(error)


@pytest.mark.parametrize(
    ("cmd", "body", "payloads"),
    [
        (p.Cmd.HELLO, {"session": "s" * 257}, 0),
        (p.Cmd.HELLO, {"session": "s", "sink": "k" * 257}, 0),
        (p.Cmd.SUBMIT, [[1, "f" * 257, 0, None, 0, None]], 1),
        (p.Cmd.READY, ["w" * 257, ["f"], 1, False], 0),
        (p.Cmd.READY, ["w", ["f" * 257], 1, False], 0),
    ],
)
def test_over_long_name_is_refused(cmd: p.Cmd, body: Any, payloads: int) -> None:
    error = refusal(frames(cmd, body, *[b"x"] * payloads))

    assert f"1 to {p.MAX_NAME_LENGTH} characters" in str(error)


FORGED = "s\n2026-01-01 00:00:00,000 ERROR ventilator.broker: FORGED"


@pytest.mark.parametrize(
    ("cmd", "body"),
    [
        (p.Cmd.HELLO, {"session": FORGED}),
        (p.Cmd.HELLO, {"session": "s\x00"}),
        (p.Cmd.HELLO, {"session": "s", "sink": "k\x1b[31m"}),
        (p.Cmd.CANCEL_TASK, [FORGED, 1]),
        (p.Cmd.RETRY, [[1], FORGED]),
        (p.Cmd.PURGE, {"session": FORGED}),
        (p.Cmd.READY, [FORGED, ["m:f"], 1, False]),
        (p.Cmd.READY, ["w", ["m:f\r"], 1, False]),
    ],
)
def test_a_peer_name_with_a_control_character_is_refused(cmd: p.Cmd, body: Any) -> None:
    error = refusal(frames(cmd, body))

    assert "control character" in str(error)
    assert "\n" not in str(error) and "\x00" not in str(error)


def test_name_of_exactly_the_maximum_length_is_accepted() -> None:
    name = "s" * p.MAX_NAME_LENGTH

    assert p.decode(frames(p.Cmd.HELLO, {"session": name}), EVERY_COMMAND) == (
        p.Hello(name)
    )


def test_empty_submit_is_refused() -> None:
    error = refusal(frames(p.Cmd.SUBMIT, []))

    assert error.code == "malformed"
    assert "at least one task" in str(error)


def test_deeply_nested_body_is_refused_with_protocol_error() -> None:
    body = b"\x91" * 1000 + b"\xc0"  # [[[...[None]...]]], 1001 bytes

    error = refusal([p.HEADER, bytes((p.Cmd.HELLO,)), body])

    assert error.code in ("body", "malformed")


# --- nothing but ProtocolError ever leaves decode -------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def check_decode(raw: list[bytes], allowed: frozenset[p.Cmd]) -> None:
    """Decode must refuse with ProtocolError or give a command it can re-encode."""
    try:
        command = p.decode(raw, allowed)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        assert says_what_was_wrong(exc), repr(str(exc))
        return
    again = p.encode(command)
    assert p.encode(p.decode(again, allowed)) == again


def says_what_was_wrong(error: ProtocolError) -> bool:
    """No message ends on a colon or an empty pair of brackets: a reason that
    came out blank."""
    message = str(error).rstrip()
    return bool(message) and not message.endswith((":", "()"))


@settings(max_examples=300, deadline=None)
@given(
    header=st.sampled_from([p.HEADER, p.HEADER, b"", b"VNT2"]) | st.binary(max_size=6),
    command=st.binary(min_size=1, max_size=1) | st.binary(max_size=3),
    rest=st.lists(st.binary(max_size=30), max_size=5),
    allowed=st.sampled_from([p.FROM_CLIENT, p.FROM_WORKER, p.TO_CLIENT, p.TO_WORKER]),
)
def test_arbitrary_frames_give_a_command_or_a_protocol_error(
    header: bytes, command: bytes, rest: list[bytes], allowed: frozenset[p.Cmd]
) -> None:
    check_decode([header, command, *rest], allowed)


@settings(max_examples=300, deadline=None)
@given(
    cmd=st.sampled_from(p.Cmd),
    body=msgpack_values,
    payloads=st.lists(st.binary(max_size=4), max_size=3),
)
def test_wrong_msgpack_bodies_give_a_command_or_a_protocol_error(
    cmd: p.Cmd, body: Any, payloads: list[bytes]
) -> None:
    check_decode(frames(cmd, body, *payloads), EVERY_COMMAND)


ROW_WIDTHS = {p.Cmd.SUBMIT: 6, p.Cmd.RESULTS: 3, p.Cmd.TASKS: 5, p.Cmd.DONE: 4}
FIXED_WIDTHS = {p.Cmd.WELCOME: 4, p.Cmd.READY: 4, p.Cmd.ERROR: 2, p.Cmd.ACK: 2}


@st.composite
def almost_right_messages(draw: st.DrawFn) -> list[bytes]:
    """Bodies of the right outline whose fields are anything msgpack can hold."""
    cmd = draw(st.sampled_from(sorted(ROW_WIDTHS | FIXED_WIDTHS)))
    field_value = msgpack_values | st.sampled_from([0, 1, "jobs:f", None, 0.5])
    if cmd in ROW_WIDTHS:
        row = st.lists(field_value, min_size=ROW_WIDTHS[cmd], max_size=ROW_WIDTHS[cmd])
        body: Any = draw(st.lists(row, max_size=3))
        count = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    else:
        width = FIXED_WIDTHS[cmd]
        fields = st.lists(field_value, min_size=width, max_size=width)
        body = draw(st.lists(fields, max_size=3) if cmd is p.Cmd.ACK else fields)
        count = draw(st.sampled_from([0, 0, 1]))
    return frames(cmd, body, *[b"p"] * max(0, count))


@settings(max_examples=300, deadline=None)
@given(raw=almost_right_messages())
def test_almost_right_bodies_give_a_command_or_a_protocol_error(
    raw: list[bytes],
) -> None:
    check_decode(raw, EVERY_COMMAND)


# --- names clients may submit -------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "flags"),
    [
        ("jobs:work", p.Flags.NONE),
        ("my.pkg.tasks:score_2", p.Flags.NONE),
        ("jobs:work", p.Flags.BATCH),
        ("jobs:work", p.Flags.SPLIT),
        ("pickled:<lambda>", p.Flags.PICKLED),
        ("pickled:outer.<locals>.inner", p.Flags.PICKLED | p.Flags.BATCH),
        ("jobs:work", p.Flags.BATCH | p.Flags.SPLITTABLE),
        ("pickled:<lambda>", p.Flags.PICKLED | p.Flags.BATCH | p.Flags.SPLITTABLE),
    ],
)
def test_names_our_clients_send_are_accepted(function: str, flags: int) -> None:
    assert p.submission_problem(function, flags) is None


@pytest.mark.parametrize(
    ("function", "flags", "rule"),
    [
        ("nocolon", p.Flags.NONE, "'module:function'"),
        ("mmi.service", p.Flags.NONE, "'module:function'"),
        ("jobs:_private", p.Flags.NONE, "public function name"),
        ("jobs:work:again", p.Flags.NONE, "'module:function'"),
        (" jobs:work", p.Flags.NONE, "'module:function'"),
        ("mdp:echo", p.Flags.NONE, "MDP services"),
        ("pickled:x", p.Flags.NONE, "reserved for pickled callables"),
        ("pickled:x", p.Flags.BATCH, "reserved for pickled callables"),
        ("jobs:work", p.Flags.PICKLED, "must start with 'pickled:'"),
        ("echo", p.Flags.RAW, "RAW (4)"),
        ("jobs:echo", p.Flags.RAW, "only the broker's MDP gateway"),
        ("jobs:echo", p.Flags.RAW | p.Flags.BATCH, "RAW (4)"),
        ("jobs:work\x00", p.Flags.NONE, "control character '\\x00'"),
        ("jobs:wo\nrk", p.Flags.NONE, "control character '\\n'"),
        ("pickled:\x1b[31mred", p.Flags.PICKLED, "control character '\\x1b'"),
        ("jobs:work", 64, "not a client's"),
        ("jobs:work", p.Flags.SPLITTABLE, "SPLITTABLE (16) only with BATCH (2)"),
    ],
)
def test_names_no_worker_could_serve_are_refused_naming_the_rule(
    function: str, flags: int, rule: str
) -> None:
    problem = p.submission_problem(function, flags)

    assert problem is not None and rule in problem


# --- task_problem: the decoder's rules, for clients ---------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sink": ""}, "sink"),
        ({"sink": "s" * 257}, "sink"),
        ({"sink": "a\nb"}, "sink"),  # a sink's HELLO refuses these names
        ({"sink": "x\x1by"}, "sink"),
        ({"function": ""}, "function"),
        ({"function": "m:" + "f" * 300}, "function"),
        ({"retries": 2**63}, "retries"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"timeout_s": math.nan}, "timeout_s"),
        ({"timeout_s": p.MAX_TIMEOUT_S * 2}, "timeout_s"),
        ({"timeout_s": "soon"}, "timeout_s"),
    ],
)
def test_task_problem_names_the_field_and_agrees_with_the_decoder(
    changes: dict[str, Any], field: str
) -> None:
    spec = dataclasses.replace(p.TaskSpec(1, "m:f", b"x"), **changes)

    problem = p.task_problem(spec)

    assert problem is not None and problem.startswith(field)
    with pytest.raises(ProtocolError) as refused:
        p.decode(p.encode(p.Submit([spec])), p.FROM_CLIENT)
    assert str(refused.value) == problem


@pytest.mark.parametrize(
    "changes",
    [{}, {"sink": "s" * 256}, {"timeout_s": p.MAX_TIMEOUT_S}, {"retries": 2**63 - 1}],
)
def test_task_problem_passes_a_task_within_the_rules(changes: dict[str, Any]) -> None:
    spec = dataclasses.replace(p.TaskSpec(1, "m:f", b"x"), **changes)

    assert p.task_problem(spec) is None
    assert p.decode(p.encode(p.Submit([spec])), p.FROM_CLIENT) == p.Submit([spec])


def test_a_welcome_from_a_broker_before_client_max_bytes_still_decodes() -> None:
    frames = [p.HEADER, bytes([p.Cmd.WELCOME]), msgpack.packb([7, 8, 1.0, True])]

    welcome = p.decode(frames, p.TO_CLIENT)

    assert welcome == p.Welcome(7, 8, 1.0, True, client_max_bytes=0)


def test_a_healthy_workers_ready_reads_to_a_broker_that_predates_problem() -> None:
    frames = p.encode(p.Ready("w", ["m:f"], 2, slots=2))

    assert len(msgpack.unpackb(frames[2])) == 5


def test_a_ready_holding_nothing_reads_to_a_broker_that_predates_held() -> None:
    frames = p.encode(p.Ready("w", ["m:f"], 2, slots=2, problem="x", held=[]))

    assert len(msgpack.unpackb(frames[2])) == 6


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"1": 1}, "released must be list"),
        ([[1]], "list of 2 fields"),
        ([[1, 0]], "attempt 0"),
        ([[1, 1], [1, 2]], "more than once"),
    ],
)
def test_a_malformed_release_is_refused_naming_the_fault(body: Any, words: str) -> None:
    error = refusal(frames(p.Cmd.RELEASE, body), p.TO_WORKER)

    assert words in str(error)


def test_a_release_is_no_command_a_broker_takes() -> None:
    error = refusal(p.encode(p.Release([(1, 1)])), p.FROM_WORKER)

    assert "RELEASE" in str(error)

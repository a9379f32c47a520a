"""The ventilator wire protocol: frames in, typed commands out, and back.

Every message is a list of ZeroMQ frames (the ROUTER routing id is removed
before decoding and added after encoding, by the broker shell)::

    frame 0   header     b"VNT1"            protocol and version
    frame 1   command    one byte           a `Cmd` value
    frame 2   body       msgpack            the command's fields
    frame 3+  payloads   raw bytes          one per task or result, never re-encoded

Tasks and results travel in batches: one SUBMIT, TASKS, DONE or RESULTS message
carries any number of entries, each with its own payload frame. Payload frames
are opaque here; they are forwarded as received, so large arguments are not
copied on their way through the broker.

Decoding never trusts its input. Anything malformed raises `ProtocolError`
naming what was wrong; no other exception leaves `decode`. The header frame
comes first so that other protocols (7/MDP, say) can share a socket later.

This module is pure: no sockets, no clock, no logging.
"""

from __future__ import annotations

import enum
import functools
import re
import reprlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack

from .errors import ProtocolError

HEADER = b"VNT1"
MAX_NAME_LENGTH = 256
# A worker's reason for serving nothing, as READY carries it to the status.
MAX_PROBLEM_LENGTH = 1000
# The most tickets a READY may name as still held: far above what a worker's
# credit lets it hold, low enough that a forged READY costs the broker little.
MAX_HELD_TICKETS = 65536
# The most a worker may declare: tasks held (capacity, as READY and CREDIT
# carry it) and tasks run at once (slots). A capacity as large as the held
# tickets a READY may name, so a returning worker can always name them all;
# slots beyond any machine's processes or useful threads. A worker that
# declared a million took most of a queue while real workers idled: a READY
# or CREDIT beyond these is refused, naming the limit.
MAX_CAPACITY = MAX_HELD_TICKETS
MAX_SLOTS = 4096
MAX_BODY_BYTES = 16 * 1024 * 1024
# The most tasks one SUBMIT may carry: four of our client's batches (2,048),
# half the frames a broker reads in one loop turn. A raw peer's SUBMIT of
# 100,000 tasks took the broker's loop for 2 to 3 s each; it is refused by its
# frame count, before its body is unpacked.
MAX_SUBMIT_TASKS = 8192
# The longest task timeout: a year is beyond any real task, and an infinite or
# astronomic one would overflow the clocks and waits it reaches on a worker.
MAX_TIMEOUT_S = 365 * 24 * 3600
# The error type a CRASHED outcome's report names: its message says how the
# task process ended ("exit code 9", "killed by SIGKILL").
PROCESS_DIED = "ProcessDied"
# The error type of a CRASHED outcome whose task's payload in shared memory
# could not be read (see _shared.read_payload): its message says why.
PAYLOAD_GONE = "SharedPayloadGone"
# Frames at least this large travel without copies (pyzmq's own threshold).
ZERO_COPY_BYTES = 65536

# A payload is bytes, a memoryview or a zmq.Frame: whatever the socket gave us,
# kept as is so that it can be forwarded without a copy.
Payload: TypeAlias = Any


class Cmd(enum.IntEnum):
    """Command bytes. Clients use 1-15, workers 16-23, operators 24-31."""

    HELLO = 1
    WELCOME = 2
    SUBMIT = 3
    ACCEPTED = 4
    RESULTS = 5
    ACK = 6
    CANCEL = 7
    STATUS = 8
    STATUS_REPLY = 9
    HEARTBEAT = 10
    ERROR = 11
    BYE = 12
    READY = 16
    TASKS = 17
    DONE = 18
    DRAIN = 19
    CREDIT = 20
    RELEASE = 21
    # Operator commands (client -> broker), answered by OPERATOR_REPLY.
    LIST_FAILED = 24
    RETRY = 25
    PURGE = 26
    CANCEL_TASK = 27
    OPERATOR_REPLY = 28


class Status(enum.IntEnum):
    """How a task ended. Every status but OK carries an error report payload."""

    OK = 0
    RAISED = 1
    TIMEOUT = 2
    CRASHED = 3
    NOT_FOUND = 4
    REJECTED = 5
    POISON = 6
    EXPIRED = 7
    CANCELLED = 8


class Flags(enum.IntFlag):
    """Per-task flags."""

    NONE = 0
    PICKLED = 1  # the payload is a cloudpickled (callable, args, kwargs)
    # The payload is a list of items: the function is called on each, and the
    # result lists their outcomes (see serialization.pack_batch). How `map`
    # makes a tiny function cost a fraction of a task per item.
    BATCH = 2
    RAW = 4  # the payload is an MDP body, frames packed by mdp.pack_body
    # One item of a batch whose worker died under it: the broker counts that
    # death as the item's first, so that the item that killed the batch runs
    # `max_attempts` times in all, not once in the batch and that many alone.
    SPLIT = 8
    # A map's batch of more than one item, whose client runs the items one by
    # one if it fails whole in one of the ways of `SPLIT_ENDINGS`: the broker
    # counts that ending as split, not failed, and keeps it out of `failed`.
    # Without it (an older client, a batch of one) such an ending is a failure.
    SPLITTABLE = 16
    # The payload frame is a reference into shared memory (see _shared): from
    # a client, offset, length and generation in its arena (`SHARED_REFERENCE`);
    # from the broker, the same followed by the arena's path.
    SHARED = 32


# The type of the TaskRejected a task gets when its payload was sent by
# reference on a connection that has no arena (any more): its client takes
# it as the word to ask for a new one, and sends the task again.
SHARED_MEMORY_GONE = "SharedMemoryGone"
# What a shared payload's frame starts with: offset, length, generation.
SHARED_REFERENCE = struct.Struct("<QQQ")
_SHARED_FLAG = int(Flags.SHARED)


def shared_arena(payload: Payload) -> bytes:
    """The arena (its path) a broker's shared-payload reference points into."""
    return bytes(payload[SHARED_REFERENCE.size :])


def payload_size(payload: Payload, flags: int) -> int:
    """The size of a task's payload: what a shared reference stands for (the
    bytes a worker reads, and a journal writes), or its frame's."""
    if flags & _SHARED_FLAG and len(payload) >= SHARED_REFERENCE.size:
        return int(SHARED_REFERENCE.unpack_from(payload)[1])
    return len(payload)


def payload_bytes(spec: TaskSpec) -> int:
    """`payload_size` of a submitted task."""
    return payload_size(spec.payload, spec.flags)


# How a SPLITTABLE batch may fail whole and still be no failure: its map runs
# the items again one by one, each under its own timeout and result limit
# (`_maps._split_when_failed` on the client's side; a test holds the two
# sides to the same rule). Not a worker's refusal of pickles, which every
# item alone would meet again. A batch whose process died is split whatever
# its size or flags (see `SPLIT`).
SPLIT_ENDINGS = frozenset({Status.TIMEOUT, Status.REJECTED, Status.EXPIRED})
UNSPLIT_ERROR_TYPES = frozenset({"PickleNotAllowed"})


# The ERROR code of a notice, not a refusal: a SUBMIT was accepted, but no
# connected worker serves a function of it, so its tasks wait for one.
UNSERVED = "unserved"
# An ERROR code: the HELLO's session is held by another live client (see
# Scheduler._attach_session); the client asks again until it is free.
SESSION_IN_USE = "session_in_use"
# An ERROR code: the HELLO names a session (or sink) the broker has no room
# for: it remembers `max_sessions` in all, and a connection opens a few at most
# (see SessionRegistry.room_for_new); the message names the limit.
TOO_MANY_SESSIONS = "too_many_sessions"
# An ERROR code: the answer to a question (status, an operator command) from a
# connection that asked more than its quota within a second (see
# `_questions.QuestionQuota`); the message names the limit.
TOO_MANY_QUESTIONS = "too_many_questions"
# An ERROR code: the HELLO names a session the broker keeps for itself (see
# `reserved_session_problem`); asking again changes nothing.
RESERVED_NAME = "reserved_name"
# What the broker names the recipients that are not client sessions: a sink's
# results wait under ``sink:NAME``, an MDP client's (and Titanic's) under
# ``mdp:...``. A client session named so would share their results, both ways.
# The broker's own reruns of failed tasks run under ``ventilator:retry``: a
# client there would count them in its window, and its task ids would hide
# reruns of the same number.
SINK_PREFIX = "sink:"
RESERVED_SESSION_PREFIXES = (SINK_PREFIX, "mdp:", "ventilator:")

# What a task's function is called. A dotted module path, a colon and a public
# name is what workers serve; a pickled callable is ``pickled:`` and a label
# (its qualname, shown to operators; the queue is the pickle queue whatever it
# says). ``mdp:`` names are the broker's MDP services, which only its gateway
# submits (with `Flags.RAW`).
TASK_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z]\w*")
PICKLED_PREFIX = "pickled:"
MDP_PREFIX = "mdp:"
# A plain int: `~` on an IntFlag complements only its known bits.
CLIENT_FLAGS = int(
    Flags.PICKLED | Flags.BATCH | Flags.SPLIT | Flags.SPLITTABLE | Flags.SHARED
)


_CLIENT_FLAGS_SAID = (
    "clients may set PICKLED (1), BATCH (2), SPLIT (8), SPLITTABLE (16) and SHARED (32)"
)


@functools.lru_cache(maxsize=4096)
def submission_problem(function: str, flags: int) -> str | None:
    """Why no worker could ever run a task a client submitted under this name
    and flags, naming the rule it breaks; None when it is a name our clients send.

    Such a task would otherwise wait in a queue nobody serves, for ever.
    Cached: the broker asks for every task, and a SUBMIT's tasks share a name.
    """
    unprintable = _first_unprintable(function)
    if unprintable is not None:
        return (
            f"function {function!r} has the control character {unprintable!r}; "
            "names are printable text (they appear in logs and metric labels)"
        )
    if flags & Flags.RAW:
        return (
            f"task flags {flags} include RAW (4), which only the broker's MDP "
            f"gateway sets; {_CLIENT_FLAGS_SAID}"
        )
    if flags & ~CLIENT_FLAGS:
        return f"task flags {flags} are not a client's: {_CLIENT_FLAGS_SAID}"
    if flags & Flags.SPLITTABLE and not flags & Flags.BATCH:
        return (
            f"task flags {flags}: SPLITTABLE (16) only with BATCH (2); it says "
            "how a map's batch of items is run again when it fails whole"
        )
    if flags & Flags.PICKLED:
        if not function.startswith(PICKLED_PREFIX):
            return (
                f"a pickled callable's name must start with {PICKLED_PREFIX!r}, "
                f"got {function!r}"
            )
        return None
    if function.startswith(PICKLED_PREFIX):
        return (
            f"function {function!r}: names starting {PICKLED_PREFIX!r} are "
            "reserved for pickled callables (flag PICKLED), which a client "
            "sends for a callable it is given, not for a name"
        )
    if function.startswith(MDP_PREFIX):
        return (
            f"function {function!r}: names starting {MDP_PREFIX!r} are the "
            "broker's MDP services; MDP clients reach them"
        )
    if not TASK_NAME.fullmatch(function):
        return (
            f"function {function!r} is not 'module:function' (a dotted module "
            "path, a colon and a public function name), the only names workers "
            "serve"
        )
    return None


def _first_unprintable(name: str) -> str | None:
    # str.isprintable is False for control, format and separator characters
    # other than the plain space: none of them belongs in a name. The whole
    # name is asked first, in C: this runs for every task submitted.
    if name.isprintable():
        return None
    return next(char for char in name if not char.isprintable())


# --- commands ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> broker: open or resume a session, optionally as a named sink.

    `instance` tells one `Client` object from another on the same session: the
    same one reconnecting takes its session back, another is refused while the
    holder is live. None from peers that predate it (they take the session).
    `shared` asks for an arena of shared memory for large payloads: a probe's
    path and token, which prove the client shares the broker's memory, and
    the arena's size in bytes (see _shared).
    """

    session: str
    sink: str | None = None
    instance: int | None = None
    shared: SharedAsk | None = None


@dataclass(frozen=True, slots=True)
class SharedAsk:
    """A peer's proof that it shares the broker's memory (see _shared.Probe),
    and for a client the size of the arena it asks for."""

    probe_path: str
    token: str
    arena_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """Broker -> client: the session is open; these are the broker's limits."""

    window: int
    max_payload_bytes: int
    heartbeat_interval_s: float
    durable: bool = True  # accepted tasks survive a broker restart
    # Payload and result bytes the client may have in the broker; 0: unsaid
    # (a broker from before it said so).
    client_max_bytes: int = 0
    # The file of shared memory the client writes its large payloads into;
    # None: it sends them in frames (see _shared).
    arena: str | None = None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task as a client submits it."""

    task_id: int
    function: str
    payload: Payload
    flags: int = 0
    timeout_s: float | None = None
    retries: int = 0
    sink: str | None = None


@dataclass(frozen=True, slots=True)
class Submit:
    """Client -> broker: a batch of new tasks."""

    tasks: Sequence[TaskSpec]


@dataclass(frozen=True, slots=True)
class Accepted:
    """Broker -> client: these task ids are journalled and will run."""

    task_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """One finished task as the broker reports it to a client or a sink.

    `origin` is empty for the receiver's own tasks; for a sink it names the
    session that submitted the task.
    """

    task_id: int
    status: Status
    payload: Payload
    origin: str = ""


@dataclass(frozen=True, slots=True)
class Results:
    """Broker -> client: a batch of finished tasks."""

    results: Sequence[ResultEntry]


@dataclass(frozen=True, slots=True)
class Ack:
    """Client -> broker: these results arrived; the broker may forget them."""

    keys: Sequence[tuple[str, int]]  # (origin, task_id), origin as in ResultEntry


@dataclass(frozen=True, slots=True)
class Cancel:
    """Client -> broker: cancel these tasks if they have not finished."""

    task_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client -> broker: describe yourself."""


@dataclass(frozen=True, slots=True)
class StatusReply:
    """Broker -> client: workers, queues and clients, as plain data."""

    status: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ListFailed:
    """Operator -> broker: the most recent failed tasks, newest first."""

    limit: int = 100


@dataclass(frozen=True, slots=True)
class Retry:
    """Operator -> broker: run these failed tasks (by ticket) again.

    No tickets means every failed task the broker remembers. The results go to
    the sink `sink`: the original recipient already has its failure.
    """

    tickets: Sequence[int]
    sink: str


@dataclass(frozen=True, slots=True)
class Purge:
    """Operator -> broker: cancel every task waiting in the queue of `function`;
    or, given `session` instead, drop all the broker holds for that session
    (results waiting for it, tasks it submitted), if it is not connected."""

    function: str = ""
    session: str | None = None


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Operator -> broker: cancel one task, named by its session and task id."""

    session: str
    task_id: int


@dataclass(frozen=True, slots=True)
class OperatorReply:
    """Broker -> operator: what an operator command did, as plain data."""

    report: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either way: I am alive."""


@dataclass(frozen=True, slots=True)
class Error:
    """Broker -> peer: your last message was refused, and why."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Bye:
    """Peer -> broker: I am leaving on purpose."""


@dataclass(frozen=True, slots=True)
class Drain:
    """Worker -> broker: send me nothing more; I leave once my tasks are done."""


@dataclass(frozen=True, slots=True)
class Credit:
    """Worker -> broker: from now on, hold at most `capacity` tasks for me."""

    capacity: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker -> broker: register, or re-register after a broker restart."""

    worker_id: str
    services: Sequence[str]
    capacity: int
    allow_pickle: bool = False
    # The tasks it runs at once, when it leaves the broker to judge per
    # function how many more to hold (adaptive prefetch); None: its capacity
    # alone limits what it is sent (a fixed prefetch, an older worker).
    slots: int | None = None
    # Why it serves nothing (its task processes cannot start, every slot holds
    # a stuck thread): shown to operators in the status. Sent only when set,
    # so that a healthy worker's READY still reads to a broker that predates it.
    problem: str | None = None
    # The tasks it still holds and will report, as (ticket, attempt), when it
    # registers again: the broker keeps them with it instead of running them
    # again elsewhere. Sent only when there are some, as `problem` is.
    held: Sequence[tuple[int, int]] = ()
    # Its proof that it shares the broker's memory: then it is sent large
    # payloads by reference (see _shared).
    shared: SharedAsk | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Broker -> worker: these tasks are no longer yours: drop them, stop
    those running, and report none (a result would be dropped as late).

    Sent after the WELCOME for tasks a READY named that the broker did not
    keep (finished, another worker's, or fenced after a restart), and for
    tasks the worker holds whose clients cancelled them, or whose deadline
    the broker saw pass. A worker from before it logs it as a malformed
    message and runs them on.
    """

    tickets: Sequence[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Assignment:
    """One task handed to a worker. `ticket` is the broker's own task number."""

    ticket: int
    attempt: int
    function: str
    payload: Payload
    flags: int = 0
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Tasks:
    """Broker -> worker: a batch of assignments."""

    tasks: Sequence[Assignment]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One task's end as a worker reports it, fenced by its attempt number."""

    ticket: int
    attempt: int
    status: Status
    payload: Payload
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Done:
    """Worker -> broker: a batch of outcomes."""

    outcomes: Sequence[Outcome] = field(default_factory=list)


Command: TypeAlias = (
    Hello
    | Welcome
    | Submit
    | Accepted
    | Results
    | Ack
    | Cancel
    | StatusRequest
    | StatusReply
    | ListFailed
    | Retry
    | Purge
    | CancelTask
    | OperatorReply
    | Heartbeat
    | Error
    | Bye
    | Drain
    | Credit
    | Release
    | Ready
    | Tasks
    | Done
)

OPERATOR_COMMANDS = frozenset({Cmd.LIST_FAILED, Cmd.RETRY, Cmd.PURGE, Cmd.CANCEL_TASK})
OperatorCommand: TypeAlias = ListFailed | Retry | Purge | CancelTask
OPERATOR_TYPES = (ListFailed, Retry, Purge, CancelTask)
# Questions: answered in order, and bounded per connection (a status report
# is costly to build); what the broker counts against a sender's quota.
QUESTION_TYPES = (StatusRequest, *OPERATOR_TYPES)

FROM_CLIENT = (
    frozenset(
        {Cmd.HELLO, Cmd.SUBMIT, Cmd.ACK, Cmd.CANCEL, Cmd.STATUS, Cmd.HEARTBEAT, Cmd.BYE}
    )
    | OPERATOR_COMMANDS
)
FROM_WORKER = frozenset(
    {Cmd.READY, Cmd.DONE, Cmd.DRAIN, Cmd.CREDIT, Cmd.HEARTBEAT, Cmd.BYE}
)
TO_CLIENT = frozenset(
    {
        Cmd.WELCOME,
        Cmd.ACCEPTED,
        Cmd.RESULTS,
        Cmd.STATUS_REPLY,
        Cmd.OPERATOR_REPLY,
        Cmd.HEARTBEAT,
        Cmd.ERROR,
    }
)
TO_WORKER = frozenset({Cmd.WELCOME, Cmd.TASKS, Cmd.HEARTBEAT, Cmd.ERROR, Cmd.RELEASE})


# --- field checks -----------------------------------------------------------------


# Counts are 64-bit signed on the wire.
_COUNT_LIMIT = 2**63
_STATUSES = {int(status): status for status in Status}


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # The usual case first, in one comparison: these checks run for every field
    # of every message, and msgpack gives exact types.
    if type(value) is kind:
        return value
    # bool is an int to Python, never to us.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{what} must be {_kind_name(kind)}, got {_short(value)}")
    return value


# reprlib stops at a depth and a length, so a hostile body cannot make the error
# message itself expensive (or recurse without end).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def name_problem(value: str, what: str) -> str | None:
    """Why `value` cannot be the name field `what` (session, sink, ...) of a
    message; None when the broker accepts it. Peers check their own names
    with it, so that a name the broker would refuse fails where it is given."""
    if not value or len(value) > MAX_NAME_LENGTH:
        return f"{what} must be 1 to {MAX_NAME_LENGTH} characters, got {len(value)}"
    return None


def label_problem(value: str, what: str) -> str | None:
    """`name_problem`, and no control characters: for the names that stand for
    a peer (session, sink, worker), which reach log lines and status tables,
    where a newline would forge a line. Function names have their own check
    (`submission_problem`), per task."""
    problem = name_problem(value, what)
    unprintable = None if problem else _first_unprintable(value)
    if unprintable is not None:
        return (
            f"{what} {_short(value)} has the control character {unprintable!r}; "
            "names are printable text (they appear in logs and status)"
        )
    return problem


def reserved_session_problem(session: str) -> str | None:
    """Why a client may not open `session`: the broker keeps names starting
    with `RESERVED_SESSION_PREFIXES` for sinks, MDP clients and its own reruns
    (sessions and sinks are separate namespaces); None when the name is free
    to take."""
    if not session.startswith(RESERVED_SESSION_PREFIXES):
        return None
    prefixes = " or ".join(repr(prefix) for prefix in RESERVED_SESSION_PREFIXES)
    return (
        f"session {_short(session)} starts with a prefix the broker keeps for "
        f"its own names ({prefixes}: sinks, MDP clients and its reruns of "
        "failed tasks), whose tasks and results it would share; name the "
        "session otherwise (a sink is received with Sink(name) or "
        "`ventilator sink NAME`)"
    )


def _label(value: Any, what: str) -> str:
    name = _name(value, what)
    problem = label_problem(name, what)
    if problem is not None:
        raise ProtocolError(problem)
    return name


def _name(value: Any, what: str) -> str:
    _expect(value, str, what)
    problem = name_problem(value, what)
    if problem is not None:
        raise ProtocolError(problem)
    return str(value)


def _optional_label(value: Any, what: str) -> str | None:
    return None if value is None else _label(value, what)


def _optional_count(value: Any, what: str) -> int | None:
    return None if value is None else _count(value, what)


def _count(value: Any, what: str) -> int:
    # Fast path for the usual case: a plain int (never a bool) in range.
    if type(value) is int and 0 <= value < _COUNT_LIMIT:
        return value
    _expect(value, int, what)
    if value < 0 or value >= _COUNT_LIMIT:
        raise ProtocolError(
            f"{what} must be a non-negative 64-bit integer (0 to 2**63-1), "
            f"got {_short(value)}"
        )
    return int(value)


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    _expect(value, (int, float), "timeout_s")
    # `not 0 < value` also refuses NaN, which compares false with everything.
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ProtocolError(
            f"timeout_s must be positive and at most {MAX_TIMEOUT_S} seconds "
            f"(a year), got {_short(value)}"
        )
    return float(value)


def _status(value: Any) -> Status:
    # A lookup, not Status(value): an enum call costs a few µs per outcome.
    status = _STATUSES.get(value) if type(value) is int else None
    if status is not None:
        return status
    try:
        return Status(_count(value, "status"))
    except ValueError:
        raise ProtocolError(f"unknown status {value!r}") from None


def _rows(body: Any, payloads: Sequence[Payload], width: int, what: str) -> list[Any]:
    """Check a batch body: a list of `width`-field rows, one payload each."""
    _expect(body, list, f"{what} body")
    if len(body) != len(payloads):
        raise ProtocolError(
            f"{what} has {len(body)} entries but {len(payloads)} payload frames"
        )
    for row in body:
        if not isinstance(row, list) or len(row) != width:
            raise ProtocolError(f"each {what} entry must be a list of {width} fields")
    return list(body)


def _no_payloads(payloads: Sequence[Payload], what: str) -> None:
    if payloads:
        raise ProtocolError(f"{what} takes no payload frames, got {len(payloads)}")


# --- per-command codecs ---------------------------------------------------------
# Each encoder returns (command byte, body, payload frames); each decoder takes the
# unpacked body and the payload frames and returns the command.


def _encode(command: Command) -> tuple[Cmd, Any, Sequence[Payload]]:
    encoder = _ENCODERS.get(type(command))
    if encoder is None:
        raise TypeError(f"not a ventilator command: {command!r}")
    return encoder(command)


_ENCODERS: dict[type, Callable[[Any], tuple[Cmd, Any, Sequence[Payload]]]] = {
    Hello: lambda c: (Cmd.HELLO, _hello_body(c), ()),
    Welcome: lambda c: (
        Cmd.WELCOME,
        [
            c.window,
            c.max_payload_bytes,
            c.heartbeat_interval_s,
            c.durable,
            c.client_max_bytes,
            *([] if c.arena is None else [c.arena]),
        ],
        (),
    ),
    Submit: lambda c: (
        Cmd.SUBMIT,
        [
            [t.task_id, t.function, t.flags, t.timeout_s, t.retries, t.sink]
            for t in c.tasks
        ],
        [t.payload for t in c.tasks],
    ),
    Accepted: lambda c: (Cmd.ACCEPTED, list(c.task_ids), ()),
    Results: lambda c: (
        Cmd.RESULTS,
        [[r.task_id, int(r.status), r.origin] for r in c.results],
        [r.payload for r in c.results],
    ),
    Ack: lambda c: (Cmd.ACK, [list(key) for key in c.keys], ()),
    Cancel: lambda c: (Cmd.CANCEL, list(c.task_ids), ()),
    StatusRequest: lambda c: (Cmd.STATUS, None, ()),
    StatusReply: lambda c: (Cmd.STATUS_REPLY, c.status, ()),
    ListFailed: lambda c: (Cmd.LIST_FAILED, c.limit, ()),
    Retry: lambda c: (Cmd.RETRY, [list(c.tickets), c.sink], ()),
    # A session's purge is a map, so that the old form (a bare function name)
    # keeps its meaning on the wire.
    Purge: lambda c: (
        Cmd.PURGE,
        c.function if c.session is None else {"session": c.session},
        (),
    ),
    CancelTask: lambda c: (Cmd.CANCEL_TASK, [c.session, c.task_id], ()),
    OperatorReply: lambda c: (Cmd.OPERATOR_REPLY, c.report, ()),
    Heartbeat: lambda c: (Cmd.HEARTBEAT, None, ()),
    Error: lambda c: (Cmd.ERROR, [c.code, c.message], ()),
    Bye: lambda c: (Cmd.BYE, None, ()),
    Drain: lambda c: (Cmd.DRAIN, None, ()),
    Credit: lambda c: (Cmd.CREDIT, c.capacity, ()),
    Release: lambda c: (Cmd.RELEASE, [list(entry) for entry in c.tickets], ()),
    Ready: lambda c: (Cmd.READY, _ready_body(c), ()),
    Tasks: lambda c: (
        Cmd.TASKS,
        [[a.ticket, a.attempt, a.function, a.flags, a.timeout_s] for a in c.tasks],
        [a.payload for a in c.tasks],
    ),
    Done: lambda c: (
        Cmd.DONE,
        [[o.ticket, o.attempt, int(o.status), o.duration_s] for o in c.outcomes],
        [o.payload for o in c.outcomes],
    ),
}


def _hello_body(hello: Hello) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session": hello.session,
        "sink": hello.sink,
        "instance": hello.instance,
    }
    if hello.shared is not None:
        body["shared"] = _shared_body(hello.shared)
    return body


def _shared_body(shared: SharedAsk) -> list[Any]:
    return [shared.probe_path, shared.token, shared.arena_bytes]


def _ready_body(ready: Ready) -> list[Any]:
    # Optional fields trail, each sent only when it or one after it is set,
    # so that a READY without them reads to brokers that predate them.
    body = [
        ready.worker_id,
        list(ready.services),
        ready.capacity,
        ready.allow_pickle,
        ready.slots,
    ]
    held = [list(entry) for entry in ready.held]
    if ready.shared is not None:
        return [*body, ready.problem, held, _shared_body(ready.shared)]
    if ready.held:
        return [*body, ready.problem, held]
    return body if ready.problem is None else [*body, ready.problem]


def _decode_hello(body: Any, payloads: Sequence[Payload]) -> Hello:
    _no_payloads(payloads, "HELLO")
    _expect(body, dict, "HELLO body")
    shared = body.get("shared")
    return Hello(
        session=_label(body.get("session"), "session"),
        sink=_optional_label(body.get("sink"), "sink"),
        instance=_optional_count(body.get("instance"), "instance"),
        shared=None if shared is None else _shared_ask(shared),
    )


def _shared_ask(value: Any) -> SharedAsk:
    path, token, arena_bytes = _fixed(value, 3, "shared ([probe path, token, size])")
    path = _name(path, "shared probe path")
    token = _name(token, "shared token")
    return SharedAsk(path, token, _count(arena_bytes, "shared arena size"))


def _decode_welcome(body: Any, payloads: Sequence[Payload]) -> Welcome:
    _no_payloads(payloads, "WELCOME")
    if not isinstance(body, list) or not 4 <= len(body) <= 6:
        raise ProtocolError("WELCOME must be a list of 4 to 6 fields")
    # Fields a broker leaves off: `client_max_bytes` (older brokers), `arena`
    # (no shared memory).
    fields: list[Any] = [*body, 0, None][:6] if len(body) == 4 else [*body, None][:6]
    window, max_payload, interval, durable, max_bytes, arena = fields
    return Welcome(
        _count(window, "window"),
        _count(max_payload, "max_payload_bytes"),
        float(_expect(interval, (int, float), "heartbeat_interval_s")),
        bool(_expect(durable, bool, "durable")),
        _count(max_bytes, "client_max_bytes"),
        None if arena is None else _name(arena, "arena"),
    )


def _decode_submit(body: Any, payloads: Sequence[Payload]) -> Submit:
    rows = _rows(body, payloads, 6, "SUBMIT")
    if not rows:
        raise ProtocolError("SUBMIT must carry at least one task")
    return Submit(
        [
            _checked_task(task_id, function, payload, flags, timeout_s, retries, sink)
            for (task_id, function, flags, timeout_s, retries, sink), payload in zip(
                rows, payloads, strict=True
            )
        ]
    )


def _checked_task(
    task_id: Any,
    function: Any,
    payload: Payload,
    flags: Any,
    timeout_s: Any,
    retries: Any,
    sink: Any,
) -> TaskSpec:
    """A task of a SUBMIT, each field checked by the rules of the wire."""
    fields = _task_fields(task_id, function, flags, timeout_s, retries, sink)
    task_id, function, flags, timeout_s, retries, sink = fields
    return TaskSpec(task_id, function, payload, flags, timeout_s, retries, sink)


def _task_fields(
    task_id: Any, function: Any, flags: Any, timeout_s: Any, retries: Any, sink: Any
) -> tuple[int, str, int, float | None, int, str | None]:
    # The one list of a task's rules: the decoder's and task_problem's.
    return (
        _count(task_id, "task_id"),
        _name(function, "function"),
        _count(flags, "flags"),
        _timeout(timeout_s),
        _count(retries, "retries"),
        # A sink's HELLO refuses control characters: a task naming such a
        # sink could never be received.
        _optional_label(sink, "sink"),
    )


def task_problem(spec: TaskSpec) -> str | None:
    """Why a broker would refuse the SUBMIT that carries this task as malformed,
    naming the field and the rule; None when every field is within the rules.

    The same checks as the broker's decoder (`_task_fields`), so that a client
    can refuse a bad task alone at submit time instead of having its whole
    message refused.
    """
    try:
        _task_fields(
            spec.task_id,
            spec.function,
            spec.flags,
            spec.timeout_s,
            spec.retries,
            spec.sink,
        )
    except ProtocolError as exc:
        return str(exc)
    return None


def _decode_ids(body: Any, payloads: Sequence[Payload], what: str) -> list[int]:
    _no_payloads(payloads, what)
    _expect(body, list, f"{what} body")
    return [_count(task_id, "task_id") for task_id in body]


def _decode_results(body: Any, payloads: Sequence[Payload]) -> Results:
    rows = _rows(body, payloads, 3, "RESULTS")
    return Results(
        [
            ResultEntry(
                _count(task_id, "task_id"),
                _status(status),
                payload,
                str(_expect(origin, str, "origin")),
            )
            for (task_id, status, origin), payload in zip(rows, payloads, strict=True)
        ]
    )


def _decode_ack(body: Any, payloads: Sequence[Payload]) -> Ack:
    _no_payloads(payloads, "ACK")
    _expect(body, list, "ACK body")
    keys = []
    for key in body:
        origin, task_id = _fixed(key, 2, "ACK entry")
        keys.append((str(_expect(origin, str, "origin")), _count(task_id, "task_id")))
    return Ack(keys)


def _decode_error(body: Any, payloads: Sequence[Payload]) -> Error:
    _no_payloads(payloads, "ERROR")
    code, message = _fixed(body, 2, "ERROR")
    return Error(str(_expect(code, str, "code")), str(_expect(message, str, "message")))


def _decode_status_reply(body: Any, payloads: Sequence[Payload]) -> StatusReply:
    _no_payloads(payloads, "STATUS_REPLY")
    return StatusReply(_expect(body, dict, "STATUS_REPLY body"))


def _decode_list_failed(body: Any, payloads: Sequence[Payload]) -> ListFailed:
    _no_payloads(payloads, "LIST_FAILED")
    return ListFailed(_count(body, "limit"))


def _decode_retry(body: Any, payloads: Sequence[Payload]) -> Retry:
    _no_payloads(payloads, "RETRY")
    tickets, sink = _fixed(body, 2, "RETRY")
    _expect(tickets, list, "tickets")
    return Retry([_count(t, "ticket") for t in tickets], _label(sink, "sink"))


def _decode_purge(body: Any, payloads: Sequence[Payload]) -> Purge:
    _no_payloads(payloads, "PURGE")
    if isinstance(body, dict):
        return Purge(session=_label(body.get("session"), "session"))
    return Purge(_name(body, "function"))


def _decode_cancel_task(body: Any, payloads: Sequence[Payload]) -> CancelTask:
    _no_payloads(payloads, "CANCEL_TASK")
    session, task_id = _fixed(body, 2, "CANCEL_TASK")
    return CancelTask(_label(session, "session"), _count(task_id, "task_id"))


def _decode_operator_reply(body: Any, payloads: Sequence[Payload]) -> OperatorReply:
    _no_payloads(payloads, "OPERATOR_REPLY")
    return OperatorReply(_expect(body, dict, "OPERATOR_REPLY body"))


def _decode_ready(body: Any, payloads: Sequence[Payload]) -> Ready:
    _no_payloads(payloads, "READY")
    if not isinstance(body, list) or not 4 <= len(body) <= 8:
        raise ProtocolError("READY must be a list of 4 to 8 fields")
    # Fields a worker leaves off: `slots` (older workers), `problem` (healthy),
    # `held` (nothing held), `shared` (no shared memory).
    fields: list[Any] = [*body, *[None] * (8 - len(body))]
    worker_id, services, capacity, allow_pickle, slots, problem, held, shared = fields
    _expect(services, list, "services")
    capacity = _declared(capacity, "capacity", MAX_CAPACITY)
    if slots is not None:
        _declared(slots, "slots", MAX_SLOTS)
    return Ready(
        worker_id=_label(worker_id, "worker_id"),
        services=[_label(service, "service") for service in services],
        capacity=capacity,
        allow_pickle=bool(_expect(allow_pickle, bool, "allow_pickle")),
        slots=slots,
        problem=None if problem is None else _problem(problem),
        held=() if held in (None, []) else _ticket_attempts(held),
        shared=None if shared is None else _shared_ask(shared),
    )


def _ticket_attempts(value: Any, what: str = "held") -> list[tuple[int, int]]:
    """The tickets a READY names as held, or a RELEASE gives back: bounded,
    well formed, each once."""
    _expect(value, list, what)
    if len(value) > MAX_HELD_TICKETS:
        raise ProtocolError(
            f"{what} names {len(value)} tickets, more than {MAX_HELD_TICKETS}"
        )
    pairs: dict[int, int] = {}
    for entry in value:
        ticket, attempt = _fixed(entry, 2, f"each {what} entry ([ticket, attempt])")
        ticket = _count(ticket, f"{what} ticket")
        attempt = _count(attempt, f"{what} attempt")
        if attempt < 1:
            raise ProtocolError(
                f"{what} ticket {ticket} has attempt 0; attempts start at 1"
            )
        if ticket in pairs:
            raise ProtocolError(f"{what} names ticket {ticket} more than once")
        pairs[ticket] = attempt
    return list(pairs.items())


def _decode_release(body: Any, payloads: Sequence[Payload]) -> Release:
    _no_payloads(payloads, "RELEASE")
    return Release(_ticket_attempts(body, "released"))


def _problem(value: Any) -> str:
    text = str(_expect(value, str, "problem"))
    if len(text) > MAX_PROBLEM_LENGTH:
        raise ProtocolError(f"problem is longer than {MAX_PROBLEM_LENGTH} characters")
    return text


def _decode_credit(body: Any, payloads: Sequence[Payload]) -> Credit:
    _no_payloads(payloads, "CREDIT")
    return Credit(_declared(body, "capacity", MAX_CAPACITY))


def _declared(value: Any, what: str, most: int) -> int:
    """A count a worker declares of itself (capacity, slots): 1 to `most`."""
    count = _count(value, what)
    if count < 1:
        raise ProtocolError(f"{what} must be at least 1")
    if count > most:
        raise ProtocolError(
            f"{what} {count} is over the most a worker may declare ({most}); "
            f"a worker must register with {what} <= {most}"
        )
    return count


def _decode_tasks(body: Any, payloads: Sequence[Payload]) -> Tasks:
    rows = _rows(body, payloads, 5, "TASKS")
    return Tasks(
        [
            Assignment(
                ticket=_count(ticket, "ticket"),
                attempt=_count(attempt, "attempt"),
                function=_name(function, "function"),
                payload=payload,
                flags=_count(flags, "flags"),
                timeout_s=_timeout(timeout_s),
            )
            for (ticket, attempt, function, flags, timeout_s), payload in zip(
                rows, payloads, strict=True
            )
        ]
    )


def _decode_done(body: Any, payloads: Sequence[Payload]) -> Done:
    rows = _rows(body, payloads, 4, "DONE")
    return Done(
        [
            Outcome(
                ticket=_count(ticket, "ticket"),
                attempt=_count(attempt, "attempt"),
                status=_status(status),
                payload=payload,
                duration_s=float(_expect(duration, (int, float), "duration_s")),
            )
            for (ticket, attempt, status, duration), payload in zip(
                rows, payloads, strict=True
            )
        ]
    )


def _fixed(body: Any, width: int, what: str) -> list[Any]:
    if not isinstance(body, list) or len(body) != width:
        raise ProtocolError(f"{what} must be a list of {width} fields")
    return list(body)


def _bare(command: Command) -> Callable[[Any, Sequence[Payload]], Command]:
    def decode(body: Any, payloads: Sequence[Payload]) -> Command:
        _no_payloads(payloads, type(command).__name__.upper())
        return command

    return decode


_DECODERS: dict[Cmd, Callable[[Any, Sequence[Payload]], Command]] = {
    Cmd.HELLO: _decode_hello,
    Cmd.WELCOME: _decode_welcome,
    Cmd.SUBMIT: _decode_submit,
    Cmd.ACCEPTED: lambda body, p: Accepted(_decode_ids(body, p, "ACCEPTED")),
    Cmd.RESULTS: _decode_results,
    Cmd.ACK: _decode_ack,
    Cmd.CANCEL: lambda body, p: Cancel(_decode_ids(body, p, "CANCEL")),
    Cmd.STATUS: _bare(StatusRequest()),
    Cmd.STATUS_REPLY: _decode_status_reply,
    Cmd.LIST_FAILED: _decode_list_failed,
    Cmd.RETRY: _decode_retry,
    Cmd.PURGE: _decode_purge,
    Cmd.CANCEL_TASK: _decode_cancel_task,
    Cmd.OPERATOR_REPLY: _decode_operator_reply,
    Cmd.HEARTBEAT: _bare(Heartbeat()),
    Cmd.ERROR: _decode_error,
    Cmd.BYE: _bare(Bye()),
    Cmd.DRAIN: _bare(Drain()),
    Cmd.CREDIT: _decode_credit,
    Cmd.RELEASE: _decode_release,
    Cmd.READY: _decode_ready,
    Cmd.TASKS: _decode_tasks,
    Cmd.DONE: _decode_done,
}


# --- the public pair ----------------------------------------------------------------


def encode(command: Command) -> list[Payload]:
    """Turn a command into the frames to send (without any routing id)."""
    cmd, body, payloads = _encode(command)
    return [HEADER, bytes((cmd,)), msgpack.packb(body), *payloads]


def small(frames: Sequence[Payload]) -> bool:
    """Whether copying `frames` into libzmq beats lending them (zero-copy).

    Lending costs pyzmq a Frame object and a release callback per frame, which
    outweighs a memcpy for anything smaller than its own 64 KiB threshold.
    """
    # map, not a generator: this runs for every message sent.
    return max(map(len, frames), default=0) < ZERO_COPY_BYTES


def decode(
    frames: Sequence[Payload],
    allowed: frozenset[Cmd],
    max_submit_tasks: int = MAX_SUBMIT_TASKS,
) -> Command:
    """Turn received frames into a command, if it is one `allowed` here; a
    SUBMIT of more than `max_submit_tasks` tasks is refused whole.

    Raises:
        ProtocolError: on anything malformed; `code` says which kind of fault.
    """
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}", "frames")

    header = bytes(frames[0])
    if header != HEADER:
        raise ProtocolError(f"unknown protocol header {header[:16]!r}", "header")

    cmd = _command_byte(bytes(frames[1]), allowed)
    if cmd is Cmd.SUBMIT and len(frames) - 3 > max_submit_tasks:
        raise _too_many_tasks(len(frames) - 3, max_submit_tasks)
    body = _unpack(frames[2])
    try:
        return _DECODERS[cmd](body, frames[3:])
    except ProtocolError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:
        # A shape we did not foresee, e.g. unpacking a row of the wrong kind.
        raise ProtocolError(f"malformed {cmd.name}: {unpack_failure(exc)}") from exc


_COMMANDS = {int(cmd): cmd for cmd in Cmd}


def _too_many_tasks(count: int, limit: int) -> ProtocolError:
    # Counted by payload frames, one per task: nothing is unpacked for it.
    return ProtocolError(
        f"SUBMIT carries {count} tasks, over the {limit} one message may "
        "carry (the broker's client_window, and at most "
        f"{MAX_SUBMIT_TASKS}); send them in smaller batches, within the window",
        "size",
    )


def _command_byte(raw: bytes, allowed: frozenset[Cmd]) -> Cmd:
    if len(raw) != 1:
        raise ProtocolError("command frame must be exactly one byte", "command")
    try:
        # A lookup, not Cmd(byte): an enum call costs a few µs per message.
        cmd = _COMMANDS[raw[0]]
    except KeyError:
        raise ProtocolError(f"unknown command byte {raw[0]}", "command") from None
    if cmd not in allowed:
        raise ProtocolError(f"{cmd.name} is not accepted on this socket", "command")
    return cmd


def _unpack(frame: Payload) -> Any:
    if len(frame) > MAX_BODY_BYTES:
        raise ProtocolError(f"body frame over {MAX_BODY_BYTES} bytes", "size")
    try:
        return msgpack.unpackb(frame, use_list=True, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a family of unrelated types
        reason = unpack_failure(exc)
        raise ProtocolError(
            f"body is not valid msgpack: {reason} (body starts {bytes(frame[:16])!r})",
            "body",
        ) from exc


def unpack_failure(exc: Exception) -> str:
    """What a failed msgpack unpack (or decode) says, or what its type means
    when it says nothing, so that no error message ends in an empty reason."""
    message = str(exc)
    if message:
        return message
    # msgpack's FormatError carries no text; the byte 0xc1 is its usual cause.
    return _SILENT_ERRORS.get(type(exc), type(exc).__name__)


_SILENT_ERRORS: dict[type, str] = {
    msgpack.FormatError: "a byte that starts no msgpack value (0xc1 is reserved)",
    msgpack.StackError: "values nested too deeply",
}

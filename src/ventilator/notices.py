"""What the scheduler tells the broker's log: one notice per event worth a line.

The scheduler touches no logger (see `scheduler`); it puts these values in
`Effects.notices`, and the broker's shell words and levels them. Each is plain,
frozen data, so a test asserts on what happened, not on how a log line reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import protocol as p


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    """A worker registered. `capacity` is its credit, the tasks it may hold,
    which grows as its tasks turn out tiny; `slots` the tasks it runs at
    once, which does not (None: it did not say, as with a fixed prefetch)."""

    worker_id: str
    services: tuple[str, ...]
    capacity: int
    slots: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerReturned:
    """A worker registered again naming the tasks it still holds: `kept` of
    them stay with it; `taken_back` of them it took back from their queues,
    where they went when it was dropped or lost (or the broker restarted),
    before any other worker started them; `requeued` it held and no longer
    names went back to their queues; `refused` it names are done, unknown or
    another's (it is told to stop them, see `p.Release`; results of theirs
    are dropped as late). `same_connection`: it registered again without
    reconnecting, serving the same functions, as it does to hand back the
    tasks it has not started while every slot runs a long one."""

    worker_id: str
    kept: int
    requeued: int
    refused: int
    taken_back: int = 0
    same_connection: bool = False


@dataclass(frozen=True, slots=True)
class WorkerDraining:
    worker_id: str
    running: int


class Fault(enum.Enum):
    """Whose fault a worker's removal is, which decides what its tasks get."""

    NONE = "none"  # replaced, revoked, or cut off by the broker's own stall
    LOST = "lost"  # silent or unreachable: each of its tasks gets a strike
    # It let deadlines pass: its tasks are requeued unblamed (it, not they,
    # is at fault), and the operator is warned even if it held nothing more.
    MISBEHAVED = "misbehaved"


@dataclass(frozen=True, slots=True)
class WorkerLost:
    worker_id: str
    reason: str
    requeued: int
    poisoned: int
    split: int = 0  # map batches handed back to their maps, item by item
    fault: Fault = Fault.LOST


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    """A worker said goodbye: a departure, not a fault. `requeued` counts the
    tasks it had not finished (it was told to leave at once)."""

    worker_id: str
    requeued: int


@dataclass(frozen=True, slots=True)
class LeaseOverrun:
    """A worker let tasks run `grace_s` past their timeout without reporting
    them, and the broker ended them as timed out: `count` of them in one
    tick (one notice, not one per task: a hoarder may hold hundreds), the
    first of them `(ticket, attempt)` with its `timeout_s`. `overruns`: how
    many in a row that worker let pass."""

    worker_id: str
    count: int
    first: tuple[int, int]
    timeout_s: float
    grace_s: float
    overruns: int


@dataclass(frozen=True, slots=True)
class LateOutcome:
    ticket: int
    attempt: int
    worker_id: str
    # Of a task the worker was told to give up (see Worker.released): sent
    # again on its return, or crossing the RELEASE; no fault of anyone's.
    released: bool = False


@dataclass(frozen=True, slots=True)
class ClientJoined:
    recipient: str
    resent: int


class Departure(enum.Enum):
    """How a client or sink stopped receiving its results."""

    LEFT = "left"  # it said BYE
    SILENT = "silent"  # given up on after liveness x heartbeat of silence
    UNREACHABLE = "unreachable"  # a send to it failed
    # A send to it failed just after the broker stood still: it gave up on the
    # silent broker's connection, and reconnects on a new one.
    CUT_BY_STALL = "cut by stall"
    REVOKED = "revoked"  # its key lost access (see Scheduler.revoke_client)


@dataclass(frozen=True, slots=True)
class ClientLost:
    """A client or sink stopped receiving: `held` results (pending or sent
    and unacknowledged) wait for it to come back."""

    recipient: str
    held: int
    how: Departure
    # Its session's other tasks in the broker (queued, running, or their
    # results on their way to a sink): they go on for it.
    unfinished: int = field(default=0, compare=False)
    # The connection it was reached on, for the shell, which knows which of
    # its sends failed and why; not part of what happened.
    peer: bytes = field(default=b"", compare=False)
    # Its join was never said (it only asked questions): its leaving is no
    # news either.
    quiet: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A task refused as it was submitted. `refusing_all`: the broker refused
    every new task then (full, or its disk nearly so), not just this one (its
    size, its client's rights or window)."""

    session: str
    task_id: int
    reason: str
    refusing_all: bool = False


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A task failed for a reason of the broker's or its worker's (it killed
    its process `max_attempts` times, or ran past its timeout), not one its
    function raised: its client hears it, and so should the operator."""

    ticket: int
    function: str
    session: str
    task_id: int
    outcome: str  # "poison", "timeout"
    reason: str
    worker: str | None


@dataclass(frozen=True, slots=True)
class OperatorActed:
    """An operator command that changes what the broker holds (retry, purge,
    cancel) was carried out: the log keeps who asked for what, and what it
    did, for whoever wonders later where the work went."""

    client: str
    command: p.Retry | p.Purge | p.CancelTask
    report: dict[str, object]  # the operator's answer


@dataclass(frozen=True, slots=True)
class ResultsExpired:
    count: int


@dataclass(frozen=True, slots=True)
class OrphansDropped:
    """The broker reached `limit` (max_queued_tasks or max_queued_bytes) and
    made room by dropping `count` results of `sessions` client sessions that
    had had no client connected for `grace_s` (orphan_grace_s) or longer:
    each is a tombstone now, as an expired result is."""

    count: int
    sessions: int
    limit: str
    grace_s: float


@dataclass(frozen=True, slots=True)
class TombstonesForgotten:
    """Tombstones of expired results kept another `ttl_s` were forgotten."""

    count: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class SinkTaken:
    """A second process asked to receive a sink that one already receives;
    `first` is False when the same process asked again."""

    sink: str
    first: bool


@dataclass(frozen=True, slots=True)
class SessionHeld:
    """A second live client asked for a session that one already holds;
    `first` is False when the same client asked again."""

    session: str
    first: bool


@dataclass(frozen=True, slots=True)
class SessionsForgotten:
    """Sessions (or sinks) that left owing and holding nothing were forgotten,
    `grace_s` (session_grace_s) after they were last heard."""

    count: int
    grace_s: float


@dataclass(frozen=True, slots=True)
class SessionRefused:
    """A HELLO named a new session the broker has no room for; `reason` names
    the limit."""

    session: str
    reason: str


@dataclass(frozen=True, slots=True)
class FailureForgotten:
    """The oldest failure records made room for new ones (`failed_kept`)."""

    count: int
    kept: int


Notice = (
    WorkerJoined
    | WorkerReturned
    | WorkerDraining
    | WorkerLost
    | WorkerLeft
    | LeaseOverrun
    | LateOutcome
    | ClientJoined
    | ClientLost
    | Rejected
    | TaskFailed
    | OperatorActed
    | ResultsExpired
    | OrphansDropped
    | TombstonesForgotten
    | SinkTaken
    | SessionHeld
    | SessionsForgotten
    | SessionRefused
    | FailureForgotten
)

"""The broker's brain: a sans-IO state machine.

Commands from clients and workers go in (`client_command`, `worker_command`),
with the current time; so does the passing of time (`tick`). After a loop turn
the broker calls `flush`, which dispatches queued tasks to workers with free
credit and hands back `Effects`: what to journal, what to send to whom, and
notices for the operator's log. No sockets, clock, threads or logging here.

Every accepted task is in exactly one state::

    QUEUED ──dispatch──▶ RUNNING ──outcome──▶ FINISHED ──ack──▶ (forgotten)
      ▲  ▲                  │  │
      │  └──worker died─────┘  └──raised, retries left──▶ WAITING ──due──┐
      └────────────────────────────────────────────────────────────────────┘

A task whose worker died `max_attempts` times finishes as POISON (a map's batch
at its first death, see `_died_running`); a cancelled task finishes as
CANCELLED. A task its submitter cancels while a worker holds it is taken back
from that worker (RELEASE: it stops the task) and dropped at once, result and
all, never requeued; the journal forgets it, so a restart does not queue it
again.
A worker never holds more tasks than its capacity.
Results of one attempt only count while that attempt is current (fencing): a
late result from an attempt that was given up on is dropped.

A result nobody collected within `result_ttl_s` is replaced by a tombstone
(EXPIRED), so that a client coming back hears "expired", not silence. A
tombstone is a few bytes and counts against no limit; it is forgotten once it
has waited another `result_ttl_s` (see `_expire_results`, `_forget_tombstones`).
"""

from __future__ import annotations

import enum
import math
import random
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from . import protocol as p
from ._words import counted, times
from .announcements import Unannounced
from .credit_index import CreditIndex

# The grace constants (and DiskBudget, Effects, the failure records, Parked,
# Recipient, Scope, SESSIONS_PER_CONNECTION, Task, Worker and State, below)
# live with their classes now; they are still importable from here, where
# tests and tools name them.
from .deadlines import LEASE_GRACE_BEATS as LEASE_GRACE_BEATS
from .deadlines import START_GRACE_BEATS as START_GRACE_BEATS
from .deadlines import DeadlineEntry, DeadlineHeap, LeaseTerms
from .disk_budget import DiskBudget as DiskBudget
from .effects import Effects as Effects
from .errors import PoisonTask, ResultExpired, TaskRejected, TaskTimeout
from .failures import RETRY_PAYLOAD_BYTES as RETRY_PAYLOAD_BYTES
from .failures import FailedTask as FailedTask
from .failures import Failures, error_fields
from .failures import split_for_its_map as split_for_its_map
from .fairqueue import FairQueue
from .notices import (
    ClientJoined,
    ClientLost,
    Departure,
    Fault,
    LateOutcome,
    LeaseOverrun,
    OperatorActed,
    OrphansDropped,
    Rejected,
    ResultsExpired,
    SessionHeld,
    SessionRefused,
    SessionsForgotten,
    SinkTaken,
    TombstonesForgotten,
    WorkerDraining,
    WorkerJoined,
    WorkerLeft,
    WorkerLost,
    WorkerReturned,
)
from .orphans import (
    ROOM_HEADROOM_BYTES,
    ROOM_HEADROOM_TASKS,
    Shortfall,
    has_left,
    headroom,
    pick_orphans,
)
from .policy import Backoff, Limits, Prefetch
from .result_room import ResultRoom
from .retries import Retries
from .return_wait import RETURN_WAIT_BEATS as RETURN_WAIT_BEATS
from .return_wait import ReturnWait
from .run_stats import RunStats
from .scope import RETRY_SESSION as RETRY_SESSION
from .scope import Scope as Scope
from .serialization import pack_error
from .sessions import SESSIONS_PER_CONNECTION as SESSIONS_PER_CONNECTION
from .sessions import Recipient as Recipient
from .sessions import SessionRegistry
from .status import StatusReport, outcome_totals
from .tasks import PICKLE_QUEUE as PICKLE_QUEUE
from .tasks import State as State
from .tasks import Task as Task
from .tasks import Worker as Worker
from .waiting_room import Parked as Parked
from .waiting_room import WaitingRoom

# The flags as plain ints: `int & IntFlag` costs about 2 us in CPython, and
# some are asked per task.
_PICKLED = int(p.Flags.PICKLED)
_BATCH = int(p.Flags.BATCH)
_SPLIT = int(p.Flags.SPLIT)
_SPLITTABLE = int(p.Flags.SPLITTABLE)
_SHARED = int(p.Flags.SHARED)
# What a client's session does with its tasks, and what it only asks (see
# Recipient.only_asked).
_WORK_TYPES = (p.Submit, p.Ack, p.Cancel)

# Session and recipient names of peers that do not speak ventilator's protocol
# (MDP clients, Titanic): a ventilator client may not take them in its HELLO
# (see protocol.RESERVED_SESSION_PREFIXES), nor a worker as its id.
GATEWAY_PREFIX = "mdp:"

# Why a worker whose send failed, or who fell silent, just after the broker
# stood still is let go unblamed: it gave up on the silent broker and
# reconnected on a new connection, where it registers again.
STALL_REASON = "its connection closed while this broker stood still"
STALL_SILENCE_REASON = "its connection fell silent after this broker stood still"

# Tickets a returning worker names above this are not taken as numbers some
# broker handed out (see Scheduler._fence): a forged one must not push ours
# towards what the wire carries. A million tickets a second would take nine
# years to reach it.
MAX_FENCED_TICKET = 2**48

# The highest attempt a restored task takes from the worker that names it.
# Far beyond any real count; what keeps a forged one from growing, attempt by
# attempt, past what the wire carries (2**63 - 1), which would have every
# worker refuse the TASKS that bring it.
MAX_ADOPTED_ATTEMPT = 2**32

# How many results one RESULTS message carries at most.
RESULTS_PER_MESSAGE = 1024
# The least a task costs its queue's turns at the workers (see
# Scheduler._turn_cost_s): tasks too short to measure take turns by count.
MIN_TURN_S = 0.001
# A round of a queue's dispatch with no cap per worker: the only queue waiting.
_UNCAPPED = sys.maxsize
# How much of a CRASHED outcome's report (how the task process ended) the
# broker repeats to the client.
MAX_DEATH_LENGTH = 200

# How long a worker's record remembers the tasks it was told to give up
# (RELEASE). A result crossing a RELEASE comes within a round trip, and one
# sent again after a reconnection right behind the READY: a minute is ample.
# However many it was told at once (up to all it held), they cost no more
# than those tasks did while it held them.
RELEASED_KEPT_S = 60.0


class Admission(enum.Enum):
    """What became of one submitted task."""

    ACCEPTED = "accepted"
    WAITING = "waiting"  # past its sender's window, for room (see waiting_room)
    REFUSED = "refused"


def _first_copies(
    specs: Sequence[p.TaskSpec],
) -> tuple[list[p.TaskSpec], dict[int, None]]:
    """The first spec of each task id in one SUBMIT, and the ids that came
    more than once (in the order they came)."""
    firsts: dict[int, p.TaskSpec] = {}
    repeated: dict[int, None] = {}
    for spec in specs:
        if spec.task_id in firsts:
            repeated[spec.task_id] = None
        else:
            firsts[spec.task_id] = spec
    return list(firsts.values()), repeated


def _split_ones_first(specs: list[p.TaskSpec]) -> list[p.TaskSpec]:
    """`specs` in the order to accept them: the items split from a map's batch
    whose worker died, last first, then the others. Each split item goes to
    the front of its session's lane, as a task given back does: a tester's
    map, its worker killed, resent them behind its whole backlog, and its
    output, in input order, stood still for a minute. Taken last first, they
    end up at the front in the order they were sent."""
    split = [spec for spec in reversed(specs) if spec.flags & _SPLIT]
    return split + [spec for spec in specs if not spec.flags & _SPLIT]


def _twice(task_id: int) -> str:
    return f"task_id {task_id} appears twice in one SUBMIT"


def _how_it_died(report: p.Payload) -> str:
    """How a task process ended, as its worker's CRASHED report says ("exit
    code 9", "killed by SIGKILL"); "" when it says nothing (an older worker)
    or something else. Shortened: it is a peer's word."""
    if not report:
        return ""
    fields = error_fields(report)
    if fields.get("type") != p.PROCESS_DIED:
        return ""
    return fields.get("message", "")[:MAX_DEATH_LENGTH]


def _strikes(task: Task) -> str:
    """What was seen of a task's strikes, in words: "its task process died
    2 times and its worker was lost once"."""
    seen = []
    if task.deaths:
        seen.append(f"its task process died {times(task.deaths)}")
    if task.losses:
        seen.append(f"its worker was lost {times(task.losses)}")
    return " and ".join(seen)


def _add_count(counts: dict[str, int], key: str, change: int) -> None:
    """Add `change` to `counts[key]`, which holds no zeros: a key counted
    down to nothing goes, so the dict is as large as what it counts."""
    count = counts.get(key, 0) + change
    if count:
        counts[key] = count
    else:
        del counts[key]


def _work_handed_out(item: tuple[str, FairQueue]) -> float:
    return item[1].handed_out_s


def _payload_size(task: Task) -> int:
    """What a task's payload counts against the byte limits: a shared one by
    the bytes it stands for, which are in memory too (its client's arena),
    and which the broker copies into its own when the client leaves."""
    return p.payload_size(task.payload, task.flags)


def _retried_here(task: Task) -> bool:
    """Whether the broker runs `task` again when it raises: while it has
    retries left, unless it is a map's batch, whose retries are its items'
    (its map runs an item that raised alone again; see telemetry)."""
    return task.retries_left > 0 and not task.flags & _BATCH


SINK_PREFIX = p.SINK_PREFIX


def sink_recipient(name: str) -> str:
    """The recipient name under which a sink's results wait."""
    return f"{SINK_PREFIX}{name}"


class Scheduler:
    """Queues, workers, credit, leases and results; driven by events.

    The shell owns the sockets: it decodes frames, calls `client_command`,
    `worker_command`, `peer_unreachable` and `tick`, then `flush`, and carries out
    the returned `Effects`.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        rng: random.Random | None = None,
        durable: bool = True,
    ):
        self.limits = limits or Limits()
        self._durable = durable
        self._backoff: Backoff = self.limits.retry_backoff
        self._rng = rng or random.Random()
        self._next_ticket = 1
        # Ticket -> the highest attempt a returning worker still runs of a
        # ticket it may not keep; the task of ours that bears it is next sent
        # at a later attempt (see _fence).
        self._fences: dict[int, int] = {}
        # After a restart, the queues of restored tasks, which dispatch
        # nothing for a while once the broker serves (see return_wait).
        self._return_wait = ReturnWait(self.limits.heartbeat_interval_s)
        # Until when clients are not told their function is unserved (see
        # await_returning_workers), and what waits to be told then.
        self._unserved_said_from = 0.0
        self._unserved_untold: dict[tuple[bytes, str], None] = {}

        self.tasks: dict[int, Task] = {}
        self._by_key: dict[tuple[str, int], int] = {}
        # Per function, a lane per submitting session served in turns, so one
        # client's backlog does not hold up the others (see fairqueue).
        self._queues: dict[str, FairQueue] = {}
        # Tasks that raised, waiting out their retry's backoff (see retries).
        self._retries = Retries(self.tasks)
        # Deadlines of running tasks with a timeout, looked at once a tick;
        # entries of tasks finished or re-armed since are skipped when they
        # come due, not searched for (see _armed_task).
        self._deadlines = DeadlineHeap(self._armed_task)
        self._lease_terms = LeaseTerms(self.limits.heartbeat_interval_s)
        # Finished tasks by the time they finished, oldest first, for result expiry.
        self._finish_order: OrderedDict[int, float] = OrderedDict()
        # Tombstones of expired results by when they expired, oldest first, and
        # their bytes: neither counts against max_queued_tasks or _bytes.
        self._tombstones: OrderedDict[int, float] = OrderedDict()
        self._tombstone_bytes = 0
        # Per submitting session: tasks not forgotten (a sink task's until its
        # sink acknowledges it), and their payload and result bytes.
        self._held: dict[str, int] = {}
        self._held_bytes: dict[str, int] = {}
        # Per session, tasks it sent past its window, waiting for room.
        self._waiting_room = WaitingRoom(
            self.limits.client_window, self.limits.client_max_bytes
        )
        self._queued_bytes = 0
        # Per submitting session, the bytes of results kept and expected, and
        # the sessions they hold back (see result_room).
        self._room = ResultRoom(self.limits.client_max_bytes)
        # Per queue: tickets still in it whose task left QUEUED without being
        # taken (cancelled, purged); they are skipped when they reach the front.
        self._stale: dict[str, int] = {}
        # The latest time any event brought, for timestamps taken inside flush().
        self._now = 0.0
        # Until when a worker's lost or silent connection is blamed on our own
        # stall rather than on its task (see stood_still).
        self._stall_aftermath_until = -math.inf

        # Running totals since start, and the latest failures, for the operator.
        # `submitted` counts every task this broker took on to run: accepted,
        # or brought back unfinished from the journal (also in `restored`), so
        # that what finishes never outnumbers what was submitted.
        self.submitted = 0
        self.restored = 0
        # Tasks refused as they were submitted, since the broker started.
        self.rejected = 0
        self._failures = Failures(self.limits.failed_kept)
        # The records themselves, as operator commands, status and telemetry
        # read them.
        self.failed = self._failures.records

        self.workers: dict[str, Worker] = {}
        self._worker_of_peer: dict[bytes, str] = {}
        # For each queue, the workers serving it that have free credit, and
        # the counts behind an even share of its work (see credit_index).
        self._credit = CreditIndex()

        # Sessions and sinks, and which connection speaks for which (see
        # sessions); `recipients` is the registry's own dict, by name.
        self._sessions = SessionRegistry(self.limits, self._holds_nothing)
        self.recipients = self._sessions.recipients

        # Per queue, how long its tasks run and how large their results are,
        # as workers report them (see run_stats): how many of them a worker's
        # slot may hold (see _allowance), and what a running one is expected
        # to return.
        self._runs = RunStats()
        # The work handed out of the least served queue that waited at the
        # last dispatch (see _dispatch): where a queue that starts waiting
        # joins the turns. It only grows.
        self._turn_clock = 0.0
        self._prefetch = Prefetch()
        # Why no new task is accepted now, as the shell found (the journal's
        # disk is nearly full); None: tasks are accepted within the limits.
        self.not_accepting: str | None = None
        # Why results are not delivered now (the journal's disk has no room to
        # record their acknowledgement); None: they are. Set by the shell.
        self.delivery_held: str | None = None
        self.disk_budget = DiskBudget()

        self._effects = Effects()
        # Accepted task ids not yet announced to their submitters (see
        # announcements.ACCEPT_GRACE_S).
        self._unannounced = Unannounced()
        # What a full broker holds, in words, worked out once per loop turn: a
        # SUBMIT of many tasks to it asks for it once per task.
        self._holdings_said: str | None = None
        # Whether this loop turn looked for room in the results of sessions
        # that left (see orphans): once a turn at most, for all it asks.
        self._room_sought = False
        # Per connection, the tasks refused and not yet told (see _reject).
        self._refusals: dict[bytes, list[p.ResultEntry]] = {}
        # Per arena of shared memory (its path), the tickets of unfinished
        # tasks whose payload lies in it (see unshare).
        self._shared: dict[bytes, set[int]] = {}

    # --- clients -------------------------------------------------------------------

    def client_command(
        self, peer: bytes, command: p.Command, now: float, scope: Scope | None = None
    ) -> None:
        """Feed one decoded command from a client's connection; `scope` limits
        what its status and operator commands see and reach (see `Scope`)."""
        self._now = now
        if isinstance(command, p.Hello):
            self._hello(peer, command, now)
            return

        recipient = self._recipient_for_peer(peer, now)
        if recipient is None:
            self._effects.to_clients.append(
                (peer, p.Error("hello_first", "send HELLO before any other command"))
            )
            return

        recipient.worked |= isinstance(command, _WORK_TYPES)
        recipient.asked |= isinstance(command, p.QUESTION_TYPES)
        if recipient.join_untold and recipient.worked:
            recipient.join_untold = False
            self._effects.notices.append(ClientJoined(recipient.name, 0))
        if isinstance(command, p.Submit):
            self._submit(peer, recipient, command.tasks, now)
        elif isinstance(command, p.Ack):
            self._ack(recipient, command.keys)
        elif isinstance(command, p.Cancel):
            self._cancel(recipient.name, command.task_ids, now)
        elif isinstance(command, p.StatusRequest):
            status = self.status(now, scope, asker=recipient.name)
            self._effects.to_clients.append((peer, p.StatusReply(status)))
        elif isinstance(command, p.OPERATOR_TYPES):
            report = self._operate(command, now, scope)
            self._effects.to_clients.append((peer, p.OperatorReply(report)))
            if not isinstance(command, p.ListFailed):  # one that changes things
                acted = OperatorActed(recipient.name, command, report)
                self._effects.notices.append(acted)
        elif isinstance(command, p.Bye):
            self._client_gone(recipient, Departure.LEFT)
        # A heartbeat needs nothing more: any command refreshed last_seen.

    def _hello(self, peer: bytes, hello: p.Hello, now: float) -> None:
        # Checked here, not only in our client: an older or foreign one naming
        # its session ``sink:NAME`` used to receive that sink's results.
        reserved = p.reserved_session_problem(hello.session)
        if reserved is not None:
            self._effects.to_clients.append((peer, p.Error(p.RESERVED_NAME, reserved)))
            return

        name = hello.session if hello.sink is None else sink_recipient(hello.sink)
        is_new = name not in self.recipients
        if is_new:
            refusal = self._sessions.room_for_new(peer)
            if refusal is not None:
                self._refuse_new_session(peer, name, refusal)
                return

        if hello.sink is None:
            if not self._attach_session(peer, hello, now):
                return
        elif not self._attach_sink(peer, hello.sink, hello.session, now):
            return
        if is_new:
            self._sessions.count_opened(self.recipients[name], peer)
        self._effects.to_clients.append((peer, self._welcome()))

    def _refuse_new_session(self, peer: bytes, name: str, reason: str) -> None:
        """Refuse a HELLO for a new session. The connection leaves the session
        it spoke for, as a HELLO under a new name does, so that what it sends
        next is not taken for that session's: it must say HELLO again."""
        self._leave(peer)
        message = f"no room for session {name!r}: {reason}"
        error = p.Error(p.TOO_MANY_SESSIONS, message)
        self._effects.to_clients.append((peer, error))
        self._effects.notices.append(SessionRefused(name, reason))

    def _leave(self, peer: bytes) -> None:
        """`peer` no longer speaks for the recipient it spoke for, which is
        away from now on (what it is owed waits), or forgotten if it holds
        nothing: its own connection moved on, so no grace is needed."""
        recipient = self._sessions.disconnect(peer)
        if recipient is None:
            return
        # What it sent past its window no longer has a connection to hear of it.
        self._waiting_room.drop(recipient.name)
        if self._holds_nothing(recipient):
            self._sessions.forget(recipient)

    def _holds_nothing(self, recipient: Recipient) -> bool:
        """Whether forgetting `recipient` loses nothing: no result waits for
        it (nor a tombstone: those wait in `pending` too), and no task it
        submitted is in the broker (queued, waiting, running or finished)."""
        return not (
            recipient.pending
            or recipient.unacked
            or self._held.get(recipient.name, 0)
            or recipient.name in self._waiting_room.parked
        )

    def _attach_session(self, peer: bytes, hello: p.Hello, now: float) -> bool:
        """Attach `peer` to its session, unless another live `Client` holds it
        (see SessionRegistry.held_by_another): that one is refused until the
        holder says BYE or is given up on."""
        holder = self._sessions.held_by_another(peer, hello)
        if holder is not None:
            self._refuse_session(peer, holder, hello.instance)
            return False

        self.attach_recipient(peer, hello.session, now)
        recipient = self.recipients[hello.session]
        recipient.instance = hello.instance
        if recipient.refused == hello.instance:
            recipient.refused = None
        return True

    def _refuse_session(
        self, peer: bytes, recipient: Recipient, instance: int | None
    ) -> None:
        silence_s = self.limits.heartbeat_interval_s * self.limits.liveness
        message = (
            f"session {recipient.name!r} is held by another live client; one "
            "client holds a session at a time: close that one, or use another "
            f"session name (the broker gives a client up after {silence_s:g}s "
            "of silence)"
        )
        error = p.Error(p.SESSION_IN_USE, message)
        self._effects.to_clients.append((peer, error))
        self._effects.notices.append(
            SessionHeld(recipient.name, first=recipient.refused != instance)
        )
        recipient.refused = instance

    def _attach_sink(self, peer: bytes, sink: str, session: str, now: float) -> bool:
        """Attach `peer` as the receiver of `sink`, unless another process is
        (see SessionRegistry.sink_held_by_another): then it is refused until
        the holder leaves or is given up on, and its HELLO changes nothing."""
        name = sink_recipient(sink)
        holder = self._sessions.sink_held_by_another(peer, name, session)
        if holder is not None:
            message = (
                f"sink {sink!r} is being received by another process; one process "
                "receives a sink at a time: stop that one, or use another name"
            )
            self._effects.to_clients.append((peer, p.Error("sink_taken", message)))
            first = holder.refused_holder != session
            self._effects.notices.append(SinkTaken(sink, first))
            holder.refused_holder = session
            return False

        self.attach_recipient(peer, name, now)
        recipient = self.recipients[name]
        recipient.holder = session
        if recipient.refused_holder == session:
            recipient.refused_holder = None
        return True

    def attach_recipient(
        self,
        peer: bytes,
        name: str,
        now: float,
        expires: bool = True,
        announce: bool = True,
    ) -> None:
        """Connect recipient `name` to `peer` (a HELLO, or a gateway's client).

        `expires=False` keeps it attached however long it is silent;
        `announce=False` leaves it out of the log (one MDP client per request).
        """
        recipient = self._sessions.recipient(name)
        recipient.expires = expires

        # A connection that speaks for a new name no longer speaks for the old
        # one: that one is away (its unacknowledged results wait) until it is
        # back, or forgotten now if it holds nothing.
        if self._sessions.name_of(peer) not in (None, name):
            self._leave(peer)

        # A session that reconnects takes its place back: everything it had been
        # sent but had not acknowledged is sent again (the client drops doubles).
        resent = self._attach(recipient, peer, now)
        fresh = not (
            resent or recipient.worked or recipient.pending or self._held.get(name)
        )
        recipient.join_untold = announce and fresh and not name.startswith(SINK_PREFIX)
        if announce and not recipient.join_untold:
            self._effects.notices.append(ClientJoined(name, resent))

    def detach_if_idle(self, name: str) -> None:
        """Forget recipient `name` if it is owed nothing and has nothing running,
        so that short-lived connections (MDP clients) do not accumulate."""
        recipient = self.recipients.get(name)
        if recipient is not None and self._holds_nothing(recipient):
            self._sessions.forget(recipient)

    def recipient_of(self, peer: bytes) -> str | None:
        """The session (or sink's recipient) the client connection `peer`
        speaks for, connected or away since; None if it must say HELLO."""
        return self._sessions.name_of(peer)

    def _welcome(self) -> p.Welcome:
        return p.Welcome(
            window=self.limits.client_window,
            max_payload_bytes=self.limits.max_payload_bytes,
            heartbeat_interval_s=self.limits.heartbeat_interval_s,
            client_max_bytes=self.limits.client_max_bytes,
            durable=self._durable,
        )

    def _attach(self, recipient: Recipient, peer: bytes, now: float) -> int:
        self._sessions.connect(recipient, peer)
        recipient.last_seen = now
        return self._redeliver(recipient)

    def _redeliver(self, recipient: Recipient) -> int:
        recipient.send_failed = False
        unacked = recipient.take_back_unacked()
        recipient.pending.extendleft(reversed(unacked))
        return len(unacked)

    def _take_back(self, recipient: Recipient, peer: bytes, now: float) -> None:
        """A recipient given up on speaks again on the same connection.

        Given up for silence only, it was busy (a sink blocked on its output,
        a paused process), not gone: what it was sent is still on its way in
        this connection, in order, and sending it again would deliver it twice.
        Only a failed send lost results, and then all unacknowledged ones go
        again (the shell does not say which a failed message carried).
        """
        if recipient.send_failed:
            self._attach(recipient, peer, now)
            return
        recipient.peer = recipient.last_peer = peer
        recipient.last_seen = now

    def _recipient_for_peer(self, peer: bytes, now: float) -> Recipient | None:
        recipient = self._sessions.speaker(peer)
        if recipient is None:
            return None
        if recipient.peer is None:
            self._take_back(recipient, peer, now)
        recipient.last_seen = now
        return recipient

    def _submit(
        self, peer: bytes, recipient: Recipient, specs: Sequence[p.TaskSpec], now: float
    ) -> None:
        session = recipient.name
        accepted: dict[int, None] = {}
        pickle_served = self._pickle_served()  # once per batch, not per task
        # A resubmission comes in a later SUBMIT; one id twice in the same
        # one is two tasks of which only the first could ever be answered.
        firsts, repeated = _first_copies(specs)
        if any(spec.flags & _SPLIT for spec in firsts):
            firsts = _split_ones_first(firsts)
        functions: dict[str, None] = {}
        sinks: dict[str, None] = {}
        for spec in firsts:
            if (session, spec.task_id) in self._by_key:
                accepted[spec.task_id] = None  # a resubmission: already ours
                continue
            if self._waiting_room.holds(session, spec.task_id):
                continue  # a resubmission of one that waits for room

            twice = spec.task_id in repeated
            admission = self._admit_submitted(
                peer, session, spec, pickle_served, now, twice, asked=firsts
            )
            if admission is Admission.REFUSED:
                # Its refusal named the copy too: one answer per task id.
                repeated.pop(spec.task_id, None)
                continue
            if admission is Admission.ACCEPTED:
                accepted[spec.task_id] = None
            if not spec.flags & _PICKLED:  # refused above if unserved
                functions[spec.function] = None
            if spec.sink is not None:
                sinks[spec.sink] = None
        for task_id in repeated:
            self._reject(peer, session, task_id, _twice(task_id))
        self._send_refusals()
        if accepted:
            self._unannounced.accepted(peer, accepted, now)
        self._tell_unserved(peer, functions)
        self._tell_unreceived(peer, sinks)

    def _admit_submitted(
        self,
        peer: bytes,
        session: str,
        spec: p.TaskSpec,
        pickle_served: bool,
        now: float,
        twice: bool = False,
        asked: Sequence[p.TaskSpec] = (),
    ) -> Admission:
        """Accept one task a client submitted, or refuse it; past its window,
        let it wait for room (see `waiting_room`). `twice`: the SUBMIT carries another
        copy of its id, which a refusal names too. `asked`: the whole SUBMIT,
        which a full broker makes room for at once (see `_make_room`)."""
        reason = p.submission_problem(spec.function, spec.flags)
        if reason is None:
            reason = self._task_refusal(spec, pickle_served)
        size = p.payload_bytes(spec)
        if reason is None and self._waits_for_room(session, size):
            reason = self._waiting_room.park(session, spec)
            if reason is None:
                return Admission.WAITING
        if reason is None:
            reason = self._room_refusal(size, asked)
        if reason is not None:
            if twice:
                reason = (
                    f"{_twice(spec.task_id)}; its first copy is refused too: {reason}"
                )
            self._reject(peer, session, spec.task_id, reason)
            return Admission.REFUSED
        self._accept(session, spec, now)
        return Admission.ACCEPTED

    def _tell_unserved(self, peer: bytes, functions: Iterable[str]) -> None:
        """Tell a client which functions of its SUBMIT no connected worker
        serves: their tasks wait for one, which without a word looks like a
        hang. A notice, not a refusal; the client logs each once.

        In the first beats after the broker starts, workers come (back) too,
        and a client's first SUBMIT often comes before them: what is unserved
        then is told once that time has passed, if it still is."""
        if self._now < self._unserved_said_from:
            self._unserved_untold.update(dict.fromkeys((peer, f) for f in functions))
            return
        for function in functions:
            if not self.serves(function):
                message = (
                    f"no connected worker serves {function}; its tasks wait in "
                    "the queue until one does"
                )
                self._effects.to_clients.append((peer, p.Error(p.UNSERVED, message)))

    def _tell_unserved_at_last(self, now: float) -> None:
        """Tell what the first beats after the start held back (see
        _tell_unserved), once they have passed."""
        if not self._unserved_untold or now < self._unserved_said_from:
            return
        untold, self._unserved_untold = self._unserved_untold, {}
        for peer, function in untold:
            self._tell_unserved(peer, (function,))

    def _tell_unreceived(self, peer: bytes, sinks: Iterable[str]) -> None:
        """Tell a client which sinks of its SUBMIT no process receives now:
        their results wait at the broker, counted against the client's window,
        which without a word looks like a hang once it fills. A notice, as for
        an unserved function; the client logs each once."""
        for sink in sinks:
            recipient = self.recipients.get(sink_recipient(sink))
            if recipient is None or recipient.peer is None:
                message = (
                    f"no sink {sink!r} is connected; results of tasks sent to it "
                    "wait at the broker until one is (`ventilator sink "
                    f"{sink}`), and count against this client's window until "
                    "it collects them"
                )
                self._effects.to_clients.append((peer, p.Error(p.UNSERVED, message)))

    def accept_task(
        self,
        session: str,
        spec: p.TaskSpec,
        now: float,
        recipient: str | None = None,
    ) -> str | None:
        """Accept one task outside a client connection (MDP, Titanic).

        Its result goes to `recipient` (default: `session`). Returns None once
        it is accepted (or was already), else the reason it was refused.
        """
        if (session, spec.task_id) in self._by_key:
            return None
        reason = self._refusal(session, spec, self._pickle_served())
        if reason is None:
            self._accept(session, spec, now, recipient)
        return reason

    def _refusal(
        self, session: str, spec: p.TaskSpec, pickle_served: bool
    ) -> str | None:
        """Why the broker will not accept `spec` from `session` now; None if
        it will. For tasks not submitted by a client (MDP, Titanic, retries),
        which wait for no room."""
        size = p.payload_bytes(spec)
        reason = self._task_refusal(spec, pickle_served)
        if reason is None:
            reason = self._window_refusal(session, size)
        if reason is None:
            reason = self._room_refusal(size)
        return reason

    def _task_refusal(self, spec: p.TaskSpec, pickle_served: bool) -> str | None:
        """Why the broker will not take this task whoever sends it, now."""
        if self.not_accepting is not None:
            return self.not_accepting
        limits = self.limits
        size = p.payload_bytes(spec)
        if size > self.disk_budget.tasks:
            return self.disk_budget.task_refusal(size)
        if size > limits.max_payload_bytes:
            return (
                f"payload of {size} bytes is over the limit of "
                f"{limits.max_payload_bytes} bytes (max_payload_bytes)"
            )
        if size > limits.client_max_bytes:
            return (
                f"payload of {size} bytes is over the {limits.client_max_bytes} "
                "bytes one client may have in the broker (client_max_bytes)"
            )
        if spec.flags & _PICKLED and not pickle_served:
            return (
                "no connected worker runs pickled callables; start one with "
                "--allow-pickle, or submit the function by its module:name"
            )
        return None

    def _window_refusal(self, session: str, size: int) -> str | None:
        """Why a task of `size` bytes does not fit the window of `session` now:
        its tasks in the broker, a sink task's until its sink acknowledges it
        (a client of ours cannot see that, and keeps to the rest)."""
        limits = self.limits
        held_bytes = self._held_bytes.get(session, 0)
        if held_bytes + size > limits.client_max_bytes:
            return (
                f"this client already has {held_bytes} bytes in the broker, the "
                f"limit is {limits.client_max_bytes} (client_max_bytes); wait for "
                "results before submitting more"
            )
        if self._held.get(session, 0) >= limits.client_window:
            return (
                f"this client already has {limits.client_window} tasks in the broker "
                "(client_window), counting those whose results wait for a sink; "
                "wait for results before submitting more"
            )
        return None

    def _full_refusal(self, size: int) -> str | None:
        """Why the broker, holding what it holds, takes no task of `size` now."""
        limits = self.limits
        if self._held_tasks() >= limits.max_queued_tasks:
            return (
                f"the broker holds {self._held_tasks()} tasks, its limit "
                f"(max_queued_tasks): {self._holdings()}"
            )
        held_bytes = self._queued_bytes - self._tombstone_bytes
        if held_bytes + size > limits.max_queued_bytes:
            return (
                f"the broker holds {held_bytes} bytes of arguments and results, "
                f"and this task's {size} would pass its limit of "
                f"{limits.max_queued_bytes} (max_queued_bytes): {self._holdings()}"
            )
        return None

    def _refusal_said(self, now: float) -> str | None:
        """Why a full broker refuses new tasks, as `status` says it, until
        some are done; none while it would make room from the results of
        sessions that left (see `_make_room`): the next task is accepted."""
        reason = self._full_refusal(0)
        cutoff = now - self.limits.orphan_grace_s
        if reason is not None and any(
            has_left(recipient, cutoff) for recipient in self.recipients.values()
        ):
            return None
        return reason

    def _room_refusal(self, size: int, asked: Sequence[p.TaskSpec] = ()) -> str | None:
        """Why the broker, holding what it holds, takes no task of `size` now,
        once it made what room it could from the results of sessions that
        left (see `orphans`), for `asked` (the SUBMIT it belongs to) if any."""
        reason = self._full_refusal(size)
        if reason is not None and self._make_room(size, asked):
            reason = self._full_refusal(size)
        return reason

    def _make_room(self, size: int, asked: Sequence[p.TaskSpec]) -> bool:
        """Drop the oldest results of client sessions that left, for tombstones,
        as many as `asked` (or one task of `size`) needs and some headroom;
        return whether any was dropped. Once a loop turn at most: a full broker
        is asked for each task of a SUBMIT, and each would look in vain again."""
        if self._room_sought:
            return False
        self._room_sought = True
        grace_s = self.limits.orphan_grace_s
        cutoff = self._now - grace_s
        shortfall = self._shortfall(size, asked)
        orphans = pick_orphans(self.recipients.values(), self.tasks, cutoff, shortfall)
        if not orphans:
            return False

        limit = self._limit_reached()
        error = ResultExpired(
            "ResultExpired",
            f"the broker was full ({limit}) and dropped this result to make "
            f"room: no client of its session had been connected for {grace_s:g}s "
            "(orphan_grace_s)",
        )
        for task in orphans:
            del self._finish_order[task.ticket]
            self._entomb(task, error, self._now)
        sessions = len({task.recipient for task in orphans})
        notice = OrphansDropped(len(orphans), sessions, limit, grace_s)
        self._effects.notices.append(notice)
        self._holdings_said = None  # said of a fuller broker
        return True

    def _shortfall(self, size: int, asked: Sequence[p.TaskSpec]) -> Shortfall:
        """What to free for the tasks `asked` (or one task of `size`), and
        some headroom."""
        asked_tasks = max(len(asked), 1)
        asked_bytes = max(sum(p.payload_bytes(spec) for spec in asked), size)
        held_bytes = self._queued_bytes - self._tombstone_bytes
        limits = self.limits
        headroom_tasks = headroom(limits.max_queued_tasks, ROOM_HEADROOM_TASKS)
        headroom_bytes = headroom(limits.max_queued_bytes, ROOM_HEADROOM_BYTES)
        return Shortfall(
            tasks=self._held_tasks()
            + asked_tasks
            + headroom_tasks
            - limits.max_queued_tasks,
            bytes=held_bytes + asked_bytes + headroom_bytes - limits.max_queued_bytes,
        )

    def _limit_reached(self) -> str:
        """The name of the limit a full broker reached."""
        if self._held_tasks() >= self.limits.max_queued_tasks:
            return "max_queued_tasks"
        return "max_queued_bytes"

    def _holdings(self) -> str:
        """What a full broker holds, by state, and what to do: worked out once
        per loop turn, as a SUBMIT of many tasks to it asks for each.

        Results waiting for delivery count: they hold memory and journal space
        as tasks do, and the limits bound both. Those of clients that left wait
        for `result_ttl_s`, unless an operator drops them, or the broker does
        to make room once their session had no client for `orphan_grace_s`;
        then they are tombstones, which count against no limit. A broker still
        full after that holds results of sessions with a client, or away for
        less than that grace, or of sinks: what is said here.
        """
        if self._holdings_said is not None:
            return self._holdings_said
        by_function = self._queued_by_function()
        queued = sum(by_function.values())
        running = sum(len(worker.running) for worker in self.workers.values())
        waiting = self._held_tasks() - queued - running
        said = (
            f"{queued} queued, {running} running, {waiting} results waiting for "
            "delivery; "
        )
        if waiting:
            said += (
                "results wait until their client or sink collects them, or for "
                f"{self.limits.result_ttl_s:g}s (result_ttl_s); a full broker "
                "drops those of a session with no client connected for "
                f"{self.limits.orphan_grace_s:g}s (orphan_grace_s), an operator "
                "sooner with `ventilator purge --session NAME`, and those of a "
                "sink nobody receives with `ventilator purge --sink NAME`"
            )
        else:
            said += (
                "tasks leave as workers finish them and their clients collect "
                "the results: try again later, or start more workers"
            )
        said += self._unserved_holdings(by_function)
        self._holdings_said = said
        return said

    def _unserved_holdings(self, queued: Mapping[str, int]) -> str:
        """What of a full broker's queue no connected worker serves, in
        words: waiting for more workers would not empty it (tester 36)."""
        unserved = sorted(
            f for f, count in queued.items() if count and not self.serves(f)
        )
        if not unserved:
            return ""
        tasks = sum(queued[function] for function in unserved)
        named = ", ".join(unserved[:3]) + (", ..." if len(unserved) > 3 else "")
        return (
            f"; {counted(tasks, 'queued task')} of functions no connected worker "
            f"serves ({named}): start a worker that serves them, or drop them "
            "with `ventilator purge FUNCTION`"
        )

    # --- tasks past their sender's window ---------------------------------------------

    def _waits_for_room(self, session: str, size: int) -> bool:
        """Whether a task of `session` must wait for room in its window: it is
        full, or others wait already (they go first)."""
        if session in self._waiting_room.parked:
            return True
        return self._window_refusal(session, size) is not None

    def _accept_waiting(self) -> None:
        """Accept, in the order they came, the tasks that waited for room in
        the windows some room came back to, while it lasts."""
        freed = self._waiting_room.take_freed()
        if not freed:
            return
        pickle_served = self._pickle_served()
        for session, parked in freed:
            self._accept_parked(session, parked, pickle_served)

    def _accept_parked(self, session: str, parked: Parked, pickle_served: bool) -> None:
        """Accept what fits of `parked`; refuse what the broker can no longer
        take (it filled up meanwhile, or its disk did)."""
        peer = self._peer_of_session(session)
        accepted: dict[int, None] = {}
        while parked.specs:
            spec = parked.first()
            size = p.payload_bytes(spec)
            if self._window_refusal(session, size) is not None:
                break  # no more room yet
            parked.remove(spec.task_id)
            reason = self._task_refusal(spec, pickle_served) or self._room_refusal(size)
            if reason is None:
                self._accept(session, spec, self._now)
                accepted[spec.task_id] = None
            elif peer is not None:
                self._reject(peer, session, spec.task_id, reason)
        self._waiting_room.tidy(session)
        if accepted and peer is not None:
            self._unannounced.accepted(peer, accepted, self._now)

    def _peer_of_session(self, session: str) -> bytes | None:
        """Where to tell `session` what became of its waiting tasks: its
        connection, or the one it was last on (it may be busy, not gone); a
        client on a new connection sends them again, and hears it then."""
        recipient = self.recipients.get(session)
        if recipient is None:
            return None
        return recipient.peer or recipient.last_peer

    def _held_tasks(self) -> int:
        """The tasks that count against max_queued_tasks: all but tombstones."""
        return len(self.tasks) - len(self._tombstones)

    def _pickle_served(self) -> bool:
        return any(PICKLE_QUEUE in w.services for w in self.workers.values())

    def reject(
        self, peer: bytes, task_id: int, reason: str, kind: str = "TaskRejected"
    ) -> None:
        """Refuse one submitted task for a reason the shell found (the sender's
        rights, a shared payload it cannot read): the client gets it as a
        TaskRejected result of type `kind`, with the other refusals of its
        SUBMIT."""
        session = self._sessions.name_of(peer)
        self._reject(peer, "?" if session is None else session, task_id, reason, kind)

    def answer(self, peer: bytes, reply: p.Command) -> None:
        """Send a client a reply the shell decided (an operator command its key
        may not give), in order with the scheduler's replies to its questions."""
        self._effects.to_clients.append((peer, reply))

    def _reject(
        self,
        peer: bytes,
        session: str,
        task_id: int,
        reason: str,
        kind: str = "TaskRejected",
    ) -> None:
        """Refuse one task: its client hears it with the other refusals of
        the same SUBMIT (see _send_refusals), as a TaskRejected result."""
        error = TaskRejected(kind, reason)
        entry = p.ResultEntry(task_id, p.Status.REJECTED, pack_error(error))
        self._refusals.setdefault(peer, []).append(entry)
        if kind == p.SHARED_MEMORY_GONE:
            return  # our client sends it again, unseen: no refusal to count
        self.rejected += 1
        notice = Rejected(session, task_id, reason, self._refusing_all())
        self._effects.notices.append(notice)

    def _refusing_all(self) -> bool:
        """Whether the broker refuses every new task now: its disk, or its
        limits (see _full_refusal)."""
        return self.not_accepting is not None or self._full_refusal(0) is not None

    def _send_refusals(self) -> None:
        """Tell each client the refusals gathered since last time, in RESULTS
        messages as large as deliveries are. A message per refused task cost
        a sender far past its window thousands of messages for a few SUBMITs,
        and the broker as many sends."""
        refusals, self._refusals = self._refusals, {}
        for peer, entries in refusals.items():
            for start in range(0, len(entries), RESULTS_PER_MESSAGE):
                chunk = entries[start : start + RESULTS_PER_MESSAGE]
                self._effects.to_clients.append((peer, p.Results(chunk)))

    def _accept(
        self,
        session: str,
        spec: p.TaskSpec,
        now: float,
        recipient: str | None = None,
    ) -> None:
        if recipient is None:
            recipient = sink_recipient(spec.sink) if spec.sink else session
        task = Task(
            ticket=self._new_ticket(),
            session=session,
            task_id=spec.task_id,
            function=spec.function,
            payload=spec.payload,
            flags=spec.flags,
            timeout_s=spec.timeout_s,
            retries_left=spec.retries,
            recipient=recipient,
            deaths=1 if spec.flags & _SPLIT else 0,
        )
        self._admit(task)
        if task.flags & _SHARED:
            self._shared.setdefault(p.shared_arena(task.payload), set()).add(
                task.ticket
            )
        # An item of a map's batch whose worker died is among the map's
        # oldest: its output, in input order, waits for it (see _split_ones_first).
        self._enqueue(task, front=bool(task.flags & _SPLIT))
        self.submitted += 1
        self.disk_budget.spend(p.payload_bytes(spec))
        self._effects.accepted.append(task)

    def _new_ticket(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        return ticket

    def _admit(self, task: Task) -> None:
        self.tasks[task.ticket] = task
        self._by_key[task.key] = task.ticket
        self._hold(task.session, +1)
        self._count_bytes(task, _payload_size(task) + len(task.result))
        if task.result:  # restored from the journal
            self._room.count_kept(task.session, len(task.result))
        self._sessions.recipient(task.recipient)

    def _hold(self, session: str, change: int) -> None:
        _add_count(self._held, session, change)
        if change < 0 and session in self._waiting_room.parked:
            self._waiting_room.room_freed(session)

    def _ack(self, recipient: Recipient, keys: Iterable[tuple[str, int]]) -> None:
        acked: set[int] = set()
        for origin, task_id in keys:
            ticket = self._by_key.get((origin or recipient.name, task_id))
            if ticket is None:
                continue  # a double ack
            # Received on a connection since replaced, a result waits to be
            # sent again, and must not be, or the recipient gets it twice.
            if ticket in recipient.unacked or self._owed_again(recipient, ticket):
                acked.add(ticket)
        recipient.owe_no_more(acked)
        for ticket in acked:
            self._forget(self.tasks[ticket])

    def _owed_again(self, recipient: Recipient, ticket: int) -> bool:
        """Whether `ticket` is a finished result of `recipient` not yet sent
        (again): one it may have received before a reconnection."""
        task = self.tasks[ticket]
        return task.state is State.FINISHED and task.recipient == recipient.name

    def _forget(self, task: Task) -> None:
        if task.flags & _SHARED:
            self._unshare_task(task)
        del self.tasks[task.ticket]
        self._fences.pop(task.ticket, None)
        del self._by_key[task.key]
        self._hold(task.session, -1)
        self._count_bytes(task, -_payload_size(task) - len(task.result))
        if task.expected:  # forgotten while it ran
            self._unexpect(task)
        self._finish_order.pop(task.ticket, None)
        if self._tombstones.pop(task.ticket, None) is not None:
            self._tombstone_bytes -= len(task.result)
            recipient = self.recipients.get(task.recipient)
            if recipient is not None:
                recipient.expired -= 1
        else:
            self._room.count_kept(task.session, -len(task.result))
        self._effects.forgotten.append(task.ticket)

    def _cancel(self, session: str, task_ids: Iterable[int], now: float) -> None:
        running: dict[int, Task] = {}
        # A task named twice is cancelled once: named again, one cancelled
        # while queued would have its "cancelled" answer forgotten unread.
        for task_id in dict.fromkeys(task_ids):
            ticket = self._by_key.get((session, task_id))
            task = self.tasks.get(ticket) if ticket is not None else None
            if task is None:
                self._waiting_room.cancel(session, task_id)
                continue
            if task.state in (State.QUEUED, State.WAITING):
                self._finish(task, p.Status.CANCELLED, b"", now)
            elif task.state is State.RUNNING and not task.cancelled:
                running[task.ticket] = task
            elif task.state is State.FINISHED and task.recipient == session:
                self._drop_unread_result(task)
        self._cancel_running(list(running.values()), now)

    def _drop_unread_result(self, task: Task) -> None:
        """A client cancelled a task whose result it has not read: its
        future is cancelled, and nobody will ever read that result (a map
        abandoned after a `break` cancels what it did not yield). Kept, it
        would wait a day for the session, and fill its next client's window."""
        recipient = self.recipients.get(task.recipient)
        if recipient is not None:
            recipient.owe_no_more({task.ticket})
        self._forget(task)

    def _cancel_running(self, tasks: list[Task], now: float) -> None:
        """Cancel tasks that workers hold (running, or waiting there for a
        slot): their clients settled their futures already and want no
        result. Each worker that can be told to stop them gives them up at
        once; an MDP worker keeps its one until it replies."""
        by_worker: dict[str, list[Task]] = {}
        for task in tasks:
            assert task.worker is not None, f"task {task.ticket} held by no worker"
            by_worker.setdefault(task.worker, []).append(task)
        for worker_id, cancelled in by_worker.items():
            worker = self.workers[worker_id]
            if worker.obeys_release:
                self._stop_on_worker(worker, cancelled, now)
            else:
                for task in cancelled:
                    self._leave_cancelled(task)

    def _stop_on_worker(self, worker: Worker, tasks: list[Task], now: float) -> None:
        """Take `tasks` back from `worker` (their clients cancelled them), and
        forget them now, by the journal too: a broker restarted on one must
        not queue it again."""
        self._release_on_worker(worker, tasks, now)
        for task in tasks:
            self._drop_cancelled(task, now)

    def _release_on_worker(self, worker: Worker, tasks: list[Task], now: float) -> None:
        """Tell `worker` to give `tasks` up (RELEASE): it stops them and
        reports none, so their slots come back here at once; the caller says
        how each ends. A worker from before RELEASE runs them on; its results
        are then dropped as late."""
        self._tell_to_give_up(worker, [(task.ticket, task.attempt) for task in tasks])
        for task in tasks:
            self._release(worker, task)
        self._start_waiting(worker, now)
        self._credit.offer(worker)

    def _leave_cancelled(self, task: Task) -> None:
        """Mark `task` cancelled on a worker that cannot be told to stop it:
        it keeps its slot until its worker reports (a second request would
        meet an MDP worker still busy with the first); then, or when that
        worker is gone, the task is dropped. The journal forgets it now."""
        task.cancelled = True
        self._effects.forgotten.append(task.ticket)

    def _tell_to_give_up(self, worker: Worker, keys: list[tuple[int, int]]) -> None:
        """Send `worker` a RELEASE of these (ticket, attempt), and remember
        them for a while: a result it had sent before reading it is no fault."""
        self._effects.to_workers.append((worker.peer, p.Release(keys)))
        released = worker.released
        since = self._now - RELEASED_KEPT_S
        while released and next(iter(released.values())) < since:
            del released[next(iter(released))]
        released.update(dict.fromkeys(keys, self._now))

    def _drop_cancelled(self, task: Task, now: float) -> None:
        """Forget an unfinished task nobody wants, as cancelled (one cancelled
        while it ran, whatever its worker made of it; one of a purged session)."""
        self._conclude(task, p.Status.CANCELLED, b"", now)
        self._forget(task)

    def _client_gone(self, recipient: Recipient, how: Departure) -> None:
        # A silent or unreachable client keeps its peer mapping: if it speaks
        # again on the same connection, it is attached again without a HELLO.
        said_bye = how is Departure.LEFT
        if said_bye and recipient.peer is not None:
            self._sessions.unmap(recipient.peer)
        # Every failed send to a gone client reports it: say so once.
        peer, was_connected = recipient.peer, recipient.peer is not None
        recipient.peer = None
        if peer is not None:
            self._effects.departed.append(peer)
        if said_bye:
            self._forget_cancellations(recipient)
            # Unaccepted: its client failed them as it closed.
            self._waiting_room.drop(recipient.name)
        held = len(recipient.pending) + len(recipient.unacked)
        if was_connected:
            unfinished = max(0, self._held.get(recipient.name, 0) - held)
            notice = ClientLost(
                recipient.name,
                held,
                how,
                unfinished,
                peer or b"",
                quiet=recipient.join_untold,
            )
            self._effects.notices.append(notice)

        # A session that left holding nothing is forgotten at once, so that
        # sessions do not accumulate; one with tasks in the broker stays
        # listed (with what `purge --session` would drop) until they are done.
        if said_bye and self._holds_nothing(recipient):
            self._sessions.forget(recipient)

    def _forget_cancellations(self, recipient: Recipient) -> None:
        """Forget the "cancelled" results of its own tasks a client leaves
        unread as it says BYE. It cancelled those tasks itself, or was there
        when they were purged; a later client of the session collects finished
        work, and news of what was called off, kept for a day, would only
        count against the broker's limits. A session purged while nobody was
        connected keeps them, to tell its next client; so does a sink, whose
        results are other clients' tasks, for its next run to count."""
        owed = [*recipient.pending, *recipient.unacked]
        cancelled = {
            ticket
            for ticket in owed
            if (task := self.tasks[ticket]).status is p.Status.CANCELLED
            and task.session == recipient.name
        }
        recipient.owe_no_more(cancelled)
        for ticket in cancelled:
            self._forget(self.tasks[ticket])

    # --- workers ---------------------------------------------------------------------

    def worker_command(self, peer: bytes, command: p.Command, now: float) -> None:
        """Feed one decoded command from a worker's connection."""
        self._now = now
        if isinstance(command, p.Ready):
            self._ready(peer, command, now)
            return

        worker = self._worker_for_peer(peer)
        if worker is None:
            # Probably a worker we declared dead, or one that outlived a broker
            # restart: it must register again, and its old tasks are already back
            # in the queue.
            self._effects.to_workers.append(
                (peer, p.Error("unknown_worker", "send READY to register again"))
            )
            return

        worker.last_seen = now
        if isinstance(command, p.Done):
            self._done(worker, command.outcomes, now)
        elif isinstance(command, p.Credit):
            # Tasks it holds beyond a lowered capacity stay with it; it just gets
            # no more until it is under the new limit.
            worker.capacity = command.capacity
            worker.grace = max(0, len(worker.running) - worker.capacity)
            self._credit.offer(worker)
        elif isinstance(command, p.Drain):
            self._credit.stop_sharing(worker)
            worker.draining = True
            self._credit.offer(worker)
            self._effects.notices.append(
                WorkerDraining(worker.worker_id, len(worker.running))
            )
        elif isinstance(command, p.Bye):
            requeued, _, _ = self._drop_worker(worker, lost=None, now=now)
            self._effects.notices.append(WorkerLeft(worker.worker_id, requeued))

    def _ready(self, peer: bytes, ready: p.Ready, now: float) -> None:
        if ready.worker_id.startswith(GATEWAY_PREFIX):
            message = f"worker ids starting {GATEWAY_PREFIX!r} are the broker's"
            self._effects.to_workers.append((peer, p.Error(p.RESERVED_NAME, message)))
            return
        refused = self.register_worker(peer, ready, now)
        self._effects.to_workers.append((peer, self._welcome()))
        if refused:
            # So that it stops them: their results would only be dropped as
            # late, and a long one would hold its slot to the end.
            self._tell_to_give_up(self.workers[ready.worker_id], refused)

    def register_worker(
        self,
        peer: bytes,
        ready: p.Ready,
        now: float,
        max_silence_s: float | None = None,
        silent_while_busy: bool = False,
        obeys_release: bool = True,
    ) -> list[tuple[int, int]]:
        """Register a worker (a READY, or a gateway's worker), replacing any
        earlier one of the same id or on the same connection.

        The tasks the READY names as held stay with the worker when they are
        still its lease, or wait in their queue for it (see `_claimable`);
        whatever else the earlier registration held is requeued, unblamed.
        `max_silence_s` overrides the broker's liveness for this worker;
        `silent_while_busy` exempts it from expiry while it holds tasks;
        without `obeys_release`, a task of it that is cancelled keeps its slot
        until it reports (see `_leave_cancelled`). Returns the (ticket,
        attempt) the READY named and the broker did not keep, for the worker
        to be told to give up once welcomed.
        """
        worker = self._new_worker(peer, ready, now)
        worker.max_silence_s = max_silence_s
        worker.silent_while_busy = silent_while_busy
        worker.obeys_release = obeys_release
        named = dict(ready.held)
        old = self.workers.get(ready.worker_id)
        # Not a return but a hand-back (see Worker._give_back_held_up), or a
        # READY sent again: nothing joined that was not here.
        again = old is not None and old.peer == peer and old.services == worker.services
        kept = requeued = 0
        if old is not None:
            kept = self._hand_over(old, worker, named)
            requeued = self._drop_worker(old, lost=None, now=now)[0]
            # Registering again is no progress: a worker that hands back the
            # tasks its busy slots hold must not be given them back at once.
            worker.last_progress = old.last_progress
        stale = self._worker_for_peer(peer)
        if stale is not None:
            self._remove_worker(stale, "replaced on its connection", Fault.NONE, now)

        self.workers[worker.worker_id] = worker
        self._worker_of_peer[peer] = worker.worker_id
        self._credit.join(worker)
        taken_back = self._reclaim(worker, named)
        refused = {t: a for t, a in named.items() if t not in worker.running}
        self._fence(refused)
        self._start_waiting(worker, now)
        # Tasks it kept beyond its credit stay; it gets no more until under it.
        worker.grace = max(0, len(worker.running) - worker.capacity)
        self._credit.offer(worker)
        if old is not None or named:
            notice = WorkerReturned(
                worker.worker_id, kept, requeued, len(refused), taken_back, again
            )
            self._effects.notices.append(notice)
        if not again:
            self._effects.notices.append(
                WorkerJoined(
                    worker.worker_id, worker.services, worker.capacity, worker.slots
                )
            )
        return list(refused.items())

    def _new_worker(self, peer: bytes, ready: p.Ready, now: float) -> Worker:
        services = tuple(dict.fromkeys(ready.services))
        if ready.allow_pickle:
            services += (PICKLE_QUEUE,)
        worker = Worker(ready.worker_id, peer, services, ready.capacity, now)
        worker.slots = ready.slots
        worker.shared_memory = ready.shared is not None
        worker.problem = ready.problem
        worker.last_progress = worker.registered_at = now
        return worker

    def _hand_over(self, old: Worker, new: Worker, named: dict[int, int]) -> int:
        """Move to `new` the leases of `old` (the same worker id) that the
        worker names with their current attempt; return how many."""
        moved = 0
        for ticket in list(old.running):
            task = self.tasks[ticket]
            if named.get(ticket) != task.attempt or task.queue not in new.services:
                continue
            self._release(old, task)
            self._lease(new, task)
            moved += 1
        return moved

    def _reclaim(self, worker: Worker, named: dict[int, int]) -> int:
        """Give `worker` back the queued tasks it names and may claim (see
        `_claimable`), with the attempt it runs; return how many."""
        claimed: dict[str, list[Task]] = {}
        for ticket, attempt in named.items():
            task = self.tasks.get(ticket)
            if task is not None and self._claimable(task, worker, attempt):
                claimed.setdefault(task.queue, []).append(task)
        for queue_name, tasks in claimed.items():
            self._unqueue(queue_name, tasks)
            for task in tasks:
                if task.restored:
                    task.started_at = self._now  # when it ran before is unknown
                task.attempt = named[task.ticket]
                task.state = State.RUNNING
                self._lease(worker, task)
        return sum(map(len, claimed.values()))

    def _fence(self, refused: dict[int, int]) -> None:
        """Make sure nothing a returning worker named and did not keep (the
        `refused` tickets and their attempts) can ever answer a task of ours.

        What it names may be an earlier broker's: one without a journal
        numbered tasks from 1, one with a journal from its highest ticket on
        disk (below those of its last, uncommitted turn). The worker still
        runs those, and will report them. So later tickets start past every
        ticket named, and a task of ours that bears one is next sent at an
        attempt past the one named: the late result matches no lease.
        """
        fenced = {t: a for t, a in refused.items() if t <= MAX_FENCED_TICKET}
        if not fenced:
            return
        self._next_ticket = max(self._next_ticket, max(fenced) + 1)
        for ticket, attempt in fenced.items():
            task = self.tasks.get(ticket)
            if task is not None and task.state is not State.FINISHED:
                fence = min(attempt, MAX_ADOPTED_ATTEMPT)
                self._fences[ticket] = max(self._fences.get(ticket, 0), fence)

    def _claimable(self, task: Task, worker: Worker, attempt: int) -> bool:
        """Whether a worker that names `task` at `attempt` may have it back:
        it waits in its queue, nobody took it since it was taken back from
        this worker at that attempt, or since the journal restored it (the
        broker then knows no attempt, and takes the worker's), and the
        worker still serves its queue."""
        if task.state is not State.QUEUED or task.queue not in worker.services:
            return False
        if task.restored:
            return attempt <= MAX_ADOPTED_ATTEMPT
        return task.given_back_by == worker.worker_id and task.attempt == attempt

    def _unqueue(self, queue_name: str, tasks: list[Task]) -> None:
        """Take `tasks`, all waiting in `queue_name`, out of it: at once, not
        as stale tickets, since they may be queued again before those reach
        the front. Costs one pass over the lanes of their sessions."""
        queue = self._queues[queue_name]
        by_session: dict[str, set[int]] = {}
        for task in tasks:
            by_session.setdefault(task.session, set()).add(task.ticket)
        for session, tickets in by_session.items():
            queue.discard(session, tickets)
        self._drop_queue_if_idle(queue_name)

    def _drop_queue_if_idle(self, queue_name: str) -> None:
        """Drop a queue in which nothing waits any more, with the stale
        tickets it may still hold."""
        if not self.queued_count(queue_name):
            self._queues.pop(queue_name, None)  # the last to leave may have taken it
            self._stale.pop(queue_name, None)

    def _lease(self, worker: Worker, task: Task) -> None:
        """Record that `worker` runs `task` (already RUNNING at its attempt).

        A task whose clock was running keeps its deadline (its entry may have
        left the heap while it waited in its queue: it goes in again); one
        without waits for a slot (see `_start_waiting`), as a returning worker
        may hold more than its slots run.
        """
        task.worker = worker.worker_id
        task.given_back_by = None
        task.restored = False
        worker.running.add(task.ticket)
        self._credit.count_held(worker, task.queue, +1)
        if task.deadline is not None:
            self._deadlines.arm(task, task.deadline)
        else:
            worker.unstarted[task.ticket] = None

    def _worker_for_peer(self, peer: bytes) -> Worker | None:
        worker_id = self._worker_of_peer.get(peer)
        return self.workers.get(worker_id) if worker_id is not None else None

    def _done(self, worker: Worker, outcomes: Iterable[p.Outcome], now: float) -> None:
        worker.last_progress = worker.reported_at = now
        worker.overruns = 0
        for outcome in outcomes:
            task = self.tasks.get(outcome.ticket)
            if (
                task is None
                or task.state is not State.RUNNING
                or task.attempt != outcome.attempt
                or task.worker != worker.worker_id
            ):
                self._late(worker, outcome)
                continue

            self._release(worker, task)
            task.run_s = outcome.duration_s
            self._runs.observe(task.queue, outcome.duration_s, len(outcome.payload))
            if task.cancelled:
                self._drop_cancelled(task, now)
            else:
                self._settle(task, outcome, now)
        self._start_waiting(worker, now)
        self._credit.offer(worker)

    def _late(self, worker: Worker, outcome: p.Outcome) -> None:
        key = (outcome.ticket, outcome.attempt)
        released = key in worker.released
        worker.released.pop(key, None)
        self._effects.notices.append(
            LateOutcome(outcome.ticket, outcome.attempt, worker.worker_id, released)
        )

    def _settle(self, task: Task, outcome: p.Outcome, now: float) -> None:
        unkept = self._unkeepable(outcome.payload)
        if unkept is not None:
            self._finish(task, p.Status.REJECTED, pack_error(unkept), now)
        elif outcome.status is p.Status.CRASHED:
            self._crashed(task, outcome.payload, now)
        elif outcome.status is p.Status.RAISED and _retried_here(task):
            self._retry_later(task, now)
        else:
            self.disk_budget.spend(len(outcome.payload))
            self._finish(task, outcome.status, outcome.payload, now)

    def _unkeepable(self, result: p.Payload) -> TaskRejected | None:
        """Why a result cannot be kept: over the size limit, or more than the
        journal's disk can take; None when it can."""
        size, limit = len(result), self.limits.max_payload_bytes
        if size > limit:
            return TaskRejected(
                "ResultTooLarge",
                f"the result of {size} bytes is over the limit of {limit} bytes "
                "(max_payload_bytes)",
            )
        if size > self.disk_budget.results:
            return TaskRejected("ResultTooLarge", self.disk_budget.result_refusal(size))
        return None

    def _retry_later(self, task: Task, now: float) -> None:
        task.retries_left -= 1
        if task.expected:
            self._unexpect(task)
        task.state = State.WAITING
        delay = self._backoff.delay_s(task.attempt, self._rng.random())
        self._retries.wait(task, now + delay)

    def _crashed(self, task: Task, report: p.Payload, now: float) -> None:
        """A task ended CRASHED: its process died, or it could not read its
        payload in shared memory (see _shared.read_payload)."""
        fields = error_fields(report) if report else {}
        if fields.get("type") != p.PAYLOAD_GONE:
            self._died_running(task, _how_it_died(report), now)
        elif not task.flags & _SHARED:
            # Its client left, and the broker has given it a copy since the
            # reference was sent: no fault of the task's, so no strike.
            self._enqueue(task, front=True)
        else:
            task.deaths += 1
            message = fields.get("message", "")[:MAX_DEATH_LENGTH]
            self._strike(task, f"its payload could not be read ({message})", now)

    def _died_running(self, task: Task, how: str, now: float) -> None:
        """Requeue a task whose task process died under it (its worker said
        CRASHED, and `how`, if it said); poison it if it keeps killing."""
        task.deaths += 1
        seen = f"its task process died ({how})" if how else "its task process died"
        self._strike(task, seen, now)

    def _lost_running(self, task: Task, reason: str, now: float) -> bool:
        """Requeue a task whose worker was lost under it (`reason`: silent,
        unreachable); poison it if that keeps happening.

        A lost worker is weaker evidence than a dead task process: the worker
        may have been paused, or cut off. It still counts, because a task of a
        thread pool can take its worker down with it, and must not kill
        workers for ever. The message says what was seen, not a death.
        """
        task.losses += 1
        return self._strike(task, f"its worker was lost ({reason})", now)

    def _strike(self, task: Task, seen: str, now: float) -> bool:
        """Requeue a task that just had a strike (`seen` says which), or fail
        it as poison; return whether it was poisoned.

        A batch of a map is not run whole again: one of its items may be to
        blame, and each run of the batch runs that item. Its client runs the
        items one by one instead (with `Flags.SPLIT`, one strike counted).
        """
        limit = self.limits.max_attempts
        if task.flags & _BATCH:
            message = (
                f"{seen} while running this batch of items; not running it "
                "whole again (its map runs the items one by one)"
            )
        elif task.deaths + task.losses >= limit:
            message = (
                f"{_strikes(task)} while running this task "
                f"(max_attempts={limit}); not retrying; last: {seen}"
            )
        else:
            self._enqueue(task, front=True)
            self._effects.struck.append(task)
            return False

        error = PoisonTask("PoisonTask", message)
        self._finish(task, p.Status.POISON, pack_error(error), now)
        return True

    def _remove_worker(
        self, worker: Worker, reason: str, fault: Fault, now: float
    ) -> None:
        """Drop `worker`, its tasks struck or not as `fault` says, and say why."""
        lost = reason if fault is Fault.LOST else None
        requeued, poisoned, split = self._drop_worker(worker, lost, now)
        self._effects.notices.append(
            WorkerLost(worker.worker_id, reason, requeued, poisoned, split, fault)
        )

    def _drop_worker(
        self, worker: Worker, lost: str | None, now: float
    ) -> tuple[int, int, int]:
        """Forget a worker and requeue its tasks (`lost`: why it was lost, a
        strike against each; None: it left or was replaced, no blame); return
        how many were requeued, poisoned, and split (map batches whose maps
        run their items alone: no failure)."""
        self._credit.leave(worker)
        del self.workers[worker.worker_id]
        if self._worker_of_peer.get(worker.peer) == worker.worker_id:
            del self._worker_of_peer[worker.peer]

        requeued = poisoned = split = 0
        for ticket in sorted(worker.running, reverse=True):
            task = self.tasks[ticket]
            task.worker = None
            # It may still run there: the worker may name it on its return.
            task.given_back_by = worker.worker_id
            if task.cancelled:
                self._drop_cancelled(task, now)
            elif lost is None:
                self._enqueue(task, front=True)
                requeued += 1
            elif not self._lost_running(task, lost, now):
                requeued += 1
            elif task.flags & _BATCH:
                split += 1
            else:
                poisoned += 1
        worker.running.clear()
        worker.held.clear()
        worker.unstarted.clear()
        return requeued, poisoned, split

    def _release(self, worker: Worker, task: Task) -> None:
        if task.ticket in worker.running:
            self._credit.count_held(worker, task.queue, -1)
        worker.running.discard(task.ticket)
        worker.unstarted.pop(task.ticket, None)
        worker.grace = min(worker.grace, max(0, len(worker.running) - worker.capacity))
        task.worker = None

    # --- deadlines: timeouts the broker enforces ------------------------------------

    def _arm(self, worker: Worker, task: Task, start: float) -> None:
        """Start the broker's clock on a task that started at `start`, if it
        has a timeout. Not on a worker that cannot be told to stop it (an MDP
        worker, which cannot take a second request while it runs one): its
        slot would not be free."""
        if task.timeout_s is None or not worker.obeys_release:
            return
        self._deadlines.arm(task, self._lease_terms.deadline(start, task.timeout_s))

    def _start_waiting(self, worker: Worker, now: float) -> None:
        """Slots of `worker` freed: the tasks it held behind them start, in
        the order they were sent, and their clocks with them. A worker that
        declares no slots was sent nothing to hold (see `_idle_room`)."""
        slots = worker.capacity if worker.slots is None else worker.slots
        while worker.unstarted and len(worker.running) - len(worker.unstarted) < slots:
            ticket = next(iter(worker.unstarted))
            del worker.unstarted[ticket]
            self._arm(worker, self.tasks[ticket], now)

    def _expire_leases(self, now: float) -> None:
        """End the running tasks whose worker let them pass their deadline;
        then drop the workers that let too many pass in a row. Not before:
        a task whose deadline passed in this tick ends as timed out too,
        rather than wait in its queue for another worker."""
        running = sum(len(w.running) for w in self.workers.values())
        overrun: dict[str, list[Task]] = {}
        for entry in self._deadlines.take_due(now, running):
            task = self._armed_task(entry)
            if task is None or task.worker is None:
                continue  # finished, requeued or re-armed since
            worker = self.workers[task.worker]
            trusted_until = self._lease_terms.trusted_until(
                worker.registered_at, worker.reported_at
            )
            if trusted_until > now:
                self._deadlines.arm(task, trusted_until)
                continue
            overrun.setdefault(task.worker, []).append(task)
            self._overran(worker, task, now)
        for worker_id, tasks in overrun.items():
            self._blame_overruns(self.workers[worker_id], tasks, now)

    def _armed_task(self, entry: DeadlineEntry) -> Task | None:
        """The running task a deadline heap entry still stands for, if any."""
        deadline, ticket, attempt = entry
        task = self.tasks.get(ticket)
        if (
            task is None
            or task.state is not State.RUNNING
            or task.attempt != attempt
            or task.deadline != deadline
        ):
            return None
        return task

    def _overran(self, worker: Worker, task: Task, now: float) -> None:
        """End `task` as timed out: its worker did not report it in time.

        It ends as the worker itself would have ended it, TIMEOUT and not
        retried (retries are for exceptions the task raised): run again, it
        would keep its client waiting as long once more, and the first run
        may still be going on there. Its worker, not the task, is blamed
        (see `_blame_overruns`). A result it sends later is late.
        """
        self._release(worker, task)
        worker.overruns += 1
        timeout_s, grace_s = task.timeout_s or 0.0, self._lease_terms.grace_s
        error = TaskTimeout(
            "TaskTimeout",
            f"the task ran past its timeout of {timeout_s:g}s and its worker "
            f"{worker.worker_id} did not report it within {grace_s:g}s more; "
            "the broker ended it (and told the worker to stop it)",
        )
        self._finish(task, p.Status.TIMEOUT, pack_error(error), now)

    def _blame_overruns(self, worker: Worker, tasks: list[Task], now: float) -> None:
        """Say that `worker` let `tasks` overrun; drop it if it let
        `max_attempts` deadlines pass in a row (its other tasks are requeued,
        unblamed: it, not they, is at fault), or else start what it held
        behind the slots those tasks took. It is told to stop them, in one
        RELEASE (see `_stop_on_worker`)."""
        self._tell_to_give_up(worker, [(task.ticket, task.attempt) for task in tasks])
        first = tasks[0]
        self._effects.notices.append(
            LeaseOverrun(
                worker.worker_id,
                len(tasks),
                (first.ticket, first.attempt),
                first.timeout_s or 0.0,
                self._lease_terms.grace_s,
                worker.overruns,
            )
        )
        if worker.overruns >= self.limits.max_attempts:
            reason = f"let {worker.overruns} tasks in a row overrun their deadlines"
            self._remove_worker(worker, reason, Fault.MISBEHAVED, now)
            return
        self._start_waiting(worker, now)
        self._credit.offer(worker)

    # --- both ------------------------------------------------------------------------

    def peer_unreachable(self, peer: bytes, now: float) -> None:
        """A send to `peer` failed: it disconnected, or stopped reading."""
        self._now = now
        worker = self._worker_for_peer(peer)
        stalled = self._in_stall_aftermath(now)
        if worker is not None and stalled:
            self._remove_worker(worker, STALL_REASON, Fault.NONE, now)
            return
        if worker is not None:
            self._remove_worker(worker, "unreachable", Fault.LOST, now)
            return

        name = self._sessions.name_of(peer)
        if name is not None:
            recipient = self.recipients[name]
            recipient.send_failed = True
            how = Departure.CUT_BY_STALL if stalled else Departure.UNREACHABLE
            self._client_gone(recipient, how)

    def revoke_worker(self, peer: bytes, reason: str, now: float) -> None:
        """Drop the worker on `peer` for a reason of the shell's (its key lost
        access): its tasks are requeued, not blamed, and it must register again."""
        worker = self._worker_for_peer(peer)
        if worker is not None:
            self._remove_worker(worker, reason, Fault.NONE, now)

    def revoke_client(self, peer: bytes, farewell: p.Command) -> str | None:
        """Stop sending results to the client connection on `peer`, for a
        reason of the shell's (its key lost access), and send it `farewell`.

        Its session (or sink) is away from then on, as if it had gone: what it
        is owed waits for it to say HELLO again, within result_ttl_s. What the
        connection was sent before stays unacknowledged, for `acknowledge`.
        Returns the session's name, or None if the connection had none.
        """
        name = self._sessions.name_of(peer)
        recipient = self._sessions.disconnect(peer)
        if recipient is not None:
            self._waiting_room.drop(recipient.name)
            held = len(recipient.pending) + len(recipient.unacked)
            notice = ClientLost(recipient.name, held, Departure.REVOKED)
            self._effects.notices.append(notice)
        self._effects.to_clients.append((peer, farewell))
        return name

    def acknowledge(self, name: str, keys: Iterable[tuple[str, int]]) -> None:
        """Take an ACK for session `name` from a connection that no longer
        speaks for it (see `revoke_client`): the results it was sent while it
        did are its to acknowledge, so that they are not delivered again."""
        recipient = self.recipients.get(name)
        if recipient is not None:
            self._ack(recipient, keys)

    def tick(self, now: float) -> None:
        """Let time pass: expire silent peers, wake retries, drop old results."""
        self._now = now
        self._expire_workers(now)
        self._expire_leases(now)
        self._expire_clients(now)
        self._wake_retries(now)
        self._expire_results(now)
        self._forget_tombstones(now)
        self._return_wait.end_if_due(now)
        self._tell_unserved_at_last(now)

    def stood_still(self, stalled_s: float, now: float) -> None:
        """The broker's loop stood still for `stalled_s` up to `now` (the process
        was stopped, swapped out, or waited on its disk): no peer could be heard
        meanwhile, so that stretch of their silence is not held against them.

        Their silence is shifted by the stall rather than forgotten: a peer
        that was already silent before it still expires on time, and a broker
        that keeps stalling still finds its dead peers. In the stall's
        aftermath a worker lost is let go unblamed: one that died cannot be
        told from one that left us for our silence and is coming back.
        """
        self._now = now
        # Peers that gave up on us meanwhile closed their connection: a send
        # to it fails, or it falls silent, though they live and are about to
        # register again on another. On a machine loaded enough to stop us
        # (CI saw it), that may take as long as the stall did, and a silence.
        self._stall_aftermath_until = now + stalled_s + self._peer_silence_s()
        for worker in self.workers.values():
            worker.last_seen = min(now, worker.last_seen + stalled_s)
        for recipient in self.recipients.values():
            recipient.last_seen = min(now, recipient.last_seen + stalled_s)

    def heartbeats(self) -> None:
        """Queue a heartbeat to every connected worker and client."""
        beat = p.Heartbeat()
        self._effects.to_workers.extend((w.peer, beat) for w in self.workers.values())
        self._effects.to_clients.extend(
            (r.peer, beat) for r in self.recipients.values() if r.peer is not None
        )

    def _in_stall_aftermath(self, now: float) -> bool:
        """Whether a worker lost at `now` is lost to our own stall (see
        stood_still): let go unblamed, its tasks are not counted a death."""
        return now < self._stall_aftermath_until

    def _peer_silence_s(self) -> float:
        """How long a peer may be silent before it is presumed gone."""
        return self.limits.heartbeat_interval_s * self.limits.liveness

    def _expire_workers(self, now: float) -> None:
        silence_s = self._peer_silence_s()
        dead = [w for w in self.workers.values() if w.presumed_dead(now, silence_s)]
        stalled = self._in_stall_aftermath(now)
        for worker in dead:
            if stalled:
                self._remove_worker(worker, STALL_SILENCE_REASON, Fault.NONE, now)
                continue
            silent_s = now - worker.last_seen
            self._remove_worker(worker, f"silent for {silent_s:.1f}s", Fault.LOST, now)

    def _expire_clients(self, now: float) -> None:
        """Give up on silent clients and sinks; forget those that left owing
        and holding nothing once `session_grace_s` passed since they were
        last heard (a client killed without a BYE used to stay for ever)."""
        deadline = now - self._peer_silence_s()
        forget_by = now - self.limits.session_grace_s
        idle: list[Recipient] = []
        for recipient in self.recipients.values():
            if recipient.peer is not None:
                if recipient.expires and recipient.last_seen < deadline:
                    self._client_gone(recipient, Departure.SILENT)
            elif recipient.last_seen <= forget_by and self._holds_nothing(recipient):
                idle.append(recipient)
        for recipient in idle:
            self._sessions.forget(recipient)
        if idle:
            grace_s = self.limits.session_grace_s
            self._effects.notices.append(SessionsForgotten(len(idle), grace_s))

    def _wake_retries(self, now: float) -> None:
        for task in self._retries.due(now):
            self._enqueue(task)

    def _expire_results(self, now: float) -> None:
        """Replace each result older than `result_ttl_s` by a tombstone."""
        deadline = now - self.limits.result_ttl_s
        expired: list[Task] = []
        while self._finish_order:
            ticket, finished_at = next(iter(self._finish_order.items()))
            if finished_at >= deadline:
                break
            del self._finish_order[ticket]
            expired.append(self.tasks[ticket])

        error = ResultExpired(
            "ResultExpired",
            f"the result was not collected within {self.limits.result_ttl_s:g}s "
            "(result_ttl_s) and was dropped",
        )
        for task in expired:
            self._entomb(task, error, now)
        if expired:
            self._effects.notices.append(ResultsExpired(len(expired)))

    def _entomb(self, task: Task, error: ResultExpired, now: float) -> None:
        """Replace the result of `task`, no longer in `_finish_order`, by a
        small tombstone saying `error`, so that its client hears why, never
        silence."""
        task.status = p.Status.EXPIRED
        self._replace_result(task, pack_error(error))
        self._bury(task, now)
        # The journal keeps the tombstone, and when it was made (as the time
        # the task finished): a restart keeps it as long, no longer.
        self._effects.finished.append(task)

    def _bury(self, task: Task, expired_at: float) -> None:
        """Keep `task`, whose result expired at `expired_at`, as a tombstone."""
        self._tombstones[task.ticket] = expired_at
        self._tombstone_bytes += len(task.result)
        self._room.count_kept(task.session, -len(task.result))
        self._sessions.recipient(task.recipient).expired += 1

    def _forget_tombstones(self, now: float) -> None:
        """Forget the tombstones kept for `result_ttl_s` since they were made.

        Telling a client its result expired is worth another TTL of a few
        bytes; past that, a session that has not come back for twice the TTL
        hears nothing of those tasks. Whoever was owed them and is away is
        forgotten too, once it is owed nothing else.
        """
        deadline = now - self.limits.result_ttl_s
        by_recipient: dict[str, set[int]] = {}
        while self._tombstones:
            ticket, expired_at = next(iter(self._tombstones.items()))
            if expired_at >= deadline:
                break
            task = self.tasks[ticket]
            by_recipient.setdefault(task.recipient, set()).add(ticket)
            self._forget(task)
        for name, tickets in by_recipient.items():
            self._withdraw_results(name, tickets)
        if by_recipient:
            count = sum(len(tickets) for tickets in by_recipient.values())
            ttl_s = self.limits.result_ttl_s
            self._effects.notices.append(TombstonesForgotten(count, ttl_s))

    def _withdraw_results(self, name: str, tickets: set[int]) -> None:
        """Take forgotten `tickets` off what recipient `name` is owed."""
        recipient = self.recipients.get(name)
        if recipient is None:
            return
        recipient.owe_no_more(tickets)
        if recipient.peer is None:
            self.detach_if_idle(name)

    # --- queues and results ----------------------------------------------------------

    def _enqueue(self, task: Task, front: bool = False) -> None:
        if task.expected:  # given back by its worker
            self._unexpect(task)
        task.state = State.QUEUED
        task.queued_at = self._now
        queue = self._queues.get(task.queue)
        if queue is None:
            queue = self._queues[task.queue] = FairQueue(self._room.held_back)
        if not queue:
            # It joins the turns level with the least served of the queues
            # waiting last, not ahead of them by what they did while it was
            # idle, nor behind by what it did while it ran alone.
            queue.handed_out_s = max(queue.handed_out_s, self._turn_clock)
        if front:
            queue.appendleft(task.ticket, task.session)
        else:
            queue.append(task.ticket, task.session)

    def _finish(
        self, task: Task, status: p.Status, result: p.Payload, now: float
    ) -> None:
        self._conclude(task, status, result, now)
        self._sessions.recipient(task.recipient).pending.append(task.ticket)
        self._finish_order[task.ticket] = now

    def _conclude(
        self, task: Task, status: p.Status, result: p.Payload, now: float
    ) -> None:
        """Make `task` FINISHED with `status`, counted and journalled, but not
        yet waiting for its recipient."""
        self._leave_queue(task)
        if task.expected:
            self._unexpect(task)
        self._failures.count_ending(task, status, result, now, self._effects)
        task.state = State.FINISHED
        task.status = status
        task.finished_at = now
        # The arguments are not needed any more; only the result is kept.
        if task.flags & _SHARED:
            self._unshare_task(task)
        self._count_bytes(task, -_payload_size(task))
        task.payload = b""
        self._replace_result(task, result)
        self._effects.finished.append(task)

    def worker_peers(self) -> set[bytes]:
        """The connections of the registered workers."""
        return set(self._worker_of_peer)

    def unshare(
        self, arena: bytes, read: Callable[[p.Payload], p.Payload | None]
    ) -> list[tuple[int, int]]:
        """Give every unfinished task whose payload lies in `arena` a copy of
        it, read by `read` from the reference: the arena is about to go (its
        client left, see _shared); a task whose payload cannot be read keeps
        its reference. Returns the (ticket, attempt) of those running: their
        workers were sent the reference, and read it when they start them."""
        tickets = self._shared.pop(arena, set())
        unread = set()
        running = []
        for ticket in tickets:
            task = self.tasks[ticket]
            if task.state is State.RUNNING:
                running.append((ticket, task.attempt))
            payload = read(task.payload)
            if payload is None:
                unread.add(ticket)
                continue
            self._count_bytes(task, len(payload) - _payload_size(task))
            task.payload = payload
            task.flags &= ~_SHARED
        if unread:
            self._shared[arena] = unread
        self._waiting_room.copy_shared(arena, read)
        return running

    def runs(self, ticket: int, attempt: int) -> bool:
        """Whether attempt `attempt` of task `ticket` is still running."""
        task = self.tasks.get(ticket)
        return (
            task is not None and task.state is State.RUNNING and task.attempt == attempt
        )

    def _unshare_task(self, task: Task) -> None:
        arena = p.shared_arena(task.payload)
        tickets = self._shared.get(arena)
        if tickets is not None:
            tickets.discard(task.ticket)
            if not tickets:
                del self._shared[arena]

    def _replace_result(self, task: Task, result: p.Payload) -> None:
        change = len(result) - len(task.result)
        self._count_bytes(task, change)
        self._room.count_kept(task.session, change)
        task.result = result

    def _count_bytes(self, task: Task, change: int) -> None:
        """Bytes held for a task count in the total, and for its submitter."""
        self._queued_bytes += change
        self._hold_bytes(task.session, change)

    def _hold_bytes(self, session: str, change: int) -> None:
        held = self._held_bytes.get(session, 0) + change
        if held:
            self._held_bytes[session] = held
        else:
            self._held_bytes.pop(session, None)
        if change < 0 and session in self._waiting_room.parked:
            self._waiting_room.room_freed(session)

    # --- room for results (see result_room) -----------------------------------------

    def _unexpect(self, task: Task) -> None:
        """`task`, which counts an expected result, runs no more: its session
        expects that result no more."""
        self._room.unexpect(task.session, task.expected)
        task.expected = 0

    def _review_result_room(self) -> None:
        """Hold back, or let go again, the queued tasks of the sessions whose
        results changed since the last look."""
        for session, held_back in self._room.review():
            self._rest_lanes(session, held_back)

    def _rest_lanes(self, session: str, resting: bool) -> None:
        """Take the lanes of `session` out of turn in every queue, or give
        them their turns back. Once per change, not per task: one pass over
        the queues."""
        for queue in self._queues.values():
            if resting:
                queue.rest(session)
            else:
                queue.wake(session)

    def await_returning_workers(self, now: float) -> float:
        """Start serving after a restart: hold the queues of restored tasks
        back for RETURN_WAIT_BEATS heartbeat intervals from `now`, for the
        workers that may still run them to come back and name them (see
        return_wait); return how long (0.0 if nothing was restored)."""
        # Workers come (back) in the first beats too, a client's first
        # SUBMIT often before them: not yet a function nobody serves.
        self._unserved_said_from = now + self._return_wait.wait_s
        return self._return_wait.start(now)

    def _dispatch(self) -> None:
        """Hand out what waits to the workers with credit for it.

        Functions take turns by the work they were handed, not by count:
        while several wait, the queue handed the fewest expected seconds
        goes first, and each takes at most one task per worker before the
        next in line. Otherwise a backlog of long tasks would take a freed
        slot every other turn, and other functions' short tasks would wait
        for it to drain.
        """
        held_back = self._return_wait.held_back
        waiting = [
            (queue_name, queue)
            for queue_name, queue in self._queues.items()
            if queue and queue_name not in held_back
        ]
        if not waiting:
            return
        least_served = min(queue.handed_out_s for _, queue in waiting)
        self._turn_clock = max(self._turn_clock, least_served)
        if len(waiting) == 1:
            self._serve(*waiting[0], one_turn=False)
            return
        while waiting:
            waiting.sort(key=_work_handed_out)
            waiting = [
                (queue_name, queue)
                for queue_name, queue in waiting
                if self._serve(queue_name, queue, one_turn=True) and queue
            ]

    def _serve(self, queue_name: str, queue: FairQueue, *, one_turn: bool) -> bool:
        """Hand out `queue` while workers have room for it, or only one turn
        of it (a task per worker) when other queues wait in line; False if
        nobody took any. Its turns are charged what it handed out."""
        available = self._credit.with_credit(queue_name)
        waiting = len(queue)
        if one_turn:
            if queue and available:
                self._assign_round(queue_name, queue, available, one_turn=True)
        else:
            while queue and available:
                if not self._assign_round(queue_name, queue, available, one_turn=False):
                    break  # credit left, but no allowance for this queue
        handed_out = waiting - len(queue)
        queue.handed_out_s += handed_out * self._turn_cost_s(queue_name)
        return handed_out > 0

    def _turn_cost_s(self, queue_name: str) -> float:
        """What a task of `queue_name` costs its queue's turns: its mean run
        time, a long task's while unknown, and at least MIN_TURN_S, so that
        tasks of no measurable length still take turns by count."""
        run_s = self._runs.run_s.get(queue_name, self._prefetch.long_task_s)
        return max(run_s, MIN_TURN_S)

    def _assign_round(
        self,
        queue_name: str,
        queue: FairQueue,
        available: dict[str, None],
        *,
        one_turn: bool,
    ) -> bool:
        """Hand out one round of `queue` (one task per worker if `one_turn`);
        False if nobody could take any.

        Idle slots first: a task sent to a worker whose slots are all busy
        waits there behind them, while another worker may have a slot free.
        Then what workers may hold beyond their slots (see `_prefetch_room`),
        in one turn only if no slot was free: other queues in line get their
        turn at the slots first.
        """
        most = 1 if one_turn else _UNCAPPED
        assigned = self._hand_out(
            queue_name, queue, available, self._idle_room, most, into_slots=True
        )
        if assigned and one_turn:
            return True
        if queue and available:  # the idle slots may have taken all the credit
            room_of = self._prefetch_room
            prefetched = self._hand_out(
                queue_name, queue, available, room_of, most, into_slots=False
            )
            assigned = assigned or prefetched
        return assigned

    def _hand_out(
        self,
        queue_name: str,
        queue: FairQueue,
        available: dict[str, None],
        room_of: Callable[[Worker, str], int],
        most: int,
        *,
        into_slots: bool,
    ) -> bool:
        """Give each available worker up to the room `room_of` says it has
        (its free slots, if `into_slots`), and `most`; False if none had any."""
        rooms = []
        for worker_id in list(available):
            worker = self.workers[worker_id]
            room = room_of(worker, queue_name)
            if room > 0:
                rooms.append((worker, room))
        if not rooms:
            return False

        # Spread the queue over the workers with room rather than filling the
        # first one: with more room than tasks, each gets a share.
        share = max(1, math.ceil(len(queue) / len(rooms)))
        for worker, room in rooms:
            count = min(share, room, most)
            assignments = self._take(queue_name, queue, worker, count, into_slots)
            if assignments:
                self._effects.to_workers.append((worker.peer, p.Tasks(assignments)))
                if into_slots:
                    worker.last_progress = self._now  # a slot starts on one
            self._credit.offer(worker)
            if not queue:
                break
        return True

    def _idle_room(self, worker: Worker, queue_name: str) -> int:
        """How many tasks of `queue_name` the worker can start at once: its
        free slots (all its credit, if it does not say how many slots)."""
        room = min(worker.free, self._allowance(worker, queue_name))
        if worker.slots is None:
            return room
        return min(room, worker.slots - len(worker.running))

    def _prefetch_room(self, worker: Worker, queue_name: str) -> int:
        """How many more tasks of `queue_name` the worker may hold: none
        unless a slot will soon be free to start them."""
        if not self._frees_a_slot_soon(worker):
            return 0
        return min(worker.free, self._allowance(worker, queue_name))

    def _frees_a_slot_soon(self, worker: Worker) -> bool:
        """Whether tasks held beyond the worker's slots would start soon: a
        slot is free, or it holds tasks of a function known to be short and
        has shown progress within as long as a long task takes. Otherwise
        they would wait behind tasks that are long, of a length not known yet,
        or that may never end."""
        if worker.slots is None or len(worker.running) < worker.slots:
            return True
        long_s = self._prefetch.long_task_s
        if self._now - worker.last_progress > long_s:
            return False
        run_s = self._runs.run_s
        return any(run_s.get(name, long_s) < long_s for name in worker.held)

    def _allowance(self, worker: Worker, queue_name: str) -> int:
        """How many more tasks of `queue_name` the worker may hold.

        Its credit follows the mean of everything it ran, so a worker that ran
        tiny tasks has room for many; long tasks of another function must not
        pile up there while other workers idle. Per function, a slot holds
        what the prefetch policy allows for that function's run time, and one
        task while that is not known yet.
        """
        if worker.slots is None:
            # It does not say how many it runs at once, so the broker cannot
            # tell what runs there from what waits: an even share of the
            # queue's work, not all its credit. A worker that declared a
            # credit of thousands took 812 of 1000 tasks while two idled.
            held = worker.held.get(queue_name, 0)
            return max(0, min(worker.free, self._even_share(queue_name) - held))
        per_slot = self._prefetch.per_slot(self._runs.run_s.get(queue_name))
        return max(0, worker.slots * per_slot - worker.held.get(queue_name, 0))

    def _even_share(self, queue_name: str) -> int:
        """An even share of a queue's tasks, waiting and held, among the
        workers that serve it and take work. Asked once per slot-less worker
        in each dispatch pass, so from counts kept up to date, not a pass over
        the workers: that made a pass over many such workers quadratic."""
        return self._credit.even_share(queue_name, self.queued_count(queue_name))

    def _take(
        self,
        queue_name: str,
        queue: FairQueue,
        worker: Worker,
        count: int,
        into_slots: bool,
    ) -> list[p.Assignment]:
        """Lease up to `count` tasks of `queue` to `worker`: started now in its
        free slots if `into_slots`, else held behind its busy ones."""
        assignments: list[p.Assignment] = []
        now = self._now
        # What each task taken is expected to return, counted against its
        # session's room for results; past that room, its lanes rest.
        expected = int(self._runs.result_size.get(queue_name, 0.0))
        room = self._room
        credit = self._credit
        while queue and len(assignments) < count:
            task = self.tasks.get(queue.popleft())
            if task is None or task.state is not State.QUEUED:
                self._stale_taken(queue_name)  # cancelled while it waited: skip it
                continue

            task.state = State.RUNNING
            task.started_at = now
            if self._fences:  # after a worker came back from an earlier broker
                task.attempt = max(task.attempt, self._fences.pop(task.ticket, 0))
            task.attempt += 1
            # What `_lease` records, written out: this runs for every task of
            # every batch, where a call per task shows in A's figures. A field
            # added to a lease goes in both.
            task.worker = worker.worker_id
            task.given_back_by = None
            task.restored = False
            worker.running.add(task.ticket)
            credit.count_held(worker, queue_name, +1)
            task.deadline = None
            if not into_slots:
                worker.unstarted[task.ticket] = None
            elif task.timeout_s is not None:  # most have none: no call for them
                self._arm(worker, task, now)
            if expected:
                task.expected = expected
                if room.expect(task.session, expected):
                    self._rest_lanes(task.session, True)
            assignments.append(
                p.Assignment(
                    task.ticket,
                    task.attempt,
                    task.function,
                    task.payload,
                    task.flags,
                    task.timeout_s,
                )
            )
        return assignments

    def _leave_queue(self, task: Task) -> None:
        if task.state is not State.QUEUED:
            return
        # Its ticket stays in the queue until it reaches the front, unless
        # nothing in the queue waits any more: then the queue goes, dead
        # tickets and all. No worker takes from a queue of a name nobody
        # serves, so each such name would leave its dead tickets behind.
        name = task.queue
        stale = self._stale.get(name, 0) + 1
        if stale < len(self._queues[name]):
            self._stale[name] = stale
        else:
            del self._queues[name]
            self._stale.pop(name, None)

    def _stale_taken(self, queue_name: str) -> None:
        left = self._stale.get(queue_name, 0) - 1
        if left > 0:
            self._stale[queue_name] = left
        else:
            self._stale.pop(queue_name, None)

    def _deliver(self) -> None:
        if self.delivery_held is not None:
            return  # they wait, as for a client that is away
        for recipient in self.recipients.values():
            if recipient.peer is None:
                continue
            room = self.limits.delivery_window - len(recipient.unacked)
            limit_bytes = self.limits.delivery_window_bytes
            while recipient.pending and room > 0:
                if recipient.unacked_bytes >= limit_bytes:
                    break  # a slow recipient of large results: the rest wait here
                count = min(room, RESULTS_PER_MESSAGE)
                batch = self._next_results(recipient, count, limit_bytes)
                if batch:
                    self._effects.to_clients.append((recipient.peer, p.Results(batch)))
                    self._unannounced.told_by(recipient.peer, batch)
                    room -= len(batch)

    def _next_results(
        self, recipient: Recipient, count: int, limit_bytes: int
    ) -> list[p.ResultEntry]:
        """Up to `count` results for `recipient`, while the bytes it was sent
        and has not acknowledged stay under `limit_bytes` (the caller checks
        before the first, so one result goes whatever its size)."""
        batch: list[p.ResultEntry] = []
        while recipient.pending and len(batch) < count:
            if recipient.unacked_bytes >= limit_bytes:
                break
            task = self.tasks.get(recipient.pending.popleft())
            if task is None or task.status is None or task.ticket in recipient.unacked:
                continue
            recipient.delivered(task.ticket, len(task.result))
            origin = task.session if task.recipient != task.session else ""
            batch.append(p.ResultEntry(task.task_id, task.status, task.result, origin))
        return batch

    def flush(self, now: float | None = None) -> Effects:
        """End a loop turn: dispatch and deliver, then hand back what to do.

        Acceptances are announced once ACCEPT_GRACE_S has passed since `now`
        of their SUBMIT, unless a result announced them first; without `now`,
        all of them at once (a broker's last turn).
        """
        self._accept_waiting()
        # Those of waiting tasks the broker could no longer take, and any the
        # shell made without a SUBMIT following.
        self._send_refusals()
        self._review_result_room()
        self._dispatch()
        self._deliver()
        self._unannounced.send_due(now, self._effects.to_clients)
        self._holdings_said = None
        self._room_sought = False
        if self._sessions.departed:
            self._effects.departed += self._sessions.departed
            self._sessions.departed.clear()

        effects = self._effects
        self._effects = Effects()
        return effects

    def announce_due_at(self) -> float:
        """When the oldest unannounced acceptance is due (inf if none is)."""
        return self._unannounced.due_at()

    # --- for gateways (MDP, Titanic) -------------------------------------------------

    def serves(self, queue: str) -> bool:
        """Whether a registered worker that is not draining serves `queue`."""
        return self._credit.serves(queue)

    def find_task(self, session: str, task_id: int) -> Task | None:
        """The task `session` submitted as `task_id`, if the broker still has it."""
        ticket = self._by_key.get((session, task_id))
        return None if ticket is None else self.tasks[ticket]

    def withdraw(self, session: str, task_id: int) -> bool:
        """Forget a task that is queued, waiting or finished, result and all.

        Returns False if it is running (its worker has it; it finishes as usual)
        and True otherwise, including when the broker never had it.
        """
        task = self.find_task(session, task_id)
        if task is None:
            return True
        if task.state is State.RUNNING:
            return False
        if task.state is State.FINISHED:
            recipient = self.recipients.get(task.recipient)
            if recipient is not None:
                recipient.owe_no_more({task.ticket})
        self._leave_queue(task)
        self._forget(task)
        return True

    def queued_count(self, queue_name: str) -> int:
        """How many tasks wait in `queue_name` (retries in backoff not counted)."""
        queue = self._queues.get(queue_name)
        return 0 if queue is None else len(queue) - self._stale.get(queue_name, 0)

    def waiting_queues(self, prefix: str) -> list[str]:
        """The queues whose names start with `prefix` and in which a task waits."""
        return [
            name
            for name in self._queues
            if name.startswith(prefix) and self.queued_count(name)
        ]

    def withdraw_queued(
        self,
        queue_name: str,
        queued_by: float,
        spare: Callable[[Task], bool],
        why: Callable[[Task], bytes],
        now: float,
    ) -> list[Task]:
        """End as not found, and forget, every task that has waited in
        `queue_name` since `queued_by` or earlier, except those `spare` keeps;
        `why` gives each its error report. Return the tasks ended.

        Ended, not only forgotten: counted failed in the status, the metrics
        and the list of failures, as a task whose function no worker serves;
        forgotten, they were counted submitted and then nowhere. A queue left
        with nothing waiting is dropped, stale tickets and all: requests for
        names nobody serves must not leave a queue behind each.
        """
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        withdrawn = [
            task
            for ticket in queue
            if (task := self.tasks.get(ticket)) is not None
            and task.state is State.QUEUED
            and task.queued_at <= queued_by
            and not spare(task)
        ]
        for task in withdrawn:
            self._conclude(task, p.Status.NOT_FOUND, why(task), now)
            self._forget(task)
        self._drop_queue_if_idle(queue_name)
        return withdrawn

    # --- recovery and introspection ------------------------------------------------

    def restore(self, task: Task, now: float) -> None:
        """Take back a task from the journal after a restart.

        Tasks that had not finished go back to the queue, in ticket order;
        finished ones wait for their recipient to connect and acknowledge them,
        and must come in the order they finished (`finished_at`, on this
        process's clock): their results expire in that order. A tombstone's
        `finished_at` is when its result expired: it is forgotten in turn.
        """
        # The ticket is the journal's key for the task: it survives restarts.
        self._now = now
        self._next_ticket = max(self._next_ticket, task.ticket + 1)
        task.worker = None
        self._admit(task)
        # Its session is known again, as it was before the restart, though
        # its results go to a sink: status lists it with the tasks it holds.
        # Both count as last heard now: their clients have had no chance to
        # come back yet, and must not lose results to make room meanwhile.
        for name in (task.recipient, task.session):
            recipient = self._sessions.recipient(name)
            recipient.last_seen = max(recipient.last_seen, now)
        if task.state is State.FINISHED:
            self._sessions.recipient(task.recipient).pending.append(task.ticket)
            if task.status is p.Status.EXPIRED:
                self._bury(task, task.finished_at)  # journalled when it expired
            else:
                self._finish_order[task.ticket] = task.finished_at
        else:
            task.restored = True
            self._return_wait.restored(task.queue)
            self._enqueue(task)
            self.submitted += 1
            self.restored += 1
        # A session whose kept results fill its room stays held back.
        self._review_result_room()

    def restore_failure(self, record: FailedTask) -> None:
        """Take back a failure record from the journal after a restart, oldest
        first; `record.failed_at` must be on this process's clock (see
        `Failures.restore`)."""
        self._failures.restore(record, self._effects)

    # --- status: what the report reads (see status.StatusReport) ----------------------

    def status(
        self,
        now: float,
        scope: Scope | None = None,
        full: bool = False,
        asker: str | None = None,
    ) -> dict[str, object]:
        """A plain-data picture of the broker, for `ventilator status`; within
        `scope`, only what a client with limited rights may see (see
        `status.StatusReport`).

        It lists the most relevant `STATUS_WORKERS` workers, `STATUS_QUEUES`
        functions and `STATUS_CLIENTS` clients, with exact counts of them all,
        so that it fits in an answer however many there are; `full` lists
        every worker and function (the broker's own metrics, which no frame
        carries). Its cost grows with workers, running tasks and queues, not
        with the number of queued tasks, so a dashboard may ask every second.
        Sessions that only asked questions and hold nothing are left out, but
        `asker`'s own: a program's client that asks looks itself up.
        """
        report = StatusReport(
            tasks=self.tasks,
            workers=self.workers.values(),
            recipients=self.recipients.values(),
            held=self._held,
            parked=self._waiting_room.parked,
            result_bytes=self._room.kept,
            expected_bytes=self._room.expected,
            held_back=self._room.held_back,
            failed=self.failed,
            tombstones=len(self._tombstones),
            queued=self._queued_by_function(),
            retrying=self._retries.by_queue(),
            next_retry_at=self._retries.next_due_at(),
            totals=self.totals(),
            asker=asker,
            not_accepting=self.not_accepting or self._refusal_said(now),
            delivery_held=self.delivery_held,
            serves=self.serves,
        )
        if scope is not None:
            return report.within(scope, now)
        return report.whole(now, full)

    def totals(self) -> dict[str, int]:
        """Tasks taken on and finished since this broker started, by outcome.

        `submitted` includes the `restored` tasks: the unfinished ones the
        journal brought back at start. Results that had finished before the
        restart count in neither. `split` counts maps' batches handed back
        to their maps, which submit their items anew: those whose task process
        died or whose worker was lost, and those of several items that timed
        out or whose result was over the limit (see `split_for_its_map`).
        They are not `failed`. `rejected` counts the tasks refused as they
        were submitted, which were never accepted and count nowhere else.
        """
        return outcome_totals(
            self.submitted,
            self.restored,
            self._failures.finished_by_status,
            self._failures.batches_split,
            self.rejected,
        )

    def _queued_by_function(self) -> dict[str, int]:
        """Tasks waiting per function: in its queue, or due for a retry."""
        queued = {
            name: len(queue) - self._stale.get(name, 0)
            for name, queue in self._queues.items()
        }
        for task in self._retries.tasks():
            queued[task.queue] = queued.get(task.queue, 0) + 1
        return {name: count for name, count in queued.items() if count}

    # --- operator commands -----------------------------------------------------------

    def _operate(
        self, command: p.OperatorCommand, now: float, scope: Scope | None = None
    ) -> dict[str, object]:
        if isinstance(command, p.ListFailed):
            return self._failures.listed(command.limit, scope, now)
        if isinstance(command, p.Retry):
            return self._retry_failed(command.tickets, command.sink, now, scope)
        if isinstance(command, p.Purge) and command.session is not None:
            return self._purge_session(command.session, now)
        if isinstance(command, p.Purge):
            return {"purged": self._purge(command.function, now)}
        return {"outcome": self._cancel_one(command.session, command.task_id, now)}

    def _retry_failed(
        self,
        tickets: Sequence[int],
        sink: str,
        now: float,
        scope: Scope | None = None,
    ) -> dict[str, object]:
        """Submit failed tasks again, as new tasks whose results go to `sink`.

        The original recipient has had its failure already, and a task id's
        result is delivered once; so the rerun is the broker's own task, named
        after the failed one's ticket, and its result is the sink's. Within a
        `scope`, only its sessions' failures are retried, each if the client
        may still submit its function, and the rerun is one of its sessions'.
        """
        session = RETRY_SESSION if scope is None else scope.retry_session
        wanted = set(tickets)
        chosen = self._failures.chosen(wanted, scope)
        retried: list[int] = []
        # Pairs, not a dict: msgpack maps with integer keys are refused on the
        # wire (strict_map_key).
        refused: list[list[object]] = []
        pickle_served = self._pickle_served()
        for record in chosen:
            reason = self._retry_refusal(record, session, pickle_served, scope)
            if reason is not None:
                refused.append([record.ticket, reason])
                continue
            # No map awaits the rerun to split it: a rerun that fails whole
            # is a failure (a batch still poisons at its first death).
            spec = p.TaskSpec(
                record.ticket,
                record.function,
                record.payload,
                record.flags & ~_SPLITTABLE,
                record.timeout_s,
                sink=sink,
            )
            self._accept(session, spec, now)
            self._failures.forget(record, self._effects)
            retried.append(record.ticket)

        unknown = sorted(wanted - {r.ticket for r in chosen})
        mine = "" if scope is None else " among this client's sessions' failures"
        kept = self._failures.records.maxlen
        for ticket in unknown:
            refused.append(
                [
                    ticket,
                    f"no failed task with this ticket is remembered{mine}: "
                    f"retried already, or older than the latest {kept} failures "
                    "kept",
                ]
            )
        return {"retried": retried, "refused": refused, "sink": sink}

    def _retry_refusal(
        self,
        record: FailedTask,
        session: str,
        pickle_served: bool,
        scope: Scope | None,
    ) -> str | None:
        if record.payload is None:
            return (
                f"its arguments were over {RETRY_PAYLOAD_BYTES} bytes and not kept; "
                "submit it again from the client"
            )
        if scope is not None and scope.retry_refusal is not None:
            return scope.retry_refusal
        if scope is not None and not scope.may_submit(record.function, record.flags):
            return f"this client may not submit {record.function} (its rights)"
        if (session, record.ticket) in self._by_key:
            return "a retry of it is still in the broker"
        spec = p.TaskSpec(record.ticket, record.function, record.payload, record.flags)
        return self._refusal(session, spec, pickle_served)

    def _purge(self, queue_name: str, now: float) -> int:
        """Cancel every task waiting to run in one queue; return how many."""
        purged = 0
        queue = self._queues.get(queue_name, FairQueue())
        for ticket in queue:
            task = self.tasks.get(ticket)
            if task is not None and task.state is State.QUEUED:
                self._finish(task, p.Status.CANCELLED, b"", now)
                purged += 1
        queue.clear()
        self._stale.pop(queue_name, None)

        for task in self._retries.tasks():
            if task.queue == queue_name:
                self._finish(task, p.Status.CANCELLED, b"", now)
                purged += 1
        return purged

    def _purge_session(self, name: str, now: float) -> dict[str, object]:
        """Drop everything the broker holds for session `name`, which left: the
        results waiting for it, the tombstones of its expired ones (counted
        apart, as `status` counts them), and the tasks it submitted (queued
        ones at once, running ones stopped on their workers; see
        `_cancel_running`). Refused while it is connected: its results are on
        their way to it."""
        recipient = self.recipients.get(name)
        if recipient is not None and recipient.peer is not None:
            return {
                "session": name,
                "refused": f"session {name!r} is connected: it receives its "
                "results; purge --session is for sessions that left",
            }

        # What it sent past its window counts as queued: it waited to be.
        dropped = {
            "results": 0,
            "expired": 0,
            "queued": self._waiting_room.drop(name),
            "running": 0,
        }
        running: list[Task] = []
        # Results of its tasks that wait for sinks are the sinks' to drop, but
        # they count against this session: say how many there are.
        dropped["for_sinks"] = 0
        for task in list(self.tasks.values()):
            kind = self._purge_for_session(task, name, now)
            if kind == "running":
                running.append(task)
            if kind is not None:
                dropped[kind] += 1
        self._cancel_running(running, now)  # a RELEASE per worker, not per task
        if recipient is not None:
            recipient.pending.clear()  # of tickets forgotten just now
            recipient.take_back_unacked()
            self.detach_if_idle(name)
        return {"session": name, **dropped}

    def _purge_for_session(self, task: Task, name: str, now: float) -> str | None:
        """Drop `task` if it is session `name`'s (a running one is left to the
        caller, which stops them all at once); say how it was held."""
        if task.state is State.FINISHED:
            if task.recipient == name:
                # Asked before forgetting it, which takes it off the tombstones.
                kind = "expired" if task.ticket in self._tombstones else "results"
                self._forget(task)
                return kind
            if task.session == name:
                return "for_sinks"  # the sink's result: see purge --sink
            return None
        if task.session != name or task.cancelled:
            return None
        if task.state is State.RUNNING:
            return "running"  # stopped with the others (see _purge_session)
        self._drop_cancelled(task, now)
        return "queued"

    def _cancel_one(self, session: str, task_id: int, now: float) -> str:
        """Cancel a task for an operator; say what became of it."""
        ticket = self._by_key.get((session, task_id))
        task = self.tasks.get(ticket) if ticket is not None else None
        if task is None:
            return "unknown" if session in self.recipients else "unknown session"
        if task.cancelled:
            return "cancelled already"  # by its client, on an MDP worker
        if task.state is State.RUNNING:
            return self._cancel_one_running(task, now)
        if task.state is State.FINISHED:
            cancelled = task.status is p.Status.CANCELLED
            return "cancelled already" if cancelled else "finished"
        self._finish(task, p.Status.CANCELLED, b"", now)
        return "cancelled"

    def _cancel_one_running(self, task: Task, now: float) -> str:
        """Stop a task a worker holds, for an operator (a hung one, with no
        timeout, runs for ever): the worker gives it up (RELEASE), and its
        client hears it cancelled, as for a queued task. An MDP worker cannot
        be told to stop: its task runs on."""
        assert task.worker is not None, f"task {task.ticket} held by no worker"
        worker = self.workers[task.worker]
        if not worker.obeys_release:
            return "running"
        self._release_on_worker(worker, [task], now)
        self._finish(task, p.Status.CANCELLED, b"", now)
        return "cancelled"

    # --- invariants: checked by the tests after every step ----------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the scheduler's state is inconsistent (for
        tests, after a `flush`)."""
        # Loaded only when a test asks: the broker never checks itself.
        from ._invariants import check_invariants

        check_invariants(self)

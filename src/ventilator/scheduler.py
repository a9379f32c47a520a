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

A task whose worker died `max_attempts` times finishes as POISON; a cancelled
task finishes as CANCELLED. A worker never holds more tasks than its capacity.
Results of one attempt only count while that attempt is current (fencing): a
late result from an attempt that was given up on is dropped.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import protocol as p
from .errors import PoisonTask, ResultExpired, TaskRejected
from .policy import Backoff, Limits
from .serialization import pack_error

# Pickled callables have no function name a worker registered; they share one
# queue, served only by workers that opted in to unpickling.
PICKLE_QUEUE = "<pickled>"

# How many results one RESULTS message carries at most.
RESULTS_PER_MESSAGE = 1024


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # for a retry's backoff to pass
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Task:
    """One accepted task, from its acceptance until its result is acknowledged."""

    ticket: int
    session: str
    task_id: int
    function: str
    payload: p.Payload
    flags: int
    timeout_s: float | None
    retries_left: int
    recipient: str
    state: State = State.QUEUED
    attempt: int = 0
    deaths: int = 0
    worker: str | None = None
    status: p.Status | None = None
    result: p.Payload = b""
    finished_at: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.session, self.task_id)

    @property
    def queue(self) -> str:
        return PICKLE_QUEUE if self.flags & p.Flags.PICKLED else self.function


@dataclass(slots=True, eq=False)
class Worker:
    worker_id: str
    peer: bytes
    services: tuple[str, ...]
    capacity: int
    last_seen: float
    running: set[int] = field(default_factory=set)
    draining: bool = False
    # Tasks it may hold above `capacity` after lowering it: those it had then.
    grace: int = 0

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.capacity - len(self.running))


@dataclass(slots=True, eq=False)
class Recipient:
    """Whoever receives results: a client session, or a named sink."""

    name: str
    peer: bytes | None = None
    last_seen: float = 0.0
    pending: deque[int] = field(default_factory=deque)  # tickets to deliver
    unacked: dict[int, None] = field(default_factory=dict)  # delivered, in order


def _counts_against_window(task: Task) -> bool:
    """A task counts against its submitter's window until it is forgotten, except
    a finished sink task, whose result is the sink's to collect."""
    return task.state is not State.FINISHED or task.recipient == task.session


def sink_recipient(name: str) -> str:
    """The recipient name under which a sink's results wait."""
    return f"sink:{name}"


# --- notices: what the broker's log should say ----------------------------------


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker_id: str
    services: tuple[str, ...]
    capacity: int


@dataclass(frozen=True, slots=True)
class WorkerDraining:
    worker_id: str
    running: int


@dataclass(frozen=True, slots=True)
class WorkerLost:
    worker_id: str
    reason: str
    requeued: int
    poisoned: int


@dataclass(frozen=True, slots=True)
class LateOutcome:
    ticket: int
    attempt: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class ClientJoined:
    recipient: str
    resent: int


@dataclass(frozen=True, slots=True)
class ClientLost:
    recipient: str
    held: int


@dataclass(frozen=True, slots=True)
class Rejected:
    session: str
    task_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResultsExpired:
    count: int


Notice = (
    WorkerJoined
    | WorkerDraining
    | WorkerLost
    | LateOutcome
    | ClientJoined
    | ClientLost
    | Rejected
    | ResultsExpired
)


@dataclass(slots=True)
class Effects:
    """What one loop turn asks the shell to do, in this order: journal, then send."""

    accepted: list[Task] = field(default_factory=list)
    finished: list[Task] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)  # tickets
    to_clients: list[tuple[bytes, p.Command]] = field(default_factory=list)
    to_workers: list[tuple[bytes, p.Command]] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    @property
    def journal_dirty(self) -> bool:
        return bool(self.accepted or self.finished or self.forgotten)


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

        self.tasks: dict[int, Task] = {}
        self._by_key: dict[tuple[str, int], int] = {}
        self._queues: dict[str, deque[int]] = {}
        self._waiting: list[tuple[float, int]] = []  # (due time, ticket) heap
        # Finished tasks by the time they finished, oldest first, for result expiry.
        self._finish_order: OrderedDict[int, float] = OrderedDict()
        self._held: dict[str, int] = {}  # per submitting session: tasks not forgotten
        self._queued_bytes = 0

        self.workers: dict[str, Worker] = {}
        self._worker_of_peer: dict[bytes, str] = {}
        # For each queue, the workers serving it that have free credit, oldest first.
        self._available: dict[str, dict[str, None]] = {}

        self.recipients: dict[str, Recipient] = {}
        self._recipient_of_peer: dict[bytes, str] = {}

        self._effects = Effects()
        self._accepted_for: dict[bytes, list[int]] = {}

    # --- clients -------------------------------------------------------------------

    def client_command(self, peer: bytes, command: p.Command, now: float) -> None:
        """Feed one decoded command from a client's connection."""
        if isinstance(command, p.Hello):
            self._hello(peer, command, now)
            return

        recipient = self._recipient_for_peer(peer, now)
        if recipient is None:
            self._effects.to_clients.append(
                (peer, p.Error("hello_first", "send HELLO before any other command"))
            )
            return

        if isinstance(command, p.Submit):
            self._submit(peer, recipient, command.tasks, now)
        elif isinstance(command, p.Ack):
            self._ack(recipient, command.keys)
        elif isinstance(command, p.Cancel):
            self._cancel(recipient.name, command.task_ids, now)
        elif isinstance(command, p.StatusRequest):
            self._effects.to_clients.append((peer, p.StatusReply(self.status(now))))
        elif isinstance(command, p.Bye):
            self._client_gone(recipient, said_bye=True)
        # A heartbeat needs nothing more: any command refreshed last_seen.

    def _hello(self, peer: bytes, hello: p.Hello, now: float) -> None:
        name = sink_recipient(hello.sink) if hello.sink else hello.session
        recipient = self._recipient(name)

        # A session that reconnects takes its place back: everything it had been
        # sent but had not acknowledged is sent again (the client drops doubles).
        if recipient.peer is not None and recipient.peer != peer:
            self._recipient_of_peer.pop(recipient.peer, None)
        resent = self._attach(recipient, peer, now)

        self._effects.to_clients.append((peer, self._welcome()))
        self._effects.notices.append(ClientJoined(name, resent))

    def _welcome(self) -> p.Welcome:
        return p.Welcome(
            window=self.limits.client_window,
            max_payload_bytes=self.limits.max_payload_bytes,
            heartbeat_interval_s=self.limits.heartbeat_interval_s,
            durable=self._durable,
        )

    def _attach(self, recipient: Recipient, peer: bytes, now: float) -> int:
        recipient.peer = peer
        recipient.last_seen = now
        self._recipient_of_peer[peer] = recipient.name
        return self._redeliver(recipient)

    def _redeliver(self, recipient: Recipient) -> int:
        unacked = list(recipient.unacked)
        recipient.pending.extendleft(reversed(unacked))
        recipient.unacked.clear()
        return len(unacked)

    def _recipient(self, name: str) -> Recipient:
        recipient = self.recipients.get(name)
        if recipient is None:
            recipient = self.recipients[name] = Recipient(name)
        return recipient

    def _recipient_for_peer(self, peer: bytes, now: float) -> Recipient | None:
        name = self._recipient_of_peer.get(peer)
        if name is None:
            return None

        recipient = self.recipients[name]
        if recipient.peer is None:
            # It was given up on (silence, or a send failed) and speaks again.
            self._attach(recipient, peer, now)
        recipient.last_seen = now
        return recipient

    def _submit(
        self, peer: bytes, recipient: Recipient, specs: Sequence[p.TaskSpec], now: float
    ) -> None:
        session = recipient.name
        accepted = self._accepted_for.setdefault(peer, [])
        pickle_served = self._pickle_served()  # once per batch, not per task
        for spec in specs:
            if (session, spec.task_id) in self._by_key:
                accepted.append(spec.task_id)  # a resubmission: already ours
                continue

            reason = self._refusal(session, spec, pickle_served)
            if reason is not None:
                self._reject(peer, session, spec.task_id, reason)
                continue

            self._accept(session, spec)
            accepted.append(spec.task_id)

    def _refusal(
        self, session: str, spec: p.TaskSpec, pickle_served: bool
    ) -> str | None:
        limits = self.limits
        size = len(spec.payload)
        if size > limits.max_payload_bytes:
            return (
                f"payload of {size} bytes is over the limit of "
                f"{limits.max_payload_bytes} bytes (max_payload_bytes)"
            )
        if spec.flags & p.Flags.PICKLED and not pickle_served:
            return (
                "no connected worker runs pickled callables; start one with "
                "--allow-pickle, or submit the function by its module:name"
            )
        if self._held.get(session, 0) >= limits.client_window:
            return (
                f"this client already has {limits.client_window} tasks in the broker "
                "(client_window); wait for results before submitting more"
            )
        if len(self.tasks) >= limits.max_queued_tasks:
            return (
                f"the broker holds {limits.max_queued_tasks} tasks (max_queued_tasks)"
            )
        if self._queued_bytes + size > limits.max_queued_bytes:
            return (
                f"the broker holds {limits.max_queued_bytes} bytes (max_queued_bytes)"
            )
        return None

    def _pickle_served(self) -> bool:
        return any(PICKLE_QUEUE in w.services for w in self.workers.values())

    def _reject(self, peer: bytes, session: str, task_id: int, reason: str) -> None:
        error = TaskRejected("TaskRejected", reason)
        entry = p.ResultEntry(task_id, p.Status.REJECTED, pack_error(error))
        self._effects.to_clients.append((peer, p.Results([entry])))
        self._effects.notices.append(Rejected(session, task_id, reason))

    def _accept(self, session: str, spec: p.TaskSpec) -> None:
        task = Task(
            ticket=self._new_ticket(),
            session=session,
            task_id=spec.task_id,
            function=spec.function,
            payload=spec.payload,
            flags=spec.flags,
            timeout_s=spec.timeout_s,
            retries_left=spec.retries,
            recipient=sink_recipient(spec.sink) if spec.sink else session,
        )
        self._admit(task)
        self._enqueue(task)
        self._effects.accepted.append(task)

    def _new_ticket(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        return ticket

    def _admit(self, task: Task) -> None:
        self.tasks[task.ticket] = task
        self._by_key[task.key] = task.ticket
        if _counts_against_window(task):
            self._hold(task.session, +1)
        self._queued_bytes += len(task.payload) + len(task.result)
        self._recipient(task.recipient)

    def _hold(self, session: str, change: int) -> None:
        held = self._held.get(session, 0) + change
        if held:
            self._held[session] = held
        else:
            del self._held[session]

    def _ack(self, recipient: Recipient, keys: Iterable[tuple[str, int]]) -> None:
        for origin, task_id in keys:
            ticket = self._by_key.get((origin or recipient.name, task_id))
            if ticket is None or ticket not in recipient.unacked:
                continue  # a double ack, or not this recipient's to acknowledge
            del recipient.unacked[ticket]
            self._forget(self.tasks[ticket])

    def _forget(self, task: Task) -> None:
        del self.tasks[task.ticket]
        del self._by_key[task.key]
        if _counts_against_window(task):
            self._hold(task.session, -1)
        self._queued_bytes -= len(task.payload) + len(task.result)
        self._finish_order.pop(task.ticket, None)
        self._effects.forgotten.append(task.ticket)

    def _cancel(self, session: str, task_ids: Iterable[int], now: float) -> None:
        for task_id in task_ids:
            ticket = self._by_key.get((session, task_id))
            task = self.tasks.get(ticket) if ticket is not None else None
            # Running tasks are left to finish: stopping them is best effort that
            # the worker protocol does not offer yet, and the result is dropped by
            # the client, whose future is already cancelled.
            if task is not None and task.state in (State.QUEUED, State.WAITING):
                self._finish(task, p.Status.CANCELLED, b"", now)

    def _client_gone(self, recipient: Recipient, said_bye: bool = False) -> None:
        # A silent or unreachable client keeps its peer mapping: if it speaks
        # again on the same connection, it is attached again without a HELLO.
        if said_bye and recipient.peer is not None:
            self._recipient_of_peer.pop(recipient.peer, None)
        recipient.peer = None
        held = len(recipient.pending) + len(recipient.unacked)
        self._effects.notices.append(ClientLost(recipient.name, held))

        # A session that left with nothing owed is forgotten, so that sessions
        # do not accumulate; one that still has tasks running is recreated when
        # their results arrive.
        if said_bye and not held:
            del self.recipients[recipient.name]

    # --- workers ---------------------------------------------------------------------

    def worker_command(self, peer: bytes, command: p.Command, now: float) -> None:
        """Feed one decoded command from a worker's connection."""
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
            self._offer(worker)
        elif isinstance(command, p.Drain):
            worker.draining = True
            self._offer(worker)
            self._effects.notices.append(
                WorkerDraining(worker.worker_id, len(worker.running))
            )
        elif isinstance(command, p.Bye):
            self._remove_worker(worker, "said goodbye", deadly=False, now=now)

    def _ready(self, peer: bytes, ready: p.Ready, now: float) -> None:
        old = self.workers.get(ready.worker_id)
        if old is not None:
            self._remove_worker(old, "registered again", deadly=False, now=now)
        stale = self._worker_for_peer(peer)
        if stale is not None:
            self._remove_worker(stale, "replaced on its connection", False, now)

        services = tuple(dict.fromkeys(ready.services))
        if ready.allow_pickle:
            services += (PICKLE_QUEUE,)
        worker = Worker(ready.worker_id, peer, services, ready.capacity, now)
        self.workers[worker.worker_id] = worker
        self._worker_of_peer[peer] = worker.worker_id
        self._offer(worker)
        self._effects.to_workers.append((peer, self._welcome()))
        self._effects.notices.append(
            WorkerJoined(worker.worker_id, services, worker.capacity)
        )

    def _worker_for_peer(self, peer: bytes) -> Worker | None:
        worker_id = self._worker_of_peer.get(peer)
        return self.workers.get(worker_id) if worker_id is not None else None

    def _done(self, worker: Worker, outcomes: Iterable[p.Outcome], now: float) -> None:
        for outcome in outcomes:
            task = self.tasks.get(outcome.ticket)
            if (
                task is None
                or task.state is not State.RUNNING
                or task.attempt != outcome.attempt
                or task.worker != worker.worker_id
            ):
                self._effects.notices.append(
                    LateOutcome(outcome.ticket, outcome.attempt, worker.worker_id)
                )
                continue

            self._release(worker, task)
            self._settle(task, outcome, now)
        self._offer(worker)

    def _settle(self, task: Task, outcome: p.Outcome, now: float) -> None:
        limit = self.limits.max_payload_bytes
        if len(outcome.payload) > limit:
            error = TaskRejected(
                "ResultTooLarge",
                f"the result of {len(outcome.payload)} bytes is over the limit of "
                f"{limit} bytes (max_payload_bytes)",
            )
            self._finish(task, p.Status.REJECTED, pack_error(error), now)
        elif outcome.status is p.Status.CRASHED:
            self._died_running(task, now)
        elif outcome.status is p.Status.RAISED and task.retries_left > 0:
            self._retry_later(task, now)
        else:
            self._finish(task, outcome.status, outcome.payload, now)

    def _retry_later(self, task: Task, now: float) -> None:
        task.retries_left -= 1
        task.state = State.WAITING
        delay = self._backoff.delay_s(task.attempt, self._rng.random())
        heapq.heappush(self._waiting, (now + delay, task.ticket))

    def _died_running(self, task: Task, now: float) -> bool:
        """Requeue a task whose worker died under it; poison it if it keeps killing.

        Returns whether the task was poisoned.
        """
        task.deaths += 1
        if task.deaths >= self.limits.max_attempts:
            error = PoisonTask(
                "PoisonTask",
                f"the worker process died each of the {task.deaths} times it ran "
                f"this task (max_attempts={self.limits.max_attempts}); not retrying",
            )
            self._finish(task, p.Status.POISON, pack_error(error), now)
            return True

        self._enqueue(task, front=True)
        return False

    def _remove_worker(
        self, worker: Worker, reason: str, deadly: bool, now: float
    ) -> None:
        del self.workers[worker.worker_id]
        if self._worker_of_peer.get(worker.peer) == worker.worker_id:
            del self._worker_of_peer[worker.peer]
        for service in worker.services:
            self._available.get(service, {}).pop(worker.worker_id, None)

        requeued = poisoned = 0
        for ticket in sorted(worker.running, reverse=True):
            task = self.tasks[ticket]
            task.worker = None
            if not deadly:
                self._enqueue(task, front=True)
            elif self._died_running(task, now):
                poisoned += 1
                continue
            requeued += 1
        worker.running.clear()
        self._effects.notices.append(
            WorkerLost(worker.worker_id, reason, requeued, poisoned)
        )

    def _release(self, worker: Worker, task: Task) -> None:
        worker.running.discard(task.ticket)
        worker.grace = min(worker.grace, max(0, len(worker.running) - worker.capacity))
        task.worker = None

    def _offer(self, worker: Worker) -> None:
        """Keep the index of workers with free credit up to date."""
        has_credit = worker.free > 0 and worker.worker_id in self.workers
        for service in worker.services:
            available = self._available.setdefault(service, {})
            if has_credit:
                available.setdefault(worker.worker_id, None)
            else:
                available.pop(worker.worker_id, None)

    # --- both ------------------------------------------------------------------------

    def peer_unreachable(self, peer: bytes, now: float) -> None:
        """A send to `peer` failed: it disconnected, or stopped reading."""
        worker = self._worker_for_peer(peer)
        if worker is not None:
            self._remove_worker(worker, "unreachable", deadly=True, now=now)
            return

        name = self._recipient_of_peer.get(peer)
        if name is not None:
            self._client_gone(self.recipients[name])

    def tick(self, now: float) -> None:
        """Let time pass: expire silent peers, wake retries, drop old results."""
        self._expire_workers(now)
        self._expire_clients(now)
        self._wake_retries(now)
        self._expire_results(now)

    def heartbeats(self) -> None:
        """Queue a heartbeat to every connected worker and client."""
        beat = p.Heartbeat()
        self._effects.to_workers.extend((w.peer, beat) for w in self.workers.values())
        self._effects.to_clients.extend(
            (r.peer, beat) for r in self.recipients.values() if r.peer is not None
        )

    def _expire_workers(self, now: float) -> None:
        deadline = now - self.limits.heartbeat_interval_s * self.limits.liveness
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            silent_s = now - worker.last_seen
            self._remove_worker(worker, f"silent for {silent_s:.1f}s", True, now)

    def _expire_clients(self, now: float) -> None:
        deadline = now - self.limits.heartbeat_interval_s * self.limits.liveness
        for recipient in self.recipients.values():
            if recipient.peer is not None and recipient.last_seen < deadline:
                self._client_gone(recipient)

    def _wake_retries(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, ticket = heapq.heappop(self._waiting)
            task = self.tasks.get(ticket)
            if task is not None and task.state is State.WAITING:
                self._enqueue(task)

    def _expire_results(self, now: float) -> None:
        deadline = now - self.limits.result_ttl_s
        expired: list[Task] = []
        while self._finish_order:
            ticket, finished_at = next(iter(self._finish_order.items()))
            if finished_at >= deadline:
                break
            del self._finish_order[ticket]
            expired.append(self.tasks[ticket])

        for task in expired:
            # Keep a small tombstone, so the client hears "expired", never silence.
            error = ResultExpired(
                "ResultExpired",
                f"the result was not collected within {self.limits.result_ttl_s:g}s "
                "(result_ttl_s) and was dropped",
            )
            task.status = p.Status.EXPIRED
            self._replace_result(task, pack_error(error))
            self._effects.finished.append(task)  # the journal keeps the tombstone
        if expired:
            self._effects.notices.append(ResultsExpired(len(expired)))

    # --- queues and results ----------------------------------------------------------

    def _enqueue(self, task: Task, front: bool = False) -> None:
        task.state = State.QUEUED
        queue = self._queues.setdefault(task.queue, deque())
        if front:
            queue.appendleft(task.ticket)
        else:
            queue.append(task.ticket)

    def _finish(
        self, task: Task, status: p.Status, result: p.Payload, now: float
    ) -> None:
        if task.recipient != task.session:
            # The submitter saw its sink task through when it was accepted; the
            # result now waits on the sink, bounded by the broker's totals.
            self._hold(task.session, -1)
        task.state = State.FINISHED
        task.status = status
        task.finished_at = now
        # The arguments are not needed any more; only the result is kept.
        self._queued_bytes -= len(task.payload)
        task.payload = b""
        self._replace_result(task, result)
        self._recipient(task.recipient).pending.append(task.ticket)
        self._finish_order[task.ticket] = now
        self._effects.finished.append(task)

    def _replace_result(self, task: Task, result: p.Payload) -> None:
        self._queued_bytes += len(result) - len(task.result)
        task.result = result

    def _dispatch(self) -> None:
        for queue_name, queue in self._queues.items():
            available = self._available.get(queue_name)
            while queue and available:
                self._assign_round(queue, available)

    def _assign_round(self, queue: deque[int], available: dict[str, None]) -> None:
        # Spread the queue over every available worker rather than filling the
        # first one: with more credit than tasks, all workers get a share.
        share = max(1, math.ceil(len(queue) / len(available)))
        for worker_id in list(available):
            worker = self.workers[worker_id]
            assignments = self._take(queue, worker, min(share, worker.free))
            if assignments:
                self._effects.to_workers.append((worker.peer, p.Tasks(assignments)))
            self._offer(worker)
            if not queue:
                return

    def _take(
        self, queue: deque[int], worker: Worker, count: int
    ) -> list[p.Assignment]:
        assignments: list[p.Assignment] = []
        while queue and len(assignments) < count:
            task = self.tasks.get(queue.popleft())
            if task is None or task.state is not State.QUEUED:
                continue  # cancelled, or finished while it waited: skip it

            task.state = State.RUNNING
            task.attempt += 1
            task.worker = worker.worker_id
            worker.running.add(task.ticket)
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

    def _deliver(self) -> None:
        for recipient in self.recipients.values():
            if recipient.peer is None:
                continue
            room = self.limits.delivery_window - len(recipient.unacked)
            while recipient.pending and room > 0:
                batch = self._next_results(recipient, min(room, RESULTS_PER_MESSAGE))
                if batch:
                    self._effects.to_clients.append((recipient.peer, p.Results(batch)))
                    room -= len(batch)

    def _next_results(self, recipient: Recipient, count: int) -> list[p.ResultEntry]:
        batch: list[p.ResultEntry] = []
        while recipient.pending and len(batch) < count:
            task = self.tasks.get(recipient.pending.popleft())
            if task is None or task.status is None or task.ticket in recipient.unacked:
                continue
            recipient.unacked[task.ticket] = None
            origin = task.session if task.recipient != task.session else ""
            batch.append(p.ResultEntry(task.task_id, task.status, task.result, origin))
        return batch

    def flush(self) -> Effects:
        """End a loop turn: dispatch and deliver, then hand back what to do."""
        self._dispatch()
        self._deliver()

        effects = self._effects
        for peer, task_ids in self._accepted_for.items():
            if task_ids:
                effects.to_clients.append((peer, p.Accepted(task_ids)))
        self._accepted_for = {}
        self._effects = Effects()
        return effects

    # --- recovery and introspection ------------------------------------------------

    def restore(self, task: Task, now: float) -> None:
        """Take back a task from the journal after a restart.

        Tasks that had not finished go back to the queue; finished ones wait for
        their recipient to connect and acknowledge them.
        """
        # The ticket is the journal's key for the task: it survives restarts.
        self._next_ticket = max(self._next_ticket, task.ticket + 1)
        task.worker = None
        self._admit(task)
        if task.state is State.FINISHED:
            self._recipient(task.recipient).pending.append(task.ticket)
            self._finish_order[task.ticket] = now
        else:
            self._enqueue(task)

    def status(self, now: float) -> dict[str, object]:
        """A plain-data picture of the broker, for `ventilator status`."""
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        finished = 0
        for task in self.tasks.values():
            if task.state in (State.QUEUED, State.WAITING):
                queued[task.function] = queued.get(task.function, 0) + 1
            elif task.state is State.RUNNING:
                running[task.function] = running.get(task.function, 0) + 1
            else:
                finished += 1

        return {
            "workers": [
                {
                    "id": w.worker_id,
                    "services": list(w.services),
                    "capacity": w.capacity,
                    "running": len(w.running),
                    "draining": w.draining,
                    "last_seen_s": round(now - w.last_seen, 3),
                }
                for w in self.workers.values()
            ],
            "queued": queued,
            "running": running,
            "results_waiting": finished,
            "clients": [
                {
                    "name": r.name,
                    "connected": r.peer is not None,
                    "pending": len(r.pending),
                }
                for r in self.recipients.values()
            ],
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if the scheduler's state is inconsistent (for
        tests, after a `flush`)."""
        running: set[int] = set()
        for worker in self.workers.values():
            assert len(worker.running) <= worker.capacity + worker.grace, worker
            assert not running & worker.running, "a task on two workers"
            running |= worker.running
            for ticket in worker.running:
                task = self.tasks[ticket]
                assert task.state is State.RUNNING and task.worker == worker.worker_id

        for ticket, task in self.tasks.items():
            assert self._by_key[task.key] == ticket
            if task.state is State.RUNNING:
                assert ticket in running, f"task {ticket} running on no worker"
            if task.state is State.FINISHED:
                assert task.status is not None

        queued = {t for q in self._queues.values() for t in q}
        for task in self.tasks.values():
            if task.state is State.QUEUED:
                assert task.ticket in queued, f"queued task {task.ticket} in no queue"
                self._check_nobody_idles_for(task)

    def _check_nobody_idles_for(self, task: Task) -> None:
        for worker in self.workers.values():
            assert task.queue not in worker.services or worker.free == 0, (
                f"task {task.ticket} waits while {worker.worker_id} has free credit"
            )

"""MDP peers as scheduler peers: the Majordomo gateway inside the broker.

The broker hands every MDP message to `MdpGateway.receive` and asks it to
turn scheduler commands for MDP peers into MDP frames. The gateway keeps
little state of its own (a task-id counter, and since when each service with
waiting requests has had no worker): what an MDP peer is, what it holds and
what it is owed all live in the scheduler, so requeueing, the journal and the
invariants apply to MDP traffic unchanged.

Mapping (peer keys are the broker's namespaced routing ids):

- MDP client REQUEST -> a task of recipient ``mdp:<peer hex>``, flag RAW,
  queue ``mdp:<service>``, payload the packed body. Its result goes back as an
  MDP REPLY and is acknowledged once sent (MDP clients never acknowledge).
- MDP worker READY -> a scheduler worker ``mdp:<peer hex>`` of capacity 1 on
  queue ``mdp:<service>``, expired after `liveness` silent heartbeat intervals
  while idle and never while busy (its death while busy is noticed when a
  send to it fails: the broker heartbeats busy workers too).
- A TASKS assignment -> MDP REQUEST, with ``<ticket>.<attempt>`` as the
  client address, which the worker echoes in its REPLY -> a DONE outcome.
- ``mmi.*`` (8/MMI) and ``titanic.*`` (9/TSP) are answered here.

7/MDP has no error reply, but a client left without one can only time out
and resend, for ever if the request always fails. So a request that cannot be
served gets a REPLY on its service whose body is one status frame, in the
codes of 9/TSP (Titanic) and 8/MMI, as `titanic.reply` answers here too:

- ``500 <reason>``: the broker did not take the request (its limits: payload
  size, queue or client window full); it may take it later.
- ``400 <kind>: <reason>``: the request was taken and failed for good (a
  worker died under it max_attempts times, a ventilator worker's function
  raised, the reply was over the size limit, it expired or was cancelled),
  or it is malformed (``400 malformed request: <reason>``: no body, a service
  name that is empty, too long, not UTF-8 or holds control characters), or its
  sender's key may not speak MDP (``400 forbidden: <reason>``: a worker's key,
  or one with limited rights), and resending it as it is would fail the same
  way.

A malformed request is answered on the service frame it carried, byte for
byte (an empty one if it had none), since clients such as zguide's
``mdcliapi`` check that a reply names the service they asked for.

A service whose own replies may start with such a frame is ambiguous to its
clients; 7/MDP leaves no room for an unambiguous marker.

Requests for a service no worker offers wait, as 7/MDP says they should, but
not without bound (anyone can name a service): at most
`MdpSettings.unserved_per_service` per service and `unserved_total` in all
(beyond: ``500``), and each for at most `unserved_expiry_s` without a worker
(then: ``400 expired: ...``, and the request is forgotten). Titanic's stored
requests are exempt: waiting for a worker is what they are for.

No sockets and no clock here (time is passed in); it logs, like the shells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from . import mdp, titanic
from . import protocol as p
from . import scheduler as s
from .errors import (
    FunctionNotFound,
    ProtocolError,
    TaskRejected,
    task_error_from_wire,
)
from .logs import RateLimit
from .policy import MdpSettings as MdpSettings  # its home before
from .serialization import pack_error, unpack_value
from .titanic import Titanic

__all__ = ["MdpGateway", "MdpSettings"]

log = logging.getLogger(__name__)

Frames = list[bytes]

# The status codes of a reply the broker makes for a request it cannot serve
# (9/TSP's meanings): not taken, try later; taken and failed, do not retry.
TRY_LATER = "500"
FAILED_FOR_GOOD = "400"


def mdp_name(peer: bytes, run: str = "") -> str:
    """The scheduler's name (worker id or recipient) of the MDP peer `peer`,
    for the broker run `run`.

    A routing id a peer chose itself (ZMQ_ROUTING_ID) names it across broker
    restarts: a client that sets one may come back for a reply. One libzmq
    made (it starts with a zero byte) means nothing after a restart: libzmq
    numbers connections from the same value every time, so the name carries
    the run, lest a stranger take a departed client's name and its replies.
    """
    routing_id = peer[1:]
    if routing_id[:1] == b"\x00":
        return f"{s.GATEWAY_PREFIX}{run}.{peer.hex()}"
    return s.GATEWAY_PREFIX + peer.hex()


class MdpGateway:
    """Translates between MDP peers and the scheduler. Use from the broker's
    thread only; send `outbox` after each turn's journal commit."""

    def __init__(
        self,
        scheduler: s.Scheduler,
        settings: MdpSettings,
        new_uuid: Callable[[], str],
    ) -> None:
        self._scheduler = scheduler
        self.settings = settings
        self._titanic = Titanic(scheduler, new_uuid)
        # Names the peers whose routing ids libzmq made (see mdp_name).
        self._run = new_uuid()[-8:]
        self._next_task_id = 1
        # Replies decided here (MMI, Titanic, DISCONNECT), sent after the commit.
        self.outbox: list[tuple[bytes, Frames]] = []
        # Clients answered this turn, forgotten once the turn's sends are done:
        # until then `owns` must still know them.
        self._answered: list[str] = []
        # Peers' faults are logged at most once a second, as the broker's own
        # refusals are: a flood of garbage must not become a flood of log.
        self._fault_log = RateLimit(per_s=1.0, what="MDP peer fault")
        # Queues of services no worker offers, with requests waiting: since
        # when (as first seen), and how many requests wait in them all (exact
        # at each sweep, counted up as requests come between sweeps).
        self._unserved_since: dict[str, float] = {}
        self._unserved_waiting = 0

    def resume(self) -> None:
        """After the journal replay: never reuse a task id of a restored request."""
        restored = [
            task.task_id
            for task in self._scheduler.tasks.values()
            if task.session.startswith(s.GATEWAY_PREFIX)
        ]
        self._next_task_id = max(restored, default=0) + 1

    def _name(self, peer: bytes) -> str:
        return mdp_name(peer, self._run)

    def owns(self, peer: bytes) -> bool:
        """Whether `peer` is an MDP worker or client the scheduler knows."""
        name = self._name(peer)
        return name in self._scheduler.workers or name in self._scheduler.recipients

    # --- inbound ------------------------------------------------------------------

    def receive(self, peer: bytes, frames: Sequence[Any], now: float) -> None:
        """Handle one MDP message (routing id removed) from `peer`."""
        try:
            message = mdp.decode(frames)
        except ProtocolError as exc:
            self._malformed(peer, frames, exc, now)
            return

        if isinstance(message, mdp.ClientRequest):
            self._request(peer, message, now)
        else:
            self._from_worker(peer, message, now)

    def refuse(self, peer: bytes, frames: Sequence[Any], reason: str) -> None:
        """Answer a message the broker would not take from `peer` (routing id
        removed), for a reason of the shell's: the sender's key may not speak
        MDP in that role. A client's request gets ``400 forbidden: <reason>``
        on the service it asked for, since sent again it would fail the same
        way. A worker is left unanswered: a DISCONNECT would have it connect
        and say READY again at once (zguide's worker does), for ever."""
        if mdp.is_worker(frames):
            return
        self._reply_failed(peer, _frame(frames, 2), f"forbidden: {reason}")

    def _malformed(
        self, peer: bytes, frames: Sequence[Any], exc: ProtocolError, now: float
    ) -> None:
        if mdp.is_worker(frames):
            # 7/MDP: a worker that breaks the protocol is disconnected.
            self._disconnect(peer, f"malformed message: {exc}", now)
            return
        # A client that hears nothing can only time out and resend the same
        # bad request; a 400 tells it (and its user) what to fix instead.
        self._reply_failed(peer, _frame(frames, 2), f"malformed request: {exc}")
        self._warn(
            now,
            "replied %s to a malformed MDP client request peer=%s: %s (frames=%.120r)",
            FAILED_FOR_GOOD,
            peer.hex(),
            exc,
            [bytes(frame[:32]) for frame in frames[:5]],
        )

    def refuse_undelimited(
        self, peer: bytes, frames: Sequence[Any], now: float
    ) -> None:
        """Answer MDP sent without its first, empty frame (a DEALER that left
        out REQ's envelope) in the shape it came in, so that its sender reads
        what to fix rather than wait for ever. A worker is only logged: it
        would take a reply in any shape for a command."""
        reason = (
            "an MDP/0.1 message starts with an empty frame (REQ adds it; a "
            "DEALER must send it first)"
        )
        if bytes(frames[0]) == mdp.CLIENT:
            why = f"malformed request: {reason}"
            self._reply_failed(peer, _frame(frames, 1), why, delimited=False)
        self._warn(now, "refused MDP without its empty first frame peer=%s", peer.hex())

    def _reply_failed(
        self, peer: bytes, service: bytes, why: str, delimited: bool = True
    ) -> None:
        """Answer a client's request ``400 <why>`` on the service frame it
        carried: sent again, it would fail the same way. Without `delimited`,
        in the shape of a request that lacked the empty first frame."""
        reply = mdp.client_reply(service, [f"{FAILED_FOR_GOOD} {why}".encode()])
        self.outbox.append((peer, reply if delimited else reply[1:]))

    def log_held_back(self, now: float) -> None:
        """Count the fault lines held back since the last one (see RateLimit)."""
        note = self._fault_log.held_back(now)
        if note is not None:
            log.warning("%s", note)

    def _warn(self, now: float, message: str, *args: object) -> None:
        """Log a peer's fault, unless one was logged within the last second."""
        if self._fault_log.allows(now):
            log.warning(message + "%s", *args, self._fault_log.suppressed_note())

    def _request(self, peer: bytes, request: mdp.ClientRequest, now: float) -> None:
        if request.service.startswith("mmi."):
            body = [self._mmi(request.service, request.body)]
        elif request.service.startswith("titanic."):
            body = self._titanic.answer(request.service, request.body, now)
        else:
            self._submit(peer, request, now)
            return
        self.outbox.append((peer, mdp.client_reply(request.service, body)))

    def _mmi(self, service: str, body: Sequence[bytes]) -> bytes:
        if service != "mmi.service":
            return b"501"
        try:
            asked = body[0].decode()
        except UnicodeDecodeError:
            return b"404"
        if asked in ("mmi.service", *Titanic.SERVICES):
            return b"200"  # answered by the broker itself, always there
        return b"200" if self._scheduler.serves(mdp.service_queue(asked)) else b"404"

    def _submit(self, peer: bytes, request: mdp.ClientRequest, now: float) -> None:
        name = self._name(peer)
        recipient = self._scheduler.recipients.get(name)
        if recipient is None or recipient.peer != peer:
            self._scheduler.attach_recipient(
                peer, name, now, expires=False, announce=False
            )

        task_id = self._next_task_id
        self._next_task_id += 1
        spec = p.TaskSpec(
            task_id, request.service, mdp.pack_body(request.body), p.Flags.RAW
        )
        queue = mdp.service_queue(request.service)
        unserved = not self._scheduler.serves(queue)
        refusal = self._unserved_refusal(request.service, now) if unserved else None
        if refusal is None:
            refusal = self._scheduler.accept_task(name, spec, now)
            if refusal is None and unserved:
                self._unserved_since.setdefault(queue, now)
                self._unserved_waiting += 1
        if refusal is not None:
            self._warn(
                now,
                "refused an MDP request client=%s service=%r; replied 500: %s",
                peer.hex(),
                request.service,
                refusal,
            )
            body = [f"{TRY_LATER} {refusal}".encode()]
            self.outbox.append((peer, mdp.client_reply(request.service, body)))
            self._scheduler.detach_if_idle(name)
        else:
            log.debug(
                "MDP request client=%s service=%r task=%d",
                peer.hex(),
                request.service,
                task_id,
            )

    def _unserved_refusal(self, service: str, now: float) -> str | None:
        """Why a request for `service`, which no worker offers, cannot wait."""
        settings = self.settings
        waiting = self._scheduler.queued_count(mdp.service_queue(service))
        if waiting >= settings.unserved_per_service:
            return (
                f"no worker offers {service!r} and {waiting} requests already "
                f"wait for one (--mdp-unserved-per-service)"
            )
        if self._unserved_waiting >= settings.unserved_total:
            return (
                f"no worker offers {service!r} and {self._unserved_waiting} "
                "requests already wait for services no worker offers "
                "(--mdp-unserved-total)"
            )
        return None

    def expire_unserved(self, now: float) -> None:
        """Sweep the queues of services no worker offers: answer and forget the
        requests that waited `unserved_expiry_s` there, and recount the rest.

        A request's wait counts from when it was queued or the service was
        first seen without a worker, whichever is later, so a backlog survives
        a worker's quick restart.
        """
        cutoff = now - self.settings.unserved_expiry_s
        since_by_queue: dict[str, float] = {}
        expired: dict[str, int] = {}
        for queue in self._scheduler.waiting_queues(mdp.QUEUE_PREFIX):
            if self._scheduler.serves(queue):
                continue
            since = self._unserved_since.get(queue, now)
            if since <= cutoff and (count := self._expire(queue, cutoff, now)):
                expired[queue[len(mdp.QUEUE_PREFIX) :]] = count
            if self._scheduler.queued_count(queue):
                since_by_queue[queue] = since
        self._unserved_since = since_by_queue
        self._unserved_waiting = sum(
            self._scheduler.queued_count(queue) for queue in since_by_queue
        )
        if expired:
            log.warning(
                "expired %d MDP requests that waited %gs for a worker of "
                "%d services (%s); replied %s",
                sum(expired.values()),
                self.settings.unserved_expiry_s,
                len(expired),
                ", ".join(repr(name) for name in list(expired)[:3])
                + (", ..." if len(expired) > 3 else ""),
                FAILED_FOR_GOOD,
            )

    def _expire(self, queue: str, cutoff: float, now: float) -> int:
        """End the requests queued in `queue` by `cutoff`, each answered."""
        withdrawn = self._scheduler.withdraw_queued(
            queue,
            cutoff,
            spare=lambda task: task.recipient == titanic.RECIPIENT,
            why=lambda task: pack_error(
                FunctionNotFound("FunctionNotFound", self._expiry_reason(task))
            ),
            now=now,
        )
        for task in withdrawn:
            reason = f"expired: {self._expiry_reason(task)}"
            recipient = self._scheduler.recipients.get(task.recipient)
            if recipient is not None and recipient.peer is not None:
                body = [f"{FAILED_FOR_GOOD} {reason}".encode()]
                self.outbox.append(
                    (recipient.peer, mdp.client_reply(task.function, body))
                )
            self._answered.append(task.recipient)
        return len(withdrawn)

    def _expiry_reason(self, task: s.Task) -> str:
        return (
            f"no worker offered {task.function!r} within "
            f"{self.settings.unserved_expiry_s:g}s (--mdp-unserved-expiry)"
        )

    def _from_worker(self, peer: bytes, message: mdp.Message, now: float) -> None:
        if isinstance(message, mdp.WorkerReady):
            self._ready(peer, message.service, now)
            return

        worker = self._scheduler.workers.get(self._name(peer))
        if isinstance(message, mdp.WorkerDisconnect):
            if worker is not None:
                self._scheduler.worker_command(peer, p.Bye(), now)
        elif worker is None:
            # A worker we expired, or one that outlived a broker restart: 7/MDP
            # tells it to reconnect and send READY again.
            self._disconnect(peer, "not registered (send READY first)", now)
        elif isinstance(message, mdp.WorkerReply):
            self._reply(peer, worker, message, now)
        else:
            self._scheduler.worker_command(peer, p.Heartbeat(), now)

    def _ready(self, peer: bytes, service: str, now: float) -> None:
        if self._name(peer) in self._scheduler.workers:
            self._disconnect(peer, "a second READY", now)
        elif mdp.is_reserved(service):
            self._disconnect(peer, f"the service {service!r} is the broker's", now)
        else:
            # One request at a time (7/MDP): one slot, and no credit beyond it.
            ready = p.Ready(
                self._name(peer), [mdp.service_queue(service)], capacity=1, slots=1
            )
            self._scheduler.register_worker(
                peer,
                ready,
                now,
                max_silence_s=self.settings.max_silence_s,
                silent_while_busy=True,
                obeys_release=False,
            )

    def _reply(
        self, peer: bytes, worker: s.Worker, reply: mdp.WorkerReply, now: float
    ) -> None:
        held = self._held_task(worker)
        if held is None or reply.address != _address(held):
            self._disconnect(peer, "a REPLY to no request it holds", now)
            return
        outcome = p.Outcome(
            held.ticket, held.attempt, p.Status.OK, mdp.pack_body(reply.body)
        )
        self._scheduler.worker_command(peer, p.Done([outcome]), now)

    def _held_task(self, worker: s.Worker) -> s.Task | None:
        for ticket in worker.running:
            return self._scheduler.tasks[ticket]
        return None

    def _disconnect(self, peer: bytes, reason: str, now: float) -> None:
        """Send DISCONNECT and forget the worker; what it held is queued again."""
        self._warn(now, "disconnecting MDP worker peer=%s: %s", peer.hex(), reason)
        if self._name(peer) in self._scheduler.workers:
            self._scheduler.worker_command(peer, p.Bye(), now)
        self.outbox.append((peer, mdp.worker_disconnect()))

    def heartbeats(self) -> None:
        """Queue a HEARTBEAT to every MDP worker, busy ones included: a send to a
        worker whose connection died fails, which is how its death is noticed."""
        beat = mdp.worker_heartbeat()
        for worker in self._scheduler.workers.values():
            if worker.worker_id.startswith(s.GATEWAY_PREFIX):
                self.outbox.append((worker.peer, beat))

    # --- outbound -----------------------------------------------------------------

    def to_worker(self, peer: bytes, command: p.Command, now: float) -> list[Frames]:
        """The MDP frames that carry `command` to worker `peer` (maybe none)."""
        if isinstance(command, p.Tasks):
            return [
                frames
                for assignment in command.tasks
                if (frames := self._request_frames(peer, assignment, now))
            ]
        if isinstance(command, p.Error):
            return [mdp.worker_disconnect()]
        return []  # heartbeats are the gateway's own, on the MDP interval

    def _request_frames(
        self, peer: bytes, assignment: p.Assignment, now: float
    ) -> Frames | None:
        try:
            if not assignment.flags & p.Flags.RAW:
                raise ProtocolError("a ventilator task, not an MDP request", "body")
            body = mdp.unpack_body(assignment.payload)
        except ProtocolError as exc:
            # Only a ventilator client naming an `mdp:` queue itself gets here.
            self._refuse_task(peer, assignment, str(exc), now)
            return None
        return mdp.worker_request(_address(assignment), body)

    def _refuse_task(
        self, peer: bytes, assignment: p.Assignment, reason: str, now: float
    ) -> None:
        error = p.Outcome(
            assignment.ticket,
            assignment.attempt,
            p.Status.REJECTED,
            _error_report(f"an MDP worker cannot run this task: {reason}"),
        )
        self._scheduler.worker_command(peer, p.Done([error]), now)

    def to_client(self, peer: bytes, command: p.Command) -> list[Frames]:
        """The MDP REPLYs that carry `command` to client `peer` (maybe none)."""
        if not isinstance(command, p.Results):
            return []  # heartbeats, errors: MDP clients have no such thing
        name = self._name(peer)
        return [
            frames
            for entry in command.results
            if (frames := self._reply_frames(peer, name, entry))
        ]

    def _reply_frames(
        self, peer: bytes, name: str, entry: p.ResultEntry
    ) -> Frames | None:
        task = self._scheduler.find_task(name, entry.task_id)
        if task is None:
            # Without the task there is no service name to reply on.
            log.warning(
                "dropped a result for MDP client=%s task=%d: the task is gone",
                peer.hex(),
                entry.task_id,
            )
            return None
        service = task.function
        if entry.status is p.Status.OK:
            try:
                return mdp.client_reply(service, mdp.unpack_body(entry.payload))
            except ProtocolError as exc:
                reason = f"the service's reply is not an MDP body: {exc}"
        else:
            reason = _failure(entry)
        # A service that raised is its client's news, as any task's is (the
        # rule in docs/cli.md): at DEBUG, or a service that fails every request
        # would be a WARNING per request. Everything else the broker did.
        raised = entry.status is p.Status.RAISED
        log.log(
            logging.DEBUG if raised else logging.WARNING,
            "MDP request failed client=%s service=%r; replied %s %s",
            peer.hex(),
            service,
            FAILED_FOR_GOOD,
            reason,
        )
        return mdp.client_reply(service, [f"{FAILED_FOR_GOOD} {reason}".encode()])

    def delivered(self, peer: bytes, command: p.Command, now: float) -> None:
        """`command`'s replies reached `peer`'s socket: acknowledge on its
        behalf (MDP clients never do)."""
        if not isinstance(command, p.Results):
            return
        keys = [("", entry.task_id) for entry in command.results]
        self._scheduler.client_command(peer, p.Ack(keys), now)
        self._answered.append(self._name(peer))

    def end_turn(self) -> None:
        """Forget the clients answered this turn that are owed nothing more, so
        that one-request clients do not accumulate."""
        for name in self._answered:
            self._scheduler.detach_if_idle(name)
        self._answered = []


def _address(assignment: p.Assignment | s.Task) -> bytes:
    return f"{assignment.ticket}.{assignment.attempt}".encode()


def _error_report(message: str) -> bytes:
    return pack_error(TaskRejected("NotAnMdpRequest", message))


def _failure(entry: p.ResultEntry) -> str:
    """Why a request failed, in one line: its kind and the error's summary."""
    if entry.status is p.Status.CANCELLED:
        return "cancelled: by its client or an operator before it ran"
    try:
        error = task_error_from_wire(unpack_value(entry.payload))
    except Exception:  # msgpack raises a family of unrelated types
        return f"{entry.status.name.lower()}: undecodable error report"
    return f"{error.kind}: {error.summary}"


def _frame(frames: Sequence[Any], index: int) -> bytes:
    """Frame `index` of a message as bytes; empty if the message is shorter."""
    return bytes(frames[index]) if len(frames) > index else b""

"""The broker's I/O shell: two ROUTER sockets around the scheduler.

One loop turn: wait for traffic or the next tick, drain what arrived (up to a
batch per socket, so one busy side cannot starve the other), feed it to the
scheduler, commit the journal, then send. Nothing is sent before the journal
commit of the turn that produced it, which is what makes "accepted" mean
"on disk".

The frontend faces clients and sinks, the backend faces workers; with
`--mdp`, a third socket serves Majordomo (7/MDP) clients and workers together.
MDP peers are also welcome on the frontend and backend: their first frame is
empty where ventilator's is ``VNT1``. All set ROUTER_MANDATORY: a send to a
peer that went away is an error the scheduler hears about
(`peer_unreachable`), never a silent drop.

Routing ids belong to one socket, so two sockets can hand out the same id.
Before a peer reaches the scheduler its id is prefixed with its socket's tag
(one byte), and a message for it goes out on that socket.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import mdp
from . import protocol as p
from . import scheduler as s
from ._timing import poll_timeout_ms
from .errors import ProtocolError
from .gateway import MdpGateway, MdpSettings
from .journal import Journal, MemoryJournal, open_journal
from .policy import Limits
from .telemetry import Telemetry

__all__ = ["Broker", "BrokerConfig"]

log = logging.getLogger(__name__)

# Messages drained from one socket per loop turn before the other gets its turn.
DRAIN_BATCH = 512
# ... and frames (about one per task): a turn's journal commit and its sends
# stay short, so heartbeats keep their pace even under a flood of submissions.
DRAIN_FRAMES = 16_384

# The one-byte prefix of a peer key: which socket the peer is on.
FRONTEND, BACKEND, MDP = b"F", b"B", b"M"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens, where it journals, and its limits."""

    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    journal: str | None = "ventilator-journal.db"
    durability: str = "process"
    limits: Limits = field(default_factory=Limits)
    # Count what each loop turn did, for a dashboard or metrics to read from
    # `Broker.telemetry`. Off by default: counting costs a little per task.
    telemetry: bool = False
    # A third endpoint where MDP clients and workers share one socket.
    mdp: str | None = None
    mdp_settings: MdpSettings = field(default_factory=MdpSettings)


class Broker:
    """Owns the sockets and the journal; the scheduler makes every decision.

    Use it from one thread: `bind()`, then `serve()` until `stop()` is called
    (from any thread, or a signal handler) and `serve` returns.
    """

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None):
        self.config = config
        self._context = context or zmq.Context.instance()
        self._journal: Journal = open_journal(config.journal, config.durability)
        durable = not isinstance(self._journal, MemoryJournal)
        self._scheduler = s.Scheduler(config.limits, durable=durable)
        self._gateway = MdpGateway(
            self._scheduler, config.mdp_settings, lambda: uuid.uuid4().hex
        )
        self._frontend = self._router()
        self._backend = self._router()
        self._mdp = self._router(zmtp_heartbeats=True) if config.mdp else None
        self._sockets = {FRONTEND: self._frontend, BACKEND: self._backend}
        if self._mdp is not None:
            self._sockets[MDP] = self._mdp
        self._wake_read, self._wake_write = os.pipe()
        self._refusal_log = _RateLimit(per_s=1.0)
        self._stopping = False
        self.telemetry = Telemetry() if config.telemetry else None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self.mdp_endpoint = ""

    def _router(self, zmtp_heartbeats: bool = False) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # libzmq refuses oversized frames before Python ever sees them; the
        # scheduler still names the limit for anything between it and this.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_payload_bytes + 65536)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        # Per peer. Kept low so that a peer flooding us waits in its own send
        # queue, not in our memory; real peers batch, so 1,000 messages is a lot.
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.LINGER, 1000)
        if zmtp_heartbeats:
            self._heartbeat_connections(sock)
        return sock

    def _heartbeat_connections(self, sock: zmq.Socket[bytes]) -> None:
        """ZMTP heartbeats: libzmq drops the connection of a peer that stopped
        answering (a host gone without a FIN), so the next send to it fails.
        MDP workers send nothing while busy; this is how a dead host is found.

        Only on the MDP socket: a connection whose reading is paused by
        backpressure (our bulk transfers) reads no PONG either, and would be
        dropped while healthy.
        """
        settings = self.config.mdp_settings
        sock.setsockopt(zmq.HEARTBEAT_IVL, _ms(settings.heartbeat_interval_s))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(settings.max_silence_s))

    def bind(self) -> None:
        """Bind both sockets and replay the journal.

        Raises:
            zmq.ZMQError: an endpoint is malformed or already in use.
            OSError: the HTTP address cannot be bound.
        """
        self._frontend.bind(self.config.frontend)
        self._backend.bind(self.config.backend)
        self.frontend_endpoint = _endpoint(self._frontend)
        self.backend_endpoint = _endpoint(self._backend)
        if self._mdp is not None and self.config.mdp:
            self._mdp.bind(self.config.mdp)
            self.mdp_endpoint = _endpoint(self._mdp)
        requeued, awaiting = self._replay()
        self._gateway.resume()
        if self.telemetry is not None:
            # A first snapshot, so that readers have one from the start.
            self.telemetry.publish(time.monotonic(), self._scheduler)
        log.info(
            "broker listening frontend=%s backend=%s mdp=%s journal=%s "
            "durability=%s; journal replay: %d tasks queued again, %d results "
            "awaiting delivery",
            self.frontend_endpoint,
            self.backend_endpoint,
            self.mdp_endpoint or "-",
            self.config.journal if self.config.durability != "memory" else "-",
            self.config.durability,
            requeued,
            awaiting,
        )

    def _replay(self) -> tuple[int, int]:
        """Restore the journal's tasks; return (queued again, results waiting)."""
        now = time.monotonic()
        tasks = self._journal.load()
        for task in tasks:
            self._scheduler.restore(task, now)
        finished = sum(1 for task in tasks if task.state is s.State.FINISHED)
        return len(tasks) - finished, finished

    def stop(self) -> None:
        """Ask `serve` to return after its current turn. Safe from any thread."""
        self._stopping = True
        os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Run loop turns until `stop()`; then commit, close and return."""
        poller = zmq.Poller()
        for sock in self._sockets.values():
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        interval_s = self.config.limits.heartbeat_interval_s
        mdp_interval_s = self.config.mdp_settings.heartbeat_interval_s
        next_tick = next_mdp_beat = time.monotonic() + min(interval_s, mdp_interval_s)

        telemetry = self.telemetry
        try:
            while not self._stopping:
                wake_at = min(next_tick, next_mdp_beat)
                if telemetry is not None:
                    wake_at = min(wake_at, telemetry.due_at())
                poller.poll(poll_timeout_ms(wake_at))
                now = time.monotonic()
                for tag in self._sockets:
                    self._drain(tag, now)
                if now >= next_tick:
                    self._scheduler.tick(now)
                    self._scheduler.heartbeats()
                    next_tick = now + interval_s
                if now >= next_mdp_beat:
                    self._gateway.heartbeats()
                    next_mdp_beat = now + mdp_interval_s
                self._carry_out(self._scheduler.flush(), now)
                if telemetry is not None:
                    telemetry.publish(now, self._scheduler)
        finally:
            self._close()

    def _drain(self, tag: bytes, now: float) -> None:
        sock = self._sockets[tag]
        frames_left = DRAIN_FRAMES
        for _ in range(DRAIN_BATCH):
            if frames_left <= 0:
                return
            try:
                received = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames_left -= len(received)
            if len(received) < 2:
                continue  # ROUTER always adds the routing id; nothing else came
            frames = [_keep(frame) for frame in received]
            self._handle(tag, frames, now)

    def _handle(self, tag: bytes, frames: list[bytes | memoryview], now: float) -> None:
        peer = tag + bytes(frames[0])
        if mdp.is_mdp(frames[1:]):
            self._gateway.receive(peer, frames[1:], now)
            return
        if tag == MDP:
            exc = ProtocolError("expected MDP/0.1 (MDPC01 or MDPW01)", "header")
            self._log_refusal(peer, frames, exc, "mdp")
            return

        allowed = p.FROM_CLIENT if tag == FRONTEND else p.FROM_WORKER
        try:
            command = p.decode(frames[1:], allowed)
        except ProtocolError as exc:
            self._refuse(peer, frames, exc)
            return
        if tag == FRONTEND:
            self._scheduler.client_command(peer, command, now)
        else:
            self._scheduler.worker_command(peer, command, now)

    def _refuse(
        self, peer: bytes, frames: list[bytes | memoryview], exc: ProtocolError
    ) -> None:
        side = "client" if peer[:1] == FRONTEND else "worker"
        self._log_refusal(peer, frames, exc, side)
        self._send(peer, p.Error(exc.code, str(exc)), time.monotonic())

    def _log_refusal(
        self,
        peer: bytes,
        frames: list[bytes | memoryview],
        exc: ProtocolError,
        side: str,
    ) -> None:
        now = time.monotonic()
        if self._refusal_log.allows(now):
            log.warning(
                "refused a malformed message peer=%s side=%s code=%s: %s "
                "(frames=%.120r)%s",
                peer[1:].hex(),
                side,
                exc.code,
                exc,
                [bytes(f[:32]) for f in frames[1:6]],
                self._refusal_log.suppressed_note(),
            )

    def _carry_out(self, effects: s.Effects, now: float) -> None:
        if effects.journal_dirty:
            self._journal.commit(effects.accepted, effects.finished, effects.forgotten)
        if self.telemetry is not None:
            self.telemetry.record(effects)
        gateway = self._gateway
        for peer, command in effects.to_workers:
            if gateway.owns(peer):
                self._send_all(peer, gateway.to_worker(peer, command, now), now)
            else:
                self._send(peer, command, now)
        for peer, command in effects.to_clients:
            if not gateway.owns(peer):
                self._send(peer, command, now)
            elif self._send_all(peer, gateway.to_client(peer, command), now):
                gateway.delivered(peer, command, now)
        outbox, gateway.outbox = gateway.outbox, []
        for peer, frames in outbox:
            self._send_frames(peer, frames, now)
        gateway.end_turn()
        for notice in effects.notices:
            _log_notice(notice)

    def _send(self, peer: bytes, command: p.Command, now: float) -> bool:
        return self._send_frames(peer, p.encode(command), now)

    def _send_all(self, peer: bytes, messages: list[list[bytes]], now: float) -> bool:
        return all(self._send_frames(peer, frames, now) for frames in messages)

    def _send_frames(self, peer: bytes, frames: list[Any], now: float) -> bool:
        """Send one message to `peer` on its socket; False (and the scheduler
        told) if the peer is gone."""
        sock = self._sockets[peer[:1]]
        try:
            message = [peer[1:], *frames]
            sock.send_multipart(message, zmq.NOBLOCK, copy=p.small(message))
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer is gone. EAGAIN: it stopped reading and its
            # queue is full. Either way the scheduler takes back what it sent.
            log.debug("send failed peer=%s: %s", peer.hex(), exc)
            self._scheduler.peer_unreachable(peer, now)
            return False
        return True

    def _close(self) -> None:
        # Anything a last turn decided is committed before the sockets go.
        self._carry_out(self._scheduler.flush(), time.monotonic())
        self._journal.close()
        for sock in self._sockets.values():
            sock.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        log.info("broker stopped")


class _RateLimit:
    """At most one log line per interval; the next one says how many were held
    back. A flood of garbage must not become a flood of log."""

    def __init__(self, per_s: float) -> None:
        self._interval_s = 1.0 / per_s
        self._next_at = 0.0
        self._suppressed = 0

    def allows(self, now: float) -> bool:
        if now >= self._next_at:
            self._next_at = now + self._interval_s
            return True
        self._suppressed += 1
        return False

    def suppressed_note(self) -> str:
        note = f"; {self._suppressed} more not logged" if self._suppressed else ""
        self._suppressed = 0
        return note


def _keep(frame: zmq.Frame) -> bytes | memoryview:
    """A frame's content: large ones as a view of libzmq's buffer, so a payload
    is never copied on its way through the broker (nor into the journal)."""
    if len(frame) >= p.ZERO_COPY_BYTES:
        return frame.buffer
    return frame.bytes


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _endpoint(sock: zmq.Socket[bytes]) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _log_notice(notice: s.Notice) -> None:
    if isinstance(notice, s.WorkerJoined):
        log.info(
            "worker joined worker=%s capacity=%d services=%s",
            notice.worker_id,
            notice.capacity,
            ",".join(notice.services),
        )
    elif isinstance(notice, s.WorkerDraining):
        log.info(
            "worker draining worker=%s; no new tasks, waiting for %d running",
            notice.worker_id,
            notice.running,
        )
    elif isinstance(notice, s.WorkerLost):
        level = logging.WARNING if notice.requeued or notice.poisoned else logging.INFO
        log.log(
            level,
            "worker lost worker=%s reason=%s; requeued %d tasks, %d failed as poison",
            notice.worker_id,
            notice.reason,
            notice.requeued,
            notice.poisoned,
        )
    elif isinstance(notice, s.LateOutcome):
        log.warning(
            "dropped a late result ticket=%d attempt=%d worker=%s: that attempt was "
            "given up on and the task rerun",
            notice.ticket,
            notice.attempt,
            notice.worker_id,
        )
    elif isinstance(notice, s.ClientJoined):
        log.info("client joined client=%s resent=%d", notice.recipient, notice.resent)
    elif isinstance(notice, s.ClientLost):
        log.info(
            "client gone client=%s; keeping %d results for its return",
            notice.recipient,
            notice.held,
        )
    elif isinstance(notice, s.Rejected):
        log.warning(
            "refused task client=%s task=%d: %s",
            notice.session,
            notice.task_id,
            notice.reason,
        )
    elif isinstance(notice, s.ResultsExpired):
        log.warning("dropped %d results nobody collected (result_ttl_s)", notice.count)

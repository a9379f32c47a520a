"""The broker's I/O shell: two ROUTER sockets around the scheduler.

One loop turn: wait for traffic or the next tick, drain what arrived (up to a
batch per socket, so one busy side cannot starve the other), feed it to the
scheduler, send tasks to workers, commit the journal, then answer clients.
Nothing reaches a client before the journal commit of the turn that produced
it, which is what makes "accepted" mean "on disk"; a worker may start a task
while its acceptance is being written (if the broker dies first, the client,
never told, sends it again).

The frontend faces clients and sinks, the backend faces workers; with
`--mdp`, a third socket serves Majordomo (7/MDP) clients and workers together.
MDP peers are also welcome on the frontend and backend: their first frame is
empty where ventilator's is ``VNT1``. All set ROUTER_MANDATORY: a send to a
peer that went away is an error the scheduler hears about
(`peer_unreachable`), never a silent drop.

Routing ids belong to one socket, so two sockets can hand out the same id.
Before a peer reaches the scheduler its id is prefixed with its socket's tag
(one byte), and a message for it goes out on that socket.

Security (see `security`): with CURVE keys, every message carries the key that
sent it (the ZAP User-Id). A message whose key is not in the live allow list of
its role (the socket's, or for MDP the header's) is refused before it is
decoded, and a key's function rights filter what it submits or registers. A
ZAP handler runs in every case, to refuse connections past `max_peers`; socket
monitors count them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import _arenas, _wire, mdp, security
from . import protocol as p
from . import scheduler as s
from ._full_queues import FullQueues
from ._notice_log import NoticeLog
from ._questions import QuestionQuota
from ._timing import StallWatch, poll_timeout_ms
from ._words import counted
from .errors import JournalError, ProtocolError, UsageError
from .gate import Gate, PeerCount
from .gateway import MdpGateway, MdpSettings
from .journal import Journal, MemoryJournal, open_journal
from .logs import RateLimit as _RateLimit
from .logs import Routine, Routines
from .policy import DEFAULT_JOURNAL_MIN_FREE_BYTES, Limits
from .security import CLIENT, WORKER, Identity, KeyStore, ServerKeys
from .telemetry import Telemetry

__all__ = ["Broker", "BrokerConfig"]

log = logging.getLogger(__name__)

# Messages drained from one socket per loop turn before the other gets its turn.
DRAIN_BATCH = 512
# ... and frames (about one per task): a turn's journal commit and its sends
# stay short, so heartbeats keep their pace even under a flood of submissions.
DRAIN_FRAMES = 16_384

# Messages queued to one peer before a send to it fails (and the scheduler takes
# it for gone). Results and tasks travel in batches and are bounded by windows,
# so real traffic needs few; a peer that never reads costs at most this many.
SEND_QUEUE = 10_000
# Messages queued from one peer before libzmq stops reading its connection.
RECEIVE_QUEUE = 100
# A peer that keeps sending garbage hears why at most this often: an ERROR per
# bad message to a peer that never reads would pile up in its send queue.
REFUSAL_REPLIES_PER_S = 1.0
# How often the allocator is asked to give freed memory back to the system.
TRIM_INTERVAL_S = 10.0

# The one-byte prefix of a peer key: which socket the peer is on.
FRONTEND, BACKEND, MDP = b"F", b"B", b"M"
# Whose keys each socket lets in (its ZAP domain names the same).
SOCKET_ROLES = {
    FRONTEND: security.CLIENTS,
    BACKEND: security.WORKERS,
    MDP: security.MDP,
}

_MONITORED = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# How long connections that ended before their handshake finished wait for a
# handshake on their socket to succeed before they are worth a warning. A peer
# whose connection failed tries again within 0.1 s (libzmq's reconnect
# interval), or opens a new one at once if it gave up on the old.
HANDSHAKE_SETTLE_S = 10.0
# Unfinished handshakes with nothing to act on (port checks) are said at INFO
# at once, then after this long, then twice as long each time up to an hour.
ROUTINE_HANDSHAKES_FIRST_INTERVAL_S = 60.0
# Handshakes that failed on one socket for one reason (a peer with a wrong
# broker key tries again all the time) are said at once, then after this long,
# then twice as long each time up to an hour, each line counting those since.
FAILED_HANDSHAKES_FIRST_INTERVAL_S = 10.0
# Questions refused past a connection's quota are said at once, then after this
# long, then twice as long each time, for as long as the flood lasts.
QUESTION_FLOOD_FIRST_INTERVAL_S = 10.0
# Messages from the open connections of a removed key, likewise.
REMOVED_KEY_FIRST_INTERVAL_S = 10.0


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
    # CURVE: the broker's secret key and the allow lists; None for plain text.
    curve: ServerKeys | None = None
    # Let workers run pickled callables on an exposed broker without CURVE.
    insecure: bool = False
    # New tasks are refused while the journal's disk has less room than this:
    # a disk that fills would fail a commit and stop the broker for everyone.
    journal_min_free_bytes: int = DEFAULT_JOURNAL_MIN_FREE_BYTES
    # Clients and workers on this machine pass large payloads through shared
    # memory (see _shared).
    shared_memory: bool = True

    @property
    def durable(self) -> bool:
        """Whether accepted tasks go to a journal file."""
        return self.journal is not None and self.durability != "memory"

    def exposed(self) -> bool:
        """Whether any endpoint is reachable from other machines."""
        endpoints = [self.frontend, self.backend, *([self.mdp] if self.mdp else [])]
        return not all(security.is_loopback(e) for e in endpoints)


class Broker:
    """Owns the sockets and the journal; the scheduler makes every decision.

    Use it from one thread: `bind()`, then `serve()` until `stop()` is called
    (from any thread, or a signal handler) and `serve` returns.

    Raises (from the constructor):
        UsageError: a key file or allow list folder is unreadable.
    """

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None):
        self.config = config
        # Our own context: the ZAP handler is one per context, and ours.
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._keys: KeyStore | None = config.curve.key_store() if config.curve else None
        self._admission = security.Admission(
            curve=self._keys is not None,
            pickle_permitted=(
                self._keys is not None or config.insecure or not config.exposed()
            ),
        )
        self._peers = PeerCount(config.limits.max_peers)
        self._gate = Gate(self._context, self._keys, self._peers)
        # A journal file this broker creates, removed if it never serves.
        self._new_journal = (
            config.journal
            if config.durable and not os.path.exists(config.journal or "")
            else None
        )
        # Made before the scheduler: the journal reads shared payloads.
        self._shared = _arenas.Arenas(
            enabled=config.shared_memory,
            max_arena_bytes=config.limits.client_max_bytes,
            worker_peers=lambda: self._scheduler.worker_peers(),
        )
        self._journal: Journal = open_journal(
            config.journal, config.durability, self._shared.materialize
        )
        durable = not isinstance(self._journal, MemoryJournal)
        self._scheduler = s.Scheduler(config.limits, durable=durable)
        # No session could ever be given room for more tasks than its window
        # in one message: a larger SUBMIT is refused whole, undecoded.
        self._max_submit_tasks = min(p.MAX_SUBMIT_TASKS, config.limits.client_window)
        self._gateway = MdpGateway(
            self._scheduler, config.mdp_settings, lambda: uuid.uuid4().hex
        )
        self._frontend = self._router(FRONTEND)
        self._backend = self._router(BACKEND)
        self._mdp = self._router(MDP, zmtp_heartbeats=True) if config.mdp else None
        self._sockets = {FRONTEND: self._frontend, BACKEND: self._backend}
        if self._mdp is not None:
            self._sockets[MDP] = self._mdp
        self._monitors = {self._monitor(tag): tag for tag in self._sockets}
        # The loop's bookkeeping of its descriptors (see `_poller`): sockets
        # that may hold input, and those sent on this turn.
        self._fd_sockets: dict[int, bytes] = {}
        self._fd_monitors: dict[int, zmq.Socket[bytes]] = {}
        self._unread: set[bytes] = set()
        self._sent_on: set[bytes] = set()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._refusal_log = _RateLimit(per_s=1.0, what="refused message")
        # By socket and event: see FAILED_HANDSHAKES_FIRST_INTERVAL_S.
        self._failed_handshakes: Routines[tuple[bytes, int]] = Routines(
            __name__, FAILED_HANDSHAKES_FIRST_INTERVAL_S, level=logging.WARNING
        )
        self._unfinished = _wire.UnfinishedHandshakes(HANDSHAKE_SETTLE_S)
        self._routine_handshakes = {
            tag: Routine(__name__, ROUTINE_HANDSHAKES_FIRST_INTERVAL_S)
            for tag in (FRONTEND, BACKEND, MDP)
        }
        self._questions = QuestionQuota(config.limits.max_questions_per_s)
        self._full_queues = FullQueues(SEND_QUEUE)
        self._notice_log = NoticeLog(self._full_queues)
        # A flood of questions lasts as long as its sender likes: said when it
        # starts, then less and less often.
        self._question_flood = Routine(
            __name__, QUESTION_FLOOD_FIRST_INTERVAL_S, level=logging.WARNING
        )
        self._trim = _MemoryTrim(TRIM_INTERVAL_S)
        self._disk_room = _DiskRoom(self.config)
        # Why the journal's files are no longer at their path, once noticed.
        self._journal_gone: str | None = None
        # Peers told why their message was refused, this second: garbage
        # senders hear about it once a second, not once per message.
        self._answered: set[bytes] = set()
        self._answered_until = 0.0
        # The worker connections of each key, so a reload that takes a key's
        # rights away also takes its registration.
        self._worker_keys: dict[bytes, str] = {}
        # The client connections of removed keys, and the session each spoke
        # for: it may still acknowledge what it was sent (see `_late_ack`).
        self._revoked_clients: dict[bytes, str] = {}
        # Keys removed from the allow lists, by public key: their connections'
        # refusals name them, said less and less often while they go on.
        self._removed_keys: dict[str, tuple[str, Routine]] = {}
        self._stopping = False
        self._journal_failed = False
        self._reload_requested = False
        self.telemetry = Telemetry() if config.telemetry else None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self.mdp_endpoint = ""

    def _router(self, tag: bytes, zmtp_heartbeats: bool = False) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # libzmq refuses oversized frames before Python ever sees them; the
        # scheduler still names the limit for anything between it and this.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_payload_bytes + 65536)
        sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        # Per peer. Kept low so that a peer flooding us waits in its own send
        # queue, not in our memory: peers x RCVHWM x message size is what a
        # flood can make us hold. Real peers batch (a SUBMIT carries up to
        # 2,048 tasks), so 100 messages is a lot.
        sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        sock.setsockopt(zmq.LINGER, 1000)
        if zmtp_heartbeats:
            self._heartbeat_connections(sock)
        roles = SOCKET_ROLES[tag]
        if self.config.curve is not None:
            self.config.curve.apply(sock, roles)
        else:
            # No CURVE, but still a ZAP domain: the gate counts the peers.
            sock.zap_domain = security.domain(roles).encode()
        return sock

    def _monitor(self, tag: bytes) -> zmq.Socket[bytes]:
        """A socket that hears a socket's connection events. Its queue has no
        limit: a dropped DISCONNECTED would count a peer for ever, and enough
        of them would lock everyone out (the loop reads the events every turn)."""
        address = f"inproc://ventilator.monitor.{tag.decode()}.{id(self)}"
        self._sockets[tag].monitor(address, _MONITORED)
        monitor: zmq.Socket[bytes] = self._context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.connect(address)
        return monitor

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
        """Start the ZAP handler, bind the sockets and replay the journal.

        Raises:
            UsageError: an endpoint is malformed.
            zmq.ZMQError: an endpoint is already in use, or its host unknown.
        """
        try:
            # A malformed endpoint is the caller's error, told before any
            # warning about exposing it.
            self._check_endpoints()
            self._check_exposure()
            self._open_gate_and_bind()
        except (UsageError, zmq.ZMQError):
            self._remove_new_journal()
            raise
        requeued, awaiting = self._replay()
        self._gateway.resume()
        self._sweep_shared_memory()
        if self.telemetry is not None:
            # A first snapshot, so that readers have one from the start.
            self.telemetry.publish(time.monotonic(), self._scheduler)
        log.info(
            "broker listening frontend=%s backend=%s mdp=%s journal=%s "
            "durability=%s curve=%s; journal replay: %s queued again, %s "
            "awaiting delivery",
            self.frontend_endpoint,
            self.backend_endpoint,
            self.mdp_endpoint or "-",
            self.config.journal if self.config.durability != "memory" else "-",
            self.config.durability,
            self._keys.counts() if self._keys else "off",
            counted(requeued, "task"),
            counted(awaiting, "result"),
        )

    def _sweep_shared_memory(self) -> None:
        # Also when this broker shares none: another broker's leftovers are
        # memory of this machine's, which nobody else gives back.
        removed = _arenas.sweep_stale()
        if removed:
            log.info(
                "removed %s of shared memory left by processes killed outright",
                counted(removed, "arena folder or probe", "arena folders or probes"),
            )

    def _open_gate_and_bind(self) -> None:
        # Before any bind: a handshake that finds no ZAP handler is not checked.
        self._gate.start()
        try:
            self._bind_sockets()
        except zmq.ZMQError:
            self._gate.stop()  # no thread left behind by a failed bind
            raise

    def _remove_new_journal(self) -> None:
        """A broker that could not bind leaves no empty journal behind, if it
        was the one that created it (an existing journal is never touched)."""
        self._journal.close()
        path = self._new_journal
        if path is None:
            return
        for leftover in (path, f"{path}-wal", f"{path}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        with contextlib.suppress(OSError):  # not empty: it holds blobs after all
            os.rmdir(f"{path}.blobs")

    def _bind_sockets(self) -> None:
        _bind(self._frontend, self.config.frontend, "frontend")
        _bind(self._backend, self.config.backend, "backend")
        self.frontend_endpoint = _endpoint(self._frontend)
        self.backend_endpoint = _endpoint(self._backend)
        if self._mdp is not None and self.config.mdp:
            _bind(self._mdp, self.config.mdp, "mdp")
            self.mdp_endpoint = _endpoint(self._mdp)

    def _check_endpoints(self) -> None:
        endpoints = {"frontend": self.config.frontend, "backend": self.config.backend}
        if self.config.mdp:
            endpoints["mdp"] = self.config.mdp
        for name, address in endpoints.items():
            _wire.check_endpoint(address, f"the {name} endpoint", to_bind=True)
        _check_distinct(endpoints)

    def _check_exposure(self) -> None:
        if self.config.curve is not None or not self.config.exposed():
            return
        log.warning(
            "!!! broker bound to a non-loopback address WITHOUT CURVE: anyone who "
            "reaches frontend=%s backend=%s mdp=%s can submit tasks and read "
            "results. Use --secret-key, --clients and --workers. !!!",
            self.config.frontend,
            self.config.backend,
            self.config.mdp or "-",
        )
        if self.config.insecure:
            log.warning(
                "!!! --insecure: workers may run pickled callables, which lets "
                "anyone on the network run any code on them !!!"
            )
        else:
            log.warning(
                "workers that ask to run pickled callables will serve named "
                "functions only (--insecure to allow it)"
            )

    def _replay(self) -> tuple[int, int]:
        """Restore the journal's tasks; return (queued again, results waiting)."""
        now = time.monotonic()
        tasks = self._journal.load()
        for task in sorted(tasks, key=_replay_order):
            self._scheduler.restore(task, now)
        unfinished = [task for task in tasks if task.state is not s.State.FINISHED]
        if self.telemetry is not None:
            # Submitted again, as the status totals count them: so that the
            # metrics never show more tasks completed than submitted.
            self.telemetry.record(s.Effects(accepted=unfinished))
        finished = len(tasks) - len(unfinished)
        failures = self._journal.load_failures()
        for record in failures:
            self._scheduler.restore_failure(record)
        if failures:
            log.info(
                "journal replay: %s remembered", counted(len(failures), "failed task")
            )
        return len(tasks) - finished, finished

    def _await_returning_workers(self) -> None:
        """Give the workers that ran restored tasks before the restart a
        moment to come back and name them, rather than run them twice."""
        wait_s = self._scheduler.await_returning_workers(time.monotonic())
        if wait_s:
            log.info(
                "restored tasks wait %.1fs for the workers that ran them to "
                "register again; other functions are served at once",
                wait_s,
            )

    def stop(self) -> None:
        """Ask `serve` to return after its current turn. Safe from any thread."""
        self._stopping = True
        os.write(self._wake_write, b"x")

    def reload(self) -> None:
        """Ask for the allow lists to be read again at the next turn. Safe from
        any thread or a signal handler (SIGHUP)."""
        self._reload_requested = True
        os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Run loop turns until `stop()`; then commit, close and return."""
        poller = self._poller()
        interval_s = self.config.limits.heartbeat_interval_s
        mdp_interval_s = self.config.mdp_settings.heartbeat_interval_s
        next_tick = next_mdp_beat = time.monotonic() + min(interval_s, mdp_interval_s)
        stalls = StallWatch(min(interval_s, mdp_interval_s), time.monotonic())

        telemetry = self.telemetry
        self._look_at_disk()
        self._await_returning_workers()
        compacting = False
        try:
            while not self._stopping:
                wake_at = min(
                    next_tick, next_mdp_beat, self._scheduler.announce_due_at()
                )
                if telemetry is not None:
                    wake_at = min(wake_at, telemetry.due_at())
                # Input known to wait (a drain cut short), or a compaction under
                # way, goes on without waiting.
                busy = self._unread or compacting
                timeout_ms = 0 if busy else poll_timeout_ms(wake_at)
                ready = poller.poll(timeout_ms)
                now = time.monotonic()
                self._forgive_stall(stalls, now)
                self._note_ready(ready, now)
                for tag in self._sockets:
                    if tag in self._unread:
                        self._drain(tag, now)
                ticked = now >= next_tick
                if ticked:
                    self._check_everything()
                    self._scheduler.tick(now)
                    self._scheduler.heartbeats()
                    self._probe_revoked_clients(now)
                    self._full_queues.forget_old(now)
                    self._log_held_back(now)
                    self._trim.maybe(now)
                    self._look_at_disk()
                    self._shared.tick(self._scheduler.runs)
                    next_tick = now + interval_s
                elif self._disk_room.due(self._journal.written_bytes):
                    self._look_at_disk()
                if now >= next_mdp_beat:
                    self._gateway.heartbeats()
                    self._gateway.expire_unserved(now)
                    next_mdp_beat = now + mdp_interval_s
                self._carry_out(self._scheduler.flush(now), now)
                # Looked for once a tick; carried on every turn once under way.
                if compacting or ticked:
                    compacting = self._compact_journal(now)
                self._recheck_sent_on()
                if telemetry is not None:
                    telemetry.publish(now, self._scheduler)
        except JournalError as exc:
            # No client heard of this turn's tasks: none was told "accepted" of
            # what is not on disk (workers may have started some, and clients
            # may hold results whose ends are not on disk; at least once).
            self._journal_failed = True
            log.error(
                "%s; the broker stops (clients and workers wait for it to come "
                "back; tasks accepted before are on disk)",
                exc,
            )
            raise
        finally:
            self._close()

    def _forgive_stall(self, stalls: StallWatch, now: float) -> None:
        """After this process stood still, give every peer back the silence
        it could not help: on SIGCONT every worker would otherwise be taken for
        dead at once, and its tasks blamed for a death nobody saw."""
        stalled_s = stalls.stalled_s(now)
        if not stalled_s:
            return
        self._scheduler.stood_still(stalled_s, now)
        log.warning(
            "the broker stood still for %.1fs (%s); not holding that silence "
            "against its %s and %s",
            stalled_s,
            stalls.cause(stalled_s),
            counted(len(self._scheduler.workers), "worker"),
            counted(
                sum(
                    1 for r in self._scheduler.recipients.values() if r.peer is not None
                ),
                "client",
            ),
        )

    def _compact_journal(self, now: float) -> bool:
        """A bounded step of journal compaction, after the turn's own commit;
        whether another waits. Its copies may use the disk's reserve as a
        result may (they free far more than they take, once done), and are
        spent from the same budget until the next look at the disk."""
        budget = self._scheduler.disk_budget
        written = self._journal.written_bytes
        more = self._journal.compact(now, budget.results)
        budget.spend(self._journal.written_bytes - written)
        return more

    def _look_at_disk(self) -> None:
        written = self._journal.written_bytes
        refusal = self._journal_refusal() or self._disk_room.problem(written)
        self._scheduler.not_accepting = refusal
        self._scheduler.delivery_held = self._disk_room.delivery_hold()
        self._scheduler.disk_budget = self._disk_room.budget()

    def _journal_refusal(self) -> str | None:
        """Why new tasks are refused for good: the journal's files are gone,
        so "accepted" would no longer mean "survives a restart". What was
        accepted before runs on; only this process holds it now."""
        if self._journal_gone is None:
            self._journal_gone = self._journal.missing()
            if self._journal_gone is None:
                return None
            log.error(
                "journal is gone from its path: %s; the %s and their results "
                "the broker holds are now only in its memory, and a restart "
                "would lose them. New tasks are refused: let the held ones "
                "finish (ventilator status), then restart the broker on a "
                "journal whose folder exists",
                self._journal_gone,
                counted(len(self._scheduler.tasks), "task"),
            )
        return (
            f"the broker's journal is gone ({self._journal_gone}): it accepts "
            "no new tasks until an operator restarts it"
        )

    def _poller(self) -> select.poll:
        """A poller of the loop's descriptors, and every socket read once.

        ZeroMQ sockets are polled by their ZMQ_FD, not through zmq_poll, which
        asks every socket for ZMQ_EVENTS before and after it waits: a poll(2)
        each, most of the syscalls of a turn. The descriptor only says that a
        socket may have news; it is armed again once ZMQ_EVENTS has been read
        and said "nothing to read". Anything that reads it without our
        knowing disarms it: a send on the socket (hence `_recheck_sent_on`)
        or a drain cut short (hence `_unread`). Reading everything now arms
        every descriptor for the first wait.
        """
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        self._fd_sockets = {
            _wire.fd_of(sock): tag for tag, sock in self._sockets.items()
        }
        self._fd_monitors = {
            _wire.fd_of(monitor): monitor for monitor in self._monitors
        }
        for fd in [*self._fd_sockets, *self._fd_monitors]:
            poller.register(fd, select.POLLIN)
        self._check_everything()
        return poller

    def _check_everything(self) -> None:
        """Read every monitor and check every socket. At start, to arm their
        descriptors; then on each tick, so that a wake-up missed for any reason
        costs one heartbeat interval at most, never a message left unread."""
        for monitor in self._monitors:
            self._watch_connections(monitor)
        self._unread.update(self._sockets)

    def _note_ready(self, ready: list[tuple[int, int]], now: float) -> None:
        """Act on the descriptors poll named: socket input is read after."""
        for fd, _event in ready:
            if fd == self._wake_read:
                self._read_wake(now)
            elif fd in self._fd_monitors:
                self._watch_connections(self._fd_monitors[fd])
            else:
                self._unread.add(self._fd_sockets[fd])

    def _recheck_sent_on(self) -> None:
        """A send can take a socket's news for its own (libzmq runs pending
        commands then), leaving its descriptor quiet with a message waiting:
        ask ZMQ_EVENTS once for each socket sent on this turn."""
        for tag in self._sent_on:
            if _wire.has_input(self._sockets[tag]):
                self._unread.add(tag)
        self._sent_on.clear()

    def _read_wake(self, now: float) -> None:
        # The pipe is only a wake-up: what it asks for is in the flags.
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        if self._reload_requested:
            self._reload_requested = False
            self._reload_keys(now)

    def _reload_keys(self, now: float) -> None:
        if self._keys is None:
            log.warning("reload asked for, but the broker runs without CURVE keys")
            return
        reloaded = self._keys.reload()
        for unread in reloaded.unread:
            _log_unread(unread)
        unread_note = (
            f"; {counted(len(reloaded.unread), 'file')} not read, kept as they "
            "were (see the ERROR lines)"
            if reloaded.unread
            else ""
        )
        log.info("allow lists reloaded: %s keys%s", self._keys.counts(), unread_note)
        for identity in reloaded.changed:
            if identity.role == CLIENT:
                self._revoke_clients(identity)
            else:
                self._revoke(identity, now)
        self._note_removed_keys(reloaded.changed)
        registered = {w.peer for w in self._scheduler.workers.values()}
        self._worker_keys = {
            peer: key for peer, key in self._worker_keys.items() if peer in registered
        }

    def _note_removed_keys(self, changed: Sequence[Identity]) -> None:
        """Remember the keys a reload removed, and forget those it allowed."""
        assert self._keys is not None  # only a reload of keys gets here
        for identity in changed:
            key = identity.public_key
            if self._keys.identity(identity.role, key) is None:
                said = Routine(
                    __name__, REMOVED_KEY_FIRST_INTERVAL_S, level=logging.WARNING
                )
                self._removed_keys.setdefault(key, (_key_name(identity), said))
        self._removed_keys = {
            key: removed
            for key, removed in self._removed_keys.items()
            if self._keys.identity(CLIENT, key) is None
            and self._keys.identity(WORKER, key) is None
        }

    def _revoke(self, identity: Identity, now: float) -> None:
        """A key lost access or rights: its workers must register again."""
        peers = [p for p, k in self._worker_keys.items() if k == identity.public_key]
        for peer in peers:
            self._scheduler.revoke_worker(peer, "its key was removed or changed", now)
        log.warning(
            "key removed or changed key=%s name=%s role=%s; %s dropped, its next "
            "messages are checked against the new lists",
            identity.fingerprint,
            identity.name,
            identity.role,
            counted(len(peers), "worker connection"),
        )

    def _revoke_clients(self, identity: Identity) -> None:
        """A client key removed: its connections are sent no more results, and
        told why. A key whose rights changed keeps its connections: each
        message is checked against the rights in force."""
        assert self._keys is not None  # only a reload of keys gets here
        if self._keys.identity(CLIENT, identity.public_key) is not None:
            log.info(
                "client key rights changed key=%s name=%s; its next messages are "
                "checked against the new ones",
                identity.fingerprint,
                identity.name,
            )
            return
        peers = self._connections_of(identity)
        for peer in peers:
            session = self._scheduler.revoke_client(peer, _revoked(identity))
            if session is not None:
                self._revoked_clients[peer] = session
        log.warning(
            "client key removed key=%s name=%s; results for its %s are no "
            "longer sent, and wait for the key's return (result_ttl_s; "
            "orphan_grace_s if the broker is full)",
            identity.fingerprint,
            identity.name,
            counted(len(peers), "open connection"),
        )

    def _probe_revoked_clients(self, now: float) -> None:
        """Forget the revoked client connections that have closed.

        The scheduler sends them nothing more, so nothing else would tell: a
        heartbeat each tick does, as ROUTER_MANDATORY fails a send to a
        connection libzmq no longer has (or one that stopped reading). Those
        still open keep their entry, and the late ACKs it lets through; the
        beat also tells them the broker is there, so they do not reconnect
        (which their key, removed, could not do).
        """
        gone = [
            peer for peer in self._revoked_clients if not self._send(peer, _BEAT, now)
        ]
        for peer in gone:
            del self._revoked_clients[peer]
        if gone:
            log.debug(
                "forgot %d closed connections of removed client keys; %d remain",
                len(gone),
                len(self._revoked_clients),
            )

    def _connections_of(self, identity: Identity) -> list[bytes]:
        """The client connections speaking for a key: under CURVE, its sessions
        are named inside it (``<fingerprint>.<name>``), and so are the holders
        of the sinks it receives."""
        inside = f"{identity.fingerprint}."
        return [
            recipient.peer
            for recipient in self._scheduler.recipients.values()
            if recipient.peer is not None
            and (recipient.holder or recipient.name).startswith(inside)
        ]

    def _watch_connections(self, monitor: zmq.Socket[bytes]) -> None:
        tag = self._monitors[monitor]
        now = time.monotonic()
        while _wire.has_input(monitor):
            message = recv_monitor_message(monitor)
            event = message["event"]
            if event == zmq.EVENT_ACCEPTED:
                self._peers.accepted += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._peers.closed += 1
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._unfinished.succeeded(tag)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._unfinished.failed(tag, message["value"], now)
            else:
                self._log_failed_handshake(tag, event, now)
        for settled_tag, unfinished in self._unfinished.settled(now):
            interval_s = _wire.handshake_interval_s(self._sockets[settled_tag])
            routine = self._routine_handshakes[settled_tag]
            _log_unfinished(_SIDES[settled_tag], unfinished, interval_s, now, routine)

    def _log_failed_handshake(self, tag: bytes, event: int, now: float) -> None:
        self._failed_handshakes.of((tag, event)).log(
            now,
            1,
            "a connection to the %s socket failed its handshake (%s): %s",
            _SIDES[tag],
            zmq.Event(event).name,
            self._handshake_causes(event),
        )

    def _handshake_causes(self, event: int) -> str:
        """What makes a handshake fail with `event` on this broker, for the
        operator reading why."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                "refused by the broker: a key it does not know, or more "
                "connections than --max-peers"
            )
        if self.config.curve is not None:
            return "a plain-text peer, or one with a wrong broker key"
        return (
            "a peer using CURVE (this broker runs without it), or a ZeroMQ "
            "socket of a type that cannot talk to a ROUTER (PUB, PUSH...)"
        )

    def _drain(self, tag: bytes, now: float) -> None:
        """Read what waits on a socket, up to a batch; the socket stays in
        `_unread` if it may hold more."""
        sock = self._sockets[tag]
        frames_left = DRAIN_FRAMES
        for _ in range(DRAIN_BATCH):
            try:
                received = _receive(sock)
            except zmq.Again:
                self._unread.discard(tag)
                return
            frames_left -= len(received)
            # ROUTER always adds the routing id; a message of nothing else is
            # dropped.
            if len(received) >= 2:
                user = self._user(received[0])
                self._handle(tag, [_keep(frame) for frame in received], user, now)
            if frames_left <= 0:
                return
            # Asking is cheaper than the exception a receive from an empty
            # socket raises; the first receive is tried blind, as a socket
            # gets here because something (most often a message) is waiting.
            if not _wire.has_input(sock):
                self._unread.discard(tag)
                return

    def _user(self, frame: zmq.Frame) -> str:
        """The key that sent a message, as ZAP named it (with CURVE only)."""
        return "" if self._keys is None else str(frame.get("User-Id"))

    def _handle(
        self, tag: bytes, frames: list[bytes | memoryview], user: str, now: float
    ) -> None:
        peer = tag + bytes(frames[0])
        if mdp.is_mdp(frames[1:]):
            self._handle_mdp(peer, frames, user, now)
            return
        if mdp.lacks_delimiter(frames[1:]):
            self._gateway.refuse_undelimited(peer, frames[1:], now)
            return
        if tag == MDP:
            exc = ProtocolError("expected MDP/0.1 (MDPC01 or MDPW01)", "header")
            self._log_refusal(peer, frames, exc, "mdp")
            return

        role = CLIENT if tag == FRONTEND else WORKER
        identity = self._identity(role, user)
        if identity is None and peer in self._revoked_clients:
            self._late_ack(peer, frames, user, now)
            return
        if identity is None:
            self._refuse(peer, frames, _FORBIDDEN, now, user)
            return
        allowed = p.FROM_CLIENT if tag == FRONTEND else p.FROM_WORKER
        try:
            command = p.decode(frames[1:], allowed, self._max_submit_tasks)
        except ProtocolError as exc:
            self._refuse(peer, frames, exc, now, user)
            return
        self._admit(peer, identity, command, now)

    def _late_ack(
        self, peer: bytes, frames: list[bytes | memoryview], user: str, now: float
    ) -> None:
        """A message from a client connection whose key was removed: an ACK of
        results it was sent before is taken, so that they are not delivered
        again when the key is back; anything else is refused."""
        try:
            command: p.Command | None = p.decode(frames[1:], _ACK_ONLY)
        except ProtocolError:
            command = None
        if isinstance(command, p.Ack):
            self._scheduler.acknowledge(self._revoked_clients[peer], command.keys)
        else:
            self._refuse(peer, frames, _FORBIDDEN, now, user)

    def _handle_mdp(
        self, peer: bytes, frames: list[bytes | memoryview], user: str, now: float
    ) -> None:
        # The role is the header's: an MDP worker on the frontend still needs
        # a worker key. Rights name ventilator functions, which MDP services
        # are not: a key with limited rights does not speak MDP at all.
        role = WORKER if mdp.is_worker(frames[1:]) else CLIENT
        identity = self._identity(role, user)
        if identity is None or not identity.rights.unrestricted:
            self._log_refusal(peer, frames, _FORBIDDEN_MDP, "mdp", user)
            self._gateway.refuse(peer, frames[1:], _mdp_refusal(role, identity))
            return
        self._gateway.receive(peer, frames[1:], now)

    def _identity(self, role: str, user: str) -> Identity | None:
        """Who sent a message: its key's live identity in `role`; everyone when
        the broker runs without CURVE; None when the key is not allowed."""
        if self._keys is None:
            return _EVERYONE[role]
        return self._keys.identity(role, user)

    def _admit(
        self, peer: bytes, identity: Identity, command: p.Command, now: float
    ) -> None:
        """Hand a command to the scheduler, within what its key may do."""
        if isinstance(command, p.QUESTION_TYPES) and not self._questions.allows(
            peer, now
        ):
            self._refuse_question(peer, identity, now)
            return
        if identity.role == CLIENT:
            if isinstance(command, p.Hello):
                self._revoked_clients.pop(peer, None)  # its key is back
                self._shared.hello(peer, command.shared)
            admitted = self._admission.client(identity, command)
            for task_id, reason in admitted.rejected:
                self._scheduler.reject(peer, task_id, reason)
            if admitted.code == security.NOT_PERMITTED and admitted.forbidden:
                self._refuse_operator(peer, admitted.forbidden, now)
            elif admitted.forbidden is not None:
                log.warning("refused a sink: %s", admitted.forbidden)
                self._send(peer, p.Error("forbidden", admitted.forbidden), now)
            admitted_command = admitted.command
            if isinstance(admitted_command, p.Submit):
                admitted_command = self._shared.resolve(
                    peer, admitted_command, self._scheduler.reject
                )
            if admitted_command is not None:
                self._scheduler.client_command(
                    peer, admitted_command, now, admitted.scope
                )
            return
        if isinstance(command, p.Ready):
            if not self._shared.ready(peer, command.shared):
                # What the scheduler sees: this worker reads no references.
                command = replace(command, shared=None)
            command = self._admission.ready(identity, command)
            if self._keys is not None:
                self._worker_keys[peer] = identity.public_key
        self._scheduler.worker_command(peer, command, now)

    def _refuse_question(self, peer: bytes, identity: Identity, now: float) -> None:
        """Refuse a question past the connection's quota. The answer goes
        through the scheduler, in turn with its answers to the connection's
        other questions, which the client pairs with them by order."""
        refusal = p.Error(p.TOO_MANY_QUESTIONS, self._questions.refusal())
        self._scheduler.answer(peer, refusal)
        self._question_flood.log(
            now,
            1,
            "refused questions (status, operator commands) past the limit of %d "
            "a second per connection peer=%s key=%s; each is answered with the "
            "limit, and the connection's other messages are served",
            self._questions.per_s,
            peer.hex(),
            _key_name(identity),
        )

    def _refuse_operator(self, peer: bytes, reason: str, now: float) -> None:
        """Refuse an operator command the sender's key may not give. The answer
        goes through the scheduler, in turn with the answers to the client's
        other questions, which it pairs with them by order."""
        if self._refusal_log.allows(now):
            log.warning(
                "refused an operator command: %s%s",
                reason,
                self._refusal_log.suppressed_note(),
            )
        self._scheduler.answer(peer, p.Error(security.NOT_PERMITTED, reason))

    def _refuse(
        self,
        peer: bytes,
        frames: list[bytes | memoryview],
        exc: ProtocolError,
        now: float,
        user: str = "",
    ) -> None:
        self._log_refusal(peer, frames, exc, _SIDES[peer[:1]], user)
        if now >= self._answered_until:
            self._answered.clear()
            self._answered_until = now + 1.0 / REFUSAL_REPLIES_PER_S
        if peer not in self._answered:
            self._answered.add(peer)
            self._send(peer, p.Error(exc.code, str(exc)), now)

    def _log_refusal(
        self,
        peer: bytes,
        frames: list[bytes | memoryview],
        exc: ProtocolError,
        side: str,
        user: str = "",
    ) -> None:
        now = time.monotonic()
        removed = self._removed_keys.get(user)
        if removed is not None:
            name, said = removed
            said.log(
                now,
                1,
                "refused a message from a connection of key %s, removed from the "
                "allow lists; peer=%s side=%s. It is told so",
                name,
                peer.hex(),
                side,
            )
        elif self._refusal_log.allows(now):
            log.warning(
                "refused a message peer=%s key=%s side=%s code=%s: %s "
                "(frames=%.120r)%s",
                peer.hex(),
                self._key_of(user),
                side,
                exc.code,
                exc,
                [bytes(f[:32]) for f in frames[1:6]],
                self._refusal_log.suppressed_note(),
            )

    def _key_of(self, user: str) -> str:
        """The key that sent a message, for the log: its name and fingerprint
        under CURVE (a key the lists do not hold has no name); `-` without."""
        if self._keys is None or not user:
            return "-"
        identity = self._keys.identity(CLIENT, user) or self._keys.identity(
            WORKER, user
        )
        if identity is None:
            return f"unknown({security.fingerprint(user)})"
        return _key_name(identity)

    def _carry_out(self, effects: s.Effects, now: float) -> None:
        # Workers first: a task may run before its acceptance is on disk, as
        # nobody has been told it was accepted. Were the broker to die before
        # the commit, the client would send it again (at-least-once), and the
        # worker overlaps its run with our commit instead of waiting for it.
        self._send_to_workers(effects.to_workers, now)
        # Results next, for the same reason: a result's task was accepted on
        # disk in an earlier turn (or never will be: a refusal, a cancel), so
        # only its end waits for this commit. Were the broker to die before
        # it, the task would run again and its second result be ignored; and
        # the client reads the result while we commit, off a lone task's path.
        results, after_commit = _results_first(effects.to_clients, self._gateway.owns)
        self._send_results(results, now)
        if effects.journal_dirty:
            self._journal.commit(
                effects.accepted,
                effects.finished,
                effects.forgotten,
                effects.failures,
                effects.unfailed,
                effects.struck,
            )
        if self.telemetry is not None:
            self.telemetry.record(effects)
        self._send_to_clients(after_commit, now)
        self._notice_log.log(effects.notices, now)
        for peer in effects.departed:
            self._unshare(peer)
        if effects.accepted:
            self._notice_log.say_accepting_again(now)

    def _unshare(self, peer: bytes) -> None:
        """A client connection is gone: its tasks get copies of the payloads
        they hold in its arena of shared memory, which then goes."""
        arena = self._shared.arena_of(peer)
        if arena is None:
            return
        running = self._scheduler.unshare(arena, self._shared.materialize)
        self._shared.drop(peer, running)
        log.debug("arena dropped peer=%s running=%d", peer.hex(), len(running))

    def _log_held_back(self, now: float) -> None:
        """Count the log lines each rate limit held back since its last one."""
        for note in (self._refusal_log.held_back(now), self._gate.held_back(now)):
            if note is not None:
                log.warning("%s", note)
        self._notice_log.log_held_back(now)
        self._gateway.log_held_back(now)

    def _send_to_workers(
        self, messages: list[tuple[bytes, p.Command]], now: float
    ) -> None:
        gateway = self._gateway
        for peer, command in messages:
            if gateway.owns(peer):
                self._send_all(peer, gateway.to_worker(peer, command, now), now)
                continue
            if type(command) is p.Tasks:
                command = self._shared.for_worker(peer, command)
            self._send(peer, command, now)

    def _send_results(
        self, messages: list[tuple[bytes, p.Command]], now: float
    ) -> None:
        for peer, command in messages:
            self._send(peer, command, now)

    def _send_to_clients(
        self, messages: list[tuple[bytes, p.Command]], now: float
    ) -> None:
        """Acceptances, answers and MDP replies: after the turn's commit."""
        gateway = self._gateway
        for peer, command in messages:
            if not gateway.owns(peer):
                self._send(peer, command, now)
            elif self._send_all(peer, gateway.to_client(peer, command), now):
                gateway.delivered(peer, command, now)
        outbox, gateway.outbox = gateway.outbox, []
        for peer, frames in outbox:
            self._send_frames(peer, frames, now)
        gateway.end_turn()

    def _send(self, peer: bytes, command: p.Command, now: float) -> bool:
        if type(command) is p.Welcome:
            command = self._shared.welcome(peer, command)
        return self._send_frames(peer, p.encode(command), now)

    def _send_all(self, peer: bytes, messages: list[list[bytes]], now: float) -> bool:
        return all(self._send_frames(peer, frames, now) for frames in messages)

    def _send_frames(self, peer: bytes, frames: list[Any], now: float) -> bool:
        """Send one message to `peer` on its socket; False (and the scheduler
        told) if the peer is gone."""
        tag = peer[:1]
        sock = self._sockets[tag]
        self._sent_on.add(tag)
        message = [peer[1:], *frames]
        small = p.small(message)
        if not small:
            message = [_received_frame(part) for part in message]
        try:
            _send_multipart(sock, message, small)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer is gone. EAGAIN: it stopped reading and its
            # queue is full. Either way the scheduler takes back what it sent.
            log.debug("send failed peer=%s: %s", peer.hex(), exc)
            if exc.errno == zmq.EAGAIN:
                self._full_queues.met(peer, now)
            self._scheduler.peer_unreachable(peer, now)
            return False
        self._full_queues.sent(peer, now)
        return True

    def _close(self) -> None:
        # Anything a last turn decided is committed before the sockets go,
        # unless the journal cannot take it: then nothing more is said.
        if self._journal_failed:
            with contextlib.suppress(OSError):  # its failure is logged already
                self._journal.close()
        else:
            self._carry_out(self._scheduler.flush(), time.monotonic())
            self._journal.close()
        for sock in self._sockets.values():
            sock.disable_monitor()
            sock.close()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._shared.close()
        self._gate.stop()
        if self._own_context:
            self._context.term()
        os.close(self._wake_read)
        os.close(self._wake_write)
        log.info("broker stopped")


_SIDES = {FRONTEND: "client", BACKEND: "worker", MDP: "mdp"}
# Without CURVE everyone is the same anonymous identity, allowed everything.
_EVERYONE = {
    role: Identity("anonymous", role, security.ANONYMOUS) for role in (CLIENT, WORKER)
}
_FORBIDDEN = ProtocolError(
    "your key is not (or no longer) allowed on this socket", "forbidden"
)
# What a revoked client connection is sent each tick, to learn whether it is
# still open (see `_probe_revoked_clients`).
_BEAT = p.Heartbeat()
# What a client connection whose key was removed may still send (`_late_ack`).
_ACK_ONLY = frozenset({p.Cmd.ACK})


def _log_unread(unread: security.Unread) -> None:
    """What a reload could not read, and what stays in force for it until it
    is mended and the broker signalled again."""
    mended = "the file is mended"
    if unread.what == "folder":
        kept = (
            f"the {unread.role} list in force is kept whole "
            f"({counted(len(unread.kept), 'key')}): removals and additions there wait"
        )
        mended = "it is back"
    elif unread.kept:
        [identity] = unread.kept
        kept = (
            f"key {_key_name(identity)} keeps the access it had "
            f"(rights {identity.rights})"
        )
    else:
        kept = "its key is not let in"
    log.error(
        "allow list %s not read; %s until %s and the broker signalled again "
        "role=%s path=%s: %s",
        unread.what,
        kept,
        mended,
        unread.role,
        unread.path,
        unread.problem,
    )


def _key_name(identity: Identity) -> str:
    """A key as the log names it: its file name and fingerprint; `-` when
    the broker runs without CURVE."""
    if identity.public_key == security.ANONYMOUS:
        return "-"
    return f"{identity.name}({identity.fingerprint})"


def _results_first(
    messages: list[tuple[bytes, p.Command]], is_mdp: Callable[[bytes], bool]
) -> tuple[list[tuple[bytes, p.Command]], list[tuple[bytes, p.Command]]]:
    """Split a turn's messages to clients into the RESULTS that may go before
    the commit and the rest, which wait for it (an ACCEPTED must not go before
    its task is on disk). A client's messages keep their order: once one of
    them waits (a WELCOME, say), its later RESULTS wait behind it. An MDP
    client's replies all wait: the gateway sends them in its own order."""
    results: list[tuple[bytes, p.Command]] = []
    after_commit: list[tuple[bytes, p.Command]] = []
    waiting: set[bytes] = set()
    for peer, command in messages:
        if type(command) is p.Results and peer not in waiting and not is_mdp(peer):
            results.append((peer, command))
        else:
            waiting.add(peer)
            after_commit.append((peer, command))
    return results, after_commit


def _revoked(identity: Identity) -> p.Error:
    """What a client connection hears when its key is removed."""
    message = (
        f"key {identity.name} ({identity.fingerprint}) was removed from the "
        "broker's client allow list: this connection is sent no more results. "
        "Its sessions' tasks keep running and their results wait at the broker "
        "(result_ttl_s; orphan_grace_s if the broker is full): once the key is "
        "allowed again, open the session again "
        "(Client(session=...)) and collect() them"
    )
    return p.Error(security.REVOKED, message)


_FORBIDDEN_MDP = ProtocolError(
    "MDP from a key not allowed in that role, or with limited rights", "forbidden"
)


def _mdp_refusal(role: str, identity: Identity | None) -> str:
    """Why a key may not speak MDP in `role`, for the peer to read."""
    if identity is None:
        return f"this key is not allowed as an MDP {role} on this broker"
    return (
        "this key has limited rights, which name ventilator functions, not MDP "
        "services: only a key with full rights speaks MDP"
    )


def _log_unfinished(
    side: str,
    unfinished: _wire.Unfinished,
    handshake_interval_s: float,
    now: float,
    routine: Routine,
) -> None:
    """Say what became of connections that ended before their ZeroMQ
    handshake finished: nothing to act on if peers got in after them, and
    then (`routine`) not at INFO every time."""
    ways = []
    if unfinished.closed:
        ways.append(f"{unfinished.closed} closed by the peer first")
    if unfinished.timed_out:
        ways.append(f"{unfinished.timed_out} not done within {handshake_interval_s:g}s")
    what = (
        f"{_connections(unfinished.count)} to the {side} socket ended before "
        f"the ZeroMQ handshake finished ({', '.join(ways)})"
    )
    if unfinished.followed:
        routine.log(
            now,
            unfinished.count,
            "%s; handshakes on that socket succeeded since: peers that were "
            "paused, overloaded, or gave up waiting (as they do while this "
            "broker stands still) got in on a later try; nothing to do",
            what,
        )
        return
    if not unfinished.timed_out:
        # Opened and closed without a word of ZMTP: a load balancer's health
        # check does it every few seconds. A peer that speaks and is refused
        # (a wrong key, garbage) is another event, logged as a warning.
        routine.log(
            now,
            unfinished.count,
            "%s: port checks (a load balancer's health check, a scanner) or "
            "peers that left before finishing it; nothing to do unless "
            "clients or workers cannot connect, and then their own logs say why",
            what,
        )
        return
    log.warning(
        "%s, and none has succeeded on that socket in the %.0fs since: peers "
        "that gave up or did not complete the handshake in time (paused or "
        "overloaded), or no ZeroMQ peers at all (a port check, a scanner); if "
        "clients or workers cannot connect, their own logs say why",
        what,
        now - unfinished.first_at,
    )


def _connections(count: int) -> str:
    return counted(count, "connection")


def _replay_order(task: s.Task) -> tuple[bool, float]:
    """Unfinished tasks first, in ticket order (their queue order), then
    results in the order they finished (the order they expire in)."""
    if task.state is s.State.FINISHED:
        return (True, task.finished_at)
    return (False, task.ticket)


class _DiskRoom:
    """Whether the journal's disk has room for new tasks.

    It looks once per tick, and again as soon as the journal has stored a
    quarter of the reserve since its last look: a burst of large payloads
    must not fill the disk between two ticks. A disk that filled used to
    fail a commit, which stops the broker for everyone, and again at each
    restart; now new tasks are refused with the reason while it lacks room,
    and what was accepted goes on."""

    def __init__(
        self,
        config: BrokerConfig,
        free_bytes: Callable[[str], int] | None = None,
    ) -> None:
        self._folder = os.path.dirname(os.path.abspath(config.journal or ".")) or "."
        self._min_free = config.journal_min_free_bytes if config.durable else 0
        self._free_bytes = free_bytes or _free_bytes
        self._refusing = False
        self._holding = False
        self._written_at_look = 0
        self._free_at_look: int | None = None

    def due(self, written_bytes: int) -> bool:
        """Whether the journal wrote enough since the last look to look again."""
        if self._min_free <= 0:
            return False
        return written_bytes - self._written_at_look >= self._min_free // 4

    def problem(self, written_bytes: int = 0) -> str | None:
        """Why new tasks are refused now; None while the disk has room.
        `written_bytes` is the journal's count at this look (see `due`)."""
        if self._min_free <= 0:
            return None
        self._written_at_look = written_bytes
        try:
            free = self._free_bytes(self._folder)
        except OSError:
            self._free_at_look = None
            return None  # no worse than before: the next commit says what is wrong
        self._free_at_look = free
        short = free < self._min_free
        if short != self._refusing:
            self._refusing = short
            self._log_change(free)
        if not short:
            return None
        return (
            f"the journal's disk ({self._folder}) has {free // 2**20} MiB free, "
            f"under the {self._min_free // 2**20} MiB the broker keeps for the "
            "tasks it holds (--journal-min-free-bytes); new tasks are refused "
            "until an operator frees space"
        )

    def delivery_hold(self) -> str | None:
        """Why results are held back now, as the last look found (see
        DiskBudget.records_deliveries; tester 36 saw 192 results delivered
        twice); None while they go."""
        budget = self.budget()
        holding = not budget.records_deliveries()
        if holding != self._holding:
            self._holding = holding
            self._log_hold(budget.free)
        if not holding:
            return None
        return (
            f"the journal's disk ({self._folder}) has {budget.free // 2**20} MiB "
            "free, too little to record that results were received: they are "
            "held until an operator frees space"
        )

    def _log_hold(self, free: int) -> None:
        if self._holding:
            log.error(
                "journal disk full folder=%s free_mib=%d: holding results back "
                "until space is freed (their delivery could not be recorded, "
                "and they would be delivered again after a restart)",
                self._folder,
                free // 2**20,
            )
        else:
            log.warning(
                "journal disk has room for acknowledgements again folder=%s "
                "free_mib=%d: delivering results",
                self._folder,
                free // 2**20,
            )

    def budget(self) -> s.DiskBudget:
        """What the disk can take until the next look, as the last one found
        (the scheduler spends it on the tasks and results it accepts)."""
        if self._min_free <= 0 or self._free_at_look is None:
            return s.DiskBudget()
        return s.DiskBudget.after_look(self._free_at_look, self._min_free)

    def _log_change(self, free: int) -> None:
        if self._refusing:
            log.error(
                "journal disk nearly full folder=%s free_mib=%d min_free_mib=%d: "
                "refusing new tasks until space is freed",
                self._folder,
                free // 2**20,
                self._min_free // 2**20,
            )
        else:
            log.warning(
                "journal disk has room again folder=%s free_mib=%d: accepting tasks",
                self._folder,
                free // 2**20,
            )


def _free_bytes(folder: str) -> int:
    """Bytes an unprivileged process may still write in `folder`'s file system."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class _MemoryTrim:
    """Give memory freed after a burst (a flood of garbage, connections gone)
    back to the system. glibc keeps freed heap memory for reuse, so without
    this the broker's RSS stays at its high-water mark for ever: measured, 45
    MiB after a garbage flood against 35 with it, from a 32 MiB baseline."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next_at = 0.0
        library = ctypes.util.find_library("c")
        libc = ctypes.CDLL(library) if library else None
        # Not glibc (musl, macOS): nothing to call, nothing to do.
        self._trim = getattr(libc, "malloc_trim", None)

    def maybe(self, now: float) -> None:
        if self._trim is not None and now >= self._next_at:
            self._next_at = now + self._interval_s
            self._trim(0)


def _keep(frame: zmq.Frame) -> bytes | memoryview:
    """A frame's content: large ones as a view of libzmq's buffer, so a payload
    is never copied on its way through the broker (nor into the journal)."""
    if len(frame) >= p.ZERO_COPY_BYTES:
        return frame.buffer
    return frame.bytes


def _received_frame(part: Any) -> Any:
    """The frame a payload was received in, when `part` is a view of all of it
    (see `_keep`): libzmq sends a received frame again by counting a reference,
    where lending pyzmq the view makes it track a new message (measured: about
    50 µs of broker CPU less per 100 KiB task)."""
    owner = getattr(part, "obj", None)
    if isinstance(owner, zmq.Frame) and part.nbytes == len(owner):
        return owner
    return part


# pyzmq's constants are enum members, and each `|` or `&` on them builds a new
# one: measured, about 2 µs apiece, and a round trip took ~40 of them. The loop
# uses them as plain ints.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def _receive(sock: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """The frames of one message, without blocking (zmq.Again if none).

    Frame.more says when the message ends: recv_multipart asks ZMQ_RCVMORE
    instead, one more call (and enum) per frame.
    """
    frames = [sock.recv(_NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(_NOBLOCK, copy=False))
    return frames


def _send_multipart(sock: zmq.Socket[bytes], message: list[Any], copy: bool) -> None:
    """send_multipart, with plain-int flags (see above) and without its check
    that every part is a buffer: ours are bytes, memoryviews or Frames.

    Only the first frame can be refused (EHOSTUNREACH, EAGAIN): once libzmq
    has taken it, it takes the rest of the message.
    """
    for part in message[:-1]:
        sock.send(part, _NOBLOCK_MORE, copy=copy)
    sock.send(message[-1], _NOBLOCK, copy=copy)


def _check_distinct(endpoints: dict[str, str]) -> None:
    """Refuse one address given for two endpoints: the second bind would fail
    with "Address already in use", as if another process held it. An
    address with a wildcard port ("*") is a fresh port each time.

    Raises:
        UsageError: naming both options and the address.
    """
    first_of: dict[str, str] = {}
    for name, address in endpoints.items():
        if address.endswith(":*") or address.endswith(":0"):
            continue
        first = first_of.setdefault(address, name)
        if first != name:
            raise UsageError(
                f"the {name} endpoint (--{name}) {address} is the {first}'s "
                f"address (--{first}): give each endpoint its own port"
            )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _bind(sock: zmq.Socket[bytes], address: str, name: str) -> None:
    """Bind `sock`; a failure names the endpoint and its option, since libzmq's
    "Address already in use" does not say which of three it was."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        message = f"cannot bind the {name} endpoint (--{name}) {address}: {exc}"
        raise zmq.ZMQError(exc.errno, message) from exc


def _endpoint(sock: zmq.Socket[bytes]) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)

"""The worker: one DEALER to the broker's backend, a pool that runs the tasks.

The main thread only moves messages: tasks from the broker into the pool,
outcomes from the pool back to the broker (batched, one DONE per loop turn),
and heartbeats both ways. A broker silent for `liveness` heartbeat intervals is
presumed gone: the worker opens a new socket and registers again, so a broker
restart needs nothing from the operator. Its READY names the tasks it still
holds, which the broker leaves with it rather than running them again, and
those whose results it sent but cannot know arrived, which it sends again
(see `_unconfirmed`); the broker answers with the named tasks it did not
keep, which the worker stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import _wire
from . import protocol as p
from ._shared import WorkerShare
from ._timing import BrokerSilence, StallWatch, poll_timeout_ms
from ._unconfirmed import Unconfirmed
from ._words import counted
from .errors import TaskRejected, UsageError
from .logs import Dwindling, Routine
from .policy import Prefetch, check_at_least, check_heartbeat
from .pool import TAKEN_BACK_FIRST_INTERVAL_S, Pool, TaskDuration, make_pool
from .registry import load_functions
from .security import client_keys, is_loopback
from .serialization import pack_error

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger(__name__)


# How a broker's frontend answers a worker's commands: READY is not a client's
# command, and anything else comes before a HELLO.
_FRONTEND_REFUSALS = frozenset({"command", "hello_first"})

# Least time between a CREDIT and one that cuts the credit within the same
# regime (see Worker._adjust_credit).
CREDIT_INTERVAL_S = 1.0


def default_worker_id() -> str:
    """host.pid.random: unique, and readable in the broker's log."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker serves, where it connects and how it runs tasks."""

    modules: tuple[str, ...]
    connect: str = "tcp://127.0.0.1:5556"
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    pool: str = "process"
    # Tasks held per slot: None adapts to task length (see policy.Prefetch).
    prefetch: int | None = None
    allow_pickle: bool = False
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    worker_id: str = field(default_factory=default_worker_id)
    # CURVE: this worker's .key_secret file and the broker's public .key file.
    secret_key: str | None = None
    broker_key: str | None = None
    # Run pickled callables from a broker reached without CURVE off this machine.
    insecure: bool = False
    # Read large payloads from shared memory, from a broker on this machine.
    shared_memory: bool = True

    def __post_init__(self) -> None:
        check_at_least("concurrency", self.concurrency, 1)
        if self.concurrency > p.MAX_SLOTS:
            raise UsageError(
                f"concurrency must be at most {p.MAX_SLOTS} (the most slots a "
                f"broker lets a worker declare), got {self.concurrency}"
            )
        if self.prefetch is not None:
            check_at_least("prefetch", self.prefetch, 1)
        check_heartbeat(self.heartbeat_interval_s, self.liveness)
        if self.worker_id.startswith(p.MDP_PREFIX):
            # The broker would refuse every READY, and the worker ask again
            # each heartbeat for ever.
            raise UsageError(
                f"worker_id {self.worker_id!r} starts with {p.MDP_PREFIX!r}, which "
                "the broker keeps for the MDP workers of its gateway; name the "
                "worker otherwise"
            )

    @property
    def prefetch_policy(self) -> Prefetch:
        return Prefetch(fixed=self.prefetch)


class Worker:
    """Serve tasks until `stop()`.

    Raises (from the constructor):
        UsageError: a module cannot be imported or has no public function; a
            key file cannot be read; or pickled callables from an exposed
            broker without CURVE, and without `insecure`.
    """

    def __init__(self, config: WorkerConfig, context: zmq.Context[Any] | None = None):
        self.config = config
        self._curve = client_keys(config.secret_key, config.broker_key)
        _check_exposure(config, curve=self._curve is not None)
        self.services = sorted(load_functions(config.modules))
        self._context = context or zmq.Context.instance()
        _wire.check_endpoint(config.connect, "the broker's backend")
        self._pool: Pool | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._input: _wire.InputCheck | None = None  # with the socket
        self._watch = _Watch()
        # A broker that refuses this worker's handshake is otherwise silence:
        # say once what is wrong with the keys, as clients do.
        public_key = self._curve.public_key if self._curve is not None else None
        self._handshakes = _wire.HandshakeWatch(config.connect, "worker", public_key)
        self._told_misdirected = False
        self._broker = _BrokerContact(
            config.heartbeat_interval_s, config.liveness, time.monotonic()
        )
        self._task_s = TaskDuration()
        # One heartbeat interval: see _unconfirmed for why that confirms.
        self._unconfirmed = Unconfirmed(config.heartbeat_interval_s)
        self._prefetch = config.prefetch_policy
        self._max_payload_bytes: int | None = None
        self._capacity = self._wanted_capacity()
        self._credit_sent_at = -CREDIT_INTERVAL_S
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        # Large payloads read from shared memory, from a broker on this machine.
        self._shared = WorkerShare(config.shared_memory)
        self._drain_requested = False
        self._draining = False
        self._stopping = False
        # Registered as serving nothing, since no task process can start.
        self._benched = False
        # Tasks taken back are routine for a client that cancels a lot: said
        # when it starts, then less and less often.
        self._taken_back = Routine(__name__, TAKEN_BACK_FIRST_INTERVAL_S)
        # Hand-backs are routine under a mix of long and short tasks (a tester
        # counted one every few seconds): said at once, then less and less often.
        self._handed_back = Routine(__name__, TAKEN_BACK_FIRST_INTERVAL_S)

    def stop(self, at_once: bool = False) -> None:
        """Leave gracefully: take no new tasks, finish the held ones, then go.

        A second call, or `at_once`, leaves at once; the broker requeues what
        was running. Safe from any thread or a signal handler.
        """
        if self._drain_requested or at_once:
            self._stopping = True
        self._drain_requested = True
        with contextlib.suppress(OSError):  # already left: nothing to wake
            os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Connect, register and run tasks until `stop()`; then leave cleanly."""
        self._pool = make_pool(
            self.config.pool,
            self.config.concurrency,
            self.config.modules,
            self.config.allow_pickle,
        )
        try:
            self._connect(time.monotonic())
            self._loop()
        finally:
            self._leave()

    def _connect(self, now: float) -> None:
        if self._socket is not None:
            self._watch.forget_socket()
            self._handshakes.close()
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._handshakes.watch(self._socket)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        if self._curve is not None:
            self._curve.apply(self._socket)
        self._socket.connect(self.config.connect)
        monitor = self._handshakes.monitor
        monitor_fd = _wire.fd_of(monitor) if monitor is not None else -1
        self._watch.socket(_wire.fd_of(self._socket), monitor_fd)
        # Its descriptor announces events only once a receive found it empty.
        self._handshakes.read()
        self._input = _wire.InputCheck(self._socket)
        self._register(now)

    def _register(self, now: float, resend: bool = True) -> None:
        """Say READY, naming what we hold. Unless told not to `resend` (the
        connection the broker welcomed us on carries our results in order,
        ahead of this READY), results the broker may not have are named too,
        and sent again right behind it: it keeps their tasks with us, then
        settles them."""
        held = self._held_tickets()
        resent = []
        if resend:
            resent = self._unconfirmed.resend(
                {ticket for ticket, _ in held}, p.MAX_HELD_TICKETS - len(held), now
            )
        services = [] if self._benched else self.services
        self._send(
            p.Ready(
                self.config.worker_id,
                services,
                self._capacity,
                allow_pickle=self.config.allow_pickle and not self._benched,
                # Adaptive prefetch: the broker keeps long functions to one
                # task per slot, whatever credit tiny ones earned us.
                slots=self.config.concurrency if self.config.prefetch is None else None,
                problem=self._problem(),
                held=held + [(outcome.ticket, outcome.attempt) for outcome in resent],
                shared=self._shared.ask(),
            )
        )
        if resent:
            self._send(p.Done(resent))
        self._say_forgotten()
        # Until the broker welcomes us, its "unknown_worker" answers are to
        # what we sent before this READY: registering again for each would
        # make the broker take back, each time, what it had just given us.
        self._broker.registering(now)
        log.info(
            "worker registering worker=%s broker=%s slots=%d credit=%d "
            "functions=%d holding=%d results_resent=%d",
            self.config.worker_id,
            self.config.connect,
            self.config.concurrency,
            self._capacity,
            len(services),
            len(held),
            len(resent),
        )

    def _say_forgotten(self) -> None:
        """Warn of the results sent before that are no longer kept to be sent
        again (since the last registration)."""
        forgotten, self._unconfirmed.forgotten = self._unconfirmed.forgotten, 0
        if forgotten:
            log.warning(
                "%s sent before not kept for sending again (over the limit of "
                "results or bytes kept, or of tasks a READY may name); their "
                "tasks run again if the broker did not get them worker=%s",
                counted(forgotten, "result"),
                self.config.worker_id,
            )

    def _held_tickets(self) -> list[tuple[int, int]]:
        """The tasks to name in a READY, which the broker then leaves with us
        rather than running them again elsewhere: all we hold, running or
        waiting, since we will run and report each.

        None while benched: what waits here cannot run, and is dropped for
        the broker to give to others. Past what a READY may name, the waiting
        ones are dropped too, for the same reason.
        """
        if self._pool is None:
            return []
        if self._benched:
            self._pool.drop_waiting()
            return []
        held = self._pool.held()
        if len(held) > p.MAX_HELD_TICKETS:
            self._pool.drop_waiting()
            held = self._pool.held()[: p.MAX_HELD_TICKETS]
        return held

    def _problem(self) -> str | None:
        """Why we serve nothing, in words for the broker's status; else None."""
        if not self._benched or self._pool is None:
            return None
        reason = self._pool.unable() or "no task can run here"
        return reason[: p.MAX_PROBLEM_LENGTH]

    def _loop(self) -> None:
        assert self._pool is not None
        interval_s = self.config.heartbeat_interval_s
        next_beat = time.monotonic() + interval_s
        stalls = StallWatch(interval_s, time.monotonic())
        self._watch.wake_pipe(self._wake_read)

        while not self._stopping:
            # Children are replaced, and written to, now and then.
            self._watch.pool(self._pool.fds(), self._pool.write_fds())
            unannounced = self._input is not None and self._input.unannounced()
            timeout_ms = 0 if unannounced else self._poll_timeout_ms(next_beat)
            ready = self._watch.wait(timeout_ms)
            now = time.monotonic()
            self._forgive_broker(stalls, now)
            if self._watch.monitor_ready(ready) and self._handshakes.read():
                # At once, not at the next beat: each turn of libzmq's is
                # another failed handshake.
                self._stop_trying()
            announced = self._watch.socket_ready(ready)
            if unannounced or announced:
                self._receive(now, announced)
            self._collect(now, ready)
            self._follow_pool(now)
            if self._stopping:
                return  # a cold stop came while we waited: no drain to announce
            if self._drain_requested and self._drained():
                return

            if now >= next_beat:
                self._send(p.Heartbeat())
                next_beat = now + interval_s
                self._unconfirmed.heard(self._broker.heard_after)
                self._check_broker(now)
                self._give_back_held_up(now)
                self._taken_back.flush(now)
                self._handed_back.flush(now)
            elif self._broker.presumed_gone(now):
                # As the silence passes the limit: at the next beat, it was
                # noticed up to an interval later than docs/cli.md says.
                self._check_broker(now)

    def _drained(self) -> bool:
        """Tell the broker we are draining, once; True when nothing is left."""
        assert self._pool is not None
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 64)
        if not self._draining:
            self._draining = True
            self._send(p.Drain())
            log.info(
                "worker draining worker=%s: no new tasks; finishing %d held "
                "(signal again to leave at once)",
                self.config.worker_id,
                self._pool.load(),
            )
        return self._pool.load() == 0

    def _poll_timeout_ms(self, next_beat: float) -> int:
        assert self._pool is not None
        wake_at = min(next_beat, self._broker.gone_at())
        deadline = self._pool.next_deadline()
        if deadline is not None:
            wake_at = min(wake_at, deadline)
        return poll_timeout_ms(wake_at)

    def _receive(self, now: float, announced: bool) -> None:
        assert self._socket is not None
        # Payloads go on to a child as they are: large ones are not copied.
        # A list, not the generator: the broker was heard only if a message
        # came, and the socket's descriptor also wakes us when nothing did
        # (a connection closed, a handshake failed).
        commands = list(
            _wire.receive(
                self._socket, p.TO_WORKER, lend_large=True, announced=announced
            )
        )
        silent_s = self._broker.read(bool(commands), now)
        if silent_s is not None:
            log.info(
                "broker answered again after %.1fs of silence broker=%s worker=%s",
                silent_s,
                self.config.connect,
                self.config.worker_id,
            )
        for command in commands:
            self._handle(command, now)

    def _handle(self, command: p.Command, now: float) -> None:
        if isinstance(command, p.Welcome):
            self._max_payload_bytes = command.max_payload_bytes
            self._handshakes.read()  # the handshake came before the welcome
            self._broker.welcomed(self._handshakes.connections)
            self._shared.welcomed()
        elif isinstance(command, p.Tasks):
            assert self._pool is not None
            if self._benched:
                return  # sent before our READY without services: requeued
            for task in command.tasks:
                self._pool.submit(task, now)
        elif isinstance(command, p.Release):
            self._release(command.tickets)
        elif isinstance(command, p.Error):
            self._refused(command, now)

    def _refused(self, error: p.Error, now: float) -> None:
        """The broker refused a message of ours: register again if it no
        longer knows us, say so if it is the wrong socket, else log it."""
        if error.code == "unknown_worker":
            if self._broker.welcome_pending(now):
                log.debug("unknown_worker about a message sent before our READY")
                return
            self._registering_again()
            self._register(now)
        elif error.code in _FRONTEND_REFUSALS:
            self._misdirected(error)
        elif error.code == "forbidden":
            self._key_removed(error, now)
        else:
            log.warning(
                "the broker refused a message from this worker code=%s worker=%s: "
                "%s; that message is dropped and the worker carries on",
                error.code,
                self.config.worker_id,
                error.message,
            )

    def _key_removed(self, error: p.Error, now: float) -> None:
        """The broker no longer allows our key (removed from its allow list):
        every message on this connection is refused, a WARNING each beat for
        ever. Say it once, and connect again: the broker refuses the handshake
        until the key is back (the handshake watch says so, and backs off),
        then takes our READY, with what we still hold."""
        log.error(
            "the broker no longer allows this worker's key: %s; connecting again, "
            "which it refuses until the key is allowed again worker=%s",
            error.message,
            self.config.worker_id,
        )
        self._connect(now)

    def _release(self, tickets: Sequence[tuple[int, int]]) -> None:
        """The broker took these tasks back: their clients cancelled them,
        their deadlines passed, or (named by our READY) they finished or went
        to another worker meanwhile. Stop them, and report none."""
        assert self._pool is not None
        self._unconfirmed.forget(tickets)
        given_up = self._pool.release(tickets)
        if given_up:
            self._taken_back.log(
                time.monotonic(),
                given_up,
                "the broker took back %s held here worker=%s (cancelled, past "
                "their deadline, or given to another worker); stopped them",
                counted(given_up, "task"),
                self.config.worker_id,
            )
        # After a broker pause, most often the results sent again on our
        # return, which it had: nothing was lost, and nothing runs here.
        if len(tickets) > given_up:
            log.info(
                "the broker needs nothing more of %s no longer running here "
                "worker=%s (it has their results, or they were cancelled or "
                "finished elsewhere); nothing to do",
                counted(len(tickets) - given_up, "task"),
                self.config.worker_id,
            )

    def _registering_again(self) -> None:
        """Say why the broker no longer knows us. After our connection to it
        was made anew (a broker restart, most often) that is expected; over
        the connection it welcomed us on, it took us for dead: a fault, and
        tasks we held were requeued and may run twice."""
        self._handshakes.read()
        if self._handshakes.connections > self._broker.welcomed_on:
            log.info(
                "the broker does not know this worker after it reconnected (the "
                "broker restarted); registering again worker=%s",
                self.config.worker_id,
            )
            return
        log.warning(
            "the broker does not know this worker on the connection it "
            "welcomed it on (it took the worker for dead: its tasks were "
            "requeued); registering again worker=%s",
            self.config.worker_id,
        )

    def _misdirected(self, error: p.Error) -> None:
        # Said once: the worker keeps trying, and the answer stays the same.
        if not self._told_misdirected:
            self._told_misdirected = True
            log.error(
                "the broker at %s answers as its frontend, where clients connect "
                "(%s): is --connect the broker's backend?",
                self.config.connect,
                error.message,
            )

    def _collect(self, now: float, ready: set[int]) -> None:
        assert self._pool is not None
        outcomes = [self._within_limit(o) for o in self._pool.collect(now, ready)]
        if outcomes:
            self._send(p.Done(outcomes))
            self._unconfirmed.sent(outcomes, now)
            for outcome in outcomes:
                self._task_s.observe(outcome.duration_s)
            self._adjust_credit(now)

    def _give_back_held_up(self, now: float) -> None:
        """Hand the tasks not started here back to the broker, for workers
        with room, when every slot has run one task or batch for HELD_UP_S or
        more (long tasks, or tasks that hang with no timeout): a tester's
        tasks waited here behind two that hung while another worker idled.
        Registering again names only what runs; the broker requeues the rest,
        first. Only this worker knows which it has started: taken back by the
        broker, a running one would be stopped and run again."""
        assert self._pool is not None
        if self._benched or self._draining:
            return
        handed = self._pool.give_up_held_up(now)
        if not handed:
            return
        self._handed_back.log(
            now,
            1,
            "every slot is busy with a long task worker=%s: handing %s not "
            "started back to the broker for workers with room",
            self.config.worker_id,
            counted(handed, "task"),
        )
        self._register(now, resend=False)

    def _follow_pool(self, now: float) -> None:
        """Serve nothing while no task can run here (no task process can
        start, every slot holds a stuck thread), and again once one can.
        Registering again without services makes the broker requeue what it
        gave us, unblamed, for the workers that can run it; the status shows
        us serving no function, and why."""
        assert self._pool is not None
        benched = self._pool.unable() is not None
        if benched == self._benched:
            return
        self._benched = benched
        if benched:
            log.error(
                "worker serves nothing while %s worker=%s: handing %s back to "
                "the broker for other workers",
                self._pool.unable(),
                self.config.worker_id,
                counted(self._pool.load(), "task"),
            )
        else:
            log.info(
                "tasks can run here again worker=%s; serving %s",
                self.config.worker_id,
                counted(len(self.services), "function"),
            )
        self._register(now)

    def _within_limit(self, outcome: p.Outcome) -> p.Outcome:
        # A frame far over the broker's limit would get this connection dropped
        # by libzmq, and the task blamed as if it had killed us.
        limit = self._max_payload_bytes
        if limit is None or len(outcome.payload) <= limit:
            return outcome
        error = TaskRejected(
            "ResultTooLarge",
            f"the result of {len(outcome.payload)} bytes is over the broker's "
            f"limit of {limit} bytes (max_payload_bytes)",
        )
        return p.Outcome(
            outcome.ticket,
            outcome.attempt,
            p.Status.REJECTED,
            pack_error(error),
            outcome.duration_s,
        )

    def _wanted_capacity(self) -> int:
        per_slot = self._prefetch.per_slot(self._task_s.mean_s)
        # The broker refuses more (see protocol.MAX_CAPACITY); thousands of
        # tiny tasks held hide a round trip as well as more would.
        return min(p.MAX_CAPACITY, self.config.concurrency * per_slot)

    def _adjust_credit(self, now: float) -> None:
        wanted = self._wanted_capacity()
        current = self._capacity
        if wanted == current:
            return
        # Only changes worth a message: by half or more, and leaving the
        # one-task-per-slot regime in either direction at once
        # (that one decides whether long tasks are hoarded). A cut within the
        # regime waits until CREDIT_INTERVAL_S after the last CREDIT: the run
        # times of tiny tasks jitter with the machine's load, and a credit
        # that followed each swing down and back up cost a CREDIT every twenty
        # round trips, each one work for the broker too. Growth is not held
        # back: it is what lets a stream of tiny tasks flow.
        low, high = min(wanted, current), max(wanted, current)
        if low != self.config.concurrency:
            too_soon = now < self._credit_sent_at + CREDIT_INTERVAL_S
            if high < 1.5 * low or (wanted < current and too_soon):
                return
        self._capacity = wanted
        self._credit_sent_at = now
        self._send(p.Credit(wanted))
        log.debug("credit changed worker=%s credit=%d", self.config.worker_id, wanted)

    def _forgive_broker(self, stalls: StallWatch, now: float) -> None:
        """This process stood still (stopped, swapped out), so the broker's
        silence meanwhile is ours: it does not count towards a reconnection,
        which would only have the broker take back and rerun what we hold."""
        stalled_s = stalls.stalled_s(now)
        if not stalled_s:
            return
        self._broker.forgive(stalled_s, now)
        log.warning(
            "this worker stood still for %.1fs (%s); not holding that silence "
            "against the broker worker=%s",
            stalled_s,
            stalls.cause(stalled_s),
            self.config.worker_id,
        )

    def _stop_trying(self) -> None:
        """Close the socket whose handshakes keep failing, or libzmq tries
        again 7 times a second for ever; an unconnected one stands in (sends
        on it fail, as to an absent broker) until the next reconnection,
        when the broker's silence is said, makes the next try."""
        assert self._socket is not None
        self._watch.forget_socket()
        self._handshakes.close()
        self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._input = _wire.InputCheck(self._socket)
        log.debug(
            "handshakes keep failing: trying again at the next reconnection broker=%s",
            self.config.connect,
        )

    def _check_broker(self, now: float) -> None:
        if self._handshakes.read():  # logs a refused handshake's reason, once
            self._stop_trying()
        if self._broker.presumed_gone(now):
            # At each reconnection at first, then less and less often.
            if self._broker.silence_worth_saying(now):
                self._log_silence(now)
            self._connect(now)

    def _log_silence(self, now: float) -> None:
        refused = self._handshakes.refused_note()
        if refused is not None:
            log.warning("%s", refused)  # not silent: it refused our key
            return
        if not self._broker.ever_heard:
            # As clients and sinks say it: "silent" read as a broker that was
            # there and went, when none ever answered (tester 36).
            log.warning(
                "no broker answered at %s yet (waited %.1fs) worker=%s; reconnecting",
                self.config.connect,
                self._broker.silent_s(now),
                self.config.worker_id,
            )
            return
        log.warning(
            "broker silent for %.1fs broker=%s; reconnecting",
            self._broker.silent_s(now),
            self.config.connect,
        )

    def _send(self, command: p.Command) -> None:
        # Outcomes dropped here are not lost: they are sent again when we
        # register again (see _unconfirmed).
        assert self._socket is not None
        _wire.send(self._socket, command)
        if self._input is not None:
            self._input.sent()

    def _leave(self) -> None:
        # Leaving at once, the tasks under way stop before the broker hears
        # BYE and runs them again elsewhere, or they would run twice.
        at_once = self._stopping
        if at_once and self._pool is not None:
            self._abandon_tasks(self._pool)
        if self._socket is not None:
            self._send(p.Bye())
            self._handshakes.close()
            self._socket.close()
        if self._pool is not None and not at_once:
            self._pool.close()
        self._shared.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        log.info("worker stopped worker=%s", self.config.worker_id)

    def _abandon_tasks(self, pool: Pool) -> None:
        # INFO: leaving at once is what the operator (or an embedded run
        # that stops) asked for; the tasks are not lost.
        log.info(
            "worker leaving at once worker=%s: stopping the %s it holds, for "
            "the broker to give to other workers",
            self.config.worker_id,
            counted(pool.load(), "task"),
        )
        pool.close(at_once=True)


class _BrokerContact:
    """What the worker knows of its broker: when it last heard from it (is it
    gone?), and where its registration stands (is a READY unanswered?)."""

    def __init__(self, interval_s: float, liveness: int, now: float) -> None:
        self._interval_s = interval_s
        self._silence_limit_s = interval_s * liveness
        # Silence counted towards a reconnection: from the last message, the
        # last READY, or later when this process stood still meanwhile.
        self._silence = BrokerSilence(0.0)
        # When the broker last said anything, across reconnections: what a
        # silence is logged from, less and less often.
        self._heard_at = now
        self._silence_log = Dwindling(self._silence_limit_s)
        # What the broker said reached us after this time, for all we can
        # tell: when we last read its socket empty. A message read after this
        # process stood still may have waited there since before the stall,
        # and proves nothing about what we sent meanwhile (see _unconfirmed).
        self.heard_after = 0.0
        self._read_at = 0.0
        # Whether any broker ever said anything to us.
        self.ever_heard = False
        self._registering = False
        self._registered_at = 0.0
        # The connections made to the broker by when it last welcomed us (see
        # Worker._registering_again).
        self.welcomed_on = 0

    def read(self, heard: bool, now: float) -> float | None:
        """The socket was read empty at `now`; `heard` if it held messages.
        Returns how long the broker had been silent, if that silence was
        logged (its end is worth a line too), else None."""
        read_before, self._read_at = self._read_at, now
        if not heard:
            return None
        ended = self._heard_at if self._silence_log.said_of(self._heard_at) else None
        self._silence.seen_at = self._heard_at = now
        self.ever_heard = True
        self.heard_after = read_before
        return None if ended is None else now - ended

    def registering(self, now: float) -> None:
        self._registering = True
        self._registered_at = now
        self._silence.seen_at = now

    def welcomed(self, connections: int) -> None:
        self._registering = False
        self.welcomed_on = connections

    def welcome_pending(self, now: float) -> bool:
        """Whether a READY is on its way: sent within a heartbeat interval and
        not answered yet (a longer wait means it was lost, and we send another)."""
        recent = now - self._registered_at < self._interval_s
        return self._registering and recent

    def forgive(self, stalled_s: float, now: float) -> None:
        """This process stood still for `stalled_s`: not the broker's silence."""
        self._silence.forgive(stalled_s, now)

    def gone_at(self) -> float:
        """When the broker's silence reaches the limit, unless it speaks."""
        return self._silence.gone_at(self._silence_limit_s)

    def presumed_gone(self, now: float) -> bool:
        return self._silence.presumed_gone(now, self._silence_limit_s)

    def silence_worth_saying(self, now: float) -> bool:
        return self._silence_log.due(now, self._heard_at)

    def silent_s(self, now: float) -> float:
        return now - self._heard_at


class _Watch:
    """One poll over the broker socket, the wake-up pipe and the pool's pipes.

    The broker socket is watched through its ZMQ_FD, which becomes readable when
    the socket's state may have changed, not once per message: the loop drains
    the socket until ZMQ_EVENTS shows no input. A `select.poll` with lasting
    registrations costs one system call per wait, where `zmq.Poller` rebuilds
    its list each time and polls twice before it sleeps.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._socket_fd = self._monitor_fd = -1
        self._pool_fds: Sequence[int] = ()
        self._write_fds: Sequence[int] = ()

    def socket(self, fd: int, monitor_fd: int) -> None:
        """Watch the broker socket, and its handshake monitor's (-1: none)."""
        self._socket_fd, self._monitor_fd = fd, monitor_fd
        for watched in (fd, monitor_fd):
            if watched != -1:
                self._poll.register(watched, select.POLLIN)

    def forget_socket(self) -> None:
        for watched in (self._socket_fd, self._monitor_fd):
            if watched != -1:
                self._poll.unregister(watched)
        self._socket_fd = self._monitor_fd = -1

    def wake_pipe(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)

    def pool(self, fds: Sequence[int], write_fds: Sequence[int]) -> None:
        """Watch these pipes from now on; cheap when nothing changed."""
        if fds == self._pool_fds and write_fds == self._write_fds:
            return
        for fd in self._pool_fds:
            with contextlib.suppress(KeyError):  # a replaced child's, closed
                self._poll.unregister(fd)
        for fd in fds:
            # A pipe with a batch not fully written yet: write the rest as
            # soon as the child has read what is in it.
            writing = select.POLLOUT if fd in write_fds else 0
            self._poll.register(fd, select.POLLIN | writing)
        self._pool_fds, self._write_fds = fds, write_fds

    def wait(self, timeout_ms: int) -> set[int]:
        """The descriptors ready within `timeout_ms`."""
        return {fd for fd, _events in self._poll.poll(timeout_ms)}

    def socket_ready(self, ready: set[int]) -> bool:
        return self._socket_fd in ready

    def monitor_ready(self, ready: set[int]) -> bool:
        return self._monitor_fd != -1 and self._monitor_fd in ready


def _check_exposure(config: WorkerConfig, curve: bool) -> None:
    """Unpickling what arrives in plain text from the network runs anyone's code."""
    if curve or is_loopback(config.connect):
        return
    if not config.allow_pickle:
        log.warning(
            "connecting to %s without CURVE: tasks and results cross the network "
            "unencrypted and the broker is not authenticated",
            config.connect,
        )
        return
    if not config.insecure:
        raise UsageError(
            f"refusing to run pickled callables from {config.connect} without "
            "CURVE: anyone on the network could run code here. Use --secret-key "
            "and --broker-key, or --insecure if you accept that"
        )
    log.warning(
        "!!! --insecure: running pickled callables from %s without CURVE; anyone "
        "who reaches that broker can run any code here !!!",
        config.connect,
    )

"""The receiving end of the ventilator-sink pipeline.

Tasks submitted with ``sink=NAME`` send their results to whichever process
registered NAME, not to their submitter. The broker keeps those results until
the sink acknowledges them, so a sink may start late, or restart, and still
receive everything.

One process receives a sink at a time. A second one is refused while the first
is connected; it keeps asking for a few seconds (a restarted sink may start
before the broker noticed that its predecessor died), then gives up with a
`UsageError`.

The caller's thread does the receiving, in `results`. While the caller holds a
result (writing it to an output that may block for minutes, behind a slow
reader), a thread of the sink's own beats in its place, so that the broker
does not take a busy sink for a dead one. The socket changes threads behind a
lock, whose acquire and release are the memory barriers libzmq asks for.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from . import _wire
from . import protocol as p
from ._client_io import ACK_BATCH
from ._recent import RecentResults
from ._timing import poll_timeout_ms
from .errors import NetworkError, TaskError, UsageError, task_error_from_wire
from .logs import Dwindling
from .policy import DEFAULT_ADDRESS, check_heartbeat
from .security import REVOKED, client_keys
from .serialization import unpack_value

__all__ = ["Sink", "SinkResult"]

log = logging.getLogger(__name__)

# How long a sink whose name another process receives keeps asking for it. The
# broker notices a killed receiver at its next heartbeat to it (1 s by default)
# and a vanished host after 3 silent heartbeat intervals.
TAKEN_WAIT_S = 5.0
# What a broker's backend answers a client's HELLO ("command") and heartbeats
# ("unknown_worker"): the sink was pointed at the wrong socket.
_BACKEND_REFUSALS = frozenset({"command", "unknown_worker"})
# Results yielded between two ACKs. A sink that starts late reads the whole
# backlog the broker sends at once (up to its delivery window, 20,000); held
# until all of it was written, a sink killed part way got every written
# result again. An ACK per result halved a sink's rate (see
# _receive_until_idle); one per this many costs next to nothing, and bounds
# what a killed sink writes twice.
SINK_ACK_EVERY = 256
# Heartbeat intervals without a word from the broker (its WELCOME at first,
# its heartbeats then) before the sink says so, and between two such
# warnings: a Client's default liveness, so that both say it after the same
# wait.
SILENT_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class SinkResult:
    """One result that reached the sink."""

    session: str  # the submitting client's session
    task_id: int
    value: Any = None
    error: TaskError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Sink:
    """Receive the results addressed to sink `name`. Use as a context manager.

    Leaving the block (or `close()`) says goodbye to the broker, as does a
    KeyboardInterrupt on its way out of it; a process ended by a signal it does
    not handle (SIGTERM, by default) cannot, and the broker notes the sink as
    unreachable. Its results wait at the broker all the same.
    """

    def __init__(
        self,
        name: str,
        address: str = DEFAULT_ADDRESS,
        *,
        heartbeat_interval_s: float = 1.0,
        context: zmq.Context[Any] | None = None,
        secret_key: str | None = None,
        broker_key: str | None = None,
        taken_wait_s: float = TAKEN_WAIT_S,
    ) -> None:
        _check_name(name)
        check_heartbeat(heartbeat_interval_s, liveness=1)
        curve = client_keys(secret_key, broker_key)  # as for Client
        self.name = name
        self.address = address
        self._heartbeat_interval_s = heartbeat_interval_s
        self._taken_wait_s = taken_wait_s
        # Since when, and why, the broker refuses us the name (None: it has not).
        self._refused_since: float | None = None
        self._refusal = ""
        # Between a broker's "hello_first" (it restarted) and its WELCOME: our
        # HELLO is on its way, and beats ask again in case it was lost.
        self._registering_again = False
        self._context = context or zmq.Context.instance()
        _wire.check_endpoint(address, "the broker address")
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 1000)
        if curve is not None:
            curve.apply(self._socket)
        # A broker that refuses our handshakes (a key missing, refused, or
        # the wrong broker key) is not silent: `results` says why and fails.
        public_key = curve.public_key if curve is not None else None
        self._handshakes = _wire.HandshakeWatch(
            address, "sink", public_key, raised_too=True
        )
        self._handshakes.watch(self._socket)
        self._socket.connect(address)
        self._session = uuid.uuid4().hex
        self._started_at = time.monotonic()
        # Whether a broker ever answered our HELLO: a sink that waited for
        # results at a wrong address must be able to say so.
        self.welcomed = False
        # Results yielded lately: a copy the broker sends again (after a
        # reconnection, or a send to us that failed) is acknowledged, not
        # written twice.
        self._handed_on = RecentResults()
        # Held by whoever uses the socket: `results` while it receives, the
        # beating thread while the caller holds a result (see _beat_meanwhile).
        self._socket_lock = threading.Lock()
        self._last_sent_at = time.monotonic()
        # When the broker last sent anything (None: never); and saying that
        # it is silent, less and less often.
        self._heard_at: float | None = None
        self._silence_log = Dwindling(self._heartbeat_interval_s * SILENT_INTERVALS)
        self._closing = threading.Event()
        self._send(self._hello())
        self._beater = threading.Thread(
            target=self._beat_meanwhile, name=f"ventilator-sink-{name}", daemon=True
        )
        self._beater.start()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def results(
        self, idle_timeout_s: float | None = None, *, output_fd: int | None = None
    ) -> Generator[SinkResult, None, None]:
        """Yield results as they arrive; acknowledge each batch once consumed.

        A caller that stops part way (an exception where it writes a result,
        or `close()` on the generator) leaves the batch of the result it held
        unacknowledged: the broker sends it to the next receiver of the sink.

        Args:
            idle_timeout_s: stop after this long without a result; None waits
                for ever (until the generator is closed).
            output_fd: the descriptor the caller writes the results to. Watched
                while the sink waits: once its reader left (a pipe's reader
                exited, a terminal hung up), the sink stops at once instead of
                at its next write, which may never come, holding its name.

        Raises:
            UsageError: another process receives this sink and kept it for
                `taken_wait_s`, or this key may not receive it (CURVE rights).
            NetworkError: the broker refuses this sink's handshakes, saying
                why: it wants CURVE and the sink has no key, its key is not
                allowed, or the broker key is not that broker's.
            BrokenPipeError: the reader of `output_fd` left. Every batch
                acknowledged was yielded whole; the caller leaves (`close()`)
                as it would had a write to the output failed.
        """
        with self._socket_lock:
            yield from self._receive_until_idle(idle_timeout_s, output_fd)
        if self._refused_since is not None:
            raise UsageError(self._refusal)

    def _receive_until_idle(
        self, idle_timeout_s: float | None, output_fd: int | None
    ) -> Iterator[SinkResult]:
        waiting = _Waiting(self._socket, output_fd, self._handshakes.monitor)
        last_result = time.monotonic()
        next_beat = last_result + self._heartbeat_interval_s
        while idle_timeout_s is None or time.monotonic() - last_result < idle_timeout_s:
            handshake_news = waiting.wait(
                self._wait_ms(next_beat, last_result, idle_timeout_s)
            )
            self._check_handshakes(handshake_news)
            batch = self._receive()
            # WELCOME may have lowered the interval to the broker's.
            next_beat = min(next_beat, time.monotonic() + self._heartbeat_interval_s)
            for start in range(0, len(batch), SINK_ACK_EVERY):
                # Acknowledged together once the caller asks for the one after
                # the last: all written. One ACK per result halved a sink's
                # rate and cost the broker five times the CPU; a sink killed
                # meanwhile gets that part of the batch again.
                part = batch[start : start + SINK_ACK_EVERY]
                for result in part:
                    with self._lent_socket():
                        yield result
                    self._handed_on.add((result.session, result.task_id))
                self._send(p.Ack([(r.session, r.task_id) for r in part]))
                last_result = time.monotonic()
            if time.monotonic() >= next_beat:
                # Refused or forgotten, we ask for the name again instead of
                # heartbeating.
                ask = self._refused_since is not None or self._registering_again
                self._send(self._hello() if ask else p.Heartbeat())
                next_beat = time.monotonic() + self._heartbeat_interval_s
                self._warn_while_silent()

    def _check_handshakes(self, news: bool) -> None:
        """Say once why the broker refuses our handshakes, if it does; fail
        once that is past doubt, as a client's tasks do: no result can come.
        A refusal libzmq does not retry (a key the broker's list lacks, a
        mechanism mismatch) is past doubt once the broker has been silent as
        long as the sink waits before saying so.

        Raises:
            NetworkError: the broker refuses our handshakes, saying why.
        """
        if news:  # the monitor's events, only when it has some
            self._handshakes.read()
        problem = self._handshakes.problem
        if problem is None:
            return
        silent = self._silent_s(time.monotonic()) >= self._silence_s
        if self._handshakes.definitive or silent:
            raise NetworkError(f"{problem} (sink={self.name})")

    def _warn_while_silent(self) -> None:
        """Say, now and then, that the broker is silent: a sink at a wrong
        address, started before its broker, or whose broker stopped, would
        otherwise wait in silence for ever."""
        now = time.monotonic()
        if self._silent_s(now) < self._silence_s:
            return
        since = self._started_at if self._heard_at is None else self._heard_at
        if not self._silence_log.due(now, since):
            return
        if self._heard_at is None:
            log.warning(
                "no broker answered at %s yet (waited %.1fs) sink=%s; still waiting",
                self.address,
                now - since,
                self.name,
            )
        else:
            log.warning(
                "broker silent for %.1fs broker=%s sink=%s; still waiting (its "
                "results wait there meanwhile)",
                now - since,
                self.address,
                self.name,
            )

    def _silent_s(self, now: float) -> float:
        """How long the broker has said nothing (since we started, if never)."""
        return now - (self._started_at if self._heard_at is None else self._heard_at)

    @property
    def _silence_s(self) -> float:
        """How long the broker may say nothing before the sink says so."""
        return self._heartbeat_interval_s * SILENT_INTERVALS

    @contextlib.contextmanager
    def _lent_socket(self) -> Iterator[None]:
        """Let the beating thread use the socket while the caller holds a result."""
        self._socket_lock.release()
        try:
            yield
        finally:
            self._socket_lock.acquire()

    def _beat_meanwhile(self) -> None:
        """Beat while nobody receives: the caller is busy with a result, or
        between two calls of `results`. Checked twice an interval, so beats
        are at most one and a half intervals apart, well within the broker's
        liveness. A sink refused its name, or not yet welcomed, has nothing
        to keep alive; `results` asks for the name again."""
        while not self._closing.wait(self._heartbeat_interval_s / 2):
            with self._socket_lock:
                if self._closing.is_set():
                    return
                due = self._last_sent_at + self._heartbeat_interval_s
                if (
                    self.welcomed
                    and self._refused_since is None
                    and not self._registering_again
                    and time.monotonic() >= due
                ):
                    self._send(p.Heartbeat())

    def _wait_ms(self, next_beat: float, last: float, idle_s: float | None) -> int:
        wake_at = next_beat if idle_s is None else min(next_beat, last + idle_s)
        return poll_timeout_ms(wake_at)

    def _receive(self) -> list[SinkResult]:
        batch: dict[tuple[str, int], SinkResult] = {}
        for command in _wire.receive(self._socket, p.TO_CLIENT):
            self._heard_at = time.monotonic()
            if isinstance(command, p.Welcome):
                self._welcome(command)
            elif isinstance(command, p.Results):
                self._add_new(batch, command.results)
            elif isinstance(command, p.Error):
                self._refused(command)
        return list(batch.values())

    def _welcome(self, welcome: p.Welcome) -> None:
        self.welcomed = True
        self._refused_since = None
        self._registering_again = False
        # Beat at least as often as the broker expects, or it takes us for
        # gone whenever no result comes for a while.
        self._heartbeat_interval_s = min(
            self._heartbeat_interval_s, welcome.heartbeat_interval_s
        )
        # ACKs sent while the broker did not know this connection were
        # refused: what it still holds of ours would come again.
        for keys in self._handed_on.chunks(ACK_BATCH):
            self._send(p.Ack(keys))

    def _add_new(
        self,
        batch: dict[tuple[str, int], SinkResult],
        entries: Sequence[p.ResultEntry],
    ) -> None:
        """Add to `batch` the results neither yielded before nor in it.

        Copies of results yielded are acknowledged at once; a copy of one in
        the batch is dropped: the batch's ACK, once it is written, covers it.
        """
        copies: list[tuple[str, int]] = []
        for entry in entries:
            key = (entry.origin, entry.task_id)
            if key in self._handed_on:
                copies.append(key)
            elif key not in batch:
                batch[key] = _result(entry)
        if copies:
            log.debug("acknowledging %d results received twice", len(copies))
            self._send(p.Ack(copies))

    def _refused(self, error: p.Error) -> None:
        """Act on the broker's refusal of our last message."""
        if error.code == "hello_first":
            # A restarted broker: register the name again; it kept our results.
            # Each message sent while it was down earns one of these: the
            # first asks, the others find the question asked.
            if not self._registering_again:
                # Expected after every broker restart, as a client says it.
                log.info(
                    "the broker does not know this sink (it restarted); "
                    "registering again sink=%s",
                    self.name,
                )
                self._registering_again = True
                self._send(self._hello())
        elif error.code in ("sink_taken", p.TOO_MANY_SESSIONS):
            # No room for it is waited out as another receiver is: asked
            # again each heartbeat, for as long.
            self._taken(error.message)
        elif error.code in ("forbidden", REVOKED):
            # Its key is not (or no longer) allowed: what the broker holds for
            # this sink waits there for a process with a key it allows.
            raise UsageError(error.message)
        elif error.code in _BACKEND_REFUSALS:
            # Our HELLO and heartbeats answered as a worker's would be: no
            # result will ever come on this address.
            raise UsageError(
                f"{self.address} is not a broker's frontend: it answered as its "
                f"backend, where workers connect ({error.message}); connect "
                "sinks to the broker's frontend"
            )
        else:
            log.warning(
                "the broker refused a message code=%s: %s", error.code, error.message
            )

    def _taken(self, message: str) -> None:
        now = time.monotonic()
        self._refusal = message
        if self._refused_since is None:
            log.warning("%s; asking again for %gs", message, self._taken_wait_s)
            self._refused_since = now
        elif now - self._refused_since >= self._taken_wait_s:
            raise UsageError(message)

    def _hello(self) -> p.Hello:
        return p.Hello(self._session, sink=self.name)

    def _send(self, command: p.Command) -> None:
        _wire.send(self._socket, command)
        self._last_sent_at = time.monotonic()

    def close(self) -> None:
        """Leave; results not yet acknowledged stay at the broker for next time."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._beater.join()
        with self._socket_lock:
            self._send(p.Bye())
            self._handshakes.close()
            self._socket.close()


class _Waiting:
    """Waits for the broker's messages, and watches the output for its
    reader leaving meanwhile.

    Checked before the socket is read: what the broker sent meanwhile stays
    unacknowledged, for the next receiver. Only an error or a hang-up wakes
    the wait: a regular file, or /dev/null, never reports one.
    """

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        output_fd: int | None,
        monitor: zmq.Socket[bytes] | None,
    ) -> None:
        self._output_fd = output_fd
        self._monitor = monitor
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        if monitor is not None:  # the socket's handshakes, failed or not
            self._poller.register(monitor, zmq.POLLIN)
        if output_fd is not None:
            # libzmq reports POLLERR and POLLHUP of a descriptor as POLLERR.
            self._poller.register(output_fd, zmq.POLLERR)

    def wait(self, timeout_ms: int) -> bool:
        """Return once the broker sent something, or after `timeout_ms`;
        whether the socket's monitor has handshake events to read.

        Raises:
            BrokenPipeError: the reader of the output left.
        """
        ready = dict(self._poller.poll(timeout_ms))
        if self._output_fd is not None and self._output_fd in ready:
            raise BrokenPipeError(errno.EPIPE, "the reader of the sink's output left")
        return self._monitor is not None and self._monitor in ready


def _check_name(name: str) -> None:
    """Refuse a name the broker's HELLO would refuse: the sink would ask for
    it again and again, receiving nothing."""
    if not isinstance(name, str):
        raise UsageError(f"a sink's name must be a str, got {type(name).__name__}")
    problem = p.label_problem(name, "sink")
    if problem is not None:
        raise UsageError(f"cannot receive this sink: {problem}")


def _result(entry: p.ResultEntry) -> SinkResult:
    try:
        value = unpack_value(entry.payload)
    except Exception as exc:  # msgpack raises a family of unrelated types
        error = TaskError("ProtocolError", f"undecodable result: {exc}")
        return SinkResult(entry.origin, entry.task_id, error=error)

    if entry.status is p.Status.OK:
        return SinkResult(entry.origin, entry.task_id, value)
    return SinkResult(entry.origin, entry.task_id, error=task_error_from_wire(value))

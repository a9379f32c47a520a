"""The client's I/O thread: the one thread that owns the DEALER socket.

It sends what the callers queued in the `Handover` (tasks, questions,
cancels), receives what the broker sends, and settles the callers' futures
and answers with it. Each loop turn it sends everything that piled up in one
SUBMIT, so a burst of `submit` calls costs one message, not one each. Results
come back in batches and complete their futures; the thread acknowledges them
in one ACK per turn.

A task submitted while none of this client's is in flight, the round trip of
a caller that waits for each result, skips the hand-over: while the I/O thread
sleeps, the caller takes the socket (`ClientIO.send_now`, behind the socket
lock, which is the memory barrier libzmq asks for when a socket changes
threads) and sends the task itself.

If the broker goes silent, the thread reconnects with the same session: the
broker sends again whatever it had not seen acknowledged, and the thread
resends whatever the broker had not accepted (all unfinished tasks when the
broker has no durable journal).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import zmq

from . import _wire
from . import protocol as p
from ._cancels import UnconfirmedCancels
from ._handover import Collected, Handover, Outcome, Pending, Question
from ._recent import RecentResults
from ._shared import ClientShare
from ._timing import BrokerSilence, StallWatch, poll_timeout_ms
from ._words import counted
from .errors import (
    ClientBroken,
    ClientClosed,
    NetworkError,
    ProtocolError,
    SessionInUse,
    SessionRefused,
    TaskRejected,
    UsageError,
    task_error_from_wire,
)
from .logs import RAISED_TOO, Dwindling
from .security import NOT_PERMITTED, REVOKED, ClientKeys
from .serialization import unpack_value

__all__ = [
    "ACK_BATCH",
    "ACK_DELAY_S",
    "SESSION_WAIT_LIVENESS_PERIODS",
    "SUBMIT_BATCH",
    "SUBMIT_BATCH_BYTES",
    "WINDOW_BYTES_MIN_TASKS",
    "ClientIO",
    "IOSettings",
    "settle",
]

# The client's own logger, whichever of its modules speaks: operators know
# one component, the client, and configure it by that name.
log = logging.getLogger("ventilator.client")

# Tasks that may always be in the broker, whatever their size: window_bytes
# holds back only those beyond this many, so that tasks larger than the window
# still keep several workers busy.
WINDOW_BYTES_MIN_TASKS = 16
# Tasks sent in one SUBMIT at most; bounds the size of one message.
SUBMIT_BATCH = 2048
# ... and at most about this many payload bytes: one huge message would stall
# the broker's loop while it is copied in, and hold memory on both sides.
SUBMIT_BATCH_BYTES = 1024 * 1024
# Acknowledgements of results wait up to this long to travel with the next
# batch of submissions, or until this many. A lone task does not take them
# along: they are a message of their own, which the broker reads in a turn of
# its own more often than not, on the lone task's way.
ACK_DELAY_S = 0.005
ACK_BATCH = 1024
# ERROR codes with which a broker refuses a whole message it could not decode
# (ProtocolError.code); with a SUBMIT, every task in it.
_MESSAGE_REFUSED = frozenset({"frames", "size", "body", "malformed"})
# A client refused its session (another live client holds it) asks again every
# heartbeat for this many of its liveness periods, then fails what it holds:
# long enough for a broker with the same settings to give up a holder that
# died without BYE, and take it over then.
SESSION_WAIT_LIVENESS_PERIODS = 3
# How long a Client dropped without close() waits for the broker to accept
# what it sent, as close() does by default. Nothing is in flight by then in
# practice: a pending task's future holds its Client.
DROPPED_CLOSE_TIMEOUT_S = 10.0
# The command bytes of answers to questions: one that cannot be read still
# answers the oldest question asked (the broker answers in order).
_ANSWER_BYTES = frozenset({bytes([p.Cmd.STATUS_REPLY]), bytes([p.Cmd.OPERATOR_REPLY])})
# The broker's notices of unserved functions kept for a timed-out wait to name.
UNSERVED_REMEMBERED = 64
# ERROR codes that answer a question in its place (in order, like an answer).
_QUESTION_REFUSED = frozenset({NOT_PERMITTED, p.TOO_MANY_QUESTIONS})


@dataclass(frozen=True, slots=True)
class IOSettings:
    """What the I/O thread knows of its client, fixed when it is made."""

    address: str
    session: str
    # The client's random instance number: the high bits of its task ids, and
    # what tells the broker that a HELLO on a new connection is the holder.
    instance: int
    curve: ClientKeys | None
    heartbeat_interval_s: float
    liveness: int
    # Whether the caller named the session: then results left behind at close
    # are likely meant to be collected later; a generated one's are likely not.
    session_named: bool = False
    # Whether large payloads may go through shared memory (see _shared).
    shared_memory: bool = True


class ClientIO:
    """The I/O thread of one `Client`, and the state only it touches.

    Everything here is guarded by `_socket_lock`, which the thread holds but
    while it sleeps in its poll (see _wait); a caller holds it in `send_now`.
    What the callers share with it is in `handover`, under that one's lock,
    which is taken after `_socket_lock`, never before.
    """

    def __init__(
        self,
        settings: IOSettings,
        handover: Handover,
        context: zmq.Context[Any],
    ) -> None:
        # Nothing here may hold the Client: one dropped without close() is
        # collected, and its finalizer stops this thread (see Handover.drop).
        self._handover = handover
        self._context = context
        self.address = settings.address
        self.session = settings.session
        self._session_named = settings.session_named
        self._instance = settings.instance
        self._curve = settings.curve
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._liveness = settings.liveness

        # Owned by whoever holds `_socket_lock` from here on: the I/O thread,
        # except while it waits (see _wait), when a caller may send (send_now).
        # A Lock's acquire and release are full memory barriers, so the socket
        # changes threads as libzmq requires.
        self._socket_lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        # Large payloads go through shared memory to a broker on this machine.
        self._shared = ClientShare(handover.window_bytes, settings.shared_memory)
        # Bytes the broker holds for us as we reckon them: payloads of tasks
        # sent and not finished, results received and not acknowledged (of
        # which `_acks_bytes`). Nothing is sent that would take them past the
        # broker's client_max_bytes, which it would refuse.
        self._bytes_held = 0
        self._acks_bytes = 0
        # Questions sent, in order, awaiting their answers.
        self._asked: deque[Question] = deque()
        # Tasks cancelled and not yet confirmed by the broker (see
        # _cancels.py), sent again on every new connection.
        self._unconfirmed_cancels = UnconfirmedCancels()
        self._socket: zmq.Socket[bytes]
        self._poll = select.poll()
        self._socket_fd = -1
        self._monitor_fd = -1
        self._input: _wire.InputCheck  # with the socket (see _watch)
        self._welcomed = False
        self._hello_sent_at = -math.inf
        self._started_at = time.monotonic()
        # When the I/O thread last heard from a broker; None while none
        # answered. Callers read it unlocked, for what they say on a timeout.
        self.broker_heard_at: float | None = None
        # Says a broker is silent (or never answered), less and less often.
        self._silence_log = Dwindling(self._heartbeat_interval_s * self._liveness)
        # Since when the broker refuses our session to us (another live client
        # holds it); None while it is ours, or not asked for yet.
        self._session_refused_at: float | None = None
        # Why: another client holds it (session_in_use), or no room for it.
        self._session_refusal: p.Error | None = None
        self._durable = True
        self._acks: list[tuple[str, int]] = []
        self._acks_due = math.inf
        # Results handed to a future or to collect(): a copy the broker sends
        # again is acknowledged, not handed on twice.
        self._handed_on = RecentResults()
        # Results waiting for collect(), by key (a copy of one is dropped):
        # the broker counts them against the window until acknowledged.
        self._collectable: set[tuple[str, int]] = set()
        self._window_held_warned = False
        self._warned: set[str] = set()  # what the broker told us, logged once
        # Why tasks were failed unsent since the last WELCOME (see _fail_tasks).
        self._failed_why: set[str] = set()
        # The broker's latest words on functions no worker serves, for what a
        # caller's wait that timed out says (see why_waiting).
        self._unserved_said: deque[str] = deque(maxlen=UNSERVED_REMEMBERED)
        # Why the broker stopped serving this client's key, once it said so.
        self._revoked: str | None = None
        public_key = self._curve.public_key if self._curve is not None else None
        self._handshakes = _wire.HandshakeWatch(
            self.address, "client", public_key, raised_too=True
        )
        # Why this address cannot be a broker's frontend, once a refusal showed
        # it (see _misdirected); None while none did, or since a WELCOME.
        self._misdirection: str | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"ventilator-client-{self.session[:8]}", daemon=True
        )
        # Set as the thread leaves. Waited on where `thread.join()` cannot be
        # trusted: once a join was interrupted (Ctrl-C), CPython may take the
        # thread for stopped while it runs on (bpo-45274's fix).
        self.left = threading.Event()

    # --- what the caller's side calls ---------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        """Wait for the thread to leave, after `Handover.close`."""
        self.thread.join()

    @property
    def silence_s(self) -> float:
        """How long without a word before the broker is presumed gone."""
        return self._heartbeat_interval_s * self._liveness

    def function_of(self, task_id: int) -> str | None:
        """The function of a task not finished yet; None for any other."""
        pending = self._pending.get(task_id)
        return None if pending is None else pending.spec.function

    def why_waiting(self, task_id: int) -> str | None:
        """What the client knows of why task `task_id` is not done, in words
        for a caller whose wait timed out; None when it knows nothing.

        Read from the caller's thread without the lock: a diagnosis, and each
        read is one step the I/O thread cannot tear. The notices are copied
        first (one C-level step): iterating the deque while the I/O thread
        appends to it raises RuntimeError."""
        pending = self._pending.get(task_id)
        if pending is None:
            return None
        function = pending.spec.function
        for message in reversed(list(self._unserved_said)):
            if f"serves {function};" in message:
                return f"the broker said: {message}"
        if not pending.accepted:
            return "the broker has not confirmed it accepted it yet"
        return None

    def send_now(self) -> bool:
        """Send what is queued from the caller's thread, if the I/O thread is
        idle in its wait; False when it must be woken to do it (or to read).

        This saves a round trip between threads (a pipe write, a wake-up and a
        loop turn) on the path of a lone task, the one that waits for it.
        """
        if not self._socket_lock.acquire(blocking=False):
            return False  # the I/O thread is busy: it may be sending already
        try:
            if self._handover.stopped or not self._welcomed:
                return False
            self._send_outgoing(time.monotonic())
            # The I/O thread sleeps on the socket's descriptor, which our sends
            # may have silenced for a message that came in meanwhile.
            return not self._input.unannounced()
        finally:
            self._socket_lock.release()

    # --- the I/O thread --------------------------------------------------------

    def _run(self) -> None:
        with self._socket_lock:
            try:
                self._serve()
            except Exception as exc:  # a bug of ours: nothing may hang on it
                self._broke(exc)
            finally:
                self.left.set()

    def _broke(self, cause: Exception) -> None:
        """The I/O thread failed: fail what waits on it, and every later call."""
        log.error(
            "the client's I/O thread failed; failing its pending tasks session=%s",
            self.session,
            exc_info=cause,
        )
        error = ClientBroken(
            f"the client's I/O thread failed ({type(cause).__name__}: {cause}); "
            f"this client can send and receive nothing more; session={self.session}"
        )
        handover = self._handover
        with handover.lock:
            handover.break_down(error)
            outgoing = handover.take_unsent()
            questions = [*self._asked, *handover.take_questions()]
        for pending in (*self._pending.values(), *outgoing):
            _fail(pending.future, error)
        for question in questions:
            _fail(question.answer, error)
        with contextlib.suppress(Exception):
            self._close_socket(linger=0)

    def _serve(self) -> None:
        self._poll.register(self._handover.wake_fd, select.POLLIN)
        self._socket = self._connect()
        broker = BrokerSilence(time.monotonic())
        next_beat = broker.seen_at + self._heartbeat_interval_s
        stalls = StallWatch(self._heartbeat_interval_s, broker.seen_at)

        while not self._handover.closed or self._awaiting_acceptance():
            wake_at = min(next_beat, self._acks_due, broker.gone_at(self.silence_s))
            ready = self._wait(wake_at)
            now = time.monotonic()
            broker.forgive(stalls.stalled_s(now), now)
            if self._monitor_fd in ready and self._handshakes.read():
                self._stop_trying()
            if self._handover.wake_fd in ready:
                self._handover.drain_wake()
                if self._handover.dropped:
                    self._close_dropped()
            if self._receive(now):
                self._log_answer_after_silence(now)
                broker.seen_at = self.broker_heard_at = now
                # WELCOME may have lowered the interval to the broker's: the
                # next beat must not keep the date our own interval gave it.
                next_beat = min(next_beat, now + self._heartbeat_interval_s)
            self._send_outgoing(now)
            if not self._welcomed:
                self._fail_unanswerable()

            if broker.presumed_gone(now, self.silence_s):
                self._log_silence(now)
                self._close_socket(linger=0)
                self._socket = self._connect()
                broker.seen_at = now
            if now >= next_beat:
                # A refused client asks again instead: a beat would only be
                # answered "hello_first".
                refused = self._session_refused_at is not None
                self._send(self._hello_command() if refused else p.Heartbeat())
                self._ask_cancel_receipt()
                self._give_up_waiting_for_session(now)
                next_beat = now + self._heartbeat_interval_s

        self._shutdown()

    def _close_dropped(self) -> None:
        """Close for a Client dropped without close(), as close() would have:
        the broker forgets the session now rather than after its silence."""
        if self._handover.close(DROPPED_CLOSE_TIMEOUT_S):
            log.info(
                "the Client was dropped without close(); leaving the broker session=%s",
                self.session,
            )

    def _fail_unanswerable(self) -> None:
        """Before a WELCOME: fail what cannot be answered, saying why.

        Questions (status) would wait in silence for an answer that cannot
        come, from a broker whose handshakes fail or from a backend; so would
        tasks, which a backend never accepts. Checked every turn, not only
        when the refusal arrives: what is asked or submitted after it must
        fail as promptly as what came before.
        """
        problem = self._handshakes.problem
        self._fail_questions([x for x in (problem, self._misdirection) if x])
        if problem is not None and self._handshakes.definitive:
            refused = counted(self._handshakes.failures, "handshake", bare_one=True)
            self._fail_tasks(
                f"{problem} (this task was not run: the broker refused this "
                f"client's last {refused}; session={self.session})",
                "the broker refuses this client",
            )
        if self._misdirection is not None:
            self._fail_tasks(
                f"{self._misdirection} (this task was not run)",
                f"{self.address} is not a broker's frontend",
            )

    def _log_silence(self, now: float) -> None:
        """Say that the broker is silent, at each reconnection at first, then
        less and less often while it stays so (see Dwindling)."""
        heard_at = self.broker_heard_at
        silent_since = self._started_at if heard_at is None else heard_at
        if not self._silence_log.due(now, silent_since):
            return
        refused = self._handshakes.refused_note()
        if refused is not None:
            log.warning("%s", refused)  # not silent: it refused our key
        elif heard_at is None:
            log.warning(
                "no broker answered at %s yet (waited %.1fs); reconnecting",
                self.address,
                now - self._started_at,
            )
        else:
            log.warning(
                "broker silent for %.1fs broker=%s; reconnecting",
                now - heard_at,
                self.address,
            )

    def _log_answer_after_silence(self, now: float) -> None:
        """Say the broker answers again, if its silence was said: an operator
        who read "reconnecting" should not have to guess how it ended."""
        heard_at = self.broker_heard_at
        silent_since = self._started_at if heard_at is None else heard_at
        if self._silence_log.said_of(silent_since):
            log.info(
                "broker answered %s after %.1fs of silence broker=%s",
                "at last" if heard_at is None else "again",
                now - silent_since,
                self.address,
            )

    def _wait(self, wake_at: float) -> set[int]:
        """The descriptors ready by `wake_at` (monotonic); none if it passed.

        The only time the I/O thread lets go of the socket: a caller may send
        on it meanwhile, and writes the pipe if a message then waits unseen.
        """
        if self._input.unannounced():
            return {self._socket_fd}
        self._socket_lock.release()
        try:
            return {fd for fd, _ in self._poll.poll(poll_timeout_ms(wake_at))}
        finally:
            self._socket_lock.acquire()

    def _close_socket(self, linger: int) -> None:
        self._shared.close()
        self._unwatch()
        self._handshakes.close()
        self._socket.close(linger=linger)

    def _stop_trying(self) -> None:
        """Close the socket whose handshakes keep failing, or libzmq tries
        again 7 times a second for ever; an unconnected one stands in (sends
        on it fail, as to an absent broker) until the next reconnection,
        when the broker's silence is said, makes the next try."""
        self._close_socket(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._input = _wire.InputCheck(self._socket)
        log.debug(
            "handshakes keep failing: trying again at the next reconnection broker=%s",
            self.address,
        )

    def _awaiting_acceptance(self) -> bool:
        """While closing: are tasks still unaccepted, with time left to wait?
        Not while the broker refuses this client: none can be accepted."""
        if time.monotonic() >= self._handover.close_deadline or self._refused_entry:
            return False
        if self._session_refused_at is not None:
            return False  # the session is another client's: nothing is accepted
        # Cancels too: a map abandoned just before close() must not leave its
        # tasks to run for a session that is going away.
        if self._handover.has_unsent():
            return True
        return any(not pending.accepted for pending in self._pending.values())

    def _connect(self) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        if self._curve is not None:
            self._curve.apply(socket)
        self._handshakes.watch(socket)
        socket.connect(self.address)
        self._socket = socket
        self._watch()
        self._hello()
        return socket

    def _hello_unanswered(self) -> bool:
        """Whether a HELLO went out within the last heartbeat interval and no
        WELCOME came since: a restarted broker answers each message it got
        before it with "hello_first", and a HELLO for each of those made the
        one client join three times. A HELLO lost on the way (its broker died
        again) is said again at the first "hello_first" after an interval."""
        since = time.monotonic() - self._hello_sent_at
        return not self._welcomed and since < self._heartbeat_interval_s

    def _hello(self) -> None:
        # Nothing else is sent until the broker's WELCOME gives its limits; then
        # whatever it may not have (see _welcome) is sent again.
        self._hello_sent_at = time.monotonic()
        self._welcomed = False
        # Questions asked of a broker that forgot us will not be answered, and
        # cancellations it did not confirm go again after WELCOME.
        unconfirmed = self._unconfirmed_cancels.to_send_again()
        self._handover.ask_again(self._asked, unconfirmed)
        self._asked.clear()
        self._send(self._hello_command())

    def _hello_command(self) -> p.Hello:
        # The instance tells the broker this is the client that holds the
        # session, back on a new connection, and not a second one.
        return p.Hello(self.session, instance=self._instance, shared=self._shared.ask())

    def _watch(self) -> None:
        """Wait on the socket and its monitor through their ZMQ_FDs, with the
        wake-up pipe in one `select.poll`: one system call per wait, where a
        `zmq.Poller` polls twice and asks each socket's ZMQ_EVENTS twice. It
        also leaves the socket alone while the I/O thread waits (see _wait)."""
        self._socket_fd = _wire.fd_of(self._socket)
        self._poll.register(self._socket_fd, select.POLLIN)
        self._input = _wire.InputCheck(self._socket)
        if self._handshakes.monitor is not None:
            self._monitor_fd = _wire.fd_of(self._handshakes.monitor)
            self._poll.register(self._monitor_fd, select.POLLIN)
            # Its descriptor announces events only once a receive found it empty.
            self._handshakes.read()

    def _unwatch(self) -> None:
        for fd in (self._socket_fd, self._monitor_fd):
            if fd != -1:
                self._poll.unregister(fd)
        self._socket_fd = self._monitor_fd = -1

    def _send(self, command: p.Command) -> None:
        _wire.send(self._socket, command)
        self._input.sent()

    def _receive(self, now: float) -> bool:
        heard = False
        commands = _wire.receive(
            self._socket, p.TO_CLIENT, unreadable=self._unreadable_answer
        )
        for command in commands:
            heard = True
            self._handle(command)
        if self._acks and self._acks_due == math.inf:
            self._acks_due = now + ACK_DELAY_S
        return heard

    def _send_acks(self, now: float, submitting: bool) -> None:
        """Acknowledge results with the next submission, or once they are due.

        Waiting lets the broker read acknowledgements and submissions in one
        turn; `_take_outgoing` counts the unsent ones against the window."""
        due = now >= self._acks_due or len(self._acks) >= ACK_BATCH
        if self._acks and (submitting or due):
            self._send(p.Ack(self._acks))
            self._acks = []
            self._acks_due = math.inf
            self._bytes_held -= self._acks_bytes
            self._acks_bytes = 0

    def _handle(self, command: p.Command) -> None:
        if isinstance(command, p.Results):
            self._complete(command.results)
        elif isinstance(command, p.Accepted):
            self._accepted(command.task_ids)
        elif isinstance(command, p.Welcome):
            self._welcome(command)
        elif isinstance(command, p.StatusReply):
            self._answered(command.status)
        elif isinstance(command, p.OperatorReply):
            self._answered(command.report)
        elif isinstance(command, p.Error):
            self._refused(command)

    def _answered(self, answer: dict[str, Any]) -> None:
        if self._asked:
            _resolve(self._asked.popleft().answer, answer)

    def _unreadable_answer(self, frames: list[p.Payload], error: ProtocolError) -> None:
        """An answer that cannot be read still came: fail the question it
        answers with why, rather than let it time out and advise waiting
        longer (a status too large to read was taken for silence)."""
        if len(frames) < 2 or bytes(frames[1]) not in _ANSWER_BYTES:
            return
        if not self._asked:
            return
        asked = self._asked.popleft()
        message = (
            f"the broker at {self.address} answered {asked.what}(), but its "
            f"answer could not be read: {error}; a longer timeout_s will not "
            "help"
        )
        if error.code == "size":
            message += (
                f" (a client reads answers of up to {p.MAX_BODY_BYTES} bytes; "
                "a broker that lists every client in its status outgrows that "
                "past about 100,000 sessions: upgrade it)"
            )
        _fail(asked.answer, ProtocolError(message, error.code))

    def _refused(self, error: p.Error) -> None:
        if error.code == "hello_first":
            # Not once the key was revoked: its results would come back to
            # futures failed meanwhile, and be acknowledged and lost.
            if self._revoked is None and not self._hello_unanswered():
                # A restarted broker, or one that forgot this connection: open
                # the session again, which also resends what it may have lost.
                # Expected after every broker restart, so not a warning. Also
                # before any WELCOME: a HELLO lost with a broker that died
                # before answering is never answered, and a client that
                # hears the next broker never calls it silent.
                log.info("the broker does not know this session; saying HELLO again")
                self._hello()
        elif error.code == p.UNSERVED:
            self._unserved_said.append(error.message)
            self._warn_once(error.message)
        elif error.code in (p.SESSION_IN_USE, p.TOO_MANY_SESSIONS):
            self._session_refused(error)
        elif error.code in _MESSAGE_REFUSED:
            self._submit_refused(error)
        elif error.code == "command":
            self._misdirected(f"it refused a client's command ({error.message})")
        elif error.code == "unknown_worker":
            # A backend's answer to our heartbeat, with advice for a worker.
            self._misdirected("it took a client's heartbeat for a worker's")
        elif error.code in _QUESTION_REFUSED and self._asked:
            # An operator command this client's key may not give, or a question
            # past the connection's quota: its answer.
            _fail(self._asked.popleft().answer, UsageError(error.message))
        elif error.code == REVOKED or (error.code == "forbidden" and self._revoked):
            self._key_revoked(self._revoked or error.message)
        else:
            log.warning(
                "the broker refused a message: %s (%s)", error.message, error.code
            )

    def _session_refused(self, error: p.Error) -> None:
        """Another live client holds our session, or the broker has no room
        for it: wait, asking again each heartbeat (see _serve), and say so
        once."""
        if self._session_refused_at is None:
            self._session_refused_at = time.monotonic()
        self._session_refusal = error
        if error.code == p.SESSION_IN_USE:
            until, kind = "takes the session once that client has left", "SessionInUse"
        else:
            until, kind = "takes the session once there is room", "SessionRefused"
        self._warn_once(
            f"{error.message}; this client asks again every "
            f"{self._heartbeat_interval_s:g}s and {until}; after "
            f"{self._session_wait_s:g}s it fails its tasks with {kind} "
            f"(session={self.session}, {error.code})"
        )

    @property
    def _session_wait_s(self) -> float:
        periods = SESSION_WAIT_LIVENESS_PERIODS * self._liveness
        return periods * self._heartbeat_interval_s

    def _give_up_waiting_for_session(self, now: float) -> None:
        """Refused our session for longer than we wait: fail what we hold
        (tasks, questions) rather than let it hang. We keep asking: what is
        submitted once the session is ours again goes through."""
        since = self._session_refused_at
        if since is None or now - since < self._session_wait_s:
            return
        error: type[SessionRefused] = SessionInUse
        message = (
            f"session {self.session!r} is held by another live client, which "
            f"kept it for the {now - since:.1f}s this client waited; one client "
            "holds a session at a time: close the other one, or use another "
            "session name"
        )
        # What is submitted from now on gets a whole wait of its own: failed
        # at the next beat, it could never see the session freed meanwhile.
        self._session_refused_at = now
        refusal = self._session_refusal
        if refusal is not None and refusal.code != p.SESSION_IN_USE:
            error = SessionRefused
            message = (
                f"{refusal.message}; refused for the {now - since:.1f}s this "
                "client waited"
            )
        with self._handover.lock:
            outgoing = self._handover.take_unsent()
            questions = [*self._asked, *self._handover.take_questions()]
        self._asked.clear()
        held = [*self._pending.values(), *outgoing]
        self._pending.clear()
        self._bytes_held = self._acks_bytes

        for pending in held:
            _fail(pending.future, error(f"{message}; {_fate(pending)}"))
        for question in questions:
            _fail(question.answer, error(message))
        if held:
            self._handover.release(len(held))
            log.error("failed %s: %s", counted(len(held), "task"), message)

    def _misdirected(self, evidence: str) -> None:
        """A command of ours was answered as not a client's: every one we send
        is, so this is a broker's backend, where workers connect. It will
        answer no question: those asked fail now, and those asked later at
        once (see _fail_unanswerable), instead of timing out in silence."""
        if self._misdirection is not None:
            log.debug("%s still answers as a backend: %s", self.address, evidence)
            return
        self._misdirection = (
            f"{self.address} is not a broker's frontend: {evidence}; is it the "
            "backend, where workers connect? Connect clients to the broker's "
            "frontend"
        )
        # Every question and task fails with it too, which is how a command
        # line tells it: there the log line would say it twice.
        log.error("%s", self._misdirection, extra={RAISED_TOO: True})
        self._fail_questions([self._misdirection])

    def _fail_questions(self, problems: list[str]) -> None:
        """Fail the questions asked (status, operator commands) with the last
        of `problems`, which say why no answer can come: not a timeout later."""
        if not problems:
            return
        with self._handover.lock:
            questions = [*self._asked, *self._handover.take_questions()]
        self._asked.clear()
        for question in questions:
            _fail(question.answer, NetworkError(problems[-1]))

    @property
    def _refused_entry(self) -> bool:
        """Whether the broker definitely refuses this client's handshakes, or
        the address is a backend's: either way nothing sent is accepted."""
        if self._welcomed:
            return False
        return self._handshakes.definitive or self._misdirection is not None

    def _fail_tasks(self, message: str, why: str) -> None:
        """Fail every task held, sent or not, with a NetworkError saying
        `message`: where this client connects, none can be accepted (see
        _fail_unanswerable). The connection keeps trying: tasks submitted
        once a handshake succeeds (the operator let the key in) go through."""
        failed = self._fail_held(NetworkError(message))
        if not failed:
            return
        # Once until the next WELCOME: a program that keeps submitting while
        # refused gets each task's NetworkError, not an ERROR line each.
        told = why in self._failed_why
        self._failed_why.add(why)
        log.log(
            logging.DEBUG if told else logging.ERROR,
            "failed %s: %s session=%s",
            counted(failed, "task"),
            why,
            self.session,
            extra={RAISED_TOO: True},
        )

    def _key_revoked(self, message: str) -> None:
        """The broker removed this client's key: it sends no more results, and
        refuses what this client sends. Every task held, and every one
        submitted later, fails saying so, rather than wait for results that
        will not come here; those of tasks the broker has wait there for the
        session's return, under a key it allows again."""
        if self._revoked is None:
            self._revoked = message
            log.error("%s (session=%s)", message, self.session)
        self._fail_questions([message])
        self._fail_held(NetworkError(f"{message} (session={self.session})"))

    def _fail_held(self, error: NetworkError) -> int:
        """Fail every task held, sent or not, with `error`; return how many."""
        with self._handover.lock:
            outgoing = self._handover.take_unsent()
        held = [*self._pending.values(), *outgoing]
        if not held:
            return 0
        self._pending.clear()
        self._bytes_held = self._acks_bytes
        for pending in held:
            _fail(pending.future, error)
        self._handover.release(len(held))
        return len(held)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _submit_refused(self, error: p.Error) -> None:
        """The broker refused a message of ours whole, as malformed.

        Only a SUBMIT can be, and only for a task the client's own checks
        missed (_check_task). The broker does not say which message it was:
        the unaccepted tasks that break a rule fail with it, and the others
        are sent again, since they may have shared its message (the broker
        ignores a task it has already). When none breaks a known rule, every
        unaccepted task fails with the broker's reason, rather than wait for
        ever.
        """
        unaccepted = [x for x in self._pending.values() if not x.accepted]
        faulty = [x for x in unaccepted if p.task_problem(x.spec) is not None]
        blamed = faulty or unaccepted
        for pending in blamed:
            del self._pending[pending.spec.task_id]
            self._bytes_held -= pending.size
            reason = p.task_problem(pending.spec) or error.message
            _fail(
                pending.future,
                TaskRejected(
                    "ProtocolError",
                    f"the broker refused the message that carried this task: {reason}",
                ),
            )
        if blamed:
            self._handover.release(len(blamed))
        log.error(
            "the broker refused a message as malformed (%s: %s); failed %d "
            "unaccepted tasks, sent %d again",
            error.code,
            error.message,
            len(blamed),
            len(unaccepted) - len(blamed),
        )
        if faulty:
            self._resend_unaccepted()

    def _resend_unaccepted(self) -> None:
        again = [x.spec for x in self._pending.values() if not x.accepted]
        self._submit(again)

    def _submit(self, specs: list[p.TaskSpec]) -> None:
        """Send `specs`, their large payloads by reference where they can be."""
        on_wire = self._shared.on_wire
        unfinished = self._pending.__contains__
        for chunk in _batches([on_wire(spec, unfinished) for spec in specs]):
            self._send(p.Submit(chunk))

    def _welcome(self, welcome: p.Welcome) -> None:
        self._welcomed = True
        self._misdirection = None  # a frontend answers here now
        if self._session_refused_at is not None:
            self._session_refused_at = self._session_refusal = None
            log.info("the session is ours now session=%s", self.session)
        self._durable = welcome.durable
        self._failed_why.clear()
        self._shared.welcomed(welcome.arena)
        # Beat at least as often as the broker expects, or it takes us for gone.
        self._heartbeat_interval_s = min(
            self._heartbeat_interval_s, welcome.heartbeat_interval_s
        )
        self._handover.welcome(
            welcome.window,
            welcome.client_max_bytes or math.inf,
            welcome.max_payload_bytes,
        )
        self._acknowledge_again()
        self._resend()

    def _acknowledge_again(self) -> None:
        """Acknowledge again the results handed on lately: the ACKs of some
        may have died with the connection this one replaces (closed with
        linger 0), and the broker would send them again, to this client or
        to a later one of the session. It ignores those it has forgotten."""
        for keys in self._handed_on.chunks(ACK_BATCH):
            self._send(p.Ack(keys))

    def _resend(self) -> None:
        # Whatever the broker has not accepted may be lost; with no durable
        # journal, so may everything it accepted.
        again = [
            pending.spec
            for pending in self._pending.values()
            if not pending.accepted or not self._durable
        ]
        self._submit(again)

    def _accepted(self, task_ids: Iterable[int]) -> None:
        released = 0
        for task_id in task_ids:
            pending = self._pending.get(task_id)
            if pending is None:
                continue
            pending.accepted = True
            if pending.spec.sink is not None:
                # Its result goes to the sink; for us, acceptance is the end.
                del self._pending[task_id]
                self._bytes_held -= pending.size
                _resolve(pending.future, None)
                released += 1
            elif self._durable:
                # The broker's journal has the payload now; drop our copy.
                pending.spec = _without_payload(pending.spec)
        if released:
            self._handover.release(released)

    def _complete(self, results: Iterable[p.ResultEntry]) -> None:
        released = 0
        # Looked at once a message: results far outnumber cancels.
        unconfirmed = self._unconfirmed_cancels if self._unconfirmed_cancels else None
        collectable = self._collectable
        arena_lost = 0
        for entry in results:
            if entry.status is p.Status.REJECTED and self._arena_lost_for(entry):
                arena_lost += 1
                continue  # sent again once we have an arena, or in a frame
            key = (entry.origin, entry.task_id)
            if unconfirmed is not None:
                unconfirmed.settled(entry.task_id)  # a task's end confirms a cancel
            if collectable and key in collectable:
                continue  # sent again while it waits for collect(), which acks it
            # The broker holds the result, instead of the payload, until acked.
            self._bytes_held += len(entry.payload)
            if key in self._handed_on:
                self._acknowledge(key, len(entry.payload))  # sent again
                continue
            pending = self._pending.pop(entry.task_id, None)
            if pending is not None:
                self._shared.done(entry.task_id)
                released += 1
                self._bytes_held -= pending.size
                settle(pending.future, entry)
            elif entry.task_id >> 32 != self._instance:
                # Submitted by an earlier Client of this session: see collect().
                self._keep_for_collect(key, entry)
                continue
            # A future counts as handed on; otherwise it is ours and sent again
            # after a reconnect: already done.
            self._handed_on.add(key)
            self._acknowledge(key, len(entry.payload))
        if released:
            self._handover.release(released)
        if arena_lost:
            self._ask_for_arena(arena_lost)

    def _arena_lost_for(self, entry: p.ResultEntry) -> bool:
        """Whether `entry` refuses a task of ours only because its payload was
        sent by reference to an arena the broker dropped: it took this client
        for gone while it stood still (SIGSTOP, a suspended laptop), and it
        carried on, on the same connection, with no word of it."""
        pending = self._pending.get(entry.task_id)
        if not self._shared.sent_references or entry.origin:
            return False  # we sent no reference: the refusal is its end
        if pending is None or pending.accepted:
            return False
        try:
            report = unpack_value(entry.payload)
        except Exception:  # a peer's word: settled as it is
            return False
        return isinstance(report, dict) and report.get("type") == p.SHARED_MEMORY_GONE

    def _ask_for_arena(self, refused: int) -> None:
        """Say HELLO again, for a new arena; the WELCOME sends again what the
        broker has not accepted, the tasks refused for the old one among it."""
        log.info(
            "the broker dropped this client's shared memory, taking it for gone "
            "session=%s; asking for new memory and sending %s again",
            self.session,
            counted(refused, "task"),
        )
        self._shared.lost()
        if not self._hello_unanswered():
            self._hello()

    def _acknowledge(self, key: tuple[str, int], size: int) -> None:
        self._acks.append(key)
        self._acks_bytes += size

    def _keep_for_collect(self, key: tuple[str, int], entry: p.ResultEntry) -> None:
        self._collectable.add(key)
        self._handover.keep_for_collect(Collected(entry, key, len(entry.payload)))

    def _take_handed(self, now: float) -> None:
        """Acknowledge the results collect() handed on (under the hand-over's
        lock)."""
        if not self._handover.handed:
            return  # as on most turns: no call, no new list
        handed = self._handover.take_handed()
        for collected in handed:
            self._collectable.discard(collected.key)
            self._handed_on.add(collected.key)
            self._acknowledge(collected.key, collected.size)
        if self._acks_due == math.inf:
            self._acks_due = now + ACK_DELAY_S

    def _send_outgoing(self, now: float) -> None:
        handover = self._handover
        if self._revoked is not None and handover.outgoing:
            # Fail them here, saying why: sent, they would meet a broker that
            # refuses this key, and a reconnection would blame the handshake.
            self._key_revoked(self._revoked)
        with handover.lock:
            # Before the submissions: the broker counts a result against our
            # window until it is acknowledged.
            self._take_handed(now)
            self._send_acks(now, submitting=self._acks_go_along())
            batch = self._take_outgoing()
            cancels = self._take_cancels()
            asking = self._welcomed and handover.questions
            questions = handover.take_questions() if asking else []

        batch = self._refuse_oversized(batch)
        for pending in batch:
            self._pending[pending.spec.task_id] = pending
        self._submit([pending.spec for pending in batch])
        if cancels:
            self._forget_cancelled(cancels)
            self._send(p.Cancel(cancels))
            self._remember_cancels(cancels)
        for question in questions:
            self._asked.append(question)
            self._send(question.command)

    def _acks_go_along(self) -> bool:
        """Whether the acknowledgements due travel with this turn's
        submissions: with a batch, or when the tasks fit the window only once
        the broker has forgotten the results they acknowledge."""
        handover = self._handover
        outgoing = len(handover.outgoing)
        if outgoing > 1:
            return True
        if outgoing == 0:
            return False
        in_broker = self._held_in_broker()
        size = handover.outgoing[0].size
        return in_broker + 1 > handover.window or not self._room_for(size, in_broker)

    def _take_outgoing(self) -> list[Pending]:
        """Submissions that fit the broker's window; the rest wait their turn
        (under the hand-over's lock)."""
        if not self._welcomed:
            return []
        handover = self._handover
        in_broker = self._held_in_broker()
        room = max(0, handover.window - in_broker)
        if not in_broker:
            self._bytes_held = 0  # nothing of ours in the broker, by any count
        taken: list[Pending] = []
        while handover.outgoing and len(taken) < room:
            size = handover.outgoing[0].size
            if not self._room_for(size, in_broker + len(taken)):
                break
            taken.append(handover.pop_unsent())
            self._bytes_held += size
        if taken:
            handover.room_changed()  # callers waiting for bytes to go
        elif handover.outgoing and self._collectable and room == 0:
            self._warn_window_held_for_collect()
        return taken

    def _room_for(self, size: int, in_broker: int) -> bool:
        """Whether a task of `size` bytes may join the `in_broker` tasks of
        ours in the broker: within its client_max_bytes (alone, a larger task
        goes: the broker says why not), and within window_bytes unless fewer
        than WINDOW_BYTES_MIN_TASKS are there."""
        held = self._bytes_held
        if held and held + size > self._handover.max_bytes:
            return False
        within = held + size <= self._handover.window_bytes
        return within or in_broker < WINDOW_BYTES_MIN_TASKS

    def _warn_window_held_for_collect(self) -> None:
        """Say once why tasks do not go: a resumed session's results fill the
        window until collect() takes them (the broker counts them too)."""
        if self._window_held_warned:
            return
        self._window_held_warned = True
        log.warning(
            "%s of earlier clients of session %s wait for collect() and "
            "fill the broker's window of %d; new tasks wait until collect() "
            "takes some",
            counted(len(self._collectable), "result"),
            self.session,
            self._handover.window,
        )

    def _held_in_broker(self) -> int:
        """Tasks and results of ours the broker counts against our window:
        tasks unfinished, results not acknowledged."""
        return len(self._pending) + len(self._acks) + len(self._collectable)

    def _take_cancels(self) -> list[int]:
        """The cancellations to send now (under the hand-over's lock): none
        until the broker welcomed this connection. Sent earlier, a CANCEL would
        reach the broker before the SUBMIT that _welcome sends again, for a
        task it does not know yet, and the task would run after all."""
        if not self._welcomed or not self._handover.cancels:
            return []
        return self._handover.take_cancels()

    def _remember_cancels(self, task_ids: list[int]) -> None:
        """Keep what was cancelled until the broker confirms it, to cancel it
        again on a new connection (see _hello): a CANCEL still queued when the
        old one was closed is lost, and so is one read by a broker that died
        before its commit. Cancelling twice is harmless."""
        forgotten = self._unconfirmed_cancels.sent(task_ids)
        if forgotten:
            log.warning(
                "forgot %s the broker has not confirmed (over %d kept); a "
                "broker restarted before it read them may run those tasks "
                "session=%s",
                counted(forgotten, "cancellation"),
                len(self._unconfirmed_cancels),
                self.session,
            )

    def _ask_cancel_receipt(self) -> None:
        """Ask a question after the cancels sent so far, if some await no
        result: its answer says the broker has them (see _cancels.py). At most
        one is in flight, asked at a heartbeat, so cancels confirmed by their
        results soon after they were sent cost no question."""
        if not self._welcomed or self._handover.cancels:
            return  # the cancels waiting to go would not be covered
        covers = self._unconfirmed_cancels.receipt_wanted()
        if covers is None:
            return
        receipt: Future[dict[str, Any]] = Future()
        receipt.add_done_callback(lambda done: self._receipt_done(done, covers))
        with self._handover.lock:
            self._handover.questions.append(Question(p.StatusRequest(), receipt))

    def _receipt_done(self, receipt: Future[dict[str, Any]], covers: int) -> None:
        if receipt.exception() is None:
            self._unconfirmed_cancels.receipt_answered(covers)
        else:
            self._unconfirmed_cancels.receipt_lost(covers)

    def _refuse_oversized(self, batch: list[Pending]) -> list[Pending]:
        # Checked here rather than at the broker: libzmq drops a connection that
        # sends a frame far over the broker's limit, and with it the session.
        fitting = []
        for pending in batch:
            oversized = self._handover.oversized(len(pending.spec.payload))
            if oversized is None:
                fitting.append(pending)
            else:
                _fail(pending.future, oversized)
                self._handover.release(1)
        return fitting

    def _forget_cancelled(self, task_ids: list[int]) -> None:
        forgotten = [self._pending.pop(t, None) for t in task_ids]
        count = 0
        for pending in forgotten:
            if pending is not None:
                self._bytes_held -= pending.size
                count += 1
        if count:
            self._handover.release(count)

    def _shutdown(self) -> None:
        with self._handover.lock:
            self._take_handed(time.monotonic())
        self._send_acks(time.monotonic(), submitting=True)
        self._send(p.Bye())
        self._close_socket(linger=100)
        accepted_error = ClientClosed(
            "the client was closed before this task finished; its result waits "
            f"at the broker{self._while_it_lasts()} for a client of "
            f"session={self.session}"
        )
        # Said apart: collecting later would wait for results that never come.
        unsent_error = ClientClosed(
            "the client was closed before this task was sent: it was never "
            "sent to the broker, and no result will come; submit it again"
        )
        # Sent, but not confirmed: a broker that stood still, or stopped with
        # the task in its journal's last write, may still queue it.
        unconfirmed_error = ClientClosed(
            "the client was closed before the broker confirmed it accepted "
            "this task: it may run there or not (if it does, its result waits "
            f"for a client of session={self.session})"
        )
        # Taken, not read in place: a done-callback of a future failed here
        # may withdraw a task, or a caller give up a question, meanwhile.
        with self._handover.lock:
            unsent = self._handover.take_unsent()
            questions = [*self._asked, *self._handover.take_questions()]
        for pending in self._pending.values():
            error = accepted_error if pending.accepted else unconfirmed_error
            _fail(pending.future, error)
        for pending in unsent:
            _fail(pending.future, unsent_error)
        self._log_unaccepted(len(unsent), self._unconfirmed())
        self._log_unfinished(len(self._pending) - self._unconfirmed())
        closed = ClientClosed("the client was closed before the broker answered")
        for question in questions:
            _fail(question.answer, closed)

    def _unconfirmed(self) -> int:
        return sum(not pending.accepted for pending in self._pending.values())

    def _log_unaccepted(self, unsent: int, unconfirmed: int) -> None:
        """Say it when closing leaves tasks unaccepted: their futures say it
        too, but a program that ends without reading them (one closed at its
        end) hears nothing else."""
        if unsent:
            log.warning(
                "closed before sending every task to the broker at %s: these "
                "were never sent and will not run (their futures raise "
                "ClientClosed) unsent=%d session=%s",
                self.address,
                unsent,
                self.session,
            )
        if unconfirmed:
            log.warning(
                "closed before the broker at %s confirmed every task it was "
                "sent: these may run there or not (their futures raise "
                "ClientClosed) unconfirmed=%d session=%s",
                self.address,
                unconfirmed,
                self.session,
            )

    @property
    def broker_durable(self) -> bool:
        """Whether the broker's last WELCOME said it journals what it accepts
        (True until one came: a broker not heard yet is not presumed to
        forget)."""
        return self._durable

    def _while_it_lasts(self) -> str:
        """How long the broker keeps results, said where a closing client
        leaves them: a broker without a journal (an embedded one, most
        often, which stops with its `with` block) keeps nothing past its own
        end."""
        return "" if self._durable else " while it runs (it has no journal)"

    def _log_unfinished(self, unfinished: int) -> None:
        """Say where the results of tasks left running at close go: a client
        closed as a ProcessPoolExecutor's `with` block would be, expecting a
        wait, left the broker holding them for a day. A WARNING for a session
        of its own, which nobody is likely to resume; news for a named one."""
        if not unfinished:
            return
        if self._durable:
            kept = (
                "which keeps their results until a client of this session "
                "collects them (Client(session=...).collect()) or the session is "
                "purged (ventilator purge --session), for up to its result TTL "
                "(a day by default)"
            )
        else:
            kept = (
                "which has no journal: their results are lost when it stops (an "
                "embedded broker stops with its with block), unless a client of "
                "this session collects them first (Client(session=...).collect())"
            )
        log.log(
            logging.INFO if self._session_named else logging.WARNING,
            "closed with tasks unfinished: they run on at the broker at %s, %s; "
            "to wait for them, wait on their futures before closing "
            "unfinished=%d session=%s",
            self.address,
            kept,
            unfinished,
            self.session,
        )


def _batches(specs: list[p.TaskSpec]) -> Iterator[list[p.TaskSpec]]:
    """Split submissions into messages bounded in count and in bytes."""
    chunk: list[p.TaskSpec] = []
    size = 0
    for spec in specs:
        if chunk and (len(chunk) >= SUBMIT_BATCH or size >= SUBMIT_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += len(spec.payload)
    if chunk:
        yield chunk


def _fate(pending: Pending) -> str:
    """What became of a task its client gave up on while refused its session."""
    if pending.accepted:
        # Accepted while the session was ours: it runs, for the session.
        return "the broker has this task: its holder can collect() the result"
    return "the broker had not accepted this task"


# Built directly: dataclasses.replace costs several times more, per task.
def _without_payload(spec: p.TaskSpec) -> p.TaskSpec:
    return p.TaskSpec(
        spec.task_id,
        spec.function,
        b"",
        spec.flags,
        spec.timeout_s,
        spec.retries,
        spec.sink,
    )


def settle(future: Outcome, entry: p.ResultEntry) -> None:
    """Complete `future` with the result `entry` carries."""
    if entry.status is p.Status.CANCELLED:
        future.cancel()
        return
    try:
        value = unpack_value(entry.payload)
    except Exception as exc:  # msgpack raises a family of unrelated types
        _fail(
            future, ProtocolError(f"undecodable result for task {entry.task_id}: {exc}")
        )
        return

    if entry.status is p.Status.OK:
        _resolve(future, value)
    else:
        _fail(future, task_error_from_wire(value))


def _resolve(future: Outcome | Future[Any], value: Any) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its owner meanwhile
        future.set_result(value)


def _fail(future: Outcome | Future[Any], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)

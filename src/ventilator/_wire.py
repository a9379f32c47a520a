"""Socket chores shared by the peers (client, worker, sink): send and receive
commands without blocking, and never let a malformed frame escape."""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import zmq

from . import protocol as p
from ._greeting import broker_mechanism
from ._words import counted
from .errors import ProtocolError, UsageError
from .logs import RAISED_TOO
from .security import fingerprint

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_FD = int(zmq.FD)


def receive(
    socket: zmq.Socket[bytes],
    allowed: frozenset[p.Cmd],
    lend_large: bool = False,
    announced: bool = False,
    unreadable: Callable[[list[p.Payload], ProtocolError], None] | None = None,
) -> Iterator[p.Command]:
    """Yield every command waiting on `socket`; log and skip malformed ones,
    after handing each to `unreadable` if given (its frames and the error).

    Frames arrive as bytes, except with `lend_large`: then frames of at least
    `protocol.ZERO_COPY_BYTES` stay the zmq.Frame libzmq received, uncopied,
    for a caller that only passes payloads on.

    ZMQ_EVENTS says when the socket is empty: cheaper than a receive that
    fails with `zmq.Again`, and it leaves the socket's descriptor ready to
    announce the next message. With `announced` (the socket's descriptor
    just woke the caller, so a message almost surely waits) the first
    receive goes ahead without asking: one ZMQ_EVENTS less per wake-up.
    """
    waiting = announced or has_input(socket)
    while waiting:
        try:
            frames = _receive_frames(socket, lend_large)
        except zmq.Again:
            return
        try:
            yield p.decode(frames, allowed)
        except ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)
            if unreadable is not None:
                unreadable(frames, exc)
        waiting = has_input(socket)


def _receive_frames(socket: zmq.Socket[bytes], lend_large: bool) -> list[p.Payload]:
    # Frame.more rather than recv_multipart's ZMQ_RCVMORE: one call less a frame.
    frames: list[p.Payload] = []
    more = True
    while more:
        frame = socket.recv(_NOBLOCK, copy=False)
        more = frame.more
        lend = lend_large and len(frame) >= p.ZERO_COPY_BYTES
        frames.append(frame if lend else frame.bytes)
    return frames


def has_input(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits on `socket`, by its ZMQ_EVENTS."""
    return bool(cast(int, socket.getsockopt(_EVENTS)) & _POLLIN)


def fd_of(socket: zmq.Socket[bytes]) -> int:
    """The descriptor that signals news on `socket` (ZMQ_FD)."""
    return cast(int, socket.getsockopt(_FD))


class InputCheck:
    """Whether a message waits on a socket that its ZMQ_FD will not announce.

    ZMQ_FD becomes readable when the socket's state may have changed, not once
    per message, and not for a first message until ZMQ_EVENTS found the socket
    empty. A send runs the socket's pending commands, which can consume the
    wake-up of a message that arrived meanwhile. So on a new socket and after a
    send, ZMQ_EVENTS is asked once before the owner sleeps; otherwise not at
    all, since each ask is a system call or two. A receive that drains the
    socket (`receive`) ends on ZMQ_EVENTS, which arms the descriptor again.
    """

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._socket = socket
        self._due = True

    def sent(self) -> None:
        self._due = True

    def unannounced(self) -> bool:
        """Whether a message waits unannounced; asks only when it may."""
        if not self._due:
            return False
        self._due = False
        return has_input(self._socket)


def send(socket: zmq.Socket[bytes], command: p.Command) -> bool:
    """Send without blocking; False if the broker is not reachable right now.

    Callers resend what matters when the broker is back (on its WELCOME), so a
    message dropped here is not lost work.
    """
    frames = p.encode(command)
    copy = p.small(frames)
    try:
        # Frame by frame, as send_multipart does, but with the flags as plain
        # ints: pyzmq's flag enums cost more per frame than the send itself.
        # Only the first frame can be refused; libzmq takes the rest.
        for frame in frames[:-1]:
            socket.send(frame, _NOBLOCK_MORE, copy=copy)
        socket.send(frames[-1], _NOBLOCK, copy=copy)
    except zmq.Again:
        log.debug("could not send %s: broker not reachable", type(command).__name__)
        return False
    return True


# A monitor event's first frame: the event (16 bits), then its value (32
# bits), in the machine's byte order (zmq_socket_monitor(3)).
_MONITOR_EVENT = struct.Struct("=HI")


def _monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """(event, value) of a monitor message. Read here rather than with
    zmq.utils.monitor, which imports asyncio: a quarter of a client's start."""
    event, value = _MONITOR_EVENT.unpack_from(frames[0])
    return event, value


def check_endpoint(address: str, what: str, *, to_bind: bool = False) -> None:
    """Refuse an address no one could connect to (or bind, with `to_bind`,
    where a port may be ``*`` or 0 for any free one), naming it.

    A typo (``foo``, a port that is not a number) would otherwise surface as a
    traceback in a background thread and a client that waits for ever. Only
    the form is checked, here rather than by a trial connect(), which would
    open a real connection to the broker and drop it half-way.

    Raises:
        UsageError: the address is malformed.
    """
    transport, separator, rest = address.partition("://")
    problem = None
    if not separator or not rest:
        problem = "no transport://, as in tcp://HOST:PORT"
    elif transport not in _TRANSPORTS:
        problem = f"unknown transport {transport!r}"
    elif transport == "tcp":
        host, colon, port = rest.rpartition(":")
        any_port = to_bind and port in ("*", "0")
        if not colon or not host or not (any_port or _port_number(port)):
            problem = "tcp needs HOST:PORT with a port from 1 to 65535"
    if problem is not None:
        verb = "bind" if to_bind else "connect to"
        raise UsageError(
            f"{what} {address!r} is not an address to {verb} ({problem}); "
            "expected e.g. tcp://127.0.0.1:5555"
        )


def _port_number(port: str) -> bool:
    return port.isdigit() and 0 < int(port) < 65536


# What ZeroMQ can connect over.
_TRANSPORTS = frozenset({"tcp", "ipc", "inproc", "pgm", "epgm", "ws", "wss", "vmci"})


# Handshakes failed in a row without detail before a peer with keys blames its
# broker key: libzmq retries every 100 ms, so this costs a fraction of a second.
SILENT_FAILURES = 3
# The errno of a HANDSHAKE_FAILED_NO_DETAIL whose connection its other end
# closed (a CURVE server that cannot read our HELLO, a peer that gave up).
# When the handshake interval (ZMQ_HANDSHAKE_IVL) ran out instead, libzmq
# passes on whatever errno its last read left: EAGAIN, with libzmq 4.3.
_CLOSED_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def closed_first(value: int) -> bool:
    """Whether a HANDSHAKE_FAILED_NO_DETAIL event (by its value) is a
    connection closed by its other end, rather than a handshake that did not
    finish within the handshake interval."""
    return value in _CLOSED_ERRNOS


def handshake_interval_s(socket: zmq.Socket[Any]) -> float:
    """How long libzmq gives a connection of `socket` to finish its handshake."""
    return cast(int, socket.getsockopt(zmq.HANDSHAKE_IVL)) / 1000


# Handshakes failed in a row for the same reason before it counts as definitive
# (a peer's tasks then fail rather than wait): a broker restarting with other
# settings may fail one or two, a broker that will not let this peer in fails
# every one, at libzmq's reconnect pace of about 100 ms.
REFUSALS_BEFORE_GIVING_UP = 3


# How long a peer waits for the broker's greeting when it reads it to learn
# why its handshakes fail (see HandshakeWatch._problem): the broker answered
# a moment ago, so it answers at once or is gone.
GREETING_TIMEOUT_S = 1.0


# Handshakes failed in a row, for whatever reason, after which a peer closes
# its socket rather than let libzmq try again 7 times a second for ever (it
# does after a closed connection, such as a CURVE server's that could not read
# our HELLO; zmq_disconnect does not stop it, libzmq issue 4052) and connects
# again at its own pace, as when the broker is silent: once in a few
# heartbeats, which a key the allow list refuses costs already (libzmq does
# not retry those). Not after the first: a broker going down may cut one short.
BACK_OFF_AFTER_FAILURES = SILENT_FAILURES


class HandshakeWatch:
    """Watches a peer's socket for failed handshakes and says once, clearly,
    what is wrong: a key the broker refused, a key missing, a wrong broker key.

    Without it a peer that the broker refuses sees nothing but silence: libzmq
    handles the handshake, and only the broker's log says why. It also tells
    its owner when to close a socket whose handshakes keep failing (see
    `BACK_OFF_AFTER_FAILURES`): the owner's next reconnection is its next try.
    """

    EVENTS = (
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )

    def __init__(
        self,
        address: str,
        role: str,
        public_key: bytes | None,
        raised_too: bool = False,
    ) -> None:
        """`raised_too`: the owner also fails what it is asked with the
        problem (a client's questions and tasks), which is how a command line
        tells it; there the log line would say it twice."""
        self._address = address
        self._role = role
        self._public_key = public_key
        self._told_extra = {RAISED_TOO: raised_too}
        # The causes said, across reconnects: a cause first guessed and then
        # named by the broker (a missing key) is said once.
        self._told: set[str] = set()
        # Why the last handshake failed; None once one succeeded.
        self._current: _Problem | None = None
        # Whether the broker's greeting was read since the last success
        # (see _problem): once is enough; and whether it confirmed the
        # mismatch a handshake ended with (see _confirm).
        self._greeting_read = False
        self._confirmed = False
        # Handshakes failed in a row, for any reason, across reconnects; the
        # ones that timed out are `timeouts`, not failures.
        self.failures = 0
        # A problem the broker's answer named (a refused key, a mechanism
        # mismatch) since the last success: evidence that a later handshake
        # ending without detail does not contradict.
        self._evidence: _Problem | None = None
        # Handshakes in a row that did not finish in time: the broker never
        # answered (paused, overloaded), which no key of ours explains.
        self.timeouts = 0
        # Handshakes that succeeded, across reconnects: each is a connection
        # (re)established, as after the broker restarted.
        self.connections = 0
        self._socket: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[bytes] | None = None

    def watch(self, socket: zmq.Socket[Any]) -> None:
        """Watch `socket` from now on; before it connects, to see every
        handshake. Stops watching the one before, which must still be open."""
        self.close()
        self._socket = socket
        self.monitor = socket.get_monitor_socket(self.EVENTS)

    def read(self) -> bool:
        """Take in every event waiting on the monitor; then say the latest
        problem if it is new (once each, at ERROR). One batch is judged as a
        whole, so that a problem the broker named wins over the guesses
        around it.

        Returns whether the owner should close the watched socket now and
        connect again later: a handshake failed again, past
        `BACK_OFF_AFTER_FAILURES` in a row.
        """
        failures_before = self.failures
        while self.monitor is not None:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.note(*_monitor_event(frames))
        current = self._current
        if current is not None and current.cause not in self._told:
            self._told.add(current.cause)
            log.error("%s", current.text, extra=self._told_extra)
        failed_again = self.failures > failures_before
        return failed_again and self.failures >= BACK_OFF_AFTER_FAILURES

    def note(self, event: int, value: int) -> None:
        """Count one monitor event (`read` does, for each): a handshake that
        succeeded, timed out, or failed, and why."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._current = self._evidence = None
            self._greeting_read = self._confirmed = False
            self.failures = self.timeouts = 0
            self.connections += 1
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not closed_first(value):
            self._timed_out()
        else:
            self.failures += 1
            self._current = self._problem(event, value) or self._current

    @property
    def problem(self) -> str | None:
        """Why the last handshake failed, as said; None once one succeeded."""
        return None if self._current is None else self._current.text

    @property
    def definitive(self) -> bool:
        """Whether `problem` is past doubt: the last `REFUSALS_BEFORE_GIVING_UP`
        handshakes all failed, or the broker's greeting confirmed the
        mechanism mismatch a handshake ended with; none succeeded since."""
        if self.problem is None:
            return False
        return self._confirmed or self.failures >= REFUSALS_BEFORE_GIVING_UP

    def refused_note(self) -> str | None:
        """What to say, in place of "broker silent", while the broker keeps
        refusing our handshakes: it is not silent, it answered no (why was
        said once, at ERROR). None while no handshake failed."""
        if self.problem is None:
            return None
        return (
            f"the broker at {self._address} refused this {self._role}'s last "
            f"{counted(self.failures, 'handshake', bare_one=True)} (why: the "
            "error above); reconnecting"
        )

    def _timed_out(self) -> None:
        """A handshake the broker did not answer in time: said once a run, at
        INFO. Not a refusal: a broker that will not let us in closes the
        connection at once. If no handshake succeeds after it, the warnings
        that the broker is silent are the ones to act on."""
        self.timeouts += 1
        if self.timeouts > 1 or self._socket is None:
            return
        log.info(
            "the ZeroMQ handshake with the broker at %s did not finish within "
            "%gs: the broker did not answer (paused or overloaded), or that "
            "address is not a ZeroMQ endpoint; ZeroMQ tries again",
            self._address,
            handshake_interval_s(self._socket),
        )

    def close(self) -> None:
        """Stop watching; call it before closing the watched socket."""
        if self._socket is not None and self.monitor is not None:
            self._socket.disable_monitor()
            self.monitor.close(linger=0)
        self._socket = self.monitor = None

    def _problem(self, event: int, value: int) -> _Problem | None:
        """Why a handshake failed with `event`: what the broker's answer
        says, else the evidence seen before, else, once the failures without
        detail are too many to be chance, what the broker's greeting shows
        (or a guess if it cannot be read); None until then."""
        named = self._named_problem(event, value)
        if named is not None:
            self._evidence = named
            if named.cause in _MISMATCHES and not self._greeting_read:
                self._confirm(named)
            return named
        if self._evidence is not None:
            return self._evidence
        if self.failures < SILENT_FAILURES or self._greeting_read:
            return None
        # The broker keeps closing our handshakes without a word (one alone
        # may be a broker going down): a CURVE server drops a HELLO it cannot
        # decrypt, and libzmq, racing the broker's close, often reports a
        # mechanism mismatch the same way. Its greeting tells them apart.
        mechanism = self._read_greeting()
        if mechanism is None:
            return self._guess()
        self._evidence = self._explain(mechanism)
        return self._evidence

    def _confirm(self, mismatch: _Problem) -> None:
        """Read the broker's greeting after a mechanism mismatch: if it says
        the same, the problem is past doubt at once (see `definitive`), and
        tasks fail now rather than after two more handshakes, which libzmq
        does not retry after a mismatch: they came only as the owner
        reconnected, seconds apart."""
        mechanism = self._read_greeting()
        self._confirmed = mechanism is not None and self._explain(mechanism) == mismatch

    def _read_greeting(self) -> str | None:
        """The broker's mechanism, from its greeting (None if unreadable):
        asked once between two successes."""
        self._greeting_read = True
        return broker_mechanism(self._address, GREETING_TIMEOUT_S)

    def _explain(self, mechanism: str) -> _Problem | None:
        """Why a broker greeting with `mechanism` closes our handshakes."""
        curve = mechanism == "CURVE"
        if self._public_key is None:
            return self._no_key() if curve else None  # ours, and yet it closes
        return self._wrong_broker_key() if curve else self._unwanted_keys()

    def _guess(self) -> _Problem:
        """The likeliest cause, when the broker's greeting could not be read."""
        if self._public_key is not None:
            return self._wrong_broker_key()
        return _Problem(
            _NO_KEY,
            f"the broker at {self._address} keeps closing this {self._role}'s "
            "handshakes without a reason: most likely it wants CURVE and this "
            f"{self._role} has no key: give it a secret key and the broker's "
            "public key (--secret-key and --broker-key); else, is that address "
            "a ventilator broker's endpoint?",
        )

    def _named_problem(self, event: int, value: int) -> _Problem | None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = fingerprint(self._public_key) if self._public_key else "?"
            return _Problem(
                _REFUSED_KEY,
                f"the broker at {self._address} refused this {self._role}'s "
                f"CURVE key {key} (ZAP status {value}): it is not among the keys "
                "let in on that socket (client keys on the frontend, worker keys "
                "on the backend); check the address, or ask the broker's operator "
                "to add the public key",
            )
        if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return None
        if value != zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return _Problem(
                _NOT_A_BROKER,
                f"the handshake with {self._address} failed (protocol error "
                f"{value:#x}): is it a ventilator broker's endpoint?",
            )
        return self._no_key() if self._public_key is None else self._unwanted_keys()

    def _no_key(self) -> _Problem:
        return _Problem(
            _NO_KEY,
            f"the broker at {self._address} wants CURVE and this {self._role} "
            "has no key: give it a secret key and the broker's public key "
            "(--secret-key and --broker-key)",
        )

    def _unwanted_keys(self) -> _Problem:
        return _Problem(
            _UNWANTED_KEYS,
            f"the broker at {self._address} does not use CURVE, but this "
            f"{self._role} has keys: drop them, or check that the broker runs "
            "with --secret-key",
        )

    def _wrong_broker_key(self) -> _Problem:
        return _Problem(
            _WRONG_BROKER_KEY,
            f"the CURVE handshake with the broker at {self._address} failed: "
            "is --broker-key (broker_key) the public key of the broker at that "
            "address?",
        )


class _Problem(NamedTuple):
    """Why handshakes fail: the cause, said once, and what to say of it."""

    cause: str
    text: str


# The causes of failed handshakes a peer can tell apart.
_REFUSED_KEY = "refused key"
_NO_KEY = "no key"
_UNWANTED_KEYS = "unwanted keys"
_WRONG_BROKER_KEY = "wrong broker key"
_NOT_A_BROKER = "not a broker"
# Those a mechanism mismatch names, which the broker's greeting confirms.
_MISMATCHES = frozenset({_NO_KEY, _UNWANTED_KEYS})


@dataclass(slots=True)
class Unfinished:
    """Connections of one socket that ended before their handshake finished,
    since `first_at`: `closed` of them by their other end, the rest timed out.
    `followed`: a handshake succeeded on that socket after the first."""

    first_at: float
    closed: int = 0
    timed_out: int = 0
    followed: bool = False

    @property
    def count(self) -> int:
        return self.closed + self.timed_out


class UnfinishedHandshakes:
    """The broker's account of connections that ended before their ZeroMQ
    handshake finished (HANDSHAKE_FAILED_NO_DETAIL), per socket, told once
    what followed them is known.

    The broker cannot tell whose connection failed: the event names only
    the socket. Most are harmless: the connections peers gave up on while
    this broker stood still (accepted on SIGCONT, already closed), a peer
    paused or overloaded mid-handshake, a port check. What matters is
    whether peers get in, so a handshake that succeeds on the same socket
    afterwards settles them as nothing to act on; failures that none follows
    within `settle_s` are worth a warning. A refused key is another event
    (the broker's ZAP handler and the PROTOCOL failures say those).
    """

    def __init__(self, settle_s: float) -> None:
        self._settle_s = settle_s
        self._pending: dict[bytes, Unfinished] = {}

    def failed(self, tag: bytes, value: int, now: float) -> None:
        """A connection of socket `tag` ended unfinished (the event's value)."""
        unfinished = self._pending.setdefault(tag, Unfinished(now))
        if closed_first(value):
            unfinished.closed += 1
        else:
            unfinished.timed_out += 1

    def succeeded(self, tag: bytes) -> None:
        """A handshake on socket `tag` succeeded."""
        unfinished = self._pending.get(tag)
        if unfinished is not None:
            unfinished.followed = True

    def settled(self, now: float) -> list[tuple[bytes, Unfinished]]:
        """The sockets' unfinished connections whose outcome is known, each
        returned once: at once when a handshake succeeded since, or once
        `settle_s` passed without one."""
        done = [
            (tag, unfinished)
            for tag, unfinished in self._pending.items()
            if unfinished.followed or now - unfinished.first_at >= self._settle_s
        ]
        for tag, _ in done:
            del self._pending[tag]
        return done

"""Who receives results, and which connection speaks for whom.

A recipient is a client's session or a named sink (`Recipient`). Its name is
its identity; a ZeroMQ routing id lasts one connection. So each connection is
mapped to the recipient it said HELLO for, and stays mapped while that
recipient is away: a client given up on for silence may speak again on the
same connection without a HELLO. A recipient on a new connection takes over:
its earlier one speaks for it no more, and must say HELLO again.

A recipient is remembered while it holds something (results owed, tasks in
the broker). In number they are bounded twice: `max_sessions` in all, and per
connection the sessions its HELLOs created that are still remembered
(`SESSIONS_PER_CONNECTION`). Our clients open one per connection; one DEALER
saying HELLO under 100,000 names with a task each once grew the broker by a
window per session, sidestepping the per-client window.

`SessionRegistry` keeps the recipients, the mapping of connections and the
count of sessions each opened, and the rules that keep the three in step:
open, connect (take over), disconnect, forget, and who may take a session or
a sink from whom. Whether a recipient holds anything is the scheduler's to
say (it counts the tasks), as are the results owed and what a client is told.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import protocol as p
from .policy import Limits

__all__ = ["SESSIONS_PER_CONNECTION", "Recipient", "SessionRegistry"]

# How many sessions (or sinks) one connection may have opened that the broker
# still remembers. Our clients and sinks open one per connection; a peer that
# says HELLO under a new name leaves its old session, which is forgotten at
# once if it holds nothing. What it holds (a task each) is not dropped, so a
# connection that keeps renaming itself is refused past these few instead of
# sidestepping the per-client window with a session per task.
SESSIONS_PER_CONNECTION = 4


@dataclass(slots=True, eq=False)
class Recipient:
    """Whoever receives results: a client session, or a named sink."""

    name: str
    peer: bytes | None = None
    last_seen: float = 0.0
    pending: deque[int] = field(default_factory=deque)  # tickets to deliver
    # Delivered and not acknowledged, in order: ticket -> its result's bytes.
    unacked: dict[int, int] = field(default_factory=dict)
    unacked_bytes: int = 0
    # MDP clients never heartbeat while they wait: their silence is not absence.
    expires: bool = True
    # For a sink: the session of the process receiving it, and of the last
    # other one refused it. One process at a time receives a sink; another
    # is refused while this one is connected, and logged once, not each time
    # it asks again (every heartbeat, for seconds).
    holder: str | None = None
    refused_holder: str | None = None
    # For a client session: the instance of the `Client` holding it (from its
    # HELLO; None from older clients), and the last other one refused it, so
    # that a client asking again every heartbeat is logged once.
    instance: int | None = None
    refused: int | None = None
    # Whether a send to its connection failed since it attached: only then did
    # results it was sent get lost on the way (see Scheduler._take_back).
    send_failed: bool = False
    # How many of its results (pending or unacknowledged) are tombstones of
    # expired ones, for the status.
    expired: int = 0
    # The connection it was last attached to, which stays mapped to it while
    # it is away (it may speak again without a HELLO), and the one whose HELLO
    # created it, which counts it against SESSIONS_PER_CONNECTION.
    last_peer: bytes | None = None
    opened_by: bytes | None = None
    # Whether it asked questions (status, operator commands), and whether it
    # ever submitted, acknowledged or cancelled: one that only asked is a
    # `ventilator status` run or the like, which other answers leave out.
    asked: bool = False
    worked: bool = False
    # Whether its join is still untold: a new session with nothing to take
    # back is said to have joined once it works, so that `ventilator status`
    # runs, which only ask, are no INFO lines (see Scheduler.attach_recipient).
    join_untold: bool = False

    @property
    def only_asked(self) -> bool:
        return self.asked and not self.worked

    def delivered(self, ticket: int, size: int) -> None:
        self.unacked[ticket] = size
        self.unacked_bytes += size

    def acknowledged(self, ticket: int) -> bool:
        """Forget a delivered result; False if it was not waiting for an ack."""
        size = self.unacked.pop(ticket, None)
        if size is None:
            return False
        self.unacked_bytes -= size
        return True

    def owe_no_more(self, tickets: set[int]) -> None:
        """Stop owing the results of `tickets`, sent and unacknowledged or
        still to send (their tasks are being forgotten).

        Results wait in about the order they finished, so those withdrawn (the
        acknowledged, the expired) are mostly at the front: the queue is
        copied only when some lie further in, not for every ack or tick.
        """
        unsent = {ticket for ticket in tickets if not self.acknowledged(ticket)}
        pending = self.pending
        while pending and pending[0] in unsent:
            unsent.discard(pending.popleft())
        if unsent:
            self.pending = deque(t for t in pending if t not in unsent)

    def take_back_unacked(self) -> list[int]:
        """The delivered results not acknowledged, oldest first, forgotten."""
        tickets = list(self.unacked)
        self.unacked.clear()
        self.unacked_bytes = 0
        return tickets


class SessionRegistry:
    """The recipients by name (`recipients`), the one each connection speaks
    for, and per connection how many remembered recipients its HELLOs created.

    `holds_nothing` is the scheduler's word on whether forgetting a recipient
    loses anything; the registry asks it when a connection that opened its
    fill of sessions names a new one.
    """

    __slots__ = (
        "_holds_nothing",
        "_limits",
        "_name_of_peer",
        "_opened_by_peer",
        "departed",
        "recipients",
    )

    def __init__(
        self, limits: Limits, holds_nothing: Callable[[Recipient], bool]
    ) -> None:
        self._limits = limits
        self._holds_nothing = holds_nothing
        self.recipients: dict[str, Recipient] = {}
        self._name_of_peer: dict[bytes, str] = {}
        self._opened_by_peer: dict[bytes, int] = {}
        # Connections that stopped speaking for anyone since the scheduler
        # last took them: their shared memory goes (see _shared).
        self.departed: list[bytes] = []

    def _unmap(self, peer: bytes) -> None:
        del self._name_of_peer[peer]
        self.departed.append(peer)

    def name_of(self, peer: bytes) -> str | None:
        """The name of the recipient `peer` speaks for (connected on it, or
        away since); None if it said no HELLO, or must say one again."""
        return self._name_of_peer.get(peer)

    def speaker(self, peer: bytes) -> Recipient | None:
        """The recipient `peer` speaks for: connected on it, or away since it
        was (it may speak again without a HELLO). None if it must say HELLO:
        it never did, or another connection took the name meanwhile (a
        sink's successor), in which case it is unmapped, to hear whether it
        may have the name back."""
        name = self._name_of_peer.get(peer)
        if name is None:
            return None
        recipient = self.recipients.get(name)
        if recipient is not None and recipient.peer in (None, peer):
            return recipient
        self._unmap(peer)
        return None

    def recipient(self, name: str) -> Recipient:
        """The recipient `name`, remembered from now on if it was not."""
        recipient = self.recipients.get(name)
        if recipient is None:
            recipient = self.recipients[name] = Recipient(name)
        return recipient

    def room_for_new(self, peer: bytes) -> str | None:
        """Why `peer` may not open a new session now; None if it may."""
        opened = self._opened_by_peer.get(peer, 0)
        # The session it speaks for now is left, and forgotten if it holds
        # nothing: that one makes room.
        current = self.recipients.get(self._name_of_peer.get(peer, ""))
        if current is not None and current.opened_by == peer:
            opened -= self._holds_nothing(current)
        if opened >= SESSIONS_PER_CONNECTION:
            return (
                f"this connection opened {opened} sessions that the broker "
                f"still holds tasks or results of, the most one may "
                f"({SESSIONS_PER_CONNECTION}); keep one session per connection, "
                "or connect anew for another"
            )
        limits = self._limits
        if len(self.recipients) >= limits.max_sessions:
            return (
                f"the broker holds {len(self.recipients)} sessions and sinks, "
                f"its limit (max_sessions={limits.max_sessions}); those "
                "that left owing nothing are forgotten "
                f"{limits.session_grace_s:g}s after they were last heard "
                "(session_grace_s): try again later, or purge sessions that left"
            )
        return None

    def count_opened(self, recipient: Recipient, peer: bytes) -> None:
        """Count `recipient`, which the HELLO of `peer` created, against it
        (see SESSIONS_PER_CONNECTION) until the recipient is forgotten."""
        recipient.opened_by = peer
        self._opened_by_peer[peer] = self._opened_by_peer.get(peer, 0) + 1

    def held_by_another(self, peer: bytes, hello: p.Hello) -> Recipient | None:
        """The session `hello` names, if a live connection of another
        `Client` holds it; that one keeps it.

        Two clients on one session used to take it from each other on every
        message. The same client (its instance) on a new connection takes
        over, since its old connection is gone; a HELLO without an instance
        comes from an older client, which takes the session as it always did.
        """
        recipient = self.recipients.get(hello.session)
        if (
            recipient is None
            or recipient.peer is None
            or recipient.peer == peer
            or recipient.instance is None
            or hello.instance is None
            or recipient.instance == hello.instance
        ):
            return None
        return recipient

    def sink_held_by_another(
        self, peer: bytes, name: str, session: str
    ) -> Recipient | None:
        """The sink recipient `name`, if a live connection of a process other
        than `session` receives it; that one keeps it. Two receivers of one
        name used to evict each other on every heartbeat; the same process
        on a new connection (its session) takes over."""
        recipient = self.recipients.get(name)
        if (
            recipient is None
            or recipient.peer is None
            or recipient.peer == peer
            or recipient.holder == session
        ):
            return None
        return recipient

    def connect(self, recipient: Recipient, peer: bytes) -> None:
        """Attach `recipient` to `peer`. Its earlier connection, even one it
        was away from, speaks for it no more: that one must say HELLO again,
        and a forgotten killed client leaves no mapping behind."""
        earlier = recipient.last_peer  # `peer` too, while it is connected
        name = recipient.name
        if earlier not in (None, peer) and self._name_of_peer.get(earlier) == name:
            self._unmap(earlier)
        recipient.peer = recipient.last_peer = peer
        self._name_of_peer[peer] = name

    def disconnect(self, peer: bytes) -> Recipient | None:
        """`peer` speaks for nobody from now on; return the recipient it was
        connected for, away from now on, or None if it was on none."""
        name = self._name_of_peer.get(peer)
        if name is not None:
            self._unmap(peer)
        recipient = self.recipients.get(name) if name is not None else None
        if recipient is None or recipient.peer != peer:
            return None
        recipient.peer = None
        return recipient

    def unmap(self, peer: bytes) -> None:
        """`peer` speaks for nobody from now on (its recipient said BYE)."""
        if peer in self._name_of_peer:
            self._unmap(peer)

    def forget(self, recipient: Recipient) -> None:
        """Forget `recipient` and every connection's mapping to it. A session
        that comes back afterwards is simply new."""
        del self.recipients[recipient.name]
        peer = recipient.last_peer  # `peer` too, while it is connected
        if peer is not None and self._name_of_peer.get(peer) == recipient.name:
            self._unmap(peer)
        opener = recipient.opened_by
        if opener is not None:
            left = self._opened_by_peer[opener] - 1
            if left:
                self._opened_by_peer[opener] = left
            else:
                del self._opened_by_peer[opener]

    def check(self) -> None:
        """Raise AssertionError unless every connected recipient is mapped
        from its connection, no connection is mapped to a forgotten one (a
        leak per killed client), and each connection counts exactly the
        remembered recipients it opened (for tests)."""
        for recipient in self.recipients.values():
            if recipient.peer is not None:
                owner = self._name_of_peer.get(recipient.peer)
                assert owner == recipient.name, f"{recipient.name} not on its peer"
        opened: dict[bytes, int] = {}
        for recipient in self.recipients.values():
            if recipient.opened_by is not None:
                opened[recipient.opened_by] = opened.get(recipient.opened_by, 0) + 1
        assert opened == self._opened_by_peer, "sessions per connection miscounted"
        for peer, name in self._name_of_peer.items():
            assert name in self.recipients, f"{peer!r} mapped to forgotten {name}"

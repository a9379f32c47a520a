"""The outcomes a worker sent and cannot yet know reached its broker.

A DONE can be lost on its way: still queued in a socket the worker closes
when it takes a silent broker for gone (linger 0, so that a dead broker does
not hold its exit), or read by a broker that died before its journal
committed what it made of it. The task would then run again: the broker no
longer finds it among what the worker holds when it registers again.

So the worker keeps what it sent until it has heard from the broker at
least `confirm_after_s` later, on the same connection or a later one. A
broker reads what arrived at the start of each turn and commits the turn at
its end, so what it sends in a turn that starts that long after a DONE went
out follows the commit of the DONE, unless the DONE and the answer spent
longer than that on their way together (a broker stalled with a backlog). On
registering again the worker names the kept outcomes as held, so that the
broker keeps their tasks with it, and sends them again right after its
READY: a broker that still has a task leased to the worker, or restored from
its journal, takes the result; one that already has it drops the copy as a
late outcome (it matches no lease any more).

This asks nothing new of a broker, so it works with brokers that predate it,
and costs one append per DONE sent. The memory is bounded by count and by
bytes: past either, the oldest outcomes are forgotten (the most likely to
have arrived), and their tasks would run again were they lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from . import protocol as p

# Outcomes kept at most: a worker hears from a live broker every heartbeat,
# so only one that sends this many results within an interval, or whose
# broker is away, forgets some. Half of what a READY may name, the rest
# being left for the tasks the worker runs and holds.
MAX_UNCONFIRMED_OUTCOMES = p.MAX_HELD_TICKETS // 2
# Result bytes kept at most: enough for a few large results, while the
# broker is away, without the worker growing with each one.
MAX_UNCONFIRMED_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Sending:
    """One DONE's outcomes, and when they last went out."""

    sent_at: float
    outcomes: Sequence[p.Outcome]
    size: int


class Unconfirmed:
    """What was sent and not yet confirmed by the broker's voice, oldest first."""

    def __init__(
        self,
        confirm_after_s: float,
        max_outcomes: int = MAX_UNCONFIRMED_OUTCOMES,
        max_bytes: int = MAX_UNCONFIRMED_BYTES,
    ) -> None:
        self._confirm_after_s = confirm_after_s
        self._max_outcomes = max_outcomes
        self._max_bytes = max_bytes
        self._sendings: deque[_Sending] = deque()
        self._outcomes = 0
        self._bytes = 0
        self.forgotten = 0  # outcomes dropped for room, since the last look

    def sent(self, outcomes: Sequence[p.Outcome], now: float) -> None:
        """Keep the outcomes of a DONE just sent; forget the oldest past the
        limits."""
        size = _size_of(outcomes)
        self._sendings.append(_Sending(now, outcomes, size))
        self._outcomes += len(outcomes)
        self._bytes += size
        while self._outcomes > self._max_outcomes or self._bytes > self._max_bytes:
            self.forgotten += len(self._sendings[0].outcomes)
            self._drop_oldest()

    def heard(self, heard_at: float) -> None:
        """The broker spoke at `heard_at`: what went out `confirm_after_s`
        before it has arrived."""
        horizon = heard_at - self._confirm_after_s
        while self._sendings and self._sendings[0].sent_at <= horizon:
            self._drop_oldest()

    def __len__(self) -> int:
        return self._outcomes

    def outcomes(self, skip: Collection[int] = ()) -> list[p.Outcome]:
        """The kept outcomes, each ticket once at its latest attempt, but
        for tickets in `skip` (held again, at a later attempt)."""
        latest: dict[int, p.Outcome] = {}
        for sending in self._sendings:
            for outcome in sending.outcomes:
                latest[outcome.ticket] = outcome
        return [o for ticket, o in latest.items() if ticket not in skip]

    def resend(
        self, running: Collection[int], room: int, now: float
    ) -> list[p.Outcome]:
        """What a READY names and a DONE right behind it sends again, at
        `now`, on a new connection: each ticket's latest outcome, but for
        tickets run again (`running`, named at their new attempt), at most
        `room` of them. The rest is forgotten, and what was left out for room
        counted in `forgotten`."""
        latest = self.outcomes(skip=running)
        kept = latest[:room]
        self.forgotten += len(latest) - len(kept)
        self._sendings = deque([_Sending(now, kept, _size_of(kept))] if kept else [])
        self._outcomes = len(kept)
        self._bytes = self._sendings[0].size if kept else 0
        return kept

    def forget(self, tickets: Collection[tuple[int, int]]) -> None:
        """Forget these (ticket, attempt): the broker said it does not want them."""
        if not self._sendings:
            return
        unwanted = set(tickets)
        kept: deque[_Sending] = deque()
        for sending in self._sendings:
            outcomes = [
                o for o in sending.outcomes if (o.ticket, o.attempt) not in unwanted
            ]
            if outcomes:
                kept.append(_Sending(sending.sent_at, outcomes, _size_of(outcomes)))
        self._sendings = kept
        self._outcomes = sum(len(s.outcomes) for s in kept)
        self._bytes = sum(s.size for s in kept)

    def _drop_oldest(self) -> None:
        oldest = self._sendings.popleft()
        self._outcomes -= len(oldest.outcomes)
        self._bytes -= oldest.size


def _size_of(outcomes: Sequence[p.Outcome]) -> int:
    """The result bytes `outcomes` hold, as the limit counts them."""
    return sum(len(outcome.payload) for outcome in outcomes)

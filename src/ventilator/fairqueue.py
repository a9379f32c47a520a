"""A FIFO per owner, served in turns: the function queues of the scheduler.

One client that floods a function's queue must not make everyone else wait
behind its backlog. Each owner (a submitting session) has its own lane; taking
from the queue takes the next task of the next owner in turn, so with N owners
waiting each gets 1/N of the workers, whatever their backlogs. Every operation
is O(1) but `discard`, `rest` and `wake`; with one owner it is a plain FIFO.

An owner may rest: its lane keeps its tickets but gets no turn, so the queue
serves the others as if it were not there (the scheduler rests a session
whose unread results fill its room). Which owners rest is one set shared by
every queue, so that a lane made while its owner rests gets no turn either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

__all__ = ["FairQueue"]


class FairQueue:
    """Tickets in per-owner FIFO lanes, taken round-robin across owners."""

    __slots__ = ("_lanes", "_resting", "_size", "_turns", "handed_out_s")

    def __init__(self, resting: set[str] | None = None) -> None:
        self._lanes: dict[str, deque[int]] = {}
        # Owners with a non-empty lane that are not resting, the next to be
        # served first.
        self._turns: deque[str] = deque()
        self._size = 0
        # The owners that get no turn, shared with the caller (who changes it,
        # and calls `rest` or `wake` on each queue when it does).
        self._resting = set() if resting is None else resting
        # The work its owner (the scheduler) has handed out of it, in expected
        # seconds: how queues take turns with each other (see
        # Scheduler._dispatch), as lanes take turns within one.
        self.handed_out_s = 0.0

    # Hot path (once per task each way): inlined rather than split into
    # helpers, since a Python call costs as much as the work itself.

    def append(self, ticket: int, owner: str) -> None:
        """Queue `ticket` behind the owner's other tickets."""
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            if owner not in self._resting:
                self._turns.append(owner)
        lane.append(ticket)
        self._size += 1

    def appendleft(self, ticket: int, owner: str) -> None:
        """Queue `ticket` before the owner's others (a task given back); an
        owner with no other tickets waiting is served next."""
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            if owner not in self._resting:
                self._turns.appendleft(owner)
        lane.appendleft(ticket)
        self._size += 1

    def popleft(self) -> int:
        """The next ticket of the owner whose turn it is.

        Raises:
            IndexError: no owner that is not resting has a ticket.
        """
        turns = self._turns
        owner = turns[0]
        lane = self._lanes[owner]
        ticket = lane.popleft()
        self._size -= 1
        if not lane:
            del self._lanes[owner]
            turns.popleft()
        elif len(turns) > 1:
            turns.rotate(-1)
        return ticket

    def discard(self, owner: str, tickets: set[int]) -> None:
        """Take `tickets` out of the owner's lane, wherever they wait.

        One pass over that lane: for the rare task taken back out of its
        queue, not for the hot path.
        """
        lane = self._lanes.get(owner)
        if lane is None:
            return
        kept = deque(ticket for ticket in lane if ticket not in tickets)
        self._size -= len(lane) - len(kept)
        if kept:
            self._lanes[owner] = kept
        else:
            del self._lanes[owner]
            if owner not in self._resting:
                self._turns.remove(owner)

    def rest(self, owner: str) -> None:
        """Take the owner's lane out of turn (the caller added it to the
        shared resting set): its tickets stay, and wait for `wake`."""
        if owner in self._lanes and owner in self._turns:
            self._turns.remove(owner)

    def wake(self, owner: str) -> None:
        """Give a lane back its turns, behind the owners waiting now (the
        caller took it out of the shared resting set)."""
        if owner in self._lanes and owner not in self._turns:
            self._turns.append(owner)

    def clear(self) -> None:
        self._lanes.clear()
        self._turns.clear()
        self._size = 0

    def owners(self) -> int:
        return len(self._lanes)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        """Whether a ticket can be taken now: one of an owner not resting."""
        return bool(self._turns)

    def __iter__(self) -> Iterator[int]:
        for lane in self._lanes.values():
            yield from lane

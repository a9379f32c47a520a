"""The cancellations a client sent and the broker has not confirmed yet.

A CANCEL can be lost on its way: still queued in a socket that a reconnection
closes, or read by a broker that died before its journal committed what it
made of it. The client keeps each cancelled task until it has proof that the
broker's journal has the cancellation, and sends the unconfirmed ones again on
every new connection. Two things prove it:

- a result of the task (CANCELLED, the broker's answer for a task that had not
  started, or whatever it ended with before the CANCEL arrived): the broker
  sends nothing before the commit of the turn that decided it, and a finished
  task is never run again;
- the answer to a question asked after the CANCEL on the same connection: the
  broker reads a connection's commands in order and answers after its commit.
  A running task's cancellation gets no answer of its own (its worker is
  told to stop it, and the broker drops it), so a receipt question confirms
  it.

Each sending numbers the cancels it carries; a receipt confirms every cancel
whose last sending came before it. The memory is bounded: past its limit the
oldest unconfirmed cancels are forgotten, and would not be sent again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

# Cancels kept unconfirmed at most: a receipt confirms them within a heartbeat
# of a live broker, so only a broker that stays away while the client cancels
# this many tasks makes the client forget some. About 100 bytes each.
UNCONFIRMED_CANCELS = 65_536


class UnconfirmedCancels:
    """Task ids cancelled and not yet confirmed, in the order last sent."""

    def __init__(self, limit: int = UNCONFIRMED_CANCELS) -> None:
        self._limit = limit
        # Task id -> the number of the sending that carried it last. An
        # OrderedDict for its O(1) look at and removal of the oldest.
        self._sent_in: OrderedDict[int, int] = OrderedDict()
        self._sendings = 0
        # The sending a receipt in flight covers, if one is in flight.
        self._receipt_covers: int | None = None
        # Sendings up to this one were covered by a receipt asked already.
        self._asked_through = 0

    def __len__(self) -> int:
        return len(self._sent_in)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._sent_in

    def sent(self, task_ids: Iterable[int]) -> int:
        """Record one sending of a CANCEL of `task_ids`; return how many of the
        oldest were forgotten to keep within the limit."""
        self._sendings += 1
        for task_id in task_ids:
            self._sent_in[task_id] = self._sendings
            self._sent_in.move_to_end(task_id)
        forgotten = 0
        while len(self._sent_in) > self._limit:
            self._sent_in.popitem(last=False)
            forgotten += 1
        return forgotten

    def settled(self, task_id: int) -> None:
        """A result of `task_id` arrived: nothing can happen to it any more."""
        self._sent_in.pop(task_id, None)

    def receipt_wanted(self) -> int | None:
        """The sending a receipt question asked now would cover, or None when
        none is needed (nothing uncovered) or one is in flight already. The
        caller asks it, after every CANCEL sent so far on this connection."""
        if self._receipt_covers is not None or not self._sent_in:
            return None
        newest = next(reversed(self._sent_in.values()))
        if newest <= self._asked_through:
            return None  # covered by a receipt that was asked and lost
        self._receipt_covers = self._asked_through = self._sendings
        return self._sendings

    def receipt_answered(self, covers: int) -> None:
        """The broker answered the receipt question covering sending `covers`."""
        while self._sent_in and next(iter(self._sent_in.values())) <= covers:
            self._sent_in.popitem(last=False)
        self._receipt_ended(covers)

    def receipt_lost(self, covers: int) -> None:
        """The receipt question failed, or its connection was replaced: the
        cancels it covered wait for their resending and a receipt after it."""
        self._asked_through = 0
        self._receipt_ended(covers)

    def _receipt_ended(self, covers: int) -> None:
        if self._receipt_covers == covers:
            self._receipt_covers = None

    def to_send_again(self) -> list[int]:
        """Every unconfirmed cancel, oldest first, for a new connection."""
        return list(self._sent_in)

"""After a restart, the wait for the workers that ran the restored tasks.

The journal brings back the tasks that had not finished, and the broker no
longer knows who ran them. Those workers may run them still: each names what
it holds when it registers again, and keeps it (see
`Scheduler._claimable`). A restored task handed to another worker first would
run twice, and the first result be dropped. So, once the broker serves, the
queues of restored tasks dispatch nothing for `RETURN_WAIT_BEATS` heartbeat
intervals; queues with nothing restored are served at once, and restored
tasks no returning worker names are served as soon as the wait ends.

`ReturnWait` keeps which queues wait, and until when; the scheduler tells it
which queues tasks were restored to, when it starts serving, and the time at
each tick, and skips the queues in `held_back` as it dispatches.
"""

from __future__ import annotations

__all__ = ["RETURN_WAIT_BEATS", "ReturnWait"]

# How many heartbeat intervals, after a restart, the tasks the journal brought
# back wait for the workers that ran them to come back and name them. A worker
# hears that the broker is new at its next beat (answered unknown_worker) and
# registers again: within one interval, and a reconnection, of the start.
RETURN_WAIT_BEATS = 2


class ReturnWait:
    """The queues tasks were restored to (`restored`), and once the broker
    serves, those held back (`held_back`) for `wait_s` from its start."""

    __slots__ = ("_restored", "_until", "held_back", "wait_s")

    def __init__(self, heartbeat_interval_s: float) -> None:
        self.wait_s = RETURN_WAIT_BEATS * heartbeat_interval_s
        self._restored: set[str] = set()
        self.held_back: set[str] = set()
        self._until = 0.0

    def restored(self, queue_name: str) -> None:
        """A task the journal brought back waits in `queue_name`."""
        self._restored.add(queue_name)

    def start(self, now: float) -> float:
        """The broker serves from `now`: hold back the queues of restored
        tasks; return for how long (0.0 if nothing was restored)."""
        if not self._restored:
            return 0.0
        self.held_back, self._restored = self._restored, set()
        self._until = now + self.wait_s
        return self.wait_s

    def end_if_due(self, now: float) -> None:
        """Let the held-back queues go once the wait has passed at `now`."""
        if self.held_back and now >= self._until:
            self.held_back = set()  # the next flush dispatches them

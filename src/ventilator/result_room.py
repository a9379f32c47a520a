"""Room for results: how many bytes of results each session has at the broker.

A task's arguments are bounded when it is submitted, its result only when it
comes. A client that never reads its results (dead, careless or hostile) once
had a window of 100,000 of them kept, 4 GB, and every other client refused for
max_queued_bytes. So per submitting session the broker counts the bytes of the
results it keeps (unsent, or sent and not acknowledged; tombstones aside) and
of those its running tasks are expected to return. When the two fill
client_max_bytes, the session is held back: none of its queued tasks is
dispatched. They stay accepted and journalled, and go once it reads results.
Arguments of queued tasks do not count: they leave as their tasks run, and
counting them could hold a session back for ever.

`ResultRoom` keeps those counts and says which sessions are held back; the
scheduler tells it what changed and takes the held-back sessions' lanes out of
turn in its queues (the set `held_back` is the one its `FairQueue`s share).
"""

from __future__ import annotations

__all__ = ["ResultRoom"]


class ResultRoom:
    """Per session, the result bytes kept and expected, and which sessions
    they fill `limit_bytes` (client_max_bytes) of.

    Counts change per task, so they are told as they happen; whether a
    session is held back is looked at once per loop turn (`review`), for the
    sessions whose counts changed since, but for a running task that fills
    the room as it is handed out (`expect`): its session's next tasks must not
    go in the same turn.
    """

    __slots__ = ("_limit_bytes", "_to_review", "expected", "held_back", "kept")

    def __init__(self, limit_bytes: int) -> None:
        self._limit_bytes = limit_bytes
        # Per session: bytes of results kept, and expected of running tasks.
        # Neither holds a zero, so each is as large as what it counts.
        self.kept: dict[str, int] = {}
        self.expected: dict[str, int] = {}
        # The sessions held back; shared with every FairQueue as the owners
        # that get no turn.
        self.held_back: set[str] = set()
        # The sessions whose counts changed since the last review.
        self._to_review: set[str] = set()

    def count_kept(self, session: str, change: int) -> None:
        """Count `change` more bytes of results kept for `session`."""
        if not change:
            return
        _add(self.kept, session, change)
        self._to_review.add(session)

    def expect(self, session: str, size: int) -> bool:
        """Count a task of `session` handed out, whose result is expected to
        take `size` bytes (more than 0); return True if that fills the room,
        and the session is held back from now on (its lanes must rest)."""
        total = self.expected.get(session, 0) + size
        self.expected[session] = total
        if total + self.kept.get(session, 0) < self._limit_bytes:
            return False
        self.held_back.add(session)
        return True

    def unexpect(self, session: str, size: int) -> None:
        """A task of `session` expected to return `size` bytes runs no more
        (it finished, went back to its queue, or was forgotten)."""
        _add(self.expected, session, -size)
        self._to_review.add(session)

    def fills(self, session: str) -> bool:
        """Whether the results `session` has kept and expected fill its room."""
        held = self.kept.get(session, 0) + self.expected.get(session, 0)
        return held >= self._limit_bytes

    def review(self) -> list[tuple[str, bool]]:
        """Hold back, or let go again, the sessions whose counts changed since
        the last review; return those that changed, each with whether it is
        held back now, for the caller to rest or wake their lanes."""
        review, self._to_review = self._to_review, set()
        changed: list[tuple[str, bool]] = []
        for session in review:
            full = self.fills(session)
            if full == (session in self.held_back):
                continue
            if full:
                self.held_back.add(session)
            else:
                self.held_back.discard(session)
            changed.append((session, full))
        return changed

    def check(self, kept: dict[str, int], expected: dict[str, int]) -> None:
        """Raise AssertionError unless the counts match a recount (`kept`,
        `expected`; zeros left out) and exactly the sessions they fill are
        held back, but for those the next review looks at (for tests)."""
        assert self.kept == kept, (self.kept, kept)
        assert self.expected == expected, (self.expected, expected)
        looked = self.held_back - self._to_review
        full = {session for session in {*kept, *expected} if self.fills(session)}
        assert looked == full - self._to_review, (self.held_back, full)


def _add(counts: dict[str, int], session: str, change: int) -> None:
    """Add `change` to the count of `session`, dropping it at zero."""
    count = counts.get(session, 0) + change
    if count:
        counts[session] = count
    else:
        del counts[session]

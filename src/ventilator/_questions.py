"""How many questions (status, operator commands) one connection may ask.

A status report walks the broker's workers, queues and sessions: one
connection asking thousands a second without reading the answers made every
other client's round trip about 50 times longer. Tasks are bounded by the
client window and the receive queue; questions were not. A connection past
its quota is answered at once with a short refusal that names the limit, so
a flood of questions costs the broker little more than reading it.

Sans-IO: the time is an argument, and nothing here logs or sends.
"""

from __future__ import annotations

__all__ = ["QUESTIONS_PER_S", "QuestionQuota"]

# The default of the broker's --max-questions-per-s (Limits.max_questions_per_s).
# A person at `ventilator status`, a dashboard, or a test polling every 20 ms
# stays well inside it; a loop asking as fast as it can does not.
QUESTIONS_PER_S = 100


class QuestionQuota:
    """Counts each connection's questions in windows of one second.

    A fixed window keeps the check to one dict lookup, and the dict empties
    itself each second, so connections that left leave nothing behind.
    """

    def __init__(self, per_s: int = QUESTIONS_PER_S) -> None:
        self.per_s = per_s
        self._asked: dict[bytes, int] = {}
        self._window_ends_at = 0.0

    def allows(self, peer: bytes, now: float) -> bool:
        """Count a question from `peer` at `now`; False once it asked more
        than `per_s` in the current second (it is then refused)."""
        if now >= self._window_ends_at:
            self._asked.clear()
            self._window_ends_at = now + 1.0
        asked = self._asked.get(peer, 0) + 1
        self._asked[peer] = asked
        return asked <= self.per_s

    def refusal(self) -> str:
        """Why a question was refused, for the asker: names the limit."""
        return (
            f"this connection asked more than {self.per_s} questions (status, "
            "operator commands) within a second, the broker's limit per "
            "connection; this one was not answered: ask less often"
        )

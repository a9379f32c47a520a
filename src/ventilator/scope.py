"""What a client with limited rights sees and reaches.

Under CURVE a client's key may be limited to some sessions and functions (see
`security`). The scheduler knows no keys: the shell turns a key's rights into
a `Scope`, and the scheduler hands it to what answers the client's questions
(status) and operator commands (failed, retry), which show and reach only
what it allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import protocol as p
from .tasks import PICKLE_QUEUE

__all__ = ["RETRY_SESSION", "Scope"]

# The session under which the broker resubmits failed tasks an operator retries.
RETRY_SESSION = "ventilator:retry"

_PICKLED = int(p.Flags.PICKLED)


@dataclass(frozen=True, slots=True)
class Scope:
    """What a client with limited rights sees and reaches with its questions
    (status) and operator commands (failed, retry): the sessions whose names
    start with `sessions`, and the functions `may_submit` allows it, asked
    with a function's name and its task flags.

    The scheduler knows no keys: the shell makes a scope from one (under
    CURVE, a key's sessions are ``<fingerprint>.<name>``). None: no limits.
    `retry_refusal`: why a retry may not run, said of each of the client's
    own failures it names (the others are not its to retry at all).
    """

    sessions: str
    may_submit: Callable[[str, int], bool]
    retry_refusal: str | None = None

    def owns(self, session: str) -> bool:
        return session.startswith(self.sessions)

    def shows_queue(self, name: str) -> bool:
        """Whether a queue (a function's, or the pickled callables') is one
        the client may submit to."""
        return self.may_submit(name, _PICKLED if name == PICKLE_QUEUE else 0)

    @property
    def retry_session(self) -> str:
        """Where this client's retries run: inside its own sessions, so that
        their own failures are its to read and retry, and its window bounds
        them."""
        return self.sessions + RETRY_SESSION

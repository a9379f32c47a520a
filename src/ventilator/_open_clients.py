"""The Clients of this process still open, for the two moments that need
them all.

At the program's end, a Client nobody closed is closed as `close()` would
close it: its I/O thread is a daemon, which the interpreter stops with
whatever it had not sent yet, so a script that submits and ends would lose
its tasks in silence.

After `fork()`, the child holds copies of Clients whose I/O threads did not
come along (only the forking thread does). Marked as forked, they refuse to
be used, where they would wait for an I/O thread that is not there; and the
child's end leaves them alone, as they are its parent's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import weakref
from typing import Protocol

log = logging.getLogger(__name__)

# How long the Clients still open when the program ends wait, all together,
# for their brokers to accept what they sent (close() waits 10 s by default).
EXIT_CLOSE_TIMEOUT_S = 10.0
# After a Ctrl-C during that wait: how long each Client gets to leave and say
# what its broker never accepted.
INTERRUPTED_CLOSE_TIMEOUT_S = 1.0


class OpenClient(Protocol):
    def _close_at_exit(self, timeout_s: float) -> None:
        """Close, as the program ends, waiting at most `timeout_s` for the
        broker."""

    def _stop_waiting_at_exit(self, timeout_s: float) -> None:
        """Leave the broker now, as the program ends interrupted; take at most
        `timeout_s` to say what was left unaccepted."""

    def _forked(self, parent_pid: int) -> None:
        """This process is a child forked from `parent_pid`, which made it."""


_open: weakref.WeakSet[OpenClient] = weakref.WeakSet()


def track(client: OpenClient) -> None:
    """`client` is open until `untrack`."""
    _open.add(client)


def untrack(client: OpenClient) -> None:
    _open.discard(client)


def _close_all_at_exit() -> None:
    left_open = list(_open)
    if left_open:
        log.debug("the program ends with %d Clients open; closing them", len(left_open))
    # One wait for them all, not one each: their I/O threads all went on
    # sending while the first closed, and the program must end.
    deadline = time.monotonic() + EXIT_CLOSE_TIMEOUT_S
    for index, client in enumerate(left_open):
        try:
            client._close_at_exit(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            # Not those closed already: their wake-up pipes are closed, and
            # the descriptors may be another file's by now.
            _stop_waiting(left_open[index:])
            return


def _stop_waiting(clients: list[OpenClient]) -> None:
    """Ctrl-C while closing at exit: the user wants the program to end now,
    not a traceback from this hook. Each Client leaves at once and says what
    its broker never accepted; a second Ctrl-C cuts even that short."""
    log.warning(
        "interrupted while waiting at exit for the broker to accept what was sent: "
        "leaving now"
    )
    with contextlib.suppress(KeyboardInterrupt):
        for client in clients:
            client._stop_waiting_at_exit(INTERRUPTED_CLOSE_TIMEOUT_S)


def _forget_all_in_child() -> None:
    parent_pid = os.getppid()
    forked = list(_open)
    _open.clear()
    for client in forked:
        client._forked(parent_pid)


# Registered once, at import, before any Client exists. `logging`, imported
# above, registered its own shutdown first, so it runs after this (atexit runs
# the last registered first), and what closing says is still written.
atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_forget_all_in_child)

"""Room in a full broker, from the results of client sessions that left.

Results wait at the broker until their client collects them, or for
`result_ttl_s` (a day), and count against `max_queued_tasks` and
`max_queued_bytes` meanwhile: eight clients that submitted 3,000 tasks each and
crashed without reading filled a broker of 20,000 and locked every other
client out for that day. So when a task would be refused because the broker is
full, the scheduler first drops results of sessions that left (orphans),
oldest first, each for a tombstone that tells a client coming back why; this
module picks which.

A session has left when no client is connected for it and none has been for
`orphan_grace_s`: a client that restarts or reconnects finds its results.
Only client sessions lose results this way, not recipients whose names the
broker keeps (`protocol.RESERVED_SESSION_PREFIXES`): a sink's results are the
work of clients that may still be running, waiting by design for a sink to
start (`purge --sink` drops those of a sink nobody will receive), and an MDP
or Titanic client asks for its result by id, later.

A pick's work is bounded: one pass over the recipients, as the scheduler makes
every loop turn to deliver, and at most `MAX_LOOKED_AT` of their results.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from . import protocol as p
from .sessions import Recipient
from .tasks import Task

__all__ = [
    "MAX_LOOKED_AT",
    "ROOM_HEADROOM_BYTES",
    "ROOM_HEADROOM_TASKS",
    "Shortfall",
    "has_left",
    "headroom",
    "pick_orphans",
]

# Results one pick looks at, at most: a full broker is asked once per task of
# a SUBMIT, and may hold millions of results.
MAX_LOOKED_AT = 100_000
# Room made beyond what was asked, so that a broker at its limit does not pick
# again for every SUBMIT that follows.
ROOM_HEADROOM_TASKS = 1024
ROOM_HEADROOM_BYTES = 16 * 1024 * 1024


def headroom(limit: int, most: int) -> int:
    """Room to make beyond what was asked under `limit`: `most`, but no more
    than a hundredth of the limit (a tester's broker of 20 tasks dropped every
    result it held to admit 5)."""
    return min(most, limit // 100)


@dataclass(frozen=True, slots=True)
class Shortfall:
    """What a full broker must free: tasks, and bytes of results."""

    tasks: int
    bytes: int

    def covered_by(self, tasks: int, size: int) -> bool:
        return tasks >= self.tasks and size >= self.bytes


def has_left(recipient: Recipient, cutoff: float) -> bool:
    """Whether `recipient` is a client session with results to lose that no
    client has been connected for since `cutoff` or earlier."""
    return (
        recipient.peer is None
        and recipient.last_seen <= cutoff
        and not recipient.name.startswith(p.RESERVED_SESSION_PREFIXES)
        and len(recipient.pending) + len(recipient.unacked) > recipient.expired
    )


def pick_orphans(
    recipients: Iterable[Recipient],
    tasks: Mapping[int, Task],
    cutoff: float,
    shortfall: Shortfall,
    max_looked_at: int = MAX_LOOKED_AT,
) -> list[Task]:
    """The oldest results of the sessions that left by `cutoff`, as many as
    cover `shortfall` (all that were found, if they do not), oldest first."""
    per_session: list[list[Task]] = []
    budget = max_looked_at
    for recipient in recipients:
        if budget <= 0:
            break
        if has_left(recipient, cutoff):
            oldest, looked = _oldest_of(recipient, tasks, shortfall, budget)
            per_session.append(oldest)
            budget -= looked
    # Each session's come oldest first: merged, not sorted, so that the work
    # grows with the results dropped rather than with those looked at.
    return _enough(heapq.merge(*per_session, key=_finished_at), shortfall)


def _oldest_of(
    recipient: Recipient, tasks: Mapping[int, Task], shortfall: Shortfall, budget: int
) -> tuple[list[Task], int]:
    """The oldest results owed to `recipient`, until they alone cover
    `shortfall` or `budget` of them were looked at; and how many were."""
    # Sent and unacknowledged ones first: they are older than those unsent.
    # Its tombstones (expired, or dropped by an earlier pick) are its oldest,
    # in front: skipped without a look each, or a session that lost most of
    # a large backlog would spend the budget on them at every pick.
    owed = itertools.chain(recipient.unacked, recipient.pending)
    found: dict[int, Task] = {}  # a ticket may be in both after a reconnection
    looked = freed_bytes = 0
    for ticket in itertools.islice(owed, recipient.expired, None):
        if looked >= budget or shortfall.covered_by(len(found), freed_bytes):
            break
        looked += 1
        task = tasks.get(ticket)
        if task is None or task.status in (None, p.Status.EXPIRED):
            continue
        if ticket not in found:
            found[ticket] = task
            freed_bytes += len(task.result)
    return list(found.values()), looked


def _finished_at(task: Task) -> float:
    return task.finished_at


def _enough(oldest_first: Iterator[Task], shortfall: Shortfall) -> list[Task]:
    """The first of `oldest_first` that together cover `shortfall`."""
    enough: list[Task] = []
    freed_bytes = 0
    for task in oldest_first:
        if shortfall.covered_by(len(enough), freed_bytes):
            break
        enough.append(task)
        freed_bytes += len(task.result)
    return enough

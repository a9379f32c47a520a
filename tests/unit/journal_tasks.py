"""Tasks as the journal tests write them: the scheduler's records, made by hand."""

from __future__ import annotations

import itertools

from ventilator import protocol as p
from ventilator.scheduler import State, Task

_TICKETS = itertools.count(1)


def a_task(task_id: int, session: str = "alice", **fields: object) -> Task:
    """A queued task of `session`, under a ticket never used before."""
    values: dict[str, object] = {
        "ticket": next(_TICKETS),  # the broker's ticket is the journal's key
        "session": session,
        "task_id": task_id,
        "function": "jobs:f",
        "payload": b"args-%d" % task_id,
        "flags": 0,
        "timeout_s": None,
        "retries_left": 0,
        "recipient": session,
    }
    return Task(**{**values, **fields})  # type: ignore[arg-type]


def finished(one: Task, result: bytes, status: p.Status = p.Status.OK) -> Task:
    """`one`, finished with `result`: its payload is no longer kept."""
    one.state, one.status, one.result, one.payload = State.FINISHED, status, result, b""
    return one

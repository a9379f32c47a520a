"""What one loop turn of the scheduler asks its shell to do.

The scheduler touches no socket and no disk: each call records what should
happen in the turn's `Effects`, and `Scheduler.flush` hands them over, to be
carried out in the order the docstring of `Effects` gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import protocol as p
from .failures import FailedTask
from .notices import Notice
from .tasks import Task

__all__ = ["Effects"]


@dataclass(slots=True)
class Effects:
    """What one loop turn asks the shell to do, in this order: send to workers,
    journal, then send to clients (nothing a client hears may outrun the disk)."""

    accepted: list[Task] = field(default_factory=list)
    finished: list[Task] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)  # tickets
    # Failure records for the operator: new ones, and tickets of those retried
    # or dropped for room, so the journal keeps the same list as `failed`.
    failures: list[FailedTask] = field(default_factory=list)
    unfailed: list[int] = field(default_factory=list)
    # Tasks requeued after a strike (their process died, their worker was
    # lost): the strikes go to the journal, so a restart gives no fresh tries.
    struck: list[Task] = field(default_factory=list)
    to_clients: list[tuple[bytes, p.Command]] = field(default_factory=list)
    to_workers: list[tuple[bytes, p.Command]] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    # Client connections gone (BYE, silence) or replaced since the last turn:
    # their arenas of shared memory go, once the shell has had the scheduler
    # copy out what its tasks still need (see _shared, Scheduler.unshare).
    departed: list[bytes] = field(default_factory=list)

    @property
    def journal_dirty(self) -> bool:
        return bool(
            self.accepted
            or self.finished
            or self.forgotten
            or self.failures
            or self.unfailed
            or self.struck
        )

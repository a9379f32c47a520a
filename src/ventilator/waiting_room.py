"""Tasks a session sent past its window, which wait at the broker for room.

A sink task counts against its sender until the sink acknowledges its result,
which our client cannot see: it takes the task for gone once accepted, and
sends more. Refused, those would fail (a sink that fell behind failed its
senders' tasks); waiting unaccepted, they keep their client's window full, and
so slow the sender, and only the sender. A client that keeps to its window
never has more than a window's worth waiting; past that, or its bytes, a
sender is refused.

Waiting tasks are not accepted: neither journalled nor counted in the
broker's totals. Their client holds them as unaccepted, and sends them again
on a new connection. The scheduler decides when a window has room (it counts
what each session holds); `WaitingRoom` keeps what waits, in the order it
came, and which sessions some room came back to since the scheduler last
looked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import protocol as p

__all__ = ["Parked", "WaitingRoom"]

_SHARED = int(p.Flags.SHARED)


@dataclass(slots=True)
class Parked:
    """The tasks one session sent past its window, in the order they came,
    and their bytes."""

    specs: dict[int, p.TaskSpec] = field(default_factory=dict)
    size: int = 0

    def add(self, spec: p.TaskSpec) -> None:
        self.specs[spec.task_id] = spec
        self.size += p.payload_bytes(spec)

    def first(self) -> p.TaskSpec:
        return next(iter(self.specs.values()))

    def remove(self, task_id: int) -> bool:
        """Drop the task `task_id`; False if it was not here."""
        spec = self.specs.pop(task_id, None)
        if spec is None:
            return False
        self.size -= p.payload_bytes(spec)
        return True


class WaitingRoom:
    """Per session, what it sent past its window (`parked`), at most a window
    of `window` tasks and `max_bytes` bytes; and the sessions some room came
    back to, for the scheduler to accept what now fits (`take_freed`)."""

    __slots__ = ("_freed", "_max_bytes", "_window", "parked")

    def __init__(self, window: int, max_bytes: int) -> None:
        self._window = window
        self._max_bytes = max_bytes
        self.parked: dict[str, Parked] = {}
        self._freed: set[str] = set()

    def holds(self, session: str, task_id: int) -> bool:
        """Whether the task `task_id` of `session` waits here."""
        parked = self.parked.get(session)
        return parked is not None and task_id in parked.specs

    def park(self, session: str, spec: p.TaskSpec) -> str | None:
        """Let `spec` wait for room in the window of `session`; None once it
        waits, else why it may not (another window's worth waits already)."""
        parked = self.parked.get(session)
        if parked is None:
            parked = self.parked[session] = Parked()
        over = len(parked.specs) >= self._window or (
            parked.size + p.payload_bytes(spec) > self._max_bytes
        )
        if over and parked.specs:
            return (
                f"{len(parked.specs)} tasks of this client ({parked.size} bytes) "
                "wait at the broker for room in its window already "
                f"(client_window={self._window}, client_max_bytes="
                f"{self._max_bytes}); wait for results before submitting more"
            )
        parked.add(spec)
        return None

    def room_freed(self, session: str) -> None:
        """Room came back to the window of `session`, whose tasks wait here:
        the next look tries them."""
        self._freed.add(session)

    def cancel(self, session: str, task_id: int) -> bool:
        """Drop the waiting task `task_id` of `session` (its client cancelled
        it); False if it does not wait here. The next behind it may fit now."""
        parked = self.parked.get(session)
        if parked is None or not parked.remove(task_id):
            return False
        self._freed.add(session)
        return True

    def take_freed(self) -> list[tuple[str, Parked]]:
        """The sessions room came back to since the last call, with what of
        them waits; the caller takes what fits out of each, then `tidy`s it."""
        freed, self._freed = self._freed, set()
        parked = self.parked
        return [(session, parked[session]) for session in freed if session in parked]

    def tidy(self, session: str) -> None:
        """Forget the entry of `session` if nothing of it waits any more."""
        if not self.parked[session].specs:
            del self.parked[session]

    def copy_shared(
        self, arena: bytes, read: Callable[[p.Payload], p.Payload | None]
    ) -> None:
        """Give the waiting tasks whose payload lies in `arena` a copy of it,
        read by `read` (see Scheduler.unshare): they may be accepted after
        the arena is gone. One whose payload cannot be read keeps its
        reference. Only a peer that sends past its window has any: our client
        sends only sink tasks past it, and those never by reference."""
        for parked in self.parked.values():
            for task_id, spec in parked.specs.items():
                if spec.flags & _SHARED and p.shared_arena(spec.payload) == arena:
                    payload = read(spec.payload)
                    if payload is not None:
                        flags = spec.flags & ~_SHARED
                        parked.specs[task_id] = replace(
                            spec, payload=payload, flags=flags
                        )

    def drop(self, session: str) -> int:
        """Forget what `session` sent past its window (its client left, lost
        its key, or an operator purged it); return how many tasks."""
        parked = self.parked.pop(session, None)
        self._freed.discard(session)
        return 0 if parked is None else len(parked.specs)

    def check(self) -> None:
        """Raise AssertionError unless every session's count of bytes is
        right, none waits with nothing, none with more than a window's worth,
        and the scheduler looked at every room that came back (for tests,
        after a `flush`)."""
        assert not self._freed, "room came back and nobody looked"
        for session, parked in self.parked.items():
            assert parked.specs, f"{session} parks nothing"
            assert len(parked.specs) <= self._window, session
            size = sum(p.payload_bytes(spec) for spec in parked.specs.values())
            assert parked.size == size, (session, parked.size, size)

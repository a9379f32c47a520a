"""How many bytes the journal's disk can still take, between two looks at it.

The broker looks at the free space on its journal's disk as the journal
grows, not per task (see `broker._DiskRoom`); in between, the scheduler spends
the budget that look left as it accepts tasks and keeps results, and refuses
what would not fit, with a message that says what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DiskBudget"]

_MIB = 2**20


def _log_reserve(reserve: int) -> int:
    """The part of the reserve kept for SQLite's log: what records a
    client's acknowledgements, among the rest."""
    return reserve // 4


@dataclass(slots=True)
class DiskBudget:
    """What the journal's disk can still take until the shell looks again.

    New tasks must leave the reserve (`--journal-min-free-bytes`) whole: it is
    kept for the tasks already held. Their results may use it, all but a
    quarter kept for SQLite's log (`log_reserve`): a result the disk cannot
    take fails its task, where its write would stop the broker, and again at
    each restart. Once even that quarter is short, results are not delivered
    (`records_deliveries`). Infinite while no reserve is kept (a memory
    journal, or 0).
    """

    tasks: float = math.inf
    results: float = math.inf
    free: int = 0  # bytes free at the look, for messages
    reserve: int = 0

    @classmethod
    def after_look(cls, free: int, reserve: int) -> DiskBudget:
        return cls(free - reserve, free - _log_reserve(reserve), free, reserve)

    @property
    def log_reserve(self) -> int:
        return _log_reserve(self.reserve)

    def records_deliveries(self) -> bool:
        """Whether the disk, at the look, had the log's part of the reserve:
        a result delivered whose acknowledgement could not be recorded would
        stop the broker, and be delivered again after its restart."""
        return self.free >= self.log_reserve

    def spend(self, size: int) -> None:
        self.tasks -= size
        self.results -= size

    def task_refusal(self, size: int) -> str:
        return (
            f"the journal's disk has {self.free // _MIB} MiB free; this task's "
            f"{size} bytes would cut into the {self.reserve // _MIB} MiB the broker "
            "keeps for the tasks it holds (--journal-min-free-bytes); free space "
            "on that disk, or send smaller tasks"
        )

    def result_refusal(self, size: int) -> str:
        # The free space alone read as a contradiction: 8 MB "did not fit"
        # 23 MiB free, where results had spent it and the log keeps a part.
        left = max(0, int(self.results))
        return (
            f"the result of {size} bytes does not fit the journal's disk: "
            f"{left // _MIB} MiB are left for results, of the "
            f"{self.free // _MIB} MiB free when the broker last looked (results "
            f"since took their part, and SQLite's log keeps "
            f"{self.log_reserve // _MIB} MiB of the --journal-min-free-bytes "
            "reserve); free space there, or return less"
        )

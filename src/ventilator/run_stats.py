"""What the broker learns of each queue's tasks as they finish.

Workers report how long each task ran and the result it returned. Per queue,
the broker keeps a moving average of both, and dispatch reads them: a
function whose tasks grow longer is soon held one per slot (see
`policy.Prefetch`), and takes its turns among the queues by the time its
tasks take; a running task is expected to return what its queue's results
weigh, counted against its session's room for results (see `result_room`).

The average of result sizes rises at once to a larger result: while an
average caught up with results turning from bytes to 60 KB, a session held
back at 1 MB kept 4.2 MB.
"""

from __future__ import annotations

__all__ = ["RUN_TIME_WEIGHT", "RunStats"]

# Weight of the newest run time (and result size) in a queue's moving average.
RUN_TIME_WEIGHT = 0.2


class RunStats:
    """Per queue, how long its tasks run (`run_s`, seconds) and how large
    their results are (`result_size`, bytes); a queue none of whose tasks
    finished yet is in neither. Read by dispatch as plain dicts, so that a
    look costs no call."""

    __slots__ = ("result_size", "run_s")

    def __init__(self) -> None:
        self.run_s: dict[str, float] = {}
        self.result_size: dict[str, float] = {}

    def observe(self, queue_name: str, duration_s: float, size: int) -> None:
        """A task of `queue_name` ran `duration_s` and returned `size` bytes."""
        mean_s = self.run_s.get(queue_name)
        mean = self.result_size.get(queue_name)
        if mean_s is None or mean is None:
            self.run_s[queue_name] = duration_s
            self.result_size[queue_name] = float(size)
        else:
            self.run_s[queue_name] = mean_s + RUN_TIME_WEIGHT * (duration_s - mean_s)
            decayed = mean + RUN_TIME_WEIGHT * (size - mean)
            self.result_size[queue_name] = max(decayed, float(size))

"""Which task of its batch a task process is running, told through memory.

A task process runs a batch of tasks and reports their outcomes together. If
one of them kills the process, the pipe says only that the batch died. The
process therefore notes, before each task, the batch and the task's place in
it in a few bytes of memory it shares with its worker; the worker reads them
once the process is gone, and blames that task alone, at its first death.

A note in shared memory rather than a message per task on the pipe: it costs a
store, not a system call on each side, and it survives the writer's death.
A memfd where the system has one, else an unlinked temporary file.

The worker writes notes the other way: the tasks it took back, to run
elsewhere while the process was held up (see `ProcessPool._withdraw`): from a
place of a batch on, through a later batch. The process reads them before
each task and skips those. A message on the pipe would queue behind them.
"""

from __future__ import annotations

import mmap
import os
import tempfile

__all__ = ["Progress"]

# The process's note: the batch's number, counted from 1 over the process's
# life, shifted past the place bits; the task's place in it plus one in the
# low bits, 0 between tasks. The worker's notes: the first task it took back
# (batch and place, the same way, without the plus one), and the number of
# the last batch it took back. Each one aligned 8-byte store, so a reader
# never sees half a note. A batch holds at most 64 tasks (pool.MAX_BATCH);
# 48 bits of batch numbers last for ever, where 32 ran out after a few days
# of tiny batches.
_SIZE = 24
_RUNNING, _CUT, _THROUGH = 0, 1, 2
_PLACE_BITS = 16
_PLACE_MASK = (1 << _PLACE_BITS) - 1


class Progress:
    """The shared note of one task process: written there, read by its worker."""

    def __init__(self, fd: int) -> None:
        self._memory = mmap.mmap(fd, _SIZE)
        self._note = memoryview(self._memory).cast("Q")

    @classmethod
    def create(cls) -> tuple[Progress, int]:
        """A note for a new task process, and the descriptor to pass it; the
        caller closes the descriptor once the process has it."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("ventilator-progress")
        else:
            with tempfile.TemporaryFile() as backing:
                fd = os.dup(backing.fileno())
        os.ftruncate(fd, _SIZE)
        return cls(fd), fd

    def running(self, batch: int, place: int) -> None:
        """The task at `place` (from 0) of batch number `batch` starts now."""
        self._note[_RUNNING] = (batch << _PLACE_BITS) | (place + 1)

    def between(self, batch: int) -> None:
        """No task of batch number `batch` runs any more."""
        self._note[_RUNNING] = batch << _PLACE_BITS

    def running_task(self, batch: int) -> int | None:
        """The place of the task of batch number `batch` that was running,
        or None if none was (the note is of another batch, or between tasks)."""
        note = self._note[_RUNNING]
        if note >> _PLACE_BITS != batch or not note & _PLACE_MASK:
            return None
        return (note & _PLACE_MASK) - 1

    def withdraw(self, batch: int, place: int, through: int) -> None:
        """The worker took back the tasks from `place` (from 0) of batch
        number `batch` on, through batch number `through`."""
        # The cut first: a process that sees the new end sees it too.
        self._note[_CUT] = (batch << _PLACE_BITS) | place
        self._note[_THROUGH] = through

    def withdrawn(self, batch: int, place: int) -> bool:
        """Whether the worker took back the task at `place` of batch number
        `batch`: skip it, and the rest of its batch."""
        if batch > self._note[_THROUGH]:
            return False
        return (batch << _PLACE_BITS) | place >= self._note[_CUT]

    def close(self) -> None:
        self._note.release()
        self._memory.close()

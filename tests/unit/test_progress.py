"""The note a task process keeps of the task it runs."""

from __future__ import annotations

import os

from ventilator._progress import Progress


def test_the_note_names_the_running_task_of_its_batch_only() -> None:
    written, fd = Progress.create()
    read = Progress(fd)  # another mapping of it, as the worker's
    os.close(fd)
    try:
        assert read.running_task(1) is None  # nothing ran yet

        written.running(7, 0)
        assert read.running_task(7) == 0
        written.running(7, 63)
        assert (read.running_task(7), read.running_task(6)) == (63, None)

        written.between(7)
        assert read.running_task(7) is None
    finally:
        written.close()
        read.close()

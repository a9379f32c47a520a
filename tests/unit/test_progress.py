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


def test_the_worker_notes_the_batches_it_took_back_through_a_number() -> None:
    worker, fd = Progress.create()
    child = Progress(fd)
    os.close(fd)
    try:
        assert not child.withdrawn(1)  # nothing taken back yet

        worker.withdraw_through(5)
        assert child.withdrawn(4) and child.withdrawn(5)
        assert not child.withdrawn(6)  # sent after: runs

        child.running(3, 0)  # the two notes do not overwrite each other
        assert worker.running_task(3) == 0 and child.withdrawn(5)
    finally:
        worker.close()
        child.close()

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


def test_the_worker_notes_the_tasks_it_took_back_from_a_place_through_a_batch() -> None:
    worker, fd = Progress.create()
    child = Progress(fd)
    os.close(fd)
    try:
        assert not child.withdrawn(1, 0)  # nothing taken back yet

        worker.withdraw(3, 2, through=5)  # batch 3 from its third task on
        assert not child.withdrawn(3, 1)  # before the cut: runs
        assert child.withdrawn(3, 2) and child.withdrawn(4, 0)
        assert child.withdrawn(5, 63)
        assert not child.withdrawn(6, 0)  # sent after: runs

        child.running(3, 1)  # the notes do not overwrite each other
        assert worker.running_task(3) == 1 and child.withdrawn(3, 2)
    finally:
        worker.close()
        child.close()


def test_batch_numbers_past_32_bits_are_noted_whole() -> None:
    # A worker's task process counts its batches over its life: tiny ones
    # passed 2**32 within days.
    written, fd = Progress.create()
    read = Progress(fd)
    os.close(fd)
    try:
        batch = 2**40 + 7
        written.running(batch, 63)
        assert read.running_task(batch) == 63
        assert read.running_task(batch - 1) is None
    finally:
        written.close()
        read.close()

"""The notes a task process and its worker keep for each other."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ventilator._progress import Progress


@pytest.fixture
def notes() -> Iterator[tuple[Progress, Progress]]:
    """The task process's mapping of its notes, and another, as the worker's."""
    child, fd = Progress.create()
    worker = Progress(fd)
    os.close(fd)
    yield child, worker
    child.close()
    worker.close()


def test_the_note_names_the_running_task_of_its_batch_only(
    notes: tuple[Progress, Progress],
) -> None:
    child, worker = notes
    assert worker.running_task(1) is None  # nothing ran yet

    child.running(7, 0)
    assert worker.running_task(7) == 0
    child.running(7, 63)
    assert (worker.running_task(7), worker.running_task(6)) == (63, None)

    child.between(7)
    assert worker.running_task(7) is None


def test_the_worker_notes_the_tasks_it_took_back_from_a_place_through_a_batch(
    notes: tuple[Progress, Progress],
) -> None:
    child, worker = notes
    assert not child.withdrawn(1, 0)  # nothing taken back yet

    worker.withdraw(3, 2, through=5)  # batch 3 from its third task on
    assert not child.withdrawn(3, 1)  # before the cut: runs
    assert child.withdrawn(3, 2) and child.withdrawn(4, 0)
    assert child.withdrawn(5, 63)
    assert not child.withdrawn(6, 0)  # sent after: runs

    child.running(3, 1)  # the notes do not overwrite each other
    assert worker.running_task(3) == 1 and child.withdrawn(3, 2)


def test_batch_numbers_past_32_bits_are_noted_whole(
    notes: tuple[Progress, Progress],
) -> None:
    # A task process counts its batches over its life: at 20,000 tiny ones a
    # second, it passed 2**32 in under three days.
    child, worker = notes
    batch = 2**40 + 7

    child.running(batch, 63)

    assert worker.running_task(batch) == 63
    assert worker.running_task(batch - 1) is None

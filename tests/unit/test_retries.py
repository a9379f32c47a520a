"""Retries: tasks that wait out their retry's backoff."""

from __future__ import annotations

from ventilator.retries import Retries
from ventilator.tasks import State, Task


def waiting(tasks: dict[int, Task], ticket: int, function: str = "m:f") -> Task:
    task = Task(ticket, "s", ticket, function, b"", 0, None, 1, "s")
    task.state = State.WAITING
    tasks[ticket] = task
    return task


def test_tasks_come_due_soonest_first_and_only_once_due() -> None:
    tasks: dict[int, Task] = {}
    retries = Retries(tasks)
    retries.wait(waiting(tasks, 1), due=3.0)
    retries.wait(waiting(tasks, 2), due=1.0)

    assert [t.ticket for t in retries.due(2.0)] == [2]
    assert [t.ticket for t in retries.due(5.0)] == [1]
    assert list(retries.due(9.0)) == []


def test_a_task_cancelled_while_it_waited_is_skipped() -> None:
    tasks: dict[int, Task] = {}
    retries = Retries(tasks)
    retries.wait(waiting(tasks, 1), due=1.0)
    tasks[1].state = State.FINISHED

    assert list(retries.due(2.0)) == []
    assert retries.next_due_at() is None


def test_a_ticket_waiting_twice_is_woken_once() -> None:
    tasks: dict[int, Task] = {}
    retries = Retries(tasks)
    task = waiting(tasks, 1)
    retries.wait(task, due=1.0)
    retries.wait(task, due=1.5)

    woken = []
    for due in retries.due(2.0):
        due.state = State.QUEUED  # as the scheduler's enqueue does
        woken.append(due.ticket)

    assert woken == [1]


def test_waits_are_counted_per_queue_with_the_next_due() -> None:
    tasks: dict[int, Task] = {}
    retries = Retries(tasks)
    retries.wait(waiting(tasks, 1, "m:f"), due=4.0)
    retries.wait(waiting(tasks, 2, "m:f"), due=2.0)
    retries.wait(waiting(tasks, 3, "m:g"), due=3.0)

    assert retries.by_queue() == {"m:f": 2, "m:g": 1}
    assert retries.next_due_at() == 2.0
    assert sorted(t.ticket for t in retries.tasks()) == [1, 2, 3]

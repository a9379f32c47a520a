"""Task and Worker: the read-outs the scheduler, status and journal share."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.mdp import service_queue
from ventilator.tasks import PICKLE_QUEUE, Task, Worker


def task(function: str = "m:f", flags: int = 0) -> Task:
    return Task(1, "s", 7, function, b"", flags, None, 0, "s")


def test_a_task_waits_in_the_queue_of_its_function() -> None:
    assert task("m:f").queue == "m:f"


def test_a_pickled_task_waits_in_the_shared_pickle_queue() -> None:
    assert task(flags=int(p.Flags.PICKLED)).queue == PICKLE_QUEUE


def test_a_raw_task_waits_in_its_service_queue() -> None:
    assert task("echo", int(p.Flags.RAW)).queue == service_queue("echo")


def test_a_task_is_known_by_its_session_and_id() -> None:
    assert task().key == ("s", 7)


def test_a_draining_worker_has_no_free_credit() -> None:
    worker = Worker("w", b"peer", ("m:f",), capacity=2, last_seen=0.0)
    assert worker.free == 2
    worker.draining = True
    assert worker.free == 0


def test_a_busy_worker_that_is_silent_while_busy_is_not_presumed_dead() -> None:
    worker = Worker("w", b"peer", ("m:f",), capacity=1, last_seen=0.0)
    worker.running.add(1)
    assert worker.presumed_dead(now=10.0, default_silence_s=3.0)
    worker.silent_while_busy = True
    assert not worker.presumed_dead(now=10.0, default_silence_s=3.0)

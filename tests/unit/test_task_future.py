"""TaskFuture.cancel as concurrent.futures' waiters and racing threads see it."""

from __future__ import annotations

import concurrent.futures
import threading

from ventilator.client import TaskFuture


class _Withdrawals:
    """Stands for the client: counts the tasks each cancel withdraws."""

    def __init__(self) -> None:
        self.withdrawn: list[int] = []
        self._lock = threading.Lock()

    def _withdraw(self, task_ids: list[int]) -> None:
        with self._lock:
            self.withdrawn.extend(task_ids)


def test_a_cancelled_future_is_done_for_wait_at_once() -> None:
    future = TaskFuture(_Withdrawals(), 1)  # type: ignore[arg-type]

    assert future.cancel()
    done, not_done = concurrent.futures.wait([future], timeout=0)

    assert (done, not_done) == ({future}, set())


def test_two_threads_cancelling_one_future_withdraw_its_task_once() -> None:
    client = _Withdrawals()
    futures = [TaskFuture(client, task_id) for task_id in range(500)]  # type: ignore[arg-type]
    start = threading.Barrier(2)
    answers: list[bool] = []

    def cancel_all() -> None:
        start.wait()
        answers.extend(future.cancel() for future in futures)

    threads = [threading.Thread(target=cancel_all) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(answers) and len(answers) == 1000
    assert sorted(client.withdrawn) == list(range(500))

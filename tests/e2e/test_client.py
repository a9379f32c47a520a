"""The Python API against real brokers and workers: Client, AsyncClient, local()."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import ventilator
from ventilator import _wire
from ventilator import protocol as p
from ventilator._open_clients import EXIT_CLOSE_TIMEOUT_S
from ventilator.client import WINDOW_BYTES_MIN_TASKS
from ventilator.serialization import pack_call, pack_value, unpack_value

from . import tasks
from .conftest import (
    MORE_TASKS,
    TASKS,
    BrokerProcess,
    Launcher,
    ProcessId,
    WorkerProcess,
    child_env,
    descendants,
    free_port,
    paused,
    status_when,
    stop_process_ids,
    wait_for_workers,
    wait_until,
)

RESULT_TIMEOUT_S = 20.0
# Tasks sent one by one through a window of one, and how long they may take
# in all (a few milliseconds each on a quiet machine).
ONE_AT_A_TIME = 50
ONE_AT_A_TIME_DEADLINE_S = 30.0


class Tripwire:
    """An argument whose unpickling creates a file: proof that someone unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (tasks.touch, (self.path,))


# --- submit, map, executor --------------------------------------------------------


def test_submit_returns_each_task_result_to_its_future(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    futures = [client.submit(tasks.square, i) for i in range(40)]

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [i * i for i in range(40)]


def test_tasks_are_spread_over_both_workers(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    futures = [client.submit(tasks.whereabouts, 0.3) for _ in range(6)]

    parents = {f.result(RESULT_TIMEOUT_S)[1] for f in futures}
    assert parents == {worker.pid for worker in two_workers}


def test_map_yields_results_in_input_order(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    items = list(range(300))

    assert list(client.map(tasks.square, items)) == [i * i for i in items]


@pytest.mark.parametrize("chunksize", [0, 1.5, "3", True])
def test_a_chunksize_that_is_not_a_whole_number_from_1_is_refused_by_name(
    client: ventilator.Client, chunksize: Any
) -> None:
    # Before, 1.5 and "3" failed deep in islice() and a comparison.
    with pytest.raises(ventilator.UsageError, match="chunksize must be an int >= 1"):
        client.map(tasks.square, range(3), chunksize=chunksize)


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_in_batches_yields_every_result_in_input_order(
    client: ventilator.Client, two_workers: list[WorkerProcess], chunksize: int | None
) -> None:
    items = list(range(3000))

    results = list(client.map(tasks.square, items, chunksize=chunksize))

    assert results == [i * i for i in items]


def test_map_raises_a_failed_item_in_its_place_after_the_items_before_it(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    items = [*range(1, 20), 0, *range(20, 40)]
    results: list[float] = []

    with pytest.raises(ventilator.TaskRaised, match="ZeroDivisionError"):
        for value in client.map(tasks.reciprocal, items, chunksize=8):
            results.append(value)

    assert results == [1 / i for i in range(1, 20)]


def test_map_fails_only_the_item_whose_result_cannot_be_sent(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    items = [1, 2, -1, 3]
    results: list[int] = []

    with pytest.raises(
        ventilator.TaskRaised,
        match="UnsendableResult: the task's return value cannot be sent as "
        "msgpack: can not serialize 'object'",
    ):
        for value in client.map(tasks.unsendable_on_negative, items, chunksize=4):
            results.append(value)

    assert results == [1, 4]


def test_map_batch_with_a_poison_item_runs_its_other_items_one_by_one(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    # With chunksize 10, items 20..24 share a batch with the poison item -1:
    # the batch dies whole, then its items run alone and only -1 fails.
    items = [*range(25), -1, *range(5)]
    results: list[int] = []

    with pytest.raises(ventilator.PoisonTask):
        for value in client.map(tasks.crash_on_negative, items, chunksize=10):
            results.append(value)

    assert results == [i * i for i in range(25)]


@pytest.mark.parametrize("chunksize", [None, 10])
def test_map_runs_a_poison_item_max_attempts_times_in_all(
    client: ventilator.Client,
    two_workers: list[WorkerProcess],
    tmp_path: Path,
    chunksize: int | None,
) -> None:
    # The broker's default max_attempts is 3. The batch that holds the poison
    # item died with it once; alone, it may kill two more processes, no more.
    runs = tmp_path / "runs"
    items = [[x, str(runs)] for x in [*range(60), -1, *range(60)]]

    outcomes = list(
        client.map_outcomes(tasks.crash_on_negative_counted, items, chunksize=chunksize)
    )

    assert isinstance(outcomes[60].error, ventilator.PoisonTask)
    assert [o.value for o in outcomes if o.error is None] == [
        x * x for x in [*range(60), *range(60)]
    ]
    assert runs.read_text().count("ran") == 3


def test_a_batch_whose_process_died_is_no_failure_only_its_poison_item_is(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    # The batch of items 10 to 19 dies with item -1 in it and is handed back
    # to the map: nothing the user asked for failed but item -1.
    runs = tmp_path / "runs"
    items = [[x, str(runs)] for x in [*range(15), -1, *range(15)]]

    outcomes = list(
        client.map_outcomes(tasks.crash_on_negative_counted, items, chunksize=10)
    )
    failed = client.failed()
    totals = client.status()["totals"]

    assert [i for i, o in enumerate(outcomes) if o.error is not None] == [15]
    [record] = failed
    assert record["outcome"] == "poison" and "batch" not in record["message"]
    assert (totals["failed"], totals["split"]) == (1, 1)


def test_map_item_alone_in_a_batch_whose_process_died_once_runs_again(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    # The broker fails a batch at its first death; its one item has attempts left.
    results = list(client.map(tasks.crash_once, [str(tmp_path / "crashed")]))

    assert results == ["survived"]


def fast_then_slow(
    log: Path, slow_items: int, seconds: float = 0.1
) -> Iterator[list[Any]]:
    """300 instant items, then `slow_items` that take `seconds` each, as a
    generator: a map cannot taper its last batches by the items left."""
    for x in range(300 + slow_items):
        yield [x, 300, seconds, str(log)]


def test_map_stopped_when_items_turn_slow_leaves_no_long_batch_behind(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    # Batches sized for instant items held 256 slow ones: the first slow
    # result came after its whole batch, 10 s here. They now stop at their
    # budget (0.2 s), and what they did not run goes again, sized anew.
    log = tmp_path / "slow"
    results = client.map(tasks.slow_from, fast_then_slow(log, slow_items=100))

    with contextlib.closing(results):
        for value in results:
            if value >= 300:
                break

    assert log.read_text().count("\n") < 30


def test_map_spreads_items_that_turn_slow_over_the_workers(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    log = tmp_path / "slow"

    results = list(client.map(tasks.slow_from, fast_then_slow(log, slow_items=40)))

    assert results == list(range(340))
    assert len(set(log.read_text().split())) == 2  # before, one ran all 40


def test_map_outcomes_reports_every_item_in_order_without_raising(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    items: list[Any] = [*range(1, 300)]
    items[100] = 0  # raises ZeroDivisionError
    items[200] = object()  # cannot be encoded, so it is never sent

    outcomes = list(client.map_outcomes(tasks.reciprocal, items))

    assert len(outcomes) == len(items)
    assert isinstance(outcomes[100].error, ventilator.TaskRaised)
    assert outcomes[100].error.remote_type == "ZeroDivisionError"
    assert isinstance(outcomes[200].error, ventilator.TaskRejected)
    assert "an item of type object" in outcomes[200].error.message
    others = [o for i, o in enumerate(outcomes) if i not in (100, 200)]
    expected = [1 / x for i, x in enumerate(items) if i not in (100, 200)]
    assert [o.value for o in others] == expected
    assert all(o.error is None for o in others)


def test_map_with_a_timeout_times_out_only_the_slow_item(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    seconds = [0.0] * 20 + [20.0] + [0.0] * 20
    results = []

    with pytest.raises(ventilator.TaskTimeout):
        for value in client.map(tasks.sleep_for, seconds, timeout_s=1):
            results.append(value)

    assert results == [0.0] * 20


def cancelled_when_idle(client: ventilator.Client, function: str) -> dict[str, int]:
    """The broker's totals once nothing of `function` is queued or running."""
    status = status_when(
        client,
        lambda s: function not in s["queued"] and function not in s["running"],
        RESULT_TIMEOUT_S,
        "the abandoned map's tasks to be gone",
    )
    return dict(status["totals"])


@pytest.mark.parametrize("chunksize", [2, 1])
def test_a_map_closed_after_a_break_cancels_the_tasks_it_has_not_yielded(
    launch: Launcher, broker: BrokerProcess, chunksize: int | None
) -> None:
    launch.worker(broker, concurrency=1)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    results = client.map(tasks.sleep_for, [0.3] * 30, chunksize=chunksize)
    assert next(results) == 0.3
    results.close()

    totals = cancelled_when_idle(client, f"{TASKS}:sleep_for")
    # 15 or 30 tasks, all sent at once; a few had started, the rest never run.
    assert totals["cancelled"] >= 10
    assert totals["completed"] + totals["cancelled"] == totals["submitted"]


def test_cancelling_the_task_of_an_async_map_cancels_its_remaining_tasks(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, concurrency=1)
    wait_for_workers(launch.client(broker), 1)

    async def main() -> None:
        async with ventilator.AsyncClient(broker.frontend) as client:
            first = asyncio.Event()

            async def consume() -> None:
                items = [0.3] * 30
                async for _ in client.map(tasks.sleep_for, items, chunksize=2):
                    first.set()

            consumer = asyncio.ensure_future(consume())
            await asyncio.wait_for(first.wait(), RESULT_TIMEOUT_S)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer

    asyncio.run(main())

    totals = cancelled_when_idle(launch.client(broker), f"{TASKS}:sleep_for")
    assert totals["cancelled"] >= 10


def numbers_then_a_failure(count: int) -> Iterator[int]:
    yield from range(count)
    raise KeyError("the input broke")


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_a_map_whose_iterable_raises_yields_the_results_before_it_then_raises(
    client: ventilator.Client, two_workers: list[WorkerProcess], chunksize: int | None
) -> None:
    results: list[int] = []

    with pytest.raises(KeyError, match="the input broke"):
        for value in client.map(
            tasks.square, numbers_then_a_failure(50), chunksize=chunksize
        ):
            results.append(value)

    assert results == [i * i for i in range(50)]


def test_executor_runs_calls_by_name_through_the_broker(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    with client.executor() as executor:
        single = executor.submit(tasks.echo, b"\x00raw bytes\xff")
        mapped = list(executor.map(tasks.square, range(25), timeout=RESULT_TIMEOUT_S))

    assert single.result(RESULT_TIMEOUT_S) == b"\x00raw bytes\xff"
    assert mapped == [i * i for i in range(25)]


def test_executor_submits_past_the_window_as_results_open_it(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    # submit blocks while the window is full; the results that open it must
    # not wait on the executor's bookkeeping meanwhile (they once deadlocked).
    client = launch.client(broker, window=10)
    outcome: list[list[Any]] = []

    def run() -> None:
        with client.executor() as executor:
            outcome.append(list(executor.map(tasks.square, range(60))))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(RESULT_TIMEOUT_S)

    assert not thread.is_alive(), "the executor hung with its window full"
    assert outcome == [[i * i for i in range(60)]]


def test_concurrent_clients_never_receive_each_others_results(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    client_count, task_count = 5, 100
    start = threading.Barrier(client_count)
    received: dict[int, list[Any]] = {}

    def run(index: int) -> None:
        client = launch.client(broker)
        start.wait(RESULT_TIMEOUT_S)
        futures = [client.submit(tasks.echo, [index, i]) for i in range(task_count)]
        received[index] = [f.result(RESULT_TIMEOUT_S) for f in futures]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(client_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sorted(received) == list(range(client_count))
    for index, results in received.items():
        assert results == [[index, i] for i in range(task_count)]


def test_threads_sharing_a_client_each_get_their_own_results_one_by_one(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    # Waiting for each result leaves the client with none in flight now and
    # then: the next task is sent by its caller's thread, racing the I/O
    # thread and the other callers for the socket.
    thread_count, task_count = 4, 60
    start = threading.Barrier(thread_count)
    received: dict[int, list[Any]] = {}

    def run(index: int) -> None:
        start.wait(RESULT_TIMEOUT_S)
        received[index] = [
            client.submit(tasks.echo, [index, i]).result(RESULT_TIMEOUT_S)
            for i in range(task_count)
        ]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sorted(received) == list(range(thread_count))
    for index, results in received.items():
        assert results == [[index, i] for i in range(task_count)]


def test_cancelling_a_queued_task_removes_it_from_the_broker(
    launch: Launcher, broker: BrokerProcess
) -> None:
    client = launch.client(broker)
    future = client.submit(f"{MORE_TASKS}:cube", 2)  # no worker serves it
    status_when(
        client,
        lambda status: status["queued"].get(f"{MORE_TASKS}:cube") == 1,
        10,
        "the task to be queued",
    )

    assert future.cancel()
    status_when(client, lambda status: not status["queued"], 10, "an empty queue")
    assert future.cancelled()


# --- errors -----------------------------------------------------------------------


def test_task_exception_reaches_the_client_with_type_message_and_traceback(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    future = client.submit(tasks.fail, "gremlins")

    error = future.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.TaskRaised)
    assert error.remote_type == "ValueError"
    assert error.message == "failed on purpose: gremlins"
    assert "Traceback" in error.remote_traceback
    assert "tasks.py" in error.remote_traceback
    with pytest.raises(ventilator.TaskRaised, match="gremlins"):
        future.result()


def test_task_that_raised_does_not_stop_the_worker(
    client: ventilator.Client, two_workers: list[WorkerProcess]
) -> None:
    failures = [client.submit(tasks.fail, str(i)) for i in range(5)]
    for failure in failures:
        assert isinstance(failure.exception(RESULT_TIMEOUT_S), ventilator.TaskRaised)

    assert client.submit(tasks.square, 9).result(RESULT_TIMEOUT_S) == 81
    assert all(worker.process.poll() is None for worker in two_workers)


def test_task_that_raised_runs_again_when_given_retries(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    counter = str(tmp_path / "calls")

    future = client.submit(tasks.flaky, counter, 2, retries=2)

    assert future.result(RESULT_TIMEOUT_S) == 3


def test_task_that_keeps_raising_fails_once_its_retries_are_spent(
    client: ventilator.Client, two_workers: list[WorkerProcess], tmp_path: Path
) -> None:
    counter = tmp_path / "calls"

    future = client.submit(tasks.flaky, str(counter), 5, retries=1)

    with pytest.raises(ventilator.TaskRaised, match="failure 2 of 5"):
        future.result(RESULT_TIMEOUT_S)
    assert counter.read_text() == "2"


def test_closing_a_client_fails_its_pending_futures_with_client_closed(
    launch: Launcher, broker: BrokerProcess
) -> None:
    client = launch.client(broker)
    future = client.submit(f"{MORE_TASKS}:cube", 2)  # no worker serves it

    wait_until(lambda: client.status()["queued"], 10, "the task to be queued")
    client.close()

    error = future.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.ClientClosed)
    assert "its result waits at the broker" in str(error)
    with pytest.raises(ventilator.ClientClosed, match="closed"):
        client.submit(tasks.square, 1)


@pytest.mark.parametrize("durability", ["memory", "process"])
def test_a_client_closed_with_tasks_unfinished_says_how_long_their_results_wait(
    launch: Launcher,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    durability: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="ventilator.client")
    journal = tmp_path / "journal.db" if durability != "memory" else None
    broker = launch.broker(durability=durability, journal=journal)
    client = launch.client(broker)
    future = client.submit(f"{MORE_TASKS}:cube", 2)  # no worker serves it

    wait_until(lambda: client.status()["queued"], 10, "the task to be queued")
    client.close()

    error = str(future.exception(RESULT_TIMEOUT_S))
    said = [r.getMessage() for r in caplog.records]
    [warning] = [message for message in said if "tasks unfinished" in message]
    # Without a journal (as an embedded broker runs), only while it runs.
    ephemeral = durability == "memory"
    assert ("while it runs (it has no journal)" in error) == ephemeral, error
    assert ("lost when it stops" in warning) == ephemeral, warning
    assert ("a day by default" in warning) == (not ephemeral), warning


def test_a_submit_waiting_for_room_at_close_says_its_task_was_never_sent(
    launch: Launcher, broker: BrokerProcess
) -> None:
    client = launch.client(broker, window=1)
    client.submit(f"{MORE_TASKS}:cube", 1)  # no worker serves it: the window stays full
    errors: list[BaseException] = []

    def submit_second() -> None:
        try:
            client.submit(f"{MORE_TASKS}:cube", 2)
        except BaseException as exc:
            errors.append(exc)

    waiting = threading.Thread(target=submit_second)
    waiting.start()
    wait_until(lambda: client._handover.waiting_for_room, 10, "the submit to wait")
    client.close()
    waiting.join(RESULT_TIMEOUT_S)

    [error] = errors
    assert isinstance(error, ventilator.ClientClosed)
    assert "never sent" in str(error)


def test_closing_a_client_no_broker_answered_says_its_tasks_were_never_sent() -> None:
    client = ventilator.Client(f"tcp://127.0.0.1:{free_port()}")  # nobody there
    future = client.submit(tasks.square, 2)

    client.close(timeout_s=0.1)

    error = future.exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.ClientClosed)
    assert "never sent to the broker" in str(error)


def test_a_client_dropped_without_close_leaves_the_broker_and_stops_its_thread(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    observer = launch.client(broker)
    dropped = ventilator.Client(broker.frontend)
    assert dropped.submit(tasks.square, 3).result(RESULT_TIMEOUT_S) == 9
    session, thread = dropped.session, dropped._io.thread

    del dropped
    gc.collect()

    thread.join(RESULT_TIMEOUT_S)
    assert not thread.is_alive()
    status_when(
        observer,
        lambda status: all(c["name"] != session for c in status["clients"]),
        RESULT_TIMEOUT_S,
        "the broker to forget the dropped client's session",
    )


def run_program(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `program` in a fresh interpreter, in a process group of its own that
    is killed on the way out: a child it forked must not outlive a failure."""
    process = subprocess.Popen(
        [sys.executable, "-c", program, *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RESULT_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# A program that submits and ends without close(), as a script often does.
SUBMIT_AND_EXIT_PROGRAM = f"""
import sys, ventilator
from {TASKS} import square
client = ventilator.Client(sys.argv[1])
for x in range(int(sys.argv[2])):
    client.submit(square, x, sink="after-exit")
"""

TASKS_SUBMITTED_BEFORE_EXIT = 500


def test_tasks_a_program_submitted_before_ending_without_close_reach_the_broker(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # Before, the program's end took the client's I/O thread with whatever it
    # had not sent yet: a fire-and-forget script lost its tasks in silence.
    ended = run_program(
        SUBMIT_AND_EXIT_PROGRAM, broker.frontend, str(TASKS_SUBMITTED_BEFORE_EXIT)
    )
    assert ended.returncode == 0, ended.stderr

    status = launch.client(broker).status()
    assert status["totals"]["submitted"] == TASKS_SUBMITTED_BEFORE_EXIT


def test_a_program_that_ends_before_the_broker_accepts_its_tasks_says_so() -> None:
    # Nobody listens there: the program waits for the broker as close() does,
    # then warns that its tasks were never sent, rather than nothing.
    ended = run_program(
        "import ventilator._open_clients as c; c.EXIT_CLOSE_TIMEOUT_S = 0.5\n"
        + SUBMIT_AND_EXIT_PROGRAM,
        f"tcp://127.0.0.1:{free_port()}",
        "3",
    )

    assert ended.returncode == 0
    assert "never sent" in ended.stderr and "unsent=3" in ended.stderr


def test_a_program_that_never_reached_a_broker_does_not_wait_long_at_its_end() -> None:
    # Ctrl-C on a script facing no broker, then the full wait at exit for a
    # broker that never answered (a second Ctrl-C did not cut it short). A
    # client that never heard one waits as long as it takes to call it silent:
    # here 0.3 s, against an exit wait of a minute, past this test's deadline.
    ended = run_program(
        "import ventilator._open_clients as c; c.EXIT_CLOSE_TIMEOUT_S = 60\n"
        "import sys, ventilator\n"
        "client = ventilator.Client(sys.argv[1], heartbeat_interval_s=0.1)\n"
        f"client.submit('{TASKS}:square', 2)\n",
        f"tcp://127.0.0.1:{free_port()}",
    )

    assert ended.returncode == 0
    assert "unsent=1" in ended.stderr


# A program that stops its broker's answers from counting: it submits while the
# broker is stopped, so that its end waits for the broker to accept them.
WAIT_AT_EXIT_PROGRAM = f"""
import logging, sys, ventilator
from {TASKS} import square
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
client = ventilator.Client(sys.argv[1])
assert client.submit(square, 3).result(20) == 9
print("heard the broker", flush=True)
sys.stdin.readline()
for x in range(50):
    client.submit(square, x)
"""


def test_ctrl_c_while_a_program_waits_at_its_end_stops_the_wait_and_says_so(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # Before, a Ctrl-C during the exit wait broke off with a traceback from
    # an atexit hook, and nothing said that 50 tasks were not accepted.
    launch.worker(broker)
    program = subprocess.Popen(
        [sys.executable, "-c", WAIT_AT_EXIT_PROGRAM, broker.frontend],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        read_line_containing(program, b"heard the broker", RESULT_TIMEOUT_S)
        with paused(broker.pid):
            assert program.stdin is not None
            program.stdin.write(b"\n")
            program.stdin.flush()
            read_line_containing(program, b"ends with a Client open", RESULT_TIMEOUT_S)

            program.send_signal(signal.SIGINT)
            # Well before the exit wait of 10 s would have ended on its own.
            said, _ = program.communicate(timeout=EXIT_CLOSE_TIMEOUT_S / 2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(program.pid, signal.SIGKILL)
        program.wait()

    assert b"Traceback" not in said, said
    # Sent to a broker that stood still: it may take them once it goes on,
    # so they are not said to be lost (they were, to a tester whose
    # restarted broker then ran one).
    assert b"unconfirmed=50" in said, said
    assert b"never queued" not in said, said


def read_line_containing(
    process: subprocess.Popen[bytes], text: bytes, timeout_s: float
) -> bytes:
    """Read `process`'s stdout up to the first line holding `text`, under a
    deadline; a byte at a time, so nothing after it is consumed."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not (line.endswith(b"\n") and text in line):
            if line.endswith(b"\n"):
                line = b""
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not selector.select(remaining_s):
                raise AssertionError(f"no line with {text!r} within {timeout_s:g}s")
            byte = os.read(fd, 1)
            if not byte:
                raise AssertionError(f"the program ended before a line with {text!r}")
            line += byte
    return line


# A program whose forked child uses the client its parent made.
FORKED_CHILD_PROGRAM = f"""
import os, sys, ventilator
from {TASKS} import square
client = ventilator.Client(sys.argv[1])
assert client.submit(square, 3).result(20) == 9
child = os.fork()
if child == 0:
    try:
        client.submit(square, 4)
    except ventilator.UsageError as error:
        print(error, flush=True)
        os._exit(0)
    os._exit(1)
os.waitpid(child, 0)
print(client.submit(square, 5).result(20), flush=True)
client.close()
"""


def test_a_forked_child_using_its_parents_client_is_told_to_make_its_own(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    # Before, the child's submit() spun at 100 % CPU for ever: the client's
    # I/O thread does not survive fork().
    ended = run_program(FORKED_CHILD_PROGRAM, broker.frontend)

    refusal, parents_result = ended.stdout.splitlines()
    assert "fork" in refusal and "new Client" in refusal
    assert parents_result == "25"


def test_a_map_read_after_its_client_closed_raises_client_closed(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # What a thread reading a map meets when another closes the client
    # between two of its submissions: the same error as its other futures.
    client = launch.client(broker)
    client.close()

    with pytest.raises(ventilator.ClientClosed):
        next(client.map(tasks.square, range(10)))


# --- pickled callables ------------------------------------------------------------


def test_lambda_without_allow_pickle_raises_pickle_not_allowed(
    client: ventilator.Client,
) -> None:
    with pytest.raises(ventilator.PickleNotAllowed, match="allow_pickle"):
        client.submit(lambda x: x, 1)


def test_a_function_of_main_is_refused_saying_workers_cannot_import_it(
    client: ventilator.Client,
) -> None:
    # As a script or the REPL defines it: its module is __main__.
    script: dict[str, Any] = {"__name__": "__main__"}
    exec("def double(x):\n    return 2 * x\n", script)

    with pytest.raises(ventilator.PickleNotAllowed) as refused:
        client.submit(script["double"], 1)

    message = str(refused.value)
    assert "__main__" in message and "cannot import" in message
    assert "module" in message and "allow_pickle=True" in message
    assert "--allow-pickle" in message


def test_partial_without_allow_pickle_raises_pickle_not_allowed(
    client: ventilator.Client,
) -> None:
    with pytest.raises(ventilator.PickleNotAllowed):
        client.submit(functools.partial(tasks.square, 3))


def test_lambda_runs_when_client_and_worker_allow_pickle(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    launch.worker(broker, allow_pickle=True)
    client = launch.client(broker, allow_pickle=True)
    wait_for_workers(client, 1)
    tripwire = tmp_path / "unpickled"

    future = client.submit(lambda wire, x: x + 1, Tripwire(tripwire), 41)

    assert future.result(RESULT_TIMEOUT_S) == 42
    assert tripwire.exists()  # the tripwire works: the worker did unpickle


def test_map_of_a_lambda_runs_in_pickled_batches(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, allow_pickle=True)
    client = launch.client(broker, allow_pickle=True)
    wait_for_workers(client, 1)
    offset = 3

    results = list(client.map(lambda x: x + offset, range(500)))

    assert results == [x + offset for x in range(500)]


def test_pickled_task_fails_clearly_when_the_worker_does_not_allow_pickle(
    launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    launch.worker(broker)
    client = launch.client(broker, allow_pickle=True)
    wait_for_workers(client, 1)
    tripwire = tmp_path / "unpickled"

    future = client.submit(lambda wire: "ran", Tripwire(tripwire))

    error = future.exception(5)
    assert isinstance(error, ventilator.TaskError)
    assert "pickle" in str(error).lower()
    assert not tripwire.exists()


# --- size limits ------------------------------------------------------------------


@pytest.fixture
def small_broker(launch: Launcher) -> BrokerProcess:
    """A broker that refuses payloads over 1000 bytes, with one worker."""
    broker = launch.broker("--max-payload-bytes", "1000")
    launch.worker(broker, pool="thread")
    return broker


def test_oversized_payload_is_refused_naming_the_limit(
    launch: Launcher, small_broker: BrokerProcess
) -> None:
    client = launch.client(small_broker)
    wait_for_workers(client, 1)  # by now the client knows the broker's limits

    with pytest.raises(ventilator.TaskRejected, match="limit of 1000 bytes"):
        client.submit(tasks.echo, b"x" * 2000)
    assert client.submit(tasks.echo, b"x" * 500).result(RESULT_TIMEOUT_S) == b"x" * 500


def submit_and_wait(
    client: ventilator.Client, *call: Any, timeout_s: float = 10
) -> BaseException | None:
    """The error of one task, whether `submit` raised it or its future did."""
    try:
        return client.submit(*call).exception(timeout_s)
    except ventilator.VentilatorError as error:
        return error


def test_oversized_payload_submitted_at_once_is_refused_naming_the_limit(
    launch: Launcher, small_broker: BrokerProcess
) -> None:
    # Submitted before the broker's WELCOME can arrive: the broker refuses it.
    client = launch.client(small_broker)

    error = submit_and_wait(client, tasks.echo, b"x" * 2000)

    assert isinstance(error, ventilator.TaskRejected)
    assert "limit of 1000 bytes" in str(error)


def test_much_larger_payload_submitted_at_once_is_refused_naming_the_limit(
    launch: Launcher, small_broker: BrokerProcess
) -> None:
    client = launch.client(small_broker)

    error = submit_and_wait(client, tasks.echo, b"x" * 200_000, timeout_s=5)

    assert isinstance(error, ventilator.TaskRejected)
    assert "limit of 1000 bytes" in str(error)


def test_oversized_result_fails_naming_the_limit(
    launch: Launcher, small_broker: BrokerProcess
) -> None:
    client = launch.client(small_broker)
    wait_for_workers(client, 1)

    error = client.submit(tasks.make_bytes, 200_000).exception(RESULT_TIMEOUT_S)

    assert isinstance(error, ventilator.TaskError)
    assert "max_payload_bytes" in str(error)


def test_task_and_result_of_exactly_the_limit_pass_one_byte_more_does_not(
    launch: Launcher, small_broker: BrokerProcess
) -> None:
    client = launch.client(small_broker)
    wait_for_workers(client, 1)
    # Sizes on the wire: the packed call, and the packed result.
    at_limit = b"x" * (1000 - (len(pack_call((b"x" * 500,), {})) - 500))
    result_size = 1000 - (len(pack_value(b"r" * 500)) - 500)
    assert len(pack_call((at_limit,), {})) == 1000
    assert len(pack_value(b"r" * result_size)) == 1000

    assert client.submit(tasks.echo, at_limit).result(RESULT_TIMEOUT_S) == at_limit
    with pytest.raises(ventilator.TaskRejected, match="limit of 1000 bytes"):
        client.submit(tasks.echo, at_limit + b"x")
    made = client.submit(tasks.make_bytes, result_size).result(RESULT_TIMEOUT_S)
    assert len(made) == result_size
    error = client.submit(tasks.make_bytes, result_size + 1).exception(RESULT_TIMEOUT_S)
    assert isinstance(error, ventilator.TaskRejected)
    assert "limit of 1000 bytes" in str(error)


def test_long_tasks_are_not_hoarded_by_a_worker_whose_credit_grew_on_tiny_ones(
    launch: Launcher, broker: BrokerProcess
) -> None:
    veteran = launch.worker(broker, concurrency=2)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    list(client.map(tasks.square, range(3000), chunksize=1))
    status_when(
        client,
        lambda s: (veteran.entry(s) or {}).get("capacity", 0) >= 8,
        10,
        "the veteran's credit grown on tiny tasks",
    )
    newcomer = launch.worker(broker, concurrency=2)
    wait_for_workers(client, 2)
    # Its task processes import their modules after it registered: on a busy
    # machine that takes longer than a task here, and the veteran would then
    # rightly take the tasks that wait.
    wait_for_task_processes(client, newcomer.pid, 2)

    places = [client.submit(tasks.whereabouts, 1.0) for _ in range(8)]
    parents = [f.result(RESULT_TIMEOUT_S)[1] for f in places]

    # One per slot each, then whoever frees a slot: 4 and 4, not 6 and 2.
    assert parents.count(newcomer.pid) >= 3, parents


def wait_for_task_processes(client: ventilator.Client, worker: int, count: int) -> None:
    """Run quick tasks until `count` task processes of process `worker` ran one."""
    seen: set[int] = set()

    def all_answered() -> bool:
        pids = [
            f.result(RESULT_TIMEOUT_S)
            for f in [client.submit(tasks.pid) for _ in range(8)]
        ]
        seen.update(pid for pid in pids if parent_of(pid) == worker)
        return len(seen) >= count

    wait_until(all_answered, RESULT_TIMEOUT_S, f"{count} task processes of {worker}")


def parent_of(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


@pytest.mark.parametrize(
    "call",
    [(tasks.slow_echo, 0.01), (tasks.echo,)],
    ids=["on the same function", "on another function"],
)
def test_a_flooding_client_does_not_hold_up_another(
    launch: Launcher, broker: BrokerProcess, call: tuple[Any, ...]
) -> None:
    function, *arguments = call
    launch.worker(broker, concurrency=1, pool="thread")
    flood = launch.client(broker)
    wait_for_workers(flood, 1)
    backlog = [flood.submit(tasks.slow_echo, i, 0.01) for i in range(400)]
    status_when(flood, lambda s: sum(s["queued"].values()) > 300, 10, "a backlog")

    other = launch.client(broker)
    mine = [other.submit(function, i, *arguments) for i in range(10)]

    assert [f.result(RESULT_TIMEOUT_S) for f in mine] == list(range(10))
    # Clients take turns at a function, and functions at the workers'
    # credit: the flood's backlog is still mostly waiting.
    assert sum(f.done() for f in backlog) < 200
    assert [f.result(RESULT_TIMEOUT_S) for f in backlog] == list(range(400))


def test_burst_beyond_the_client_window_is_slowed_down_not_refused(
    launch: Launcher,
) -> None:
    broker = launch.broker("--client-window", "5")
    launch.worker(broker, concurrency=2, pool="thread")
    wait_for_workers(launch.client(broker), 1)
    client = launch.client(broker)

    futures = [client.submit(tasks.square, i) for i in range(20)]

    errors = [f.exception(RESULT_TIMEOUT_S) for f in futures]
    assert errors == [None] * 20
    assert [f.result() for f in futures] == [i * i for i in range(20)]


# --- functions nobody serves yet --------------------------------------------------


def test_task_for_an_unserved_function_waits_until_a_worker_serving_it_joins(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, TASKS)
    client = launch.client(broker)
    wait_for_workers(client, 1)

    future = client.submit(f"{MORE_TASKS}:cube", 3)
    status = status_when(
        client,
        lambda status: status["queued"].get(f"{MORE_TASKS}:cube") == 1,
        10,
        "the task to show as queued",
    )
    assert [w["running"] for w in status["workers"]] == [0]
    assert not future.done()

    launch.worker(broker, MORE_TASKS)
    assert future.result(RESULT_TIMEOUT_S) == 27
    assert client.status()["queued"] == {}


def test_names_no_client_of_ours_sends_are_refused_from_a_raw_socket(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    context: zmq.Context[Any] = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(broker.frontend)
        _wire.send(raw, p.Hello("raw-session"))
        bad = [p.TaskSpec(1, "nocolon", b"\x92\x90\x80")]
        bad.append(p.TaskSpec(2, "mmi.service", b"\x92\x90\x80"))
        _wire.send(raw, p.Submit(bad))
        refusals = raw_results(raw, count=2)
    finally:
        raw.close()
        context.term()

    assert sorted(refusals) == [1, 2]
    assert all(entry.status is p.Status.REJECTED for entry in refusals.values())
    assert "'module:function'" in unpack_value(refusals[2].payload)["message"]
    client = launch.client(broker)
    assert client.submit(tasks.square, 5).result(RESULT_TIMEOUT_S) == 25
    assert client.status()["queued"] == {}


def test_the_refusals_of_a_raw_submit_past_its_window_come_in_one_message(
    launch: Launcher,
) -> None:
    # Before, each refused task came in a RESULTS message of its own.
    broker = launch.broker("--client-window", "10")
    context: zmq.Context[Any] = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    call = pack_call((3,), {})
    square = f"{TASKS}:square"
    try:
        raw.connect(broker.frontend)
        _wire.send(raw, p.Hello("raw-session"))
        # A window's worth accepted, and one waiting for room: the room to
        # wait in is full, and the next two SUBMITs are refused.
        for first in range(0, 40, 10):
            tasks_sent = [p.TaskSpec(i, square, call) for i in range(first, first + 10)]
            _wire.send(raw, p.Submit(tasks_sent))
        messages = raw_result_messages(raw, count=20)
    finally:
        raw.close()
        context.term()

    told = [[entry.task_id for entry in message.results] for message in messages]
    assert told == [list(range(20, 30)), list(range(30, 40))]
    entries = [entry for message in messages for entry in message.results]
    assert {entry.status for entry in entries} == {p.Status.REJECTED}
    assert "wait at the broker for room" in unpack_value(entries[0].payload)["message"]


def raw_result_messages(socket: zmq.Socket[bytes], count: int) -> list[p.Results]:
    """The RESULTS messages `socket` receives until they carried `count`
    results."""
    messages: list[p.Results] = []

    def more() -> bool:
        if socket.poll(100):
            for command in _wire.receive(socket, p.TO_CLIENT):
                if isinstance(command, p.Results):
                    messages.append(command)
        return sum(len(m.results) for m in messages) >= count

    wait_until(more, RESULT_TIMEOUT_S, f"{count} results on a raw socket")
    return messages


def raw_results(socket: zmq.Socket[bytes], count: int) -> dict[int, p.ResultEntry]:
    """The first `count` results `socket` receives, by task id."""
    entries: dict[int, p.ResultEntry] = {}

    def more() -> bool:
        if socket.poll(100):
            for command in _wire.receive(socket, p.TO_CLIENT):
                if isinstance(command, p.Results):
                    entries.update((e.task_id, e) for e in command.results)
        return len(entries) >= count

    wait_until(more, RESULT_TIMEOUT_S, f"{count} results on a raw socket")
    return entries


# --- asyncio ----------------------------------------------------------------------


def test_async_client_submit_returns_the_result(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    async def main() -> Any:
        async with ventilator.AsyncClient(broker.frontend) as client:
            return await client.submit(tasks.square, 12)

    assert asyncio.run(main()) == 144


def test_async_client_gathers_many_results_in_order(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    async def main() -> list[Any]:
        async with ventilator.AsyncClient(broker.frontend) as client:
            calls = (client.submit(tasks.square, i) for i in range(60))
            return await asyncio.wait_for(asyncio.gather(*calls), RESULT_TIMEOUT_S)

    assert asyncio.run(main()) == [i * i for i in range(60)]


def test_async_client_raises_the_task_error(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    async def main() -> Any:
        async with ventilator.AsyncClient(broker.frontend) as client:
            return await asyncio.wait_for(
                client.submit(tasks.fail, "async"), RESULT_TIMEOUT_S
            )

    with pytest.raises(ventilator.TaskRaised, match="failed on purpose: async"):
        asyncio.run(main())


def test_async_client_map_yields_results_in_order(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    async def main() -> list[Any]:
        async with ventilator.AsyncClient(broker.frontend) as client:
            return [value async for value in client.map(tasks.square, range(40))]

    assert asyncio.run(main()) == [i * i for i in range(40)]


def test_async_client_map_with_per_item_options_still_batches(
    broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    async def main() -> tuple[list[Any], dict[str, Any]]:
        async with ventilator.AsyncClient(broker.frontend) as client:
            values = [
                value
                async for value in client.map(
                    tasks.square, range(200), chunksize=50, timeout_s=30, retries=1
                )
            ]
            return values, await client.status()

    values, status = asyncio.run(main())

    assert values == [i * i for i in range(200)]
    assert status["totals"]["submitted"] <= 8  # 4 batches of 50, not 200 tasks


# --- the embedded cluster ---------------------------------------------------------


def test_local_cluster_runs_tasks_and_leaves_no_process_behind() -> None:
    before = {process.pid for process in descendants(os.getpid())}
    started = []
    try:
        with ventilator.local(workers=2, modules=[TASKS]) as cluster:
            with ventilator.Client(cluster.address) as client:
                futures = [client.submit(tasks.whereabouts, 0.2) for _ in range(4)]
                ran_in = {f.result(RESULT_TIMEOUT_S)[0] for f in futures}
            started = [p for p in descendants(os.getpid()) if p.pid not in before]
            # A broker, a worker and its two task processes at least.
            assert len(started) >= 4
            assert ran_in <= {process.pid for process in started}

        wait_until(
            lambda: not any(process.alive() for process in started),
            5,
            "every process of the embedded cluster to end",
        )
    finally:
        stop_process_ids(started)


def test_a_local_cluster_entered_by_hand_runs_until_it_is_stopped() -> None:
    # Entered without a `with` block, and nothing kept but what it returned:
    # a collection of garbage must not stop the cluster under its user.
    cluster = ventilator.local(workers=1, modules=[TASKS]).__enter__()
    try:
        gc.collect()

        assert set(cluster.pids) == {"broker", "worker"}
        assert cluster.exited() is None
        with ventilator.Client(cluster.address) as client:
            assert client.submit(tasks.square, 3).result(RESULT_TIMEOUT_S) == 9
    finally:
        cluster.__exit__(None, None, None)
    assert cluster.pids == {}


def test_local_with_a_module_that_does_not_import_raises_saying_why() -> None:
    with (
        pytest.raises(ventilator.UsageError, match="on purpose"),
        ventilator.local(workers=1, modules=["tests.e2e.unimportable_tasks"]),
    ):
        pass


# A program that starts an embedded cluster, says so, and waits to be killed.
EMBEDDING_PROGRAM = f"""
import sys, ventilator
with ventilator.local(workers=1, modules=["{TASKS}"]):
    print("started", flush=True)
    sys.stdin.read()
"""


def test_embedded_cluster_stops_when_its_program_is_killed_outright() -> None:
    program = subprocess.Popen(
        [sys.executable, "-c", EMBEDDING_PROGRAM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    started: list[ProcessId] = []
    try:
        assert program.stdout is not None
        assert program.stdout.readline() == b"started\n"
        started = descendants(program.pid)
        assert len(started) >= 3  # a broker, a worker and its task process

        program.kill()  # SIGKILL: no `with` block runs, no stop() is called
        program.wait(RESULT_TIMEOUT_S)

        wait_until(
            lambda: not any(process.alive() for process in started),
            10,
            "the orphaned broker and worker to stop",
        )
    finally:
        stop_process_ids(started)
        if program.stdin is not None:
            program.stdin.close()
        if program.stdout is not None:
            program.stdout.close()


def test_payloads_larger_than_a_socket_buffer_pass_through_the_process_pool() -> None:
    # A regression: with two batches in a child's pipe, the worker wrote a large
    # task while the child wrote a large result, and each waited for the other.
    payload = b"x" * 256 * 1024
    with (
        ventilator.local(workers=2, modules=[TASKS]) as cluster,
        ventilator.Client(cluster.address) as client,
    ):
        echoed = list(client.map(f"{TASKS}:echo", [payload] * 100))

    assert echoed == [payload] * 100


def test_submit_nowait_declines_instead_of_waiting_when_the_window_is_full(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    client = launch.client(broker, window=1)
    first = client.submit_nowait(tasks.sleep_for, 0.5)

    second = client.submit_nowait(tasks.sleep_for, 0.0)

    assert first is not None and second is None
    assert first.result(RESULT_TIMEOUT_S) == 0.5
    wait_until(lambda: client.submit_nowait(tasks.echo, 1) is not None, 5, "room")


def test_one_task_at_a_time_through_a_window_of_one(
    launch: Launcher, broker: BrokerProcess, two_workers: list[WorkerProcess]
) -> None:
    # A lone task leaves its client's acknowledgements behind, except when
    # it fits the window only once they are sent: here, every time. Should
    # they stay behind, `submit` waits for room for ever: it runs in a thread
    # the test gives up on at a deadline (closing the client wakes it).
    client = launch.client(broker, window=1)
    results: list[int] = []
    failures: list[BaseException] = []

    def one_at_a_time() -> None:
        try:
            for i in range(ONE_AT_A_TIME):
                results.append(client.submit(tasks.echo, i).result(RESULT_TIMEOUT_S))
        except BaseException as exc:  # reported by the test's own thread
            failures.append(exc)

    submitter = threading.Thread(target=one_at_a_time, daemon=True)
    submitter.start()
    submitter.join(ONE_AT_A_TIME_DEADLINE_S)

    assert not submitter.is_alive(), (
        f"after {ONE_AT_A_TIME_DEADLINE_S:g}s, {len(results)} of {ONE_AT_A_TIME} "
        "tasks done and the next submit still waits for room in a window of one, "
        "which the last result (and the acknowledgement it owes) should have freed"
    )
    assert not failures, f"task {len(results)} failed: {failures[0]!r}"
    assert results == list(range(ONE_AT_A_TIME))


def test_submissions_wait_for_room_under_the_brokers_byte_limit(
    launch: Launcher,
) -> None:
    # Thirty 10 kB tasks against a limit of 100 kB per client: the client must
    # hold back what does not fit, not have the broker refuse it.
    broker = launch.broker("--client-max-bytes", "100000")
    launch.worker(broker)
    client = launch.client(broker)
    blob = b"x" * 10_000

    futures = [client.submit(tasks.slow_echo, blob, 0.01) for _ in range(30)]
    mapped = list(client.map(tasks.echo, [blob] * 30, chunksize=1))

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [blob] * 30
    assert mapped == [blob] * 30


def test_a_client_keeps_its_window_bytes_in_the_broker_and_the_rest_at_home(
    launch: Launcher, broker: BrokerProcess
) -> None:
    # Twenty tasks of 10 kB against window_bytes of 50 kB, and no worker yet:
    # the sixteen any window lets through reach the broker, and no more.
    client = launch.client(broker, window_bytes=50_000)
    blob = b"x" * 10_000
    futures = [client.submit(tasks.echo, blob) for _ in range(20)]
    queue = f"{TASKS}:echo"

    status = status_when(
        client, lambda status: queue in status["queued"], 10, "tasks in the queue"
    )
    assert status["queued"][queue] <= WINDOW_BYTES_MIN_TASKS
    status_when(
        client,
        lambda status: status["queued"].get(queue) == WINDOW_BYTES_MIN_TASKS,
        10,
        "the tasks any window lets through",
    )

    launch.worker(broker)
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [blob] * 20


def test_tasks_larger_than_window_bytes_still_keep_workers_busy_side_by_side(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, concurrency=2)
    client = launch.client(broker, window_bytes=50_000)
    wait_for_workers(client, 1)
    blob = b"x" * 60_000

    futures = [client.submit(tasks.slow_echo, blob, 1.0) for _ in range(2)]

    status_when(
        client,
        lambda status: sum(status["running"].values()) == 2,
        RESULT_TIMEOUT_S,
        "both large tasks to run at once",
    )
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [blob] * 2


def test_a_client_beats_at_the_brokers_interval_from_its_welcome_on(
    launch: Launcher,
) -> None:
    # A client of 10 s beats to a broker that takes 0.6 s of silence for gone:
    # it must adopt the broker's interval at once, not after its first beat.
    broker = launch.broker(heartbeat_interval_s=0.2)
    slow = launch.client(broker.frontend, heartbeat_interval_s=10.0)
    slow.status()
    observer = launch.client(broker)

    def slow_seen_gone() -> bool:
        clients = observer.status()["clients"]
        return any(c["name"] == slow.session and not c["connected"] for c in clients)

    deadline = time.monotonic() + 3.0  # five times the broker's patience
    while time.monotonic() < deadline:
        assert not slow_seen_gone(), "the broker took the silent client for gone"
        # Paced as `wait_until` polls: asked as fast as it can, status passes
        # the broker's quota of questions per connection.
        time.sleep(0.02)


def test_window_bytes_below_one_is_refused_at_once() -> None:
    with pytest.raises(ventilator.UsageError, match="window_bytes must be at least 1"):
        ventilator.Client(f"tcp://127.0.0.1:{free_port()}", window_bytes=0)


def test_client_with_a_malformed_address_is_refused_at_once() -> None:
    with pytest.raises(ventilator.UsageError, match="'broker:5555' is not an address"):
        ventilator.Client("broker:5555")


@pytest.mark.parametrize("session", ["x" * 300, 42])
def test_client_with_a_session_the_broker_would_refuse_is_refused_at_once(
    session: Any,
) -> None:
    with pytest.raises(ventilator.UsageError, match="session must be"):
        ventilator.Client(f"tcp://127.0.0.1:{free_port()}", session=session)


def test_a_plain_name_under_the_pickled_prefix_is_refused_at_submit(
    client: ventilator.Client,
) -> None:
    with pytest.raises(ventilator.UsageError, match="reserved for pickled callables"):
        client.submit("pickled:x", 1)


@pytest.mark.parametrize(("named", "level"), [(False, "WARNING"), (True, "INFO")])
def test_closing_with_tasks_unfinished_says_where_their_results_wait(
    launch: Launcher,
    broker: BrokerProcess,
    caplog: pytest.LogCaptureFixture,
    named: bool,
    level: str,
) -> None:
    # Tester 24 left `with Client(...)` blocks with futures pending, as a
    # ProcessPoolExecutor's block would wait for them: the broker kept 46,118
    # results for seven sessions nobody would come back to, and nothing said
    # so. A session of its own (generated) is a WARNING; a named one, kept on
    # purpose to collect later, is news at INFO.
    caplog.set_level(logging.INFO, logger="ventilator.client")
    session = "kept-on-purpose" if named else None
    client = launch.client(broker, session=session)
    futures = [client.submit(f"{MORE_TASKS}:cube", i) for i in range(3)]
    status_when(client, lambda s: sum(s["queued"].values()) == 3, 10, "3 queued")

    client.close()

    assert all(isinstance(f.exception(), ventilator.ClientClosed) for f in futures)
    [line] = [r for r in caplog.records if "unfinished=3" in r.getMessage()]
    assert line.levelname == level
    assert f"session={client.session}" in line.getMessage()

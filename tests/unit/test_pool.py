"""The process pool with real child processes, driven as the worker's loop does."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.e2e import tasks
from tests.e2e.broken_child_tasks import BREAK_CHILDREN
from tests.e2e.conftest import wait_until
from tests.leftovers import pid_file
from ventilator import protocol as p
from ventilator.policy import Backoff
from ventilator.pool import HELD_UP_S, ProcessPool, ThreadPool
from ventilator.serialization import BatchPacker, pack_call, unpack_value

TASKS = "tests.e2e.tasks"
PROCESS_TASKS = "tests.e2e.process_tasks"
BROKEN = "tests.e2e.broken_child_tasks"
DEADLINE_S = 60.0


def run_all(pool: ProcessPool | ThreadPool, count: int) -> list[p.Outcome]:
    """Collect outcomes as the worker does: wait for readable or writable pipes."""
    outcomes: list[p.Outcome] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(outcomes) < count:
        assert time.monotonic() < deadline, f"{len(outcomes)} of {count} came back"
        readable, _, _ = select.select(pool.fds(), pool.write_fds(), [], 1.0)
        outcomes += pool.collect(time.monotonic(), set(readable))
    return outcomes


def test_large_tasks_and_large_results_cross_pipelined_children() -> None:
    # Each child holds two batches while it writes results as large as the
    # tasks: a worker that blocked writing to a child would wait for ever.
    blob = bytes(range(256)) * 1200  # about 300 KiB, above a socket buffer
    pool = ProcessPool(2, [TASKS], allow_pickle=False)
    try:
        for ticket in range(1, 41):
            call = pack_call((blob,), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:echo", call), 0.0)

        outcomes = run_all(pool, 40)
    finally:
        pool.close()

    assert sorted(o.ticket for o in outcomes) == list(range(1, 41))
    assert all(o.status is p.Status.OK for o in outcomes)
    assert all(unpack_value(o.payload) == blob for o in outcomes)


def test_pool_reports_a_crash_and_runs_what_was_queued_behind_it() -> None:
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        pool.submit(p.Assignment(1, 1, f"{TASKS}:crash", pack_call((3,), {})), 0.0)
        for ticket in range(2, 6):
            call = pack_call((ticket,), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:square", call), 0.0)

        outcomes = {o.ticket: o for o in run_all(pool, 5)}
    finally:
        pool.close()

    assert outcomes[1].status is p.Status.CRASHED
    assert [unpack_value(outcomes[t].payload) for t in range(2, 6)] == [4, 9, 16, 25]


def map_batch(ticket: int, xs: list[int], runs: Path) -> p.Assignment:
    """A batch of `map` calling `crash_on_negative_counted`, which counts in
    the file `runs` the processes a negative x killed."""
    packer = BatchPacker()
    payload = packer.batch([packer.item([x, str(runs)]) for x in xs])
    function = f"{TASKS}:crash_on_negative_counted"
    return p.Assignment(ticket, 1, function, payload, p.Flags.BATCH)


def test_only_the_map_batch_that_killed_its_batchs_child_is_reported_crashed(
    tmp_path: Path,
) -> None:
    # The broker fails a map's batch at its first death, and its map runs the
    # items alone with that death counted. The map batches it shared a child's
    # batch with did not kill it: they run again, and their items only once
    # more (the first run's outcomes died with the child).
    runs = tmp_path / "runs"
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        pool.submit(map_batch(1, [1, 2], runs), 0.0)  # times the function
        assert run_all(pool, 1)[0].status is p.Status.OK
        for ticket, xs in [(2, [3, 4]), (3, [5, -1, 6]), (4, [7])]:
            pool.submit(map_batch(ticket, xs, runs), 0.0)

        outcomes = run_all(pool, 3)
    finally:
        pool.close()

    assert {o.ticket: o.status for o in outcomes} == {
        2: p.Status.OK,
        3: p.Status.CRASHED,
        4: p.Status.OK,
    }
    assert runs.read_text().count("ran") == 1


def test_a_plain_task_that_kills_its_batchs_child_is_blamed_at_its_first_death(
    tmp_path: Path,
) -> None:
    # Squares teach the pool that the function is quick, so the next five
    # travel in one batch. The one that kills its child is reported at once,
    # having run once; the others run again, unblamed.
    runs = tmp_path / "runs"
    function = f"{TASKS}:crash_on_negative_counted"
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        for ticket in range(1, 11):
            call = pack_call(([ticket, str(runs)],), {})
            pool.submit(p.Assignment(ticket, 1, function, call), 0.0)
        run_all(pool, 10)
        for ticket, x in zip(range(11, 16), [1, 2, -1, 3, 4], strict=True):
            call = pack_call(([x, str(runs)],), {})
            pool.submit(p.Assignment(ticket, 1, function, call), 0.0)

        outcomes = {o.ticket: o for o in run_all(pool, 5)}
    finally:
        pool.close()

    assert outcomes.pop(13).status is p.Status.CRASHED
    assert [unpack_value(o.payload) for o in outcomes.values()] == [1, 4, 9, 16]
    assert runs.read_text().count("ran") == 1


def children_of_this_process() -> set[int]:
    pid = os.getpid()
    return {
        int(child)
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    }


def test_a_child_killed_while_idle_is_replaced_and_nothing_is_blamed() -> None:
    before = children_of_this_process()
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        (idle_child,) = children_of_this_process() - before
        os.kill(idle_child, signal.SIGKILL)
        # Its pipe reads end-of-file at once: no task, so no outcome to report.
        readable, _, _ = select.select(pool.fds(), [], [], DEADLINE_S)
        blamed = pool.collect(time.monotonic(), set(readable))
        pool.submit(p.Assignment(1, 1, f"{TASKS}:square", pack_call((7,), {})), 0.0)

        outcomes = run_all(pool, 1)
    finally:
        pool.close()

    assert readable and blamed == []
    assert outcomes[0].status is p.Status.OK
    assert unpack_value(outcomes[0].payload) == 49


def test_thread_pool_caps_stuck_threads_and_takes_slots_back_when_they_return() -> None:
    # One slot, at most one stuck thread: the first hung task gets a fresh
    # thread in its slot, the second keeps the slot, and the square behind it
    # waits until the hung tasks are let go.
    pool = ThreadPool(1, [TASKS], allow_pickle=False, max_stuck=1)
    tasks.RELEASE_HANGS.clear()
    try:
        for ticket in (1, 2):
            hang = p.Assignment(ticket, 1, f"{TASKS}:hang", pack_call((), {}), 0, 0.05)
            pool.submit(hang, time.monotonic())
        pool.submit(
            p.Assignment(3, 1, f"{TASKS}:square", pack_call((4,), {})),
            time.monotonic(),
        )
        timed_out = run_all(pool, 2)
        assert {o.ticket for o in timed_out} == {1, 2}
        assert all(o.status is p.Status.TIMEOUT for o in timed_out)
        assert pool.load() == 1  # the square, waiting for a slot

        tasks.RELEASE_HANGS.set()
        (square,) = run_all(pool, 1)
    finally:
        tasks.RELEASE_HANGS.set()
        pool.close()

    assert square.ticket == 3
    assert unpack_value(square.payload) == 16


def test_a_thread_pool_whose_every_slot_is_stuck_says_no_task_can_run_here() -> None:
    # Past the cap on stuck threads, a hung task keeps its slot. With every
    # slot kept, the worker went on taking tasks it could not run: they waited
    # there while other workers idled, and no status said why.
    pool = ThreadPool(1, [TASKS], allow_pickle=False, max_stuck=0)
    tasks.RELEASE_HANGS.clear()
    try:
        hang = p.Assignment(1, 1, f"{TASKS}:hang", pack_call((), {}), 0, 0.05)
        pool.submit(hang, time.monotonic())
        run_all(pool, 1)  # its timeout
        stuck = pool.unable()

        tasks.RELEASE_HANGS.set()
        deadline = time.monotonic() + DEADLINE_S
        while pool.unable() is not None:
            assert time.monotonic() < deadline, "its slot never came back"
            select.select(pool.fds(), [], [], 1.0)
            pool.collect(time.monotonic(), set(pool.fds()))
    finally:
        tasks.RELEASE_HANGS.set()
        pool.close()

    assert stuck is not None and "stuck" in stuck, stuck


def test_a_thread_that_returns_after_close_writes_to_no_reused_descriptor() -> None:
    # A hung task outlives its pool; the pipe's descriptor numbers go to new
    # files, and the thread's return must not write a byte into them.
    pool = ThreadPool(1, [TASKS], allow_pickle=False, max_stuck=1)
    tasks.RELEASE_HANGS.clear()
    hang = p.Assignment(1, 1, f"{TASKS}:hang", pack_call((), {}), 0, 0.05)
    pool.submit(hang, time.monotonic())
    run_all(pool, 1)  # its timeout
    threads = {t for t in threading.enumerate() if t.name.startswith("ventilator-task")}
    pool.close()
    newcomer_read, newcomer_write = os.pipe()  # the lowest free numbers: the old ones
    try:
        tasks.RELEASE_HANGS.set()
        for thread in threads:
            thread.join(DEADLINE_S)
            assert not thread.is_alive(), "the hung thread did not return"

        readable, _, _ = select.select([newcomer_read], [], [], 0)
        assert not readable, "a returning thread wrote into a reused descriptor"
    finally:
        os.close(newcomer_read)
        os.close(newcomer_write)


def test_two_tasks_for_two_idle_children_run_side_by_side() -> None:
    # Squares teach the pool that tasks are tiny and worth batching; two slow
    # tasks of another function must still go one to each child, not both
    # into one child's batch while the other child idles.
    pool = ProcessPool(2, [TASKS], allow_pickle=False)
    try:
        for ticket in range(1, 21):
            call = pack_call((ticket,), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:square", call), 0.0)
        run_all(pool, 20)

        for ticket in (21, 22):
            call = pack_call((0.2,), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:whereabouts", call), 0.0)
        outcomes = run_all(pool, 2)
    finally:
        pool.close()

    pids = {unpack_value(o.payload)[0] for o in outcomes}
    assert len(pids) == 2, "both tasks ran in one child"


@pytest.mark.parametrize("pool_class", [ProcessPool, ThreadPool])
def test_both_pools_warn_of_a_task_past_its_timeout_naming_its_ticket(
    pool_class: type[ProcessPool] | type[ThreadPool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The client hears TaskTimeout; the operator reading the worker's log
    # must see it too, whichever pool ran the task.
    caplog.set_level(logging.INFO, logger="ventilator.pool")
    pool = pool_class(1, [TASKS], allow_pickle=False)
    tasks.RELEASE_HANGS.clear()
    try:
        hang = p.Assignment(7, 1, f"{TASKS}:hang", pack_call((), {}), timeout_s=0.2)
        pool.submit(hang, time.monotonic())

        (outcome,) = run_all(pool, 1)
    finally:
        tasks.RELEASE_HANGS.set()
        pool.close()

    assert outcome.status is p.Status.TIMEOUT
    warned = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "ticket=7" in record.getMessage()
    ]
    assert len(warned) == 1, [record.getMessage() for record in caplog.records]


def test_a_task_with_a_timeout_waiting_in_a_pipe_is_stopped_on_its_own_time() -> None:
    # The hanging task waits in the child's pipe behind a slow one: its clock
    # starts when the slow one ends, and the pool must still stop it then.
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        pool.submit(p.Assignment(1, 1, f"{TASKS}:sleep_for", pack_call((0.3,), {})), 0)
        hang = p.Assignment(2, 1, f"{TASKS}:hang", pack_call((), {}), timeout_s=0.2)
        pool.submit(hang, 0.0)

        outcomes = {o.ticket: o for o in run_all(pool, 2)}
    finally:
        pool.close()

    assert outcomes[1].status is p.Status.OK
    assert outcomes[2].status is p.Status.TIMEOUT
    assert outcomes[2].duration_s >= 0.2


def test_a_task_timeout_counts_from_when_its_process_is_ready() -> None:
    # The child takes 1.5 s to import its module; a task with a 1 s timeout
    # sent at once must not time out for the import it did not do.
    module = "tests.e2e.slow_import_tasks"
    pool = ProcessPool(1, [module], allow_pickle=False)
    try:
        call = pack_call((7,), {})
        pool.submit(p.Assignment(1, 1, f"{module}:quick", call, 0, 1.0), 0.0)
        pool.collect(time.monotonic())  # sent down the pipe now, as a worker does
        (outcome,) = run_all(pool, 1)
    finally:
        pool.close()

    assert outcome.status is p.Status.OK
    assert unpack_value(outcome.payload) == 7


# --- what a task started ends with its task process ---------------------------------


def test_a_timed_out_task_leaves_no_process_it_started(tmp_path: Path) -> None:
    with pid_file(tmp_path) as pids:
        program = ["sh", "-c", pids.sleeper()]
        pool = ProcessPool(1, [PROCESS_TASKS], allow_pickle=False)
        try:
            call = pack_call((program,), {})
            function = f"{PROCESS_TASKS}:run_program"
            pool.submit(p.Assignment(1, 1, function, call, timeout_s=1.0), 0.0)

            [outcome] = run_all(pool, 1)
        finally:
            pool.close()

        assert outcome.status is p.Status.TIMEOUT
        assert len(pids.recorded()) == 1
        wait_until(lambda: not pids.alive(), 5, "the task's subprocess to go")


def test_a_closed_pool_leaves_no_process_its_running_commands_started(
    tmp_path: Path,
) -> None:
    # What a worker leaving at once does: its running commands, and what
    # they started in the background, end with it.
    with pid_file(tmp_path) as pids:
        script = f"sh -c '{pids.sleeper()}' & {pids.sleeper()}"
        pool = ProcessPool(1, ["ventilator.shell"], allow_pickle=False)
        try:
            call = pack_call(([["sh", "-c", script], None],), {})
            pool.submit(p.Assignment(1, 1, "ventilator.shell:run_call", call), 0.0)
            pool.collect(time.monotonic())
            wait_until(lambda: len(pids.alive()) == 2, 30, "the commands to start")
        finally:
            pool.close()

        wait_until(lambda: not pids.alive(), 5, "the commands to go")


def test_a_task_process_that_dies_on_its_own_leaves_no_process_it_started(
    tmp_path: Path,
) -> None:
    # Its commands outlive it, adopted by init, where no walk of its tree finds
    # them; one of them has left its process group and session too.
    with pid_file(tmp_path) as pids:
        commands = [
            ["sh", "-c", pids.sleeper()],
            ["setsid", "sh", "-c", pids.sleeper()],
        ]
        pool = ProcessPool(1, [PROCESS_TASKS], allow_pickle=False)
        try:
            call = pack_call((commands, str(pids.path)), {})
            function = f"{PROCESS_TASKS}:start_then_die"
            pool.submit(p.Assignment(1, 1, function, call), 0.0)

            [outcome] = run_all(pool, 1)
            assert outcome.status is p.Status.CRASHED
            assert len(pids.recorded()) == 2
            wait_until(lambda: not pids.alive(), 5, "the dead task's commands to go")
        finally:
            pool.close()


def test_closing_a_pool_ends_what_its_tasks_left_running_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C on `ventilator exec` printed a WARNING for each command its
    # interrupted tasks left behind: ending them is what a close is for.
    with pid_file(tmp_path) as pids:
        pool = ProcessPool(1, [PROCESS_TASKS], allow_pickle=False)
        try:
            # The inner shell outlives the outer one: adopted by init, where
            # only the mark its environment carries finds it.
            script = f"sh -c '{pids.sleeper()}' & {pids.until_recorded(1)}"
            call = pack_call((["sh", "-c", script],), {})
            pool.submit(p.Assignment(1, 1, f"{PROCESS_TASKS}:run_program", call), 0.0)
            [outcome] = run_all(pool, 1)
        finally:
            with caplog.at_level(logging.INFO, logger="ventilator.pool"):
                pool.close()
        wait_until(lambda: not pids.alive(), 5, "the command left running to go")

    assert outcome.status is p.Status.OK
    lines = [r for r in caplog.records if "left running" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO], lines


def test_a_thread_pool_task_past_its_timeout_leaves_no_process_it_started(
    tmp_path: Path,
) -> None:
    # The thread cannot be stopped, but the command it waits for can: the
    # thread then returns, its result dropped.
    with pid_file(tmp_path) as pids:
        pool = ThreadPool(1, [PROCESS_TASKS], allow_pickle=False)
        try:
            call = pack_call((["sh", "-c", pids.sleeper()],), {})
            function = f"{PROCESS_TASKS}:run_program"
            pool.submit(p.Assignment(1, 1, function, call, timeout_s=2.0), 0.0)

            [outcome] = run_all(pool, 1)
            assert outcome.status is p.Status.TIMEOUT
            assert len(pids.recorded()) == 1
            wait_until(
                lambda: not pids.alive(), 5, "the timed-out task's command to go"
            )
        finally:
            pool.close()


def rests_after_failed_starts(pool: ProcessPool, count: int) -> list[float]:
    """Drive the pool until its children failed to start `count` times; return
    how long its slot rested after each failure. Nothing may be reported."""
    rests: list[float] = []
    restart_at = None
    deadline = time.monotonic() + DEADLINE_S
    while len(rests) < count:
        assert time.monotonic() < deadline, f"{len(rests)} failed starts seen"
        readable, _, _ = select.select(pool.fds(), pool.write_fds(), [], 0.05)
        now = time.monotonic()
        assert pool.collect(now, set(readable)) == []
        # No task has a timeout: the pool's next deadline is the slot's restart.
        if pool.next_deadline() not in (None, restart_at):
            restart_at = pool.next_deadline()
            assert restart_at is not None
            rests.append(round(restart_at - now, 3))
    return rests


def test_a_child_that_cannot_import_blames_no_task_and_retries_ever_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(BREAK_CHILDREN, "1")  # before the pool starts its child
    backoff = Backoff(base_s=0.1, cap_s=0.4, jitter=0.0)
    pool = ProcessPool(1, [BROKEN], allow_pickle=False, restart_backoff=backoff)
    try:
        pool.submit(p.Assignment(1, 1, f"{BROKEN}:double", pack_call((21,), {})), 0)
        rests = rests_after_failed_starts(pool, 4)
        reason, held = pool.unable(), pool.load()

        monkeypatch.delenv(BREAK_CHILDREN)  # the deploy is fixed
        (outcome,) = run_all(pool, 1)
        reason_after = pool.unable()
    finally:
        pool.close()

    assert rests == [0.1, 0.2, 0.4, 0.4]
    assert reason is not None and "on purpose" in reason
    assert held == 1, "the task waits, unblamed, for a child that starts"
    assert outcome.status is p.Status.OK
    assert unpack_value(outcome.payload) == 42
    assert reason_after is None


def test_a_slot_that_cannot_restart_leaves_its_tasks_to_the_other_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = ProcessPool(2, [TASKS, BROKEN], allow_pickle=False)
    try:
        warm = [
            p.Assignment(t, 1, f"{TASKS}:square", pack_call((t,), {})) for t in (1, 2)
        ]
        for task in warm:
            pool.submit(task, 0.0)
        run_all(pool, 2)  # both children imported the modules before the break
        monkeypatch.setenv(BREAK_CHILDREN, "1")
        pool.submit(p.Assignment(3, 1, f"{TASKS}:crash", pack_call((3,), {})), 0.0)
        for ticket in range(4, 10):
            call = pack_call((ticket,), {})
            pool.submit(p.Assignment(ticket, 1, f"{BROKEN}:double", call), 0.0)

        outcomes = {o.ticket: o for o in run_all(pool, 7)}
        reason = pool.unable()
    finally:
        pool.close()

    assert outcomes[3].status is p.Status.CRASHED
    doubled = [unpack_value(outcomes[t].payload) for t in range(4, 10)]
    assert doubled == [2 * t for t in range(4, 10)]
    assert reason is None, "a child still serves: the pool is not failing"


@pytest.mark.parametrize("kind", [ProcessPool, ThreadPool])
def test_a_pool_names_what_it_holds_running_first_until_reported(
    kind: type[ProcessPool] | type[ThreadPool], tmp_path: Path
) -> None:
    pool = kind(1, [TASKS], allow_pickle=False)
    release = tmp_path / "release"
    try:
        for ticket in (3, 1, 2):
            call = pack_call((str(tmp_path / f"started-{ticket}"), str(release)), {})
            pool.submit(p.Assignment(ticket, 2, f"{TASKS}:wait_for_file", call), 0.0)
        pool.collect(time.monotonic())  # hands the first to its slot
        wait_until(lambda: (tmp_path / "started-3").exists(), DEADLINE_S)

        held = pool.held()
        release.touch()
        run_all(pool, 3)
    finally:
        pool.close()

    assert held[0] == (3, 2)
    assert sorted(held) == [(1, 2), (2, 2), (3, 2)]
    assert pool.held() == []


@pytest.mark.parametrize("kind", [ProcessPool, ThreadPool])
def test_a_pool_gives_up_released_tasks_running_or_waiting_and_runs_the_rest(
    kind: type[ProcessPool] | type[ThreadPool], tmp_path: Path
) -> None:
    pool = kind(1, [TASKS], allow_pickle=False)
    release = tmp_path / "release"
    try:
        for ticket in (1, 2):
            call = pack_call((str(tmp_path / f"started-{ticket}"), str(release)), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:wait_for_file", call), 0.0)
        square = p.Assignment(3, 1, f"{TASKS}:square", pack_call((3,), {}))
        pool.submit(square, 0.0)
        pool.collect(time.monotonic())  # hands the first to its slot
        wait_until(lambda: (tmp_path / "started-1").exists(), DEADLINE_S)

        given_up = pool.release([(1, 1), (2, 1), (9, 1)])
        # Only the task not released comes back: the others would block the
        # slot until `release` exists, which it never does meanwhile.
        outcomes = run_all(pool, 1)
        held = pool.held()
    finally:
        release.touch()
        pool.close()

    assert given_up == 2
    assert [(o.ticket, unpack_value(o.payload)) for o in outcomes] == [(3, 9)]
    assert held == []


def test_a_batch_in_the_pipe_of_a_child_held_up_runs_on_an_idle_one_once(
    tmp_path: Path,
) -> None:
    # A task that never ends holds its child; the batch written to that
    # child's pipe behind it would wait as long, while the other child idles.
    started, release = tmp_path / "started", tmp_path / "release"
    runs, done = tmp_path / "runs", tmp_path / "done"
    runs.mkdir()
    done.touch()  # the counted tasks end at once
    pool = ProcessPool(2, [TASKS], allow_pickle=False)
    try:
        head = pack_call((str(started), str(release)), {})
        pool.submit(p.Assignment(1, 1, f"{TASKS}:wait_for_file", head), 0.0)
        for ticket in range(2, 6):
            call = pack_call((str(runs), str(done)), {})
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", call), 0.0)

        behind = collect_until(pool, {2, 3, 4, 5}, deadline_s=10.0)
        release.touch()
        head_outcome = collect_until(pool, {1}, deadline_s=10.0)
    finally:
        pool.close()

    assert all(o.status is p.Status.OK for o in [*behind, *head_outcome])
    assert sorted(o.ticket for o in behind) == [2, 3, 4, 5]
    assert len(list(runs.iterdir())) == 4, "a task withdrawn from a pipe ran twice"


def test_the_rest_of_a_batch_held_up_by_a_task_that_hangs_runs_on_an_idle_child(
    tmp_path: Path,
) -> None:
    # Tiny tasks of one function travel to a child in batches: one of them
    # that hangs held the rest of its batch, while the other child idled.
    runs, done, never = tmp_path / "runs", tmp_path / "done", tmp_path / "never"
    runs.mkdir()
    done.touch()
    tiny = pack_call((str(runs), str(done)), {})
    pool = ProcessPool(2, [TASKS], allow_pickle=False)
    try:
        for ticket in range(1, 31):  # the pool learns the function is tiny
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", tiny), 0.0)
        collect_until(pool, set(range(1, 31)), deadline_s=DEADLINE_S)
        hang = pack_call((str(runs), str(never)), {})
        pool.submit(p.Assignment(31, 1, f"{TASKS}:run_counted", hang), 0.0)
        for ticket in range(32, 42):
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", tiny), 0.0)

        behind = collect_until(pool, set(range(32, 42)), deadline_s=10.0)
        never.touch()
        last = collect_until(pool, {31}, deadline_s=10.0)
    finally:
        never.touch()
        pool.close()

    assert all(o.status is p.Status.OK for o in [*behind, *last])
    assert len(list(runs.iterdir())) == 41, "a task taken back ran twice"


def tiny_then_a_hang(
    pool: ProcessPool, folder: Path, tiny_tickets: range, hang_ticket: int
) -> tuple[Path, Path]:
    """Teach `pool` that run_counted is tiny, then give it `tiny_tickets` and
    `hang_ticket`, which runs until the returned file exists, in one batch
    behind them. Returns that file, and the folder counting the runs."""
    runs, done, never = folder / "runs", folder / "done", folder / "never"
    runs.mkdir()
    done.touch()
    tiny = pack_call((str(runs), str(done)), {})
    for ticket in range(1, 31):
        pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", tiny), 0.0)
    collect_until(pool, set(range(1, 31)), deadline_s=DEADLINE_S)
    for ticket in tiny_tickets:
        pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", tiny), 0.0)
    hang = pack_call((str(runs), str(never)), {})
    pool.submit(p.Assignment(hang_ticket, 1, f"{TASKS}:run_counted", hang), 0.0)
    return never, runs


@pytest.mark.parametrize(
    ("children", "behind"),
    # One child: the first four report while the fifth hangs (their outcomes
    # waited in the child for the batch to end: for ever). Two: 36-40, in the
    # hang's batch behind it, go to the idle child; the places it is cut at
    # count the four reported early, or a task would run twice or hang on.
    [(1, range(0)), (2, range(36, 51))],
)
def test_tasks_that_ran_before_one_that_hangs_in_their_batch_report_without_it(
    tmp_path: Path, children: int, behind: range
) -> None:
    pool = ProcessPool(children, [TASKS], allow_pickle=False)
    try:
        never, runs = tiny_then_a_hang(pool, tmp_path, range(31, 35), 35)
        done = pack_call((str(runs), str(tmp_path / "done")), {})
        for ticket in behind:
            pool.submit(p.Assignment(ticket, 1, f"{TASKS}:run_counted", done), 0.0)

        before = collect_until(pool, {*range(31, 35), *behind}, deadline_s=10.0)
        never.touch()
        last = collect_until(pool, {35}, deadline_s=10.0)
    finally:
        (tmp_path / "never").touch()
        pool.close()

    assert all(o.status is p.Status.OK for o in [*before, *last])
    assert len(list(runs.iterdir())) == 35 + len(behind), "a task ran twice"


def test_tasks_reported_before_one_that_hangs_do_not_run_again_when_it_is_released(
    tmp_path: Path,
) -> None:
    # Releasing the task that hangs stops its child; the others of its batch
    # ran again, their outcomes lost with it.
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        never, runs = tiny_then_a_hang(pool, tmp_path, range(31, 35), 35)
        collect_until(pool, {31, 32, 33, 34}, deadline_s=10.0)

        given_up = pool.release([(35, 1)])
        # Behind whatever would run again: it runs first (see _blame_one).
        done = pack_call((str(runs), str(tmp_path / "done")), {})
        pool.submit(p.Assignment(36, 1, f"{TASKS}:run_counted", done), 0.0)
        after = collect_until(pool, {36}, deadline_s=DEADLINE_S)
        held = pool.held()
    finally:
        never.touch()
        pool.close()

    assert given_up == 1
    assert [o.ticket for o in after] == [36] and held == []
    assert len(list(runs.iterdir())) == 36, "a task ran again"


def test_a_released_task_in_a_pipe_behind_the_running_one_is_taken_back_unrun(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Once it reached the task, the child used to be stopped for it, and a
    # new one started: the task was already in its pipe.
    started, release = tmp_path / "started", tmp_path / "release"
    runs = tmp_path / "runs"
    runs.mkdir()
    pool = ProcessPool(1, [TASKS], allow_pickle=False)
    try:
        head = pack_call((str(started), str(release)), {})
        pool.submit(p.Assignment(1, 1, f"{TASKS}:wait_for_file", head), 0.0)
        counted = pack_call((str(runs), str(release)), {})
        pool.submit(p.Assignment(2, 1, f"{TASKS}:run_counted", counted), 0.0)
        pool.submit(p.Assignment(3, 1, f"{TASKS}:square", pack_call((3,), {})), 0.0)
        pool.collect(time.monotonic())  # the first two go down the pipe
        wait_until(started.exists, DEADLINE_S)

        with caplog.at_level(logging.INFO, logger="ventilator.pool"):
            given_up = pool.release([(2, 1)])
            release.touch()
            outcomes = collect_until(pool, {1, 3}, deadline_s=DEADLINE_S)
    finally:
        pool.close()

    assert given_up == 1
    assert {o.ticket: unpack_value(o.payload) for o in outcomes} == {
        1: "released",
        3: 9,
    }
    assert not list(runs.iterdir()), "the released task ran"
    assert "stopping task process" not in caplog.text


@pytest.mark.parametrize("kind", [ProcessPool, ThreadPool])
def test_a_pool_whose_every_slot_is_held_up_gives_up_only_what_it_has_not_started(
    kind: type[ProcessPool] | type[ThreadPool], tmp_path: Path
) -> None:
    # For its worker to hand back to the broker: tasks waited behind two that
    # hung while another worker idled.
    release, runs = tmp_path / "release", tmp_path / "runs"
    runs.mkdir()
    started = [tmp_path / f"started-{ticket}" for ticket in (1, 2)]
    pool = kind(2, [TASKS], allow_pickle=False)
    try:
        for ticket, path in zip((1, 2), started, strict=True):
            call = pack_call((str(path), str(release)), {})
            task = p.Assignment(ticket, 1, f"{TASKS}:wait_for_file", call)
            pool.submit(task, time.monotonic())
        for ticket in range(3, 9):
            call = pack_call((str(runs), str(release)), {})
            task = p.Assignment(ticket, 1, f"{TASKS}:run_counted", call)
            pool.submit(task, time.monotonic())
        wait_until(lambda: turn(pool) and all(map(Path.exists, started)), DEADLINE_S)
        turn(pool)  # what the processes said before they started is read

        soon = pool.give_up_held_up(time.monotonic())
        given_up = pool.give_up_held_up(time.monotonic() + HELD_UP_S)
        held = pool.held()
        release.touch()
        outcomes = collect_until(pool, {1, 2}, deadline_s=DEADLINE_S)
    finally:
        release.touch()
        pool.close()

    assert (soon, given_up) == (0, 6)
    assert sorted(held) == [(1, 1), (2, 1)]
    assert all(o.status is p.Status.OK for o in outcomes)
    assert not list(runs.iterdir()), "a task given up ran"


def turn(pool: ProcessPool | ThreadPool) -> bool:
    """One turn of the worker's loop: a short wait, then what came in."""
    readable, _, _ = select.select(pool.fds(), pool.write_fds(), [], 0.05)
    pool.collect(time.monotonic(), set(readable))
    return True


def collect_until(
    pool: ProcessPool | ThreadPool, tickets: set[int], deadline_s: float
) -> list[p.Outcome]:
    """The outcomes of `tickets`, collected as the worker's loop does; fails
    if one does not come within `deadline_s` or another comes instead."""
    outcomes: list[p.Outcome] = []
    deadline = time.monotonic() + deadline_s
    while {o.ticket for o in outcomes} != tickets:
        left_s = deadline - time.monotonic()
        assert left_s > 0, f"only {sorted(o.ticket for o in outcomes)} came back"
        readable, _, _ = select.select(
            pool.fds(), pool.write_fds(), [], min(left_s, 1.0)
        )
        outcomes += pool.collect(time.monotonic(), set(readable))
    assert len(outcomes) == len(tickets), "a task was reported twice"
    return outcomes

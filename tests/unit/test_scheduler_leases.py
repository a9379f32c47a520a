"""What a worker may keep: timeouts the broker enforces, and an even share of a
queue for a worker that does not say how many tasks it runs at once."""

from __future__ import annotations

import math

from ventilator import protocol as p
from ventilator.deadlines import DEADLINE_HEAP_SLACK
from ventilator.notices import (
    Fault,
    LateOutcome,
    LeaseOverrun,
    WorkerLost,
)
from ventilator.policy import Limits
from ventilator.scheduler import (
    LEASE_GRACE_BEATS,
    START_GRACE_BEATS,
)

from .driver import (
    CLIENT,
    Driver,
    Effects,
    assignments,
    error_report,
    notices,
    results,
    sent,
    task,
)

BEAT_S = 1.0
GRACE_S = LEASE_GRACE_BEATS * BEAT_S
W1, W2, W3 = b"w1", b"w2", b"w3"


def _driver(max_attempts: int = 3) -> Driver:
    driver = Driver(Limits(heartbeat_interval_s=BEAT_S, max_attempts=max_attempts))
    driver.hello()
    return driver


def _beats_until(driver: Driver, seconds: float, *peers: bytes) -> list[Effects]:
    """Move the clock in ticks of one beat, the worker and the client
    heartbeating, so that only the deadline, never a silence, can end its
    tasks; return each tick's effects."""
    end = driver.now + seconds
    ticks = []
    while driver.now + BEAT_S <= end:
        for peer in peers:
            driver.worker(peer, p.Heartbeat())
        driver.client(CLIENT, p.Heartbeat())
        ticks.append(driver.tick(BEAT_S))
    return ticks


def _started(driver: Driver, *peers: bytes) -> None:
    """Let the workers' start grace pass, as if their task processes had
    started long ago: the deadlines of a worker that reported nothing since it
    registered wait for it (see test_a_new_worker_is_given_time_to_start)."""
    _beats_until(driver, START_GRACE_BEATS * BEAT_S, *peers)


def test_a_task_its_worker_never_reports_ends_as_timeout_after_the_grace() -> None:
    driver = _driver()
    given = assignments(driver.ready(W1, capacity=4), W1)
    assert not given
    _started(driver, W1)
    given = assignments(driver.submit(task(1, timeout_s=2.0)), W1)
    assert len(given) == 1

    _beats_until(driver, 2.0 + GRACE_S - BEAT_S, W1)
    assert driver.scheduler.tasks[given[0].ticket].state.value == "running"
    (effects,) = _beats_until(driver, BEAT_S, W1)

    (entry,) = results(effects)
    assert entry.status is p.Status.TIMEOUT
    assert "did not report it" in error_report(entry)["message"]
    (overrun,) = notices(effects, LeaseOverrun)
    assert (overrun.worker_id, overrun.count, overrun.overruns) == ("w1", 1, 1)


def test_the_overruns_of_one_tick_are_one_notice_and_one_release_per_worker() -> None:
    driver = _driver(max_attempts=100)
    driver.ready(W1, capacity=50)
    _started(driver, W1)
    driver.submit(*[task(i, timeout_s=1.0) for i in range(50)])
    ticks = _beats_until(driver, 1.0 + GRACE_S + BEAT_S, W1)

    overruns = [n for effects in ticks for n in notices(effects, LeaseOverrun)]
    assert [(n.count, n.overruns) for n in overruns] == [(50, 50)]
    releases = [r for effects in ticks for r in sent(effects, W1, p.Release)]
    assert [len(release.tickets) for release in releases] == [50]


def test_a_new_worker_is_given_time_to_start() -> None:
    # Its task processes may still import modules: its first task's deadline
    # waits for the start grace, not only its timeout.
    driver = _driver()
    driver.ready(W1, capacity=1)
    (given,) = assignments(driver.submit(task(1, timeout_s=1.0)), W1)

    _beats_until(driver, START_GRACE_BEATS * BEAT_S - BEAT_S, W1)
    assert driver.scheduler.tasks[given.ticket].state.value == "running"
    ticks = _beats_until(driver, 2 * BEAT_S, W1)

    assert [n.count for t in ticks for n in notices(t, LeaseOverrun)] == [1]


def test_a_worker_that_keeps_reporting_is_left_to_its_own_timeouts() -> None:
    # A task that waits for a task process to restart is not the worker's
    # fault while it goes on reporting others.
    driver = _driver()
    driver.ready(W1, capacity=2)
    _started(driver, W1)
    (slow,) = assignments(driver.submit(task(1, timeout_s=1.0)), W1)
    for second in range(10):
        (quick,) = assignments(driver.submit(task(10 + second)), W1)
        driver.done(W1, quick)
        assert not notices(driver.tick(BEAT_S), LeaseOverrun), f"at {second} s"

    ticks = _beats_until(driver, GRACE_S + BEAT_S, W1)

    assert [n.count for t in ticks for n in notices(t, LeaseOverrun)] == [1]
    assert driver.scheduler.tasks[slow.ticket].status is p.Status.TIMEOUT


def test_a_worker_that_reports_its_own_timeout_first_sees_no_change() -> None:
    driver = _driver()
    driver.ready(W1, capacity=1)
    (given,) = assignments(driver.submit(task(1, timeout_s=2.0)), W1)
    driver.tick(2.0)
    own = b"the worker's own report"
    effects = driver.done(W1, given, p.Status.TIMEOUT, own)
    (entry,) = results(effects)
    assert (entry.status, entry.payload) == (p.Status.TIMEOUT, own)

    effects = driver.tick(GRACE_S + BEAT_S)
    assert not notices(effects, LeaseOverrun)
    assert not results(effects)


def test_a_late_result_of_an_overrun_task_is_dropped() -> None:
    driver = _driver()
    driver.ready(W1, capacity=1)
    _started(driver, W1)
    (given,) = assignments(driver.submit(task(1, timeout_s=1.0)), W1)
    _beats_until(driver, 1.0 + GRACE_S + BEAT_S, W1)

    effects = driver.done(W1, given, p.Status.OK, b"too late")
    assert notices(effects, LateOutcome)
    assert not results(effects)


def test_a_task_held_behind_busy_slots_starts_its_clock_when_a_slot_frees() -> None:
    driver = _driver()
    driver.ready(W1, capacity=2, slots=1)
    first = assignments(driver.submit(task(1)), W1)
    driver.done(W1, first[0], duration_s=0.01)  # known short: held two per slot
    specs = [task(2, timeout_s=5.0), task(3, timeout_s=5.0)]
    running, held = assignments(driver.submit(*specs), W1)

    # The first runs 4 s, within its timeout; the second only starts then.
    _beats_until(driver, 4.0, W1)
    driver.done(W1, running, duration_s=4.0)
    _beats_until(driver, 4.0, W1)
    assert driver.scheduler.tasks[held.ticket].state.value == "running"

    _beats_until(driver, 1.0 + GRACE_S + BEAT_S, W1)
    assert driver.scheduler.tasks[held.ticket].status is p.Status.TIMEOUT


def test_a_task_without_a_timeout_is_never_ended_by_the_broker() -> None:
    driver = _driver()
    driver.ready(W1, capacity=1)
    (given,) = assignments(driver.submit(task(1)), W1)
    _beats_until(driver, 100.0, W1)
    assert driver.scheduler.tasks[given.ticket].state.value == "running"


def test_a_worker_that_overruns_max_attempts_deadlines_in_a_row_is_dropped() -> None:
    driver = _driver(max_attempts=2)
    driver.ready(W1, capacity=1)
    _started(driver, W1)
    specs = [task(i, timeout_s=1.0) for i in (1, 2, 3)]
    driver.submit(*specs)
    ticks = _beats_until(driver, 2 * (1.0 + GRACE_S + BEAT_S), W1)

    lost = [n for effects in ticks for n in notices(effects, WorkerLost)]
    assert [(n.worker_id, n.fault) for n in lost] == [("w1", Fault.MISBEHAVED)]
    assert "w1" not in driver.scheduler.workers
    third = driver.scheduler.tasks[max(driver.scheduler.tasks)]
    assert third.state.value == "queued" and third.deaths + third.losses == 0


def test_an_outcome_in_time_resets_the_count_of_overruns() -> None:
    driver = _driver(max_attempts=2)
    driver.ready(W1, capacity=1)
    _started(driver, W1)
    driver.submit(task(1, timeout_s=1.0))
    _beats_until(driver, 1.0 + GRACE_S + BEAT_S, W1)
    (given,) = assignments(driver.submit(task(2, timeout_s=1.0)), W1)
    driver.done(W1, given)
    assert driver.scheduler.workers["w1"].overruns == 0


def test_a_slow_worker_does_not_make_another_workers_tasks_overrun() -> None:
    driver = _driver()
    driver.ready(W1, capacity=1)
    driver.ready(W2, capacity=1)
    _started(driver, W1, W2)
    effects = driver.submit(task(1, timeout_s=1.0), task(2, timeout_s=1.0))
    (mine,) = assignments(effects, W2)
    driver.done(W2, mine)
    _beats_until(driver, 1.0 + GRACE_S + BEAT_S, W1, W2)
    assert driver.scheduler.workers["w2"].overruns == 0
    assert driver.scheduler.workers["w1"].overruns == 1


def test_a_worker_without_slots_holds_no_more_than_an_even_share_of_a_queue() -> None:
    driver = _driver()
    driver.ready(W1, capacity=p.MAX_CAPACITY)  # declares no slots
    driver.ready(W2, capacity=1, slots=1)
    driver.ready(W3, capacity=1, slots=1)
    effects = driver.submit(*[task(i) for i in range(300)])

    hoarded = len(assignments(effects, W1))
    assert hoarded <= 100
    assert len(assignments(effects, W2)) == len(assignments(effects, W3)) == 1
    assert driver.scheduler.queued_count("jobs:work") == 300 - hoarded - 2


OTHER = "jobs:other"


def _recounted_share(driver: Driver, queue_name: str) -> int:
    """An even share of `queue_name` counted the long way, over every worker."""
    scheduler = driver.scheduler
    sharing = [
        w
        for w in scheduler.workers.values()
        if queue_name in w.services and not w.draining
    ]
    total = scheduler.queued_count(queue_name)
    total += sum(w.held.get(queue_name, 0) for w in sharing)
    return math.ceil(total / max(1, len(sharing)))


def _assert_shares_recounted(driver: Driver) -> None:
    for queue_name in ("jobs:work", OTHER):
        recounted = _recounted_share(driver, queue_name)
        assert driver.scheduler._even_share(queue_name) == recounted, queue_name


def test_even_shares_match_a_recount_through_joins_leaves_drains_requeues() -> None:
    driver = _driver()
    both = ("jobs:work", OTHER)
    given = assignments(driver.ready(W1, capacity=40, services=both), W1)
    driver.ready(W2, capacity=40)
    driver.submit(*[task(i) for i in range(100)])
    driver.submit(*[task(1000 + i, function=OTHER) for i in range(30)])
    _assert_shares_recounted(driver)

    driver.worker(W2, p.Drain())  # its tasks no longer count in the share
    _assert_shares_recounted(driver)
    given = assignments(driver.ready(W3, capacity=40, services=both), W3)
    _assert_shares_recounted(driver)
    driver.done(W3, given[0])
    _assert_shares_recounted(driver)

    # W3's connection fails: its tasks are requeued; it comes back naming
    # them and gets them back on a new connection.
    driver.unreachable(W3)
    _assert_shares_recounted(driver)
    driver.ready(b"w3-again", capacity=40, services=both, worker_id="w3", held=given)
    _assert_shares_recounted(driver)

    driver.worker(W2, p.Bye())
    driver.worker(W1, p.Bye())
    _assert_shares_recounted(driver)
    assert all(driver.scheduler.serves(name) for name in both)  # w3 alone


def test_a_worker_without_slots_alone_on_a_queue_may_hold_all_its_credit() -> None:
    driver = _driver()
    driver.ready(W1, capacity=50)
    effects = driver.submit(*[task(i) for i in range(300)])
    assert len(assignments(effects, W1)) == 50


def test_tasks_that_finish_long_before_their_deadline_leave_no_trace_for_long() -> None:
    driver = _driver()
    driver.ready(W1, capacity=100)
    for round_ in range(15):
        specs = [task(round_ * 100 + i, timeout_s=86400.0) for i in range(100)]
        given = assignments(driver.submit(*specs), W1)
        outcomes = [
            p.Outcome(a.ticket, a.attempt, p.Status.OK, b"", 0.0) for a in given
        ]
        driver.worker(W1, p.Done(outcomes))
    _beats_until(driver, BEAT_S, W1)

    # 1500 entries of tasks long finished, whose deadlines are a day away.
    assert len(driver.scheduler._deadlines) <= DEADLINE_HEAP_SLACK

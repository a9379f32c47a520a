"""The scheduler's behaviour, one sentence per test, with the clock moved by hand."""

from __future__ import annotations

import itertools
import math

import pytest

from ventilator import protocol as p
from ventilator.announcements import ACCEPT_GRACE_S
from ventilator.errors import TaskError
from ventilator.notices import (
    ClientLost,
    Departure,
    LateOutcome,
    SessionHeld,
    SinkTaken,
    WorkerDraining,
    WorkerJoined,
    WorkerLeft,
    WorkerLost,
)
from ventilator.policy import Backoff, Limits
from ventilator.return_wait import RETURN_WAIT_BEATS
from ventilator.scheduler import (
    RELEASED_KEPT_S,
    DiskBudget,
    Scheduler,
    State,
    Task,
    sink_recipient,
)
from ventilator.serialization import pack_error, unpack_value
from ventilator.status import busiest_first, name_order

from .driver import (
    CLIENT,
    FUNCTION,
    Driver,
    accepted,
    assignments,
    error_codes,
    error_report,
    notices,
    results,
    sent,
    task,
)

W1 = b"worker-1"
W2 = b"worker-2"
OTHER = b"client-2"
OTHER_FUNCTION = "jobs:other"


def pickled_task(task_id: int) -> p.TaskSpec:
    return task(task_id, function="pickled:<lambda>", flags=p.Flags.PICKLED)


@pytest.fixture
def driver() -> Driver:
    driver = Driver()
    driver.hello()
    return driver


# --- submission -----------------------------------------------------------------------


def test_submitted_task_is_journalled_and_accepted(driver: Driver) -> None:
    effects = driver.submit(task(1))

    assert [(t.session, t.task_id) for t in effects.accepted] == [("alice", 1)]
    assert accepted(effects) == [1]


def test_command_before_hello_is_refused_with_hello_first() -> None:
    effects = Driver().submit(task(1))

    assert error_codes(effects, CLIENT) == ["hello_first"]
    assert not effects.accepted


def test_welcome_tells_the_client_the_limits_and_durability() -> None:
    limits = Limits(client_window=7, max_payload_bytes=99, client_max_bytes=500)
    driver = Driver(limits, durable=False)

    [welcome] = sent(driver.hello(), CLIENT, p.Welcome)

    assert welcome == p.Welcome(7, 99, 1.0, durable=False, client_max_bytes=500)


def test_resubmitted_task_id_is_not_run_twice(driver: Driver) -> None:
    driver.submit(task(1))
    effects = driver.submit(task(1))
    effects_on_ready = driver.ready(W1, capacity=2)

    assert accepted(effects) == [1]
    assert not effects.accepted
    assert len(assignments(effects_on_ready, W1)) == 1


def test_a_task_id_twice_in_one_submit_rejects_the_second_naming_the_id(
    driver: Driver,
) -> None:
    effects = driver.submit(task(7, b"first"), task(7, b"second"))

    [refusal] = results(effects)
    assert (refusal.task_id, refusal.status) == (7, p.Status.REJECTED)
    assert "task_id 7 appears twice" in error_report(refusal)["message"]
    [assignment] = assignments(driver.ready(W1, capacity=2), W1)
    assert assignment.payload == b"first"


def test_a_task_id_twice_in_one_submit_whose_first_is_refused_is_refused_once() -> None:
    driver = Driver(Limits(max_payload_bytes=4))
    driver.hello()

    effects = driver.submit(task(7, b"too large"), task(7, b"ok"))

    [refusal] = results(effects)
    message = error_report(refusal)["message"]
    assert "task_id 7 appears twice" in message
    assert "max_payload_bytes" in message
    assert not driver.scheduler.tasks


def test_same_task_id_from_two_sessions_is_two_tasks(driver: Driver) -> None:
    driver.hello(OTHER, session="bob")
    driver.submit(task(1))
    driver.submit(task(1), peer=OTHER)

    assert len(assignments(driver.ready(W1, capacity=2), W1)) == 2


def test_oversized_payload_is_rejected_naming_the_limit() -> None:
    driver = Driver(Limits(max_payload_bytes=10))
    driver.hello()

    effects = driver.submit(task(1, payload=b"x" * 11))

    [entry] = results(effects)
    assert entry.status is p.Status.REJECTED
    report = error_report(entry)
    assert report["kind"] == "rejected"
    assert "11 bytes" in report["message"]
    assert "max_payload_bytes" in report["message"]
    assert not effects.accepted


def test_a_task_that_would_cut_into_the_disk_reserve_is_rejected_saying_so() -> None:
    driver = Driver()
    driver.hello()
    # 100 bytes free above a reserve of 1,000: one task of 60 fits, not two.
    driver.scheduler.disk_budget = DiskBudget.after_look(free=1_100, reserve=1_000)

    effects = driver.submit(task(1, payload=b"x" * 60), task(2, payload=b"y" * 60))

    assert [t.task_id for t in effects.accepted] == [1]
    [entry] = results(effects)
    assert (entry.task_id, entry.status) == (2, p.Status.REJECTED)
    assert "--journal-min-free-bytes" in error_report(entry)["message"]


def test_a_result_refused_for_the_disk_says_what_is_left_for_results() -> None:
    # Tester 36: "8000005 bytes does not fit ... (23 MiB free)" read as a
    # contradiction: results since the look had spent it.
    budget = DiskBudget.after_look(free=24 * 2**20, reserve=64 * 2**20)
    budget.spend(15 * 2**20)

    message = budget.result_refusal(8_000_005)

    assert "0 MiB are left for results, of the 24 MiB free" in message
    assert "SQLite's log keeps 16 MiB of the --journal-min-free-bytes" in message


def test_results_wait_while_delivery_is_held_and_go_once_it_is_not(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [work] = assignments(driver.ready(W1), W1)
    driver.scheduler.delivery_held = "the journal's disk is full"

    while_held = driver.done(W1, work, payload=b"49")
    said = driver.scheduler.status(driver.now)["delivery_held"]
    driver.scheduler.delivery_held = None
    after = driver.flush()

    assert results(while_held) == []
    assert said == "the journal's disk is full"
    assert [r.payload for r in results(after)] == [b"49"]


def test_a_result_the_journal_disk_cannot_take_fails_its_task_instead(
    driver: Driver,
) -> None:
    # A write past the disk's end would stop the broker, and again at each
    # restart as the task ran again: the task fails, the broker goes on.
    driver.submit(task(1), task(2))
    work = assignments(driver.ready(W1, capacity=2), W1)
    # 2,000 bytes free, under a reserve of 4,000: results may use all but 1,000.
    driver.scheduler.disk_budget = DiskBudget.after_look(free=2_000, reserve=4_000)

    too_big = driver.done(W1, work[0], payload=b"r" * 1_001)
    fits = driver.done(W1, work[1], payload=b"r" * 900)

    [refused] = results(too_big)
    assert refused.status is p.Status.REJECTED
    assert "does not fit the journal's disk" in error_report(refused)["message"]
    [kept] = results(fits)
    assert (kept.status, kept.payload) == (p.Status.OK, b"r" * 900)


def test_client_window_is_enforced_past_another_window_waiting() -> None:
    driver = Driver(Limits(client_window=2))
    driver.hello()

    effects = driver.submit(*[task(i) for i in range(1, 6)])

    assert accepted(effects) == [1, 2]  # 3 and 4 wait for room
    [refused] = results(effects)
    assert refused.task_id == 5
    assert "client_window" in error_report(refused)["message"]
    status = driver.scheduler.status(driver.now)
    assert status["clients"][0]["waiting_for_room"] == 2  # type: ignore[index]


def test_client_window_reopens_when_results_are_acknowledged() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.done(W1, first)
    driver.ack(("", 1))

    assert accepted(driver.submit(task(2))) == [2]


def test_broker_task_limit_is_enforced() -> None:
    driver = Driver(Limits(max_queued_tasks=1))
    driver.hello()

    effects = driver.submit(task(1), task(2))

    assert accepted(effects) == [1]
    assert "max_queued_tasks" in error_report(results(effects)[0])["message"]


def test_broker_byte_limit_is_enforced() -> None:
    driver = Driver(Limits(max_queued_bytes=10))
    driver.hello()

    effects = driver.submit(task(1, payload=b"x" * 6), task(2, payload=b"x" * 6))

    assert accepted(effects) == [1]
    assert "max_queued_bytes" in error_report(results(effects)[0])["message"]


def test_byte_limit_refusal_says_what_the_broker_holds_and_its_limit() -> None:
    driver = Driver(Limits(max_queued_bytes=500))
    driver.hello()

    effects = driver.submit(task(1, payload=b"x" * 400), task(2, payload=b"x" * 150))

    message = error_report(results(effects)[0])["message"]
    assert "holds 400 bytes" in message
    assert "this task's 150" in message and "limit of 500" in message
    assert "1 queued, 0 running, 0 results waiting for delivery" in message
    assert "try again" in message
    assert "results wait until" not in message, "no result waits"


def test_a_full_broker_names_the_queued_functions_no_worker_serves() -> None:
    # Tester 36: "try again later, or start more workers" of a queue that no
    # worker serves, which neither would empty.
    driver = Driver(Limits(max_queued_tasks=2))
    driver.hello()
    driver.submit(task(1, function="jobs:wrok"), task(2, function="jobs:wrok"))

    message = error_report(results(driver.submit(task(3)))[0])["message"]

    assert "2 queued tasks of functions no connected worker serves (jobs:wrok)" in (
        message
    )
    assert "ventilator purge FUNCTION" in message


def test_task_limit_refusal_speaks_of_waiting_results_only_when_some_wait() -> None:
    driver = Driver(Limits(max_queued_tasks=2))
    driver.hello()
    driver.submit(task(1), task(2))
    none_waits = error_report(results(driver.submit(task(3)))[0])["message"]
    driver.done(W1, assignments(driver.ready(W1), W1)[0])

    one_waits = error_report(results(driver.submit(task(4)))[0])["message"]

    assert "0 results waiting" in none_waits
    assert "results wait until" not in none_waits and "try again" in none_waits
    assert "1 running, 1 results waiting" in one_waits
    assert "results wait until their client or sink collects them" in one_waits
    assert "purge --sink NAME" in one_waits


# --- dispatch -------------------------------------------------------------------------


def test_queued_task_goes_to_a_ready_worker_that_serves_its_function(
    driver: Driver,
) -> None:
    driver.submit(task(1, payload=b"seven"))

    [assignment] = assignments(driver.ready(W1), W1)

    assert assignment.function == FUNCTION
    assert assignment.payload == b"seven"
    assert assignment.attempt == 1


def test_task_waits_for_a_worker_that_serves_its_function(driver: Driver) -> None:
    driver.submit(task(1, function="jobs:other"))

    assert not assignments(driver.ready(W1), W1)
    assert len(assignments(driver.ready(W2, services=["jobs:other"]), W2)) == 1


def test_worker_never_holds_more_than_its_capacity(driver: Driver) -> None:
    driver.submit(*(task(i) for i in range(10)))

    effects = driver.ready(W1, capacity=3)

    assert len(assignments(effects, W1)) == 3
    assert not assignments(driver.submit(task(99)), W1)


def test_worker_gets_more_work_as_it_finishes(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    [first] = assignments(driver.ready(W1), W1)

    [second] = assignments(driver.done(W1, first), W1)

    assert second.ticket != first.ticket


def test_functions_of_equal_run_times_take_turns_at_the_credit_a_worker_frees(
    driver: Driver,
) -> None:
    driver.submit(*(task(i) for i in range(10)))
    driver.submit(*(task(20 + i, function=OTHER_FUNCTION) for i in range(10)))
    [running] = assignments(driver.ready(W1, services=[FUNCTION, OTHER_FUNCTION]), W1)

    turns = []
    for _ in range(8):
        [running] = assignments(driver.done(W1, running, duration_s=0.01), W1)
        turns.append(running.function)

    # Neither takes two turns in a row while the other waits.
    assert all(turn != after for turn, after in itertools.pairwise(turns)), turns


def test_short_tasks_of_one_function_need_not_wait_for_a_backlog_of_long_ones(
    driver: Driver,
) -> None:
    driver.submit(*(task(i) for i in range(10)))
    [running] = assignments(driver.ready(W1, services=[FUNCTION, OTHER_FUNCTION]), W1)
    [running] = assignments(driver.done(W1, running, duration_s=2.0), W1)
    driver.submit(*(task(20 + i, function=OTHER_FUNCTION) for i in range(5)))

    turns = []
    for _ in range(6):
        took_s = 2.0 if running.function == FUNCTION else 0.01
        [running] = assignments(driver.done(W1, running, duration_s=took_s), W1)
        turns.append(running.function)

    # Turns go by the work handed out: five short tasks weigh less than one
    # long one, so they run before the next long task but one at most.
    assert turns.count(OTHER_FUNCTION) == 5, turns


def test_a_function_that_once_ran_alone_does_not_wait_behind_a_later_backlog(
    driver: Driver,
) -> None:
    driver.submit(*(task(i) for i in range(300)))
    [running] = assignments(driver.ready(W1, services=[FUNCTION, OTHER_FUNCTION]), W1)
    for _ in range(299):  # alone for a while: 300 tasks of 5 ms
        [running] = assignments(driver.done(W1, running, duration_s=0.005), W1)
    driver.submit(*(task(400 + i, function=OTHER_FUNCTION) for i in range(10)))
    [running] = assignments(driver.done(W1, running, duration_s=0.005), W1)
    driver.submit(*(task(500 + i) for i in range(3)))

    [after] = assignments(driver.done(W1, running, duration_s=2.0), W1)

    # What it did alone is no debt: its next task goes before the backlog's.
    assert after.function == FUNCTION


# --- per-function prefetch: credit for tiny tasks is not room for long ones --------


def test_a_function_of_unknown_run_time_is_held_one_per_slot(driver: Driver) -> None:
    driver.submit(*[task(i) for i in range(8)])

    effects = driver.ready(W1, capacity=20, slots=2)

    assert len(assignments(effects, W1)) == 2


def test_a_long_function_stays_one_per_slot_on_a_worker_with_credit_for_more(
    driver: Driver,
) -> None:
    driver.submit(*[task(i) for i in range(8)])
    first, _ = assignments(driver.ready(W1, capacity=20, slots=2), W1)

    effects = driver.done(W1, first, duration_s=1.0)

    assert len(assignments(effects, W1)) == 1  # back to one per slot


def test_a_short_function_fills_the_credit(driver: Driver) -> None:
    driver.submit(*[task(i) for i in range(40)])
    first, _ = assignments(driver.ready(W1, capacity=20, slots=2), W1)

    effects = driver.done(W1, first, duration_s=0.001)

    assert len(assignments(effects, W1)) == 19  # the credit, not the slots


def test_long_tasks_go_to_the_idle_worker_not_the_one_with_more_credit(
    driver: Driver,
) -> None:
    driver.ready(W1, capacity=20, slots=2)
    driver.ready(W2, capacity=2, slots=2)

    effects = driver.submit(*[task(i) for i in range(8)])

    assert len(assignments(effects, W1)) == len(assignments(effects, W2)) == 2
    assert driver.scheduler.status(driver.now)["queued"] == {FUNCTION: 4}


def _two_busy_slots_on_w1_then_w2_joins(driver: Driver) -> None:
    """W1 learns the function is short, then both its slots take a task."""
    driver.ready(W1, capacity=20, slots=2)
    [first] = assignments(driver.submit(task(1)), W1)
    driver.done(W1, first, duration_s=0.001)
    assert len(assignments(driver.submit(task(2), task(3)), W1)) == 2
    driver.ready(W2, capacity=20, slots=2)


def test_idle_slots_are_filled_before_anything_is_held_beyond_busy_ones(
    driver: Driver,
) -> None:
    _two_busy_slots_on_w1_then_w2_joins(driver)

    effects = driver.submit(task(10), task(11))

    assert len(assignments(effects, W2)) == 2
    assert not assignments(effects, W1)


def test_a_stalled_worker_is_given_no_tasks_to_wait_behind_its_busy_slots(
    driver: Driver,
) -> None:
    _two_busy_slots_on_w1_then_w2_joins(driver)
    driver.tick(1.0)  # W1 has reported nothing for longer than a long task

    effects = driver.submit(*[task(i) for i in range(10, 30)])

    assert not assignments(effects, W1)
    assert len(assignments(effects, W2)) == 20  # all its credit


def test_a_worker_that_hands_back_what_its_busy_slots_held_is_not_given_it_back(
    driver: Driver,
) -> None:
    # Its slots run long tasks: registering again naming only those hands the
    # rest back, for workers with room. Taken for progress, it got them back.
    driver.ready(W1, capacity=20, slots=2)
    [first] = assignments(driver.submit(task(1)), W1)
    driver.done(W1, first, duration_s=0.001)  # short: worth holding
    running = assignments(driver.submit(task(2), task(3)), W1)
    held = assignments(driver.submit(*[task(i) for i in range(10, 13)]), W1)
    assert len(held) == 3  # behind its two busy slots
    driver.tick(1.0)

    again = driver.ready(W1, capacity=20, slots=2, held=running)
    joined = driver.ready(W2, capacity=20, slots=2)

    assert not assignments(again, W1)
    assert sorted(a.ticket for a in assignments(joined, W2)) == sorted(
        a.ticket for a in held
    )


def test_nothing_is_held_behind_slots_busy_with_tasks_of_unknown_length(
    driver: Driver,
) -> None:
    hang = "jobs:hang"
    driver.ready(W1, capacity=20, slots=2, services=[FUNCTION, hang])
    [first] = assignments(driver.submit(task(1)), W1)
    driver.done(W1, first, duration_s=0.001)  # FUNCTION is short
    assert (
        len(
            assignments(
                driver.submit(task(2, function=hang), task(3, function=hang)), W1
            )
        )
        == 2
    )

    held_back = driver.submit(*[task(i) for i in range(10, 15)])
    joined = driver.ready(W2, capacity=20, slots=2)

    assert not assignments(held_back, W1)
    assert len(assignments(joined, W2)) == 5


def test_a_busy_worker_that_reports_keeps_holding_tasks_beyond_its_slots(
    driver: Driver,
) -> None:
    _two_busy_slots_on_w1_then_w2_joins(driver)

    effects = driver.submit(*[task(i) for i in range(10, 30)])

    assert len(assignments(effects, W1)) > 0  # not stalled: it prefetches


def test_a_worker_without_slots_is_limited_by_its_credit_alone(driver: Driver) -> None:
    driver.submit(*[task(i) for i in range(8)])

    effects = driver.ready(W1, capacity=6)

    assert len(assignments(effects, W1)) == 6


def test_tasks_are_dispatched_in_submission_order(driver: Driver) -> None:
    driver.submit(task(5), task(3), task(8))

    work = assignments(driver.ready(W1, capacity=3), W1)

    tasks = driver.scheduler.tasks
    assert [tasks[a.ticket].task_id for a in work] == [5, 3, 8]


def test_work_is_spread_over_every_ready_worker(driver: Driver) -> None:
    driver.ready(W1, capacity=4)
    driver.ready(W2, capacity=4)

    effects = driver.submit(task(1), task(2))

    assert len(assignments(effects, W1)) == 1
    assert len(assignments(effects, W2)) == 1


def test_pickled_task_goes_only_to_a_worker_that_allows_pickle(driver: Driver) -> None:
    driver.ready(W1, capacity=4)
    driver.ready(W2, capacity=1, allow_pickle=True)

    effects = driver.submit(pickled_task(1), pickled_task(2))

    assert not assignments(effects, W1)
    assert len(assignments(effects, W2)) == 1


def test_task_no_worker_could_serve_is_refused_and_the_others_accepted(
    driver: Driver,
) -> None:
    driver.ready(W1, capacity=4, services=[FUNCTION, "mmi.service"])

    effects = driver.submit(
        task(1, function="nocolon"), task(2), task(3, function="mmi.service")
    )

    refused = {entry.task_id: error_report(entry) for entry in results(effects)}
    assert sorted(refused) == [1, 3]
    assert refused[1]["kind"] == "rejected"
    assert "'module:function'" in refused[3]["message"]
    assert accepted(effects) == [2]
    assert [a.function for a in assignments(effects, W1)] == [FUNCTION]


def test_pickled_task_is_refused_when_no_worker_allows_pickle(driver: Driver) -> None:
    driver.ready(W1, capacity=4)

    effects = driver.submit(pickled_task(1))

    [refusal] = results(effects)
    assert refusal.status is p.Status.REJECTED
    assert "--allow-pickle" in unpack_value(refusal.payload)["message"]
    assert not assignments(effects, W1)


# --- results --------------------------------------------------------------------------


def test_a_quick_result_stands_for_the_acceptance() -> None:
    driver = Driver(defer_acceptance=True)
    driver.hello()
    submitted = driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)

    finished = driver.done(W1, assignment)
    later = driver.tick(ACCEPT_GRACE_S * 2)

    assert [t.task_id for t in submitted.accepted] == [1]  # journalled at once
    assert accepted(submitted) == accepted(finished) == accepted(later) == []
    assert [r.task_id for r in results(finished)] == [1]


def test_acceptance_is_announced_once_the_grace_has_passed() -> None:
    driver = Driver(defer_acceptance=True)
    driver.hello()
    driver.submit(task(1), task(2))
    assert driver.scheduler.announce_due_at() == driver.now + ACCEPT_GRACE_S

    soon = driver.tick(ACCEPT_GRACE_S / 2)
    due = driver.tick(ACCEPT_GRACE_S / 2)

    assert accepted(soon) == []
    assert accepted(due) == [1, 2]
    assert driver.scheduler.announce_due_at() == math.inf


def test_a_submit_refused_whole_schedules_no_announcement() -> None:
    driver = Driver(defer_acceptance=True)
    driver.hello()

    driver.submit(task(1, function="nocolon"))

    assert driver.scheduler.announce_due_at() == math.inf


def test_a_sink_result_does_not_stand_for_the_submitters_acceptance() -> None:
    driver = Driver(defer_acceptance=True)
    driver.hello()
    sink = b"sink-peer"
    driver.hello(sink, session="sink-session", sink="totals")
    driver.submit(task(1, sink="totals"))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.done(W1, assignment)

    due = driver.tick(ACCEPT_GRACE_S)

    assert accepted(due) == [1]


def test_result_goes_back_to_the_submitter_with_status_and_payload(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, assignment, payload=b"49")

    assert results(effects) == [p.ResultEntry(1, p.Status.OK, b"49", "")]
    assert [t.task_id for t in effects.finished] == [1]


def test_results_go_to_the_sink_not_the_submitter(driver: Driver) -> None:
    sink = b"sink-peer"
    driver.hello(sink, session="sink-session", sink="totals")
    driver.submit(task(1, sink="totals"))
    [assignment] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, assignment)

    assert not results(effects, CLIENT)
    assert results(effects, sink) == [
        p.ResultEntry(1, p.Status.OK, b"result", origin="alice")
    ]


def test_sink_acknowledges_by_the_origin_session(driver: Driver) -> None:
    sink = b"sink-peer"
    driver.hello(sink, session="sink-session", sink="totals")
    driver.submit(task(1, sink="totals"))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])

    effects = driver.ack(("alice", 1), peer=sink)

    assert len(effects.forgotten) == 1


def test_results_for_a_sink_wait_until_it_connects(driver: Driver) -> None:
    driver.submit(task(1, sink="totals"))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])

    effects = driver.hello(b"sink-peer", session="late-sink", sink="totals")

    assert [r.origin for r in results(effects, b"sink-peer")] == ["alice"]


def test_a_client_that_leaves_forgets_the_cancelled_results_of_its_tasks(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    driver.cancel(1)  # queued: its "cancelled" answer is on its way

    left = driver.client(CLIENT, p.Bye())

    assert len(left.forgotten) == 1
    assert driver.scheduler.find_task("alice", 1) is None
    assert driver.scheduler.find_task("alice", 2) is not None  # still queued


def test_a_sink_that_leaves_keeps_the_cancelled_results_of_others_tasks(
    driver: Driver,
) -> None:
    driver.hello(b"sink-peer", session="reader", sink="totals")
    driver.submit(task(1, sink="totals"))
    driver.cancel(1)

    left = driver.client(b"sink-peer", p.Bye())

    assert not left.forgotten
    task_1 = driver.scheduler.find_task("alice", 1)
    assert task_1 is not None and task_1.status is p.Status.CANCELLED


@pytest.mark.parametrize("session", ["sink:totals", "mdp:01"])
def test_a_session_named_like_the_broker_s_own_recipients_is_refused(
    driver: Driver, session: str
) -> None:
    driver.submit(task(1, sink="totals"))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])

    refused = driver.hello(OTHER, session=session)

    [error] = sent(refused, OTHER, p.Error)
    assert error.code == p.RESERVED_NAME
    assert "'sink:'" in error.message and "name the session otherwise" in error.message
    assert not sent(refused, OTHER, p.Welcome)
    assert not results(refused, OTHER), "a session took the sink's results"
    assert error_codes(driver.submit(task(2), peer=OTHER), OTHER) == ["hello_first"]


def test_a_sink_never_receives_results_of_a_session_named_after_it(
    driver: Driver,
) -> None:
    driver.hello(OTHER, session="sink:totals")  # refused: no such session
    driver.submit(task(1), peer=OTHER)
    for assignment in assignments(driver.ready(W1), W1):
        driver.done(W1, assignment, payload=b"private")
    driver.client(OTHER, p.Bye())

    effects = driver.hello(b"sink-peer", session="reader", sink="totals")

    assert not results(effects, b"sink-peer")
    assert not driver.scheduler.tasks


SINK_A = b"sink-a"
SINK_B = b"sink-b"


def sink_with_one_result_delivered(driver: Driver) -> None:
    """Sink `totals` received by SINK_A, holding task 1's result unacknowledged."""
    driver.hello(SINK_A, session="reader-a", sink="totals")
    driver.submit(task(1, sink="totals"))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])


def test_second_process_receiving_a_sink_is_refused_while_the_first_is_there(
    driver: Driver,
) -> None:
    sink_with_one_result_delivered(driver)

    refused = driver.hello(SINK_B, session="reader-b", sink="totals")
    heartbeat = driver.client(SINK_A, p.Heartbeat())

    assert error_codes(refused, SINK_B) == ["sink_taken"]
    assert not sent(refused, SINK_B, p.Welcome)
    assert not error_codes(heartbeat, SINK_A), "the first one was evicted"
    assert driver.scheduler.recipients[sink_recipient("totals")].peer == SINK_A
    assert driver.scheduler.recipient_of(SINK_B) is None


def test_a_refused_receiver_asking_again_is_news_only_the_first_time(
    driver: Driver,
) -> None:
    # Before, the broker warned once a second while a refused sink asked again.
    sink_with_one_result_delivered(driver)

    first = driver.hello(SINK_B, session="reader-b", sink="totals")
    again = driver.hello(SINK_B, session="reader-b", sink="totals")
    another = driver.hello(OTHER, session="reader-c", sink="totals")

    assert notices(first, SinkTaken) == [SinkTaken("totals", first=True)]
    assert notices(again, SinkTaken) == [SinkTaken("totals", first=False)]
    assert notices(another, SinkTaken) == [SinkTaken("totals", first=True)]


def test_sink_takes_its_name_back_on_a_new_connection(driver: Driver) -> None:
    sink_with_one_result_delivered(driver)

    effects = driver.hello(SINK_B, session="reader-a", sink="totals")

    assert sent(effects, SINK_B, p.Welcome)
    assert [r.origin for r in results(effects, SINK_B)] == ["alice"]


@pytest.mark.parametrize("how", ["bye", "unreachable", "silent"])
def test_a_sink_is_another_process_s_once_its_receiver_left(
    driver: Driver, how: str
) -> None:
    sink_with_one_result_delivered(driver)
    if how == "bye":
        driver.client(SINK_A, p.Bye())
    elif how == "unreachable":
        driver.unreachable(SINK_A)
    else:
        driver.client(CLIENT, p.Heartbeat())
        driver.tick(3.5)

    effects = driver.hello(SINK_B, session="reader-b", sink="totals")

    assert sent(effects, SINK_B, p.Welcome)
    assert [r.origin for r in results(effects, SINK_B)] == ["alice"]


def test_a_sink_given_up_on_hears_that_its_name_was_taken(driver: Driver) -> None:
    sink_with_one_result_delivered(driver)
    driver.client(CLIENT, p.Heartbeat())
    driver.tick(3.5)  # SINK_A fell silent: given up on
    driver.hello(SINK_B, session="reader-b", sink="totals")

    effects = driver.client(SINK_A, p.Ack([("alice", 1)]))

    assert error_codes(effects, SINK_A) == ["hello_first"]
    assert not effects.forgotten, "the old receiver acknowledged the new one's"
    assert driver.scheduler.recipients[sink_recipient("totals")].peer == SINK_B
    assert error_codes(driver.hello(SINK_A, "reader-a", "totals"), SINK_A) == [
        "sink_taken"
    ]


def test_acknowledged_result_is_forgotten(driver: Driver) -> None:
    driver.submit(task(1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])

    effects = driver.ack(("", 1))

    assert len(effects.forgotten) == 1
    assert not driver.scheduler.tasks


def test_ack_of_a_result_not_yet_delivered_is_ignored(driver: Driver) -> None:
    driver.submit(task(1))

    effects = driver.ack(("", 1))

    assert not effects.forgotten
    assert len(driver.scheduler.tasks) == 1


def test_delivery_window_caps_unacknowledged_results() -> None:
    driver = Driver(Limits(delivery_window=2))
    driver.hello()
    driver.submit(task(1), task(2), task(3))
    work = assignments(driver.ready(W1, capacity=3), W1)

    outcomes = [p.Outcome(a.ticket, a.attempt, p.Status.OK, b"") for a in work]
    first = driver.worker(W1, p.Done(outcomes))
    second = driver.ack(("", 1))

    assert [r.task_id for r in results(first)] == [1, 2]
    assert [r.task_id for r in results(second)] == [3]


def test_unacked_results_are_redelivered_when_the_client_says_hello_again(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    work = assignments(driver.ready(W1, capacity=2), W1)
    for assignment in work:
        driver.done(W1, assignment)
    driver.ack(("", 1))

    effects = driver.hello(OTHER)

    assert [r.task_id for r in results(effects, OTHER)] == [2]


def test_a_revoked_connection_is_sent_no_more_results_but_may_ack_its_own(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    first, second = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, first)
    farewell = p.Error("revoked", "your key was removed")

    driver.scheduler.revoke_client(CLIENT, farewell)
    told = driver.flush()
    while_revoked = driver.done(W1, second)
    # Its ACK of what it was sent before comes in after the revocation.
    driver.scheduler.acknowledge("alice", [("", 1)])
    late_ack = driver.flush()
    refused = driver.ack(("", 2))
    back = driver.hello(OTHER)

    assert error_codes(told, CLIENT) == ["revoked"]
    assert results(while_revoked, CLIENT) == []
    assert len(late_ack.forgotten) == 1
    assert error_codes(refused, CLIENT) == ["hello_first"]
    assert [r.task_id for r in results(back, OTHER)] == [2]


def test_revoking_a_sinks_connection_keeps_its_results_for_the_next_holder(
    driver: Driver,
) -> None:
    driver.hello(SINK_A, "reader", sink="totals")
    driver.submit(task(1, sink="totals"))
    [assignment] = assignments(driver.ready(W1), W1)

    driver.scheduler.revoke_client(SINK_A, p.Error("revoked", "gone"))
    while_revoked = driver.done(W1, assignment)
    successor = driver.hello(OTHER, "other-reader", sink="totals")

    assert results(while_revoked, SINK_A) == []
    assert [r.task_id for r in results(successor, OTHER)] == [1]


def test_results_wait_for_a_client_that_went_away(driver: Driver) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.unreachable(CLIENT)

    while_gone = driver.done(W1, assignment)
    back = driver.hello(OTHER)

    assert not results(while_gone, CLIENT)
    assert [r.task_id for r in results(back, OTHER)] == [1]


def test_late_result_from_an_earlier_attempt_is_dropped(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.unreachable(W1)
    [second] = assignments(driver.ready(W2), W2)
    driver.ready(W1)  # the first worker comes back and reports its old attempt

    late = driver.done(W1, first, payload=b"stale")
    current = driver.done(W2, second, payload=b"fresh")

    assert not results(late)
    assert notices(late, LateOutcome) == [LateOutcome(first.ticket, 1, "worker-1")]
    assert [r.payload for r in results(current)] == [b"fresh"]


def test_result_from_a_worker_that_does_not_hold_the_task_is_dropped(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.ready(W2)

    effects = driver.done(W2, assignment)

    assert not results(effects)
    assert driver.scheduler.tasks[assignment.ticket].state is State.RUNNING


def test_result_from_an_unregistered_worker_asks_it_to_register(
    driver: Driver,
) -> None:
    effects = driver.worker(W1, p.Done([p.Outcome(1, 1, p.Status.OK, b"")]))

    assert error_codes(effects, W1) == ["unknown_worker"]


# --- failures -------------------------------------------------------------------------


def test_a_map_batch_of_a_lost_worker_is_counted_as_split_not_poisoned(
    driver: Driver,
) -> None:
    driver.submit(task(1, flags=int(p.Flags.BATCH)), task(2))
    assignments(driver.ready(W1, capacity=2), W1)

    lost = driver.unreachable(W1)

    [notice] = notices(lost, WorkerLost)
    assert (notice.requeued, notice.split, notice.poisoned) == (1, 1, 0)


def test_task_of_dead_worker_is_requeued(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    lost = driver.unreachable(W1)
    [second] = assignments(driver.ready(W2), W2)

    assert notices(lost, WorkerLost) == [WorkerLost("worker-1", "unreachable", 1, 0)]
    assert (second.ticket, second.attempt) == (first.ticket, 2)


def test_requeued_task_goes_before_tasks_that_never_ran(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.submit(task(2))
    driver.unreachable(W1)

    [next_up] = assignments(driver.ready(W2), W2)

    assert next_up.ticket == first.ticket


def test_task_that_kills_its_worker_max_attempts_times_fails_as_poison() -> None:
    driver = Driver(Limits(max_attempts=3))
    driver.hello()
    driver.submit(task(1))

    for n in range(3):
        peer = f"worker-{n}".encode()
        assert len(assignments(driver.ready(peer), peer)) == 1
        effects = driver.unreachable(peer)

    [entry] = results(effects)
    assert entry.status is p.Status.POISON
    assert error_report(entry)["kind"] == "poison"
    assert "max_attempts=3" in error_report(entry)["message"]
    assert notices(effects, WorkerLost)[0].poisoned == 1


def test_crashed_outcome_counts_as_a_death_of_the_worker() -> None:
    driver = Driver(Limits(max_attempts=2))
    driver.hello()
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)

    retried = driver.done(W1, first, p.Status.CRASHED)
    [second] = assignments(retried, W1)
    poisoned = driver.done(W1, second, p.Status.CRASHED)

    assert second.attempt == 2
    assert [r.status for r in results(poisoned)] == [p.Status.POISON]


def test_poison_says_how_the_task_process_died_as_the_worker_reported_it() -> None:
    driver = Driver(Limits(max_attempts=2))
    driver.hello()
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    report = pack_error(TaskError(p.PROCESS_DIED, "killed by SIGKILL"))

    [second] = assignments(driver.done(W1, first, p.Status.CRASHED, report), W1)
    [entry] = results(driver.done(W1, second, p.Status.CRASHED, report))

    assert (
        "last: its task process died (killed by SIGKILL)"
        in (error_report(entry)["message"])
    )


def test_batch_whose_worker_died_fails_at_once_for_its_items_to_run_alone() -> None:
    driver = Driver(Limits(max_attempts=3))
    driver.hello()
    driver.submit(task(1, flags=p.Flags.BATCH))
    [batch] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, batch, p.Status.CRASHED)

    [entry] = results(effects)
    assert entry.status is p.Status.POISON
    assert error_report(entry)["kind"] == "poison"
    assert "batch" in error_report(entry)["message"]


def test_item_split_from_a_dead_batch_has_that_death_counted_already() -> None:
    driver = Driver(Limits(max_attempts=3))
    driver.hello()
    driver.submit(task(1, flags=p.Flags.SPLIT))

    [first] = assignments(driver.ready(W1), W1)
    [second] = assignments(driver.done(W1, first, p.Status.CRASHED), W1)
    poisoned = driver.done(W1, second, p.Status.CRASHED)

    [entry] = results(poisoned)
    assert entry.status is p.Status.POISON
    assert "3 times" in error_report(entry)["message"]


def test_items_split_from_a_dead_batch_run_before_their_maps_backlog_in_order() -> None:
    # A tester's map, its worker killed, sent the items of its batches again
    # behind its whole backlog; its output, in input order, stood still.
    driver = Driver()
    driver.hello()
    driver.submit(*[task(i) for i in range(1, 6)])  # the map's later batches
    driver.submit(*[task(i, flags=p.Flags.SPLIT) for i in range(10, 13)])

    ran = []  # task ids, in the order the worker got them
    handed = assignments(driver.ready(W1), W1)
    while handed:
        ran.append(driver.scheduler.tasks[handed[0].ticket].task_id)
        handed = assignments(driver.done(W1, handed[0]), W1)

    assert ran == [10, 11, 12, 1, 2, 3, 4, 5]


def test_silent_worker_is_expired_and_its_tasks_requeued(driver: Driver) -> None:
    driver.submit(task(1))
    driver.ready(W1)

    still_alive = driver.tick(3.0)  # heartbeat 1s x liveness 3
    expired = driver.tick(0.1)
    [again] = assignments(driver.ready(W2), W2)

    assert not notices(still_alive, WorkerLost)
    [lost] = notices(expired, WorkerLost)
    assert lost.requeued == 1
    assert again.attempt == 2


def test_heartbeating_worker_is_not_expired(driver: Driver) -> None:
    driver.ready(W1)
    for _ in range(10):
        driver.worker(W1, p.Heartbeat())
        assert not notices(driver.tick(2.0), WorkerLost)

    assert "worker-1" in driver.scheduler.workers


def test_worker_that_registers_again_gets_its_tasks_requeued_without_a_death() -> None:
    driver = Driver(Limits(max_attempts=1))
    driver.hello()
    driver.submit(task(1))
    driver.ready(W1)

    effects = driver.ready(W1)

    [again] = assignments(effects, W1)
    assert again.attempt == 2
    assert not results(effects)


def test_worker_that_says_bye_has_its_tasks_requeued_first(driver: Driver) -> None:
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1), W1)
    driver.submit(task(2))

    driver.worker(W1, p.Bye())
    [again] = assignments(driver.ready(W2), W2)

    assert "worker-1" not in driver.scheduler.workers
    assert (again.ticket, again.attempt) == (first.ticket, 2)


def test_worker_that_says_bye_has_left_not_been_lost(driver: Driver) -> None:
    driver.submit(task(1))
    driver.ready(W1)

    effects = driver.worker(W1, p.Bye())

    assert notices(effects, WorkerLeft) == [WorkerLeft("worker-1", 1)]
    assert not notices(effects, WorkerLost)


def test_draining_worker_is_sent_no_more_tasks(driver: Driver) -> None:
    driver.submit(task(1), task(2))
    [first] = assignments(driver.ready(W1, capacity=1), W1)

    drained = driver.worker(W1, p.Drain())
    finished = driver.done(W1, first)

    assert [n.running for n in notices(drained, WorkerDraining)] == [1]
    assert [r.task_id for r in results(finished)] == [1]
    assert not assignments(finished, W1)
    assert len(assignments(driver.ready(W2), W2)) == 1


def test_draining_worker_is_shown_in_status(driver: Driver) -> None:
    driver.ready(W1)
    driver.worker(W1, p.Drain())

    [worker] = driver.scheduler.status(driver.now)["workers"]  # type: ignore[union-attr]

    assert worker["draining"] is True


def test_raised_task_without_retries_fails_with_its_error(driver: Driver) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, assignment, p.Status.RAISED, b"report")

    assert results(effects) == [p.ResultEntry(1, p.Status.RAISED, b"report")]


def test_raised_task_with_retries_is_retried_after_backoff() -> None:
    backoff = Backoff(base_s=2.0, cap_s=10.0, jitter=0.0)
    driver = Driver(Limits(retry_backoff=backoff))
    driver.hello()
    driver.submit(task(1, retries=1))
    [first] = assignments(driver.ready(W1), W1)

    raised = driver.done(W1, first, p.Status.RAISED)
    too_soon = driver.tick(1.5)
    due = driver.tick(1.0)

    assert not results(raised) and not assignments(raised, W1)
    assert not assignments(too_soon, W1)
    [second] = assignments(due, W1)
    assert second.attempt == 2
    final = driver.done(W1, second, p.Status.RAISED, b"report")
    assert [r.status for r in results(final)] == [p.Status.RAISED]


def test_task_with_many_retries_keeps_being_retried() -> None:
    backoff = Backoff(base_s=0.001, cap_s=0.001, jitter=0.0)
    driver = Driver(Limits(retry_backoff=backoff))
    driver.hello()
    driver.submit(task(1, retries=2000))
    effects = driver.ready(W1)

    for _ in range(1100):
        [assignment] = assignments(effects, W1)
        driver.done(W1, assignment, p.Status.RAISED)
        effects = driver.tick(0.01)

    assert driver.scheduler.tasks[assignment.ticket].attempt > 1024


def test_a_map_batch_that_raised_whole_is_not_retried_its_retries_are_its_items(
    driver: Driver,
) -> None:
    # A batch carries its map's retries so that the broker counts the items
    # its map will retry as retried, not failed (see telemetry); the map runs
    # them again alone, and a batch that failed whole fails the same way again.
    driver.submit(task(1, flags=p.Flags.BATCH, retries=2))
    [assignment] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, assignment, p.Status.RAISED, b"report")

    assert [r.status for r in results(effects)] == [p.Status.RAISED]


def test_timed_out_task_is_not_retried(driver: Driver) -> None:
    driver.submit(task(1, retries=3))
    [assignment] = assignments(driver.ready(W1), W1)

    effects = driver.done(W1, assignment, p.Status.TIMEOUT)

    assert [r.status for r in results(effects)] == [p.Status.TIMEOUT]


# --- cancellation ---------------------------------------------------------------------


def test_large_results_wait_at_the_broker_beyond_the_delivery_window_bytes() -> None:
    driver = Driver(Limits(delivery_window_bytes=2_500_000))
    driver.hello()
    driver.submit(*[task(i) for i in range(5)])
    work = assignments(driver.ready(W1, capacity=5), W1)
    big = b"x" * 1_000_000

    sent = [r for a in work for r in results(driver.done(W1, a, payload=big))]

    assert len(sent) == 3  # the third passes 2.5 MB; the rest wait for acks
    later = results(driver.ack(*[("", r.task_id) for r in sent]))
    assert len(later) == 2


def test_queued_task_can_be_cancelled(driver: Driver) -> None:
    driver.submit(task(1))

    cancelled = driver.cancel(1)
    on_ready = driver.ready(W1)

    assert [r.status for r in results(cancelled)] == [p.Status.CANCELLED]
    assert not assignments(on_ready, W1)


def test_queues_of_names_nobody_serves_go_once_their_tasks_are_cancelled(
    driver: Driver,
) -> None:
    names = [f"nobody.serves:f{i}" for i in range(50)]
    for task_id, name in enumerate(names, 1):
        driver.submit(task(task_id, function=name))
    for task_id in range(1, 51):
        driver.cancel(task_id)

    status = driver.scheduler.status(driver.now)

    assert not set(names) & set(driver.scheduler._queues)
    assert status["queued"] == {}
    driver.scheduler.check_invariants()


def test_names_are_ordered_as_text_with_the_numbers_in_them_by_value() -> None:
    names = ["job10", "job9", "Job1", "job1.b", "job1", "job01", "job:2", "job"]

    assert sorted(names, key=name_order) == [
        "Job1",  # as text: capitals first
        "job",
        "job01",  # the same number as job1: the names settle it
        "job1",
        "job1.b",
        "job9",
        "job10",
        "job:2",
    ]


def test_status_lists_the_functions_with_the_most_tasks_first(driver: Driver) -> None:
    # Tasks of functions nobody serves: all of them queued.
    loads = {"f1": 1, "f10": 3, "f2": 3, "f9": 12}
    task_ids = iter(range(1, 100))
    for name, count in loads.items():
        for _ in range(count):
            driver.submit(task(next(task_ids), function=f"nobody.serves:{name}"))

    queued = driver.scheduler.status(driver.now)["queued"]

    busiest = ["f9", "f2", "f10", "f1"]
    assert list(queued) == [f"nobody.serves:{name}" for name in busiest]  # type: ignore[call-overload]
    assert busiest_first(loads, {}) == busiest
    # Running tasks count too: 2 on workers and 1 queued pass 2 queued.
    assert busiest_first({"a": 2, "b": 1}, {"b": 2}) == ["b", "a"]


def test_task_waiting_for_a_retry_can_be_cancelled() -> None:
    driver = Driver(Limits(retry_backoff=Backoff(1.0, 1.0, 0.0)))
    driver.hello()
    driver.submit(task(1, retries=1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.done(W1, assignment, p.Status.RAISED)

    cancelled = driver.cancel(1)
    later = driver.tick(1.5)  # past the backoff, before the worker expires

    assert [r.status for r in results(cancelled)] == [p.Status.CANCELLED]
    assert not assignments(later, W1)


def test_running_task_cancelled_is_released_and_its_slot_reused_at_once(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    [assignment] = assignments(driver.ready(W1), W1)

    cancelled = driver.cancel(1)

    [release] = sent(cancelled, W1, p.Release)
    assert release.tickets == [(assignment.ticket, assignment.attempt)]
    assert [a.ticket for a in assignments(cancelled, W1)] == [assignment.ticket + 1]


def test_finished_task_cancelled_before_its_result_was_read_is_forgotten(
    driver: Driver,
) -> None:
    # A map abandoned after a break cancels what it has not yielded: results
    # that finished meanwhile must not wait a day for a session that left.
    driver.hello()
    driver.submit(task(1), task(2))
    first, second = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, first)  # sent to the client, not acknowledged yet
    driver.unreachable(CLIENT)
    driver.done(W1, second)  # pending: its client is not connected
    driver.hello()

    driver.cancel(1, 2)

    assert not driver.scheduler.tasks
    recipient = driver.scheduler.recipients["alice"]
    assert not recipient.pending and not recipient.unacked


def test_a_task_named_twice_in_one_cancel_still_answers_cancelled(
    driver: Driver,
) -> None:
    driver.submit(task(1))

    cancelled = driver.cancel(1, 1)

    assert [r.status for r in results(cancelled)] == [p.Status.CANCELLED]


def test_running_task_cancelled_is_dropped_result_and_all(driver: Driver) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)

    cancelled = driver.cancel(1)
    crossed = driver.done(W1, assignment)  # sent before the worker read RELEASE

    assert not results(cancelled) and not results(crossed)
    assert not driver.scheduler.tasks
    assert driver.scheduler.totals()["cancelled"] == 1
    [late] = notices(crossed, LateOutcome)
    assert late.released, "a result crossing its RELEASE is no fault"


def test_every_result_crossing_a_large_cancel_is_no_fault(driver: Driver) -> None:
    # More than a few thousand tasks held by one worker, all cancelled at
    # once: each result it had sent before reading the RELEASE is expected.
    count = 5000
    driver.submit(*(task(i) for i in range(count)))
    held = assignments(driver.ready(W1, capacity=count), W1)
    assert len(held) == count

    driver.cancel(*range(count))
    crossed = driver.worker(W1, p.Done([_ok(a) for a in held]))

    late = notices(crossed, LateOutcome)
    assert len(late) == count
    assert all(notice.released for notice in late)


def test_released_tasks_are_forgotten_once_no_result_can_still_cross(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))
    _first, second = assignments(driver.ready(W1, capacity=2), W1)
    driver.cancel(1)

    driver.now += RELEASED_KEPT_S + 1
    driver.cancel(2)  # the next RELEASE to it sheds what no result can cross

    worker = driver.scheduler.workers[W1.decode()]
    assert list(worker.released) == [(second.ticket, second.attempt)]


def _ok(assignment: p.Assignment) -> p.Outcome:
    return p.Outcome(assignment.ticket, assignment.attempt, p.Status.OK, b"r", 0.0)


def test_running_task_cancelled_is_forgotten_by_the_journal_at_once(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)

    cancelled = driver.cancel(1)

    # A broker restarted on the journal now must not queue it again.
    assert cancelled.forgotten == [assignment.ticket]
    assert assignment.ticket not in driver.scheduler.tasks


@pytest.mark.parametrize("how", ["dies", "leaves", "falls silent"])
def test_running_task_cancelled_is_not_requeued_when_its_worker_goes(
    driver: Driver, how: str
) -> None:
    driver.submit(task(1))
    driver.ready(W1)
    driver.cancel(1)

    if how == "dies":
        gone = driver.unreachable(W1)
    elif how == "leaves":
        gone = driver.worker(W1, p.Bye())
    else:
        gone = driver.tick(3.5)
    on_ready = driver.ready(W2)

    assert not assignments(on_ready, W2)
    assert not results(gone) and not driver.scheduler.tasks
    lost = notices(gone, WorkerLost) + notices(gone, WorkerLeft)
    assert [n.requeued for n in lost] == [0]


def test_operator_cancel_of_a_task_its_client_cancelled_finds_it_gone(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    driver.ready(W1)
    driver.cancel(1)

    effects = driver.client(CLIENT, p.CancelTask("alice", 1))

    [reply] = sent(effects, CLIENT, p.OperatorReply)
    assert reply.report == {"outcome": "unknown"}


def test_cancel_of_another_sessions_task_does_nothing(driver: Driver) -> None:
    driver.hello(OTHER, session="bob")
    driver.submit(task(1))

    effects = driver.cancel(1, peer=OTHER)

    assert not results(effects, OTHER) and not results(effects)
    assert len(assignments(driver.ready(W1), W1)) == 1


# --- clients coming and going ---------------------------------------------------------


def test_a_client_unreachable_twice_in_one_turn_is_lost_once(driver: Driver) -> None:
    driver.submit(task(1))

    driver.scheduler.peer_unreachable(CLIENT, driver.now)
    driver.scheduler.peer_unreachable(CLIENT, driver.now)  # a second send failed
    effects = driver.flush()

    assert notices(effects, ClientLost) == [
        ClientLost("alice", 0, Departure.UNREACHABLE)
    ]
    assert notices(effects, ClientLost)[0].unfinished == 1  # its task goes on


def test_a_client_that_says_bye_is_noted_as_left(driver: Driver) -> None:
    driver.submit(task(1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])
    driver.ack(("", 1))

    left = driver.client(CLIENT, p.Bye())

    assert notices(left, ClientLost) == [ClientLost("alice", 0, Departure.LEFT)]


def test_status_of_clients_adds_up_to_the_results_it_counts() -> None:
    # A result delivered and not acknowledged, one not sent, a sink's, and a
    # tombstone: each client's pending and unacked add up to the totals.
    driver = Driver(Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0))
    results_expired_for_a_gone_client(driver, 1)
    driver.hello(OTHER, session="bob")
    submitted = driver.submit(task(1), task(2), task(3, sink="out"), peer=OTHER)
    work = assignments(submitted, W1)
    while work:
        work += assignments(driver.done(W1, work.pop()), W1)
    driver.unreachable(OTHER)

    status = driver.scheduler.status(driver.now)

    clients = status["clients"]
    assert isinstance(clients, list)
    owed = sum(c["pending"] + c["unacknowledged"] for c in clients)
    assert (status["results_waiting"], status["results_expired"]) == (3, 1)
    assert owed == 4


def test_status_shows_the_tasks_a_departed_session_left_queued(
    driver: Driver,
) -> None:
    driver.submit(task(1), task(2))  # nobody serves them: they stay queued
    driver.client(CLIENT, p.Bye())

    status = driver.scheduler.status(driver.now)

    clients = status["clients"]
    assert isinstance(clients, list)
    [alice] = [c for c in clients if c["name"] == "alice"]
    assert (alice["connected"], alice["pending"], alice["tasks"]) == (False, 0, 2)


def test_silent_client_is_given_up_and_its_results_kept(driver: Driver) -> None:
    driver.submit(task(1))
    driver.ready(W1)

    gone = driver.tick(3.5)

    assert notices(gone, ClientLost) == [ClientLost("alice", 0, Departure.SILENT)]
    assert driver.scheduler.recipients["alice"].peer is None
    assert len(driver.scheduler.tasks) == 1


def test_client_given_up_for_silence_is_taken_back_when_it_speaks_again(
    driver: Driver,
) -> None:
    driver.tick(3.5)

    effects = driver.client(CLIENT, p.Heartbeat())

    assert not error_codes(effects, CLIENT)
    assert driver.scheduler.recipients["alice"].peer == CLIENT


def test_client_given_up_for_silence_is_not_sent_again_what_it_was_sent(
    driver: Driver,
) -> None:
    # Busy (a sink blocked on its output, a paused process), not gone: its
    # connection still carries what it was sent.
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    first = driver.done(W1, assignment)
    driver.tick(3.5)

    back = driver.client(CLIENT, p.Heartbeat())

    assert [r.task_id for r in results(first)] == [1]
    assert results(back) == []
    assert driver.scheduler.recipients["alice"].peer == CLIENT


def test_client_whose_send_failed_is_sent_its_unacked_results_on_return(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.done(W1, assignment)
    driver.unreachable(CLIENT)

    back = driver.client(CLIENT, p.Heartbeat())

    assert [r.task_id for r in results(back)] == [1]


def test_ack_of_a_result_waiting_to_be_sent_again_forgets_it() -> None:
    # The client received 1 and 2, then reconnected before its ACK left: the
    # new connection is sent 1 again (a window of one), then acknowledges both.
    driver = Driver(Limits(delivery_window=1))
    driver.hello()
    driver.submit(task(1), task(2))
    work = assignments(driver.ready(W1, capacity=2), W1)
    for assignment in work:
        driver.done(W1, assignment)
    driver.ack(("", 1))  # 2 was sent in its turn
    resent = driver.hello(OTHER)

    acked = driver.ack(("", 2), peer=OTHER)

    assert [r.task_id for r in results(resent, OTHER)] == [2]
    assert len(acked.forgotten) == 1
    assert driver.scheduler.tasks == {}


def test_ack_of_a_result_not_yet_sent_again_keeps_it_from_being_sent() -> None:
    driver = Driver(Limits(delivery_window=1))
    driver.hello()
    driver.submit(task(1), task(2))
    work = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, work[0])
    driver.ack(("", 1))
    driver.done(W1, work[1])  # sent; not acknowledged before the reconnection
    driver.submit(task(3))
    [third] = assignments(driver.ready(W1, capacity=2), W1)
    driver.done(W1, third)  # waits: the window of one is full
    resent = driver.hello(OTHER)  # 2 again; 3 waits behind it

    after_ack = driver.ack(("", 3), ("", 2), peer=OTHER)

    assert [r.task_id for r in results(resent, OTHER)] == [2]
    assert results(after_ack, OTHER) == []
    assert driver.scheduler.tasks == {}


def test_client_that_says_bye_keeps_its_results_for_its_return(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.client(CLIENT, p.Bye())

    while_gone = driver.done(W1, assignment)
    back = driver.hello(OTHER)

    assert not results(while_gone, CLIENT)
    assert [r.task_id for r in results(back, OTHER)] == [1]


def test_uncollected_result_expires_to_a_tombstone_after_its_ttl() -> None:
    driver = Driver(Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0))
    driver.hello()
    driver.submit(task(1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])
    driver.unreachable(CLIENT)

    driver.tick(59.0)
    kept = driver.hello(OTHER)
    driver.unreachable(OTHER)
    driver.tick(2.0)
    expired = driver.hello(b"client-3")

    assert [r.status for r in results(kept, OTHER)] == [p.Status.OK]
    [tombstone] = results(expired, b"client-3")
    assert tombstone.status is p.Status.EXPIRED
    assert "result_ttl_s" in error_report(tombstone)["message"]


def results_expired_for_a_gone_client(driver: Driver, count: int) -> None:
    """Tasks 1..count of session alice finished, alice gone, their results
    expired to tombstones just now (result_ttl_s 60)."""
    driver.hello()
    driver.submit(*(task(i) for i in range(1, count + 1)))
    for assignment in assignments(driver.ready(W1, capacity=count), W1):
        driver.done(W1, assignment)
    driver.unreachable(CLIENT)
    driver.tick(61.0)


def test_a_tombstone_is_forgotten_one_ttl_after_its_result_expired() -> None:
    driver = Driver(Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0))
    results_expired_for_a_gone_client(driver, 2)
    tickets = set(driver.scheduler.tasks)

    kept = driver.tick(59.0)
    forgotten = driver.tick(2.0)
    back = driver.hello(OTHER)

    assert not kept.forgotten
    assert set(forgotten.forgotten) == tickets
    assert driver.scheduler.tasks == {}
    assert results(back, OTHER) == []
    assert driver.scheduler.status(driver.now)["results_waiting"] == 0


def test_a_tombstone_delivered_and_not_acknowledged_is_forgotten_too() -> None:
    driver = Driver(Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0))
    results_expired_for_a_gone_client(driver, 1)
    [tombstone] = results(driver.hello(OTHER), OTHER)
    driver.unreachable(OTHER)

    driver.tick(61.0)
    late_ack = driver.hello(b"client-3")

    assert tombstone.status is p.Status.EXPIRED
    assert driver.scheduler.tasks == {}
    assert results(late_ack, b"client-3") == []


def test_tombstones_do_not_count_against_max_queued_tasks() -> None:
    limits = Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0, max_queued_tasks=2)
    driver = Driver(limits)
    results_expired_for_a_gone_client(driver, 2)

    driver.hello(OTHER, session="bob")
    effects = driver.submit(task(1), task(2), peer=OTHER)

    assert accepted(effects, OTHER) == [1, 2]


def test_tombstones_do_not_count_against_max_queued_bytes() -> None:
    limits = Limits(
        result_ttl_s=60.0, heartbeat_interval_s=100.0, max_queued_bytes=2000
    )
    driver = Driver(limits)
    results_expired_for_a_gone_client(driver, 2)
    assert driver.scheduler.status(driver.now)["results_expired"] == 2

    driver.hello(OTHER, session="bob")
    effects = driver.submit(task(1, payload=b"x" * 1990), peer=OTHER)

    assert accepted(effects, OTHER) == [1]


def test_refusal_at_max_queued_tasks_counts_no_tombstone_as_waiting() -> None:
    limits = Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0, max_queued_tasks=3)
    driver = Driver(limits)
    results_expired_for_a_gone_client(driver, 2)
    driver.hello(OTHER, session="bob")

    effects = driver.submit(task(1), task(2), task(3), task(4), peer=OTHER)

    [refusal] = results(effects, OTHER)
    message = error_report(refusal)["message"]
    assert "3 tasks" in message and "3 queued" in message
    assert "0 results waiting" in message


def test_status_counts_tombstones_apart_from_results_waiting() -> None:
    driver = Driver(Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0))
    results_expired_for_a_gone_client(driver, 2)

    status = driver.scheduler.status(driver.now)

    assert status["results_waiting"] == 0
    assert status["results_expired"] == 2
    [alice] = status["clients"]
    assert alice["pending"] + alice["unacknowledged"] == 2
    assert alice["expired"] == 2


def test_a_restored_tombstone_is_forgotten_one_ttl_after_it_expired() -> None:
    limits = Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0)
    before = Driver(limits)
    results_expired_for_a_gone_client(before, 1)
    [tombstone] = before.scheduler.tasks.values()
    tombstone.finished_at = before.now - 30.0  # as the journal says it expired

    after = Driver(limits)
    after.now = before.now
    after.scheduler.restore(tombstone, after.now)
    kept = after.tick(29.0)
    forgotten = after.tick(2.0)

    assert not kept.finished and not kept.forgotten  # not expired again
    assert forgotten.forgotten == [tombstone.ticket]
    assert after.scheduler.tasks == {}


# --- one live client per session -----------------------------------------------------

A, B = 1, 2  # the instance numbers of two Client objects on session "alice"


def session_with_one_result_delivered(driver: Driver) -> None:
    """Session alice held by client A on CLIENT, task 1's result unacknowledged."""
    driver.hello(CLIENT, instance=A)
    driver.submit(task(1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0])


def test_second_client_of_a_session_is_refused_while_the_first_is_there() -> None:
    driver = Driver()
    session_with_one_result_delivered(driver)

    refused = driver.hello(OTHER, instance=B)
    heartbeat = driver.client(CLIENT, p.Heartbeat())

    assert error_codes(refused, OTHER) == [p.SESSION_IN_USE]
    [error] = sent(refused, OTHER, p.Error)
    assert isinstance(error, p.Error) and "'alice'" in error.message
    assert not sent(refused, OTHER, p.Welcome)
    assert not results(refused, OTHER), "the second client got the first's result"
    assert not error_codes(heartbeat, CLIENT), "the first one was evicted"
    assert driver.scheduler.recipients["alice"].peer == CLIENT
    assert driver.scheduler.recipient_of(OTHER) is None


def test_a_refused_client_asking_again_is_news_only_the_first_time() -> None:
    driver = Driver()
    session_with_one_result_delivered(driver)

    first = driver.hello(OTHER, instance=B)
    again = driver.hello(OTHER, instance=B)

    assert notices(first, SessionHeld) == [SessionHeld("alice", first=True)]
    assert notices(again, SessionHeld) == [SessionHeld("alice", first=False)]


def test_a_client_takes_its_session_back_at_once_on_a_new_connection() -> None:
    driver = Driver()
    session_with_one_result_delivered(driver)

    effects = driver.hello(OTHER, instance=A)

    assert sent(effects, OTHER, p.Welcome)
    assert [r.task_id for r in results(effects, OTHER)] == [1]


@pytest.mark.parametrize("how", ["bye", "unreachable", "silent"])
def test_a_session_is_another_client_s_once_its_holder_left(how: str) -> None:
    driver = Driver()
    session_with_one_result_delivered(driver)
    driver.hello(OTHER, instance=B)  # refused while A is there
    if how == "bye":
        driver.client(CLIENT, p.Bye())
    elif how == "unreachable":
        driver.unreachable(CLIENT)
    else:
        driver.tick(3.5)

    effects = driver.hello(OTHER, instance=B)

    assert sent(effects, OTHER, p.Welcome)
    assert [r.task_id for r in results(effects, OTHER)] == [1]
    assert not notices(effects, SessionHeld)


def test_a_client_given_up_on_is_refused_once_another_took_its_session() -> None:
    driver = Driver()
    session_with_one_result_delivered(driver)
    driver.tick(3.5)  # A fell silent: given up on
    driver.hello(OTHER, instance=B)

    speaks_again = driver.client(CLIENT, p.Ack([("", 1)]))
    hello_again = driver.hello(CLIENT, instance=A)

    assert error_codes(speaks_again, CLIENT) == ["hello_first"]
    assert not speaks_again.forgotten, "the old holder acknowledged the new one's"
    assert error_codes(hello_again, CLIENT) == [p.SESSION_IN_USE]
    assert driver.scheduler.recipients["alice"].peer == OTHER


@pytest.mark.parametrize(("holder", "newcomer"), [(A, None), (None, B)])
def test_a_client_that_sends_no_instance_takes_the_session_as_before(
    holder: int | None, newcomer: int | None
) -> None:
    driver = Driver()
    driver.hello(CLIENT, instance=holder)

    effects = driver.hello(OTHER, instance=newcomer)

    assert sent(effects, OTHER, p.Welcome)
    assert driver.scheduler.recipients["alice"].peer == OTHER


# --- introspection --------------------------------------------------------------------


def test_status_request_is_answered_with_workers_queues_and_clients(
    driver: Driver,
) -> None:
    driver.ready(W1, capacity=2)
    driver.submit(task(1), task(2), task(3, function="jobs:other"))

    [reply] = sent(driver.client(CLIENT, p.StatusRequest()), CLIENT, p.StatusReply)

    assert reply.status["queued"] == {"jobs:other": 1}
    assert reply.status["running"] == {FUNCTION: 2}
    [worker] = reply.status["workers"]
    assert (worker["id"], worker["running"], worker["capacity"]) == ("worker-1", 2, 2)
    assert reply.status["clients"][0]["name"] == "alice"


def test_status_tells_running_tasks_from_prefetched_ones_and_ages_the_oldest() -> None:
    driver = Driver(Limits(heartbeat_interval_s=100.0))
    driver.hello()
    driver.submit(task(1))
    [first] = assignments(driver.ready(W1, capacity=4, slots=1), W1)
    driver.done(W1, first, duration_s=0.001)  # short: the worker may prefetch
    driver.tick(1.0)
    driver.submit(task(2))
    driver.submit(task(3), task(4))  # held while task 2 is fresh: prefetched
    driver.tick(5.0)

    [worker] = driver.scheduler.status(driver.now)["workers"]

    assert (worker["held"], worker["running"], worker["prefetched"]) == (3, 1, 2)
    assert worker["oldest_running_s"] == pytest.approx(5.0)
    # The id `cancel` takes: a hung one had nothing else to find it by.
    assert worker["oldest_task"] == {
        "session": "alice",
        "task_id": 2,
        "function": FUNCTION,
    }


def test_status_of_an_idle_worker_has_no_oldest_task(driver: Driver) -> None:
    driver.ready(W1, capacity=2, slots=2)

    [worker] = driver.scheduler.status(driver.now)["workers"]

    assert (worker["running"], worker["prefetched"]) == (0, 0)
    assert worker["oldest_running_s"] is None
    assert worker["oldest_task"] is None


def test_status_counts_every_task_of_a_worker_without_slots_as_running(
    driver: Driver,
) -> None:
    driver.ready(W1, capacity=2)
    driver.submit(task(1), task(2))

    [worker] = driver.scheduler.status(driver.now)["workers"]

    assert (worker["held"], worker["running"], worker["prefetched"]) == (2, 2, None)


def test_status_counts_a_task_waiting_for_its_retry_as_queued_and_says_so() -> None:
    # A queued task beside an idle worker that serves it looks stuck: the
    # status says it waits out a retry's backoff, and when it runs again.
    driver = Driver(Limits(retry_backoff=Backoff(2.0, 2.0, 0.0)))
    driver.hello()
    driver.submit(task(1, retries=1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0], p.Status.RAISED)
    driver.tick(0.5)

    status = driver.scheduler.status(driver.now)

    assert (status["queued"], status["running"]) == ({FUNCTION: 1}, {})
    assert status["retrying"] == {FUNCTION: 1}
    assert status["queue_counts"]["retrying"] == 1
    assert status["next_retry_in_s"] == pytest.approx(1.5)


def test_status_says_nothing_retries_once_the_retry_ran() -> None:
    driver = Driver(Limits(retry_backoff=Backoff(1.0, 1.0, 0.0)))
    driver.hello()
    driver.submit(task(1, retries=1))
    driver.done(W1, assignments(driver.ready(W1), W1)[0], p.Status.RAISED)
    assert assignments(driver.tick(1.0), W1)  # the retry runs

    status = driver.scheduler.status(driver.now)

    assert (status["retrying"], status["next_retry_in_s"]) == ({}, None)


def test_heartbeats_go_to_every_connected_peer(driver: Driver) -> None:
    driver.ready(W1)
    driver.scheduler.heartbeats()

    effects = driver.flush()

    assert sent(effects, W1, p.Heartbeat) and sent(effects, CLIENT, p.Heartbeat)


# --- restore after a journal replay ---------------------------------------------------


def journalled(task_id: int, **fields: object) -> Task:
    """A task as the journal gives it back: its ticket kept, never run here."""
    defaults: dict[str, object] = {
        "ticket": 100 + task_id,
        "session": "alice",
        "task_id": task_id,
        "function": FUNCTION,
        "payload": b"args",
        "flags": 0,
        "timeout_s": None,
        "retries_left": 0,
        "recipient": "alice",
    }
    return Task(**{**defaults, **fields})  # type: ignore[arg-type]


def restored(*tasks: Task) -> Driver:
    driver = Driver()
    for one in tasks:
        driver.scheduler.restore(one, driver.now)
    driver.scheduler.check_invariants()
    return driver


def test_restored_unfinished_task_is_queued_again() -> None:
    driver = restored(journalled(1, payload=b"abc"))

    [assignment] = assignments(driver.ready(W1), W1)

    assert (assignment.payload, assignment.attempt) == (b"abc", 1)


def test_restored_tasks_count_as_submitted_so_totals_add_up() -> None:
    finished = journalled(2, payload=b"", state=State.FINISHED, status=p.Status.OK)
    driver = restored(journalled(1), finished)
    [assignment] = assignments(driver.ready(W1), W1)
    driver.done(W1, assignment)

    totals = driver.scheduler.totals()

    assert (totals["submitted"], totals["restored"], totals["completed"]) == (1, 1, 1)


def test_restored_result_is_delivered_when_its_client_says_hello() -> None:
    finished = journalled(1, payload=b"", state=State.FINISHED, status=p.Status.OK)
    finished.result = b"49"
    driver = restored(finished)

    effects = driver.hello()

    assert results(effects) == [p.ResultEntry(1, p.Status.OK, b"49", "")]


def test_restored_task_is_recognised_when_resubmitted() -> None:
    driver = restored(journalled(1))
    driver.hello()

    effects = driver.submit(task(1))

    assert accepted(effects) == [1]
    assert not effects.accepted
    assert len(assignments(driver.ready(W1, capacity=2), W1)) == 1


def test_restored_sink_result_waits_for_the_sink() -> None:
    finished = journalled(
        1, recipient=sink_recipient("totals"), state=State.FINISHED, status=p.Status.OK
    )
    driver = restored(finished)

    effects = driver.hello(b"sink-peer", session="s", sink="totals")

    assert [r.origin for r in results(effects, b"sink-peer")] == ["alice"]


def test_restored_tasks_keep_their_tickets_and_new_ones_come_after() -> None:
    driver = restored(journalled(1), journalled(2))
    driver.hello()
    driver.submit(task(3))

    tickets = [a.ticket for a in assignments(driver.ready(W1, capacity=3), W1)]

    assert sorted(tickets) == [101, 102, 103]


def test_scheduler_starts_empty() -> None:
    scheduler = Scheduler()

    assert scheduler.status(0.0)["workers"] == []
    assert not scheduler.flush().journal_dirty


def test_session_that_leaves_with_nothing_owed_is_forgotten(driver: Driver) -> None:
    driver.hello(session="alice")

    driver.client(CLIENT, p.Bye())

    assert "alice" not in driver.scheduler.recipients


def test_session_that_leaves_owing_results_keeps_them(driver: Driver) -> None:
    driver.hello(session="alice")
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.client(CLIENT, p.Bye())

    driver.done(W1, assignment, payload=b"49")

    assert list(driver.scheduler.recipients["alice"].pending)


# --- limits at their edge, fairness, refusals from the shell ------------------------


def test_payload_of_exactly_the_limit_is_accepted() -> None:
    driver = Driver(Limits(max_payload_bytes=10))
    driver.hello()

    effects = driver.submit(task(1, payload=b"x" * 10))

    assert accepted(effects) == [1]
    assert not results(effects)


def test_result_of_exactly_the_limit_is_kept_and_one_more_byte_is_refused() -> None:
    driver = Driver(Limits(max_payload_bytes=10))
    driver.hello()
    driver.submit(task(1), task(2))
    running = assignments(driver.ready(W1, capacity=2), W1)

    at_limit = driver.done(W1, running[0], payload=b"r" * 10)
    over_limit = driver.done(W1, running[1], payload=b"r" * 11)

    by_id = {e.task_id: e for e in results(at_limit) + results(over_limit)}
    assert by_id[1].status is p.Status.OK
    assert by_id[2].status is p.Status.REJECTED
    assert "10 bytes (max_payload_bytes)" in error_report(by_id[2])["message"]


def test_client_over_its_byte_limit_is_refused_and_others_are_not() -> None:
    driver = Driver(Limits(client_max_bytes=10))
    driver.hello()
    driver.hello(OTHER, session="bob")

    first = driver.submit(*[task(i, payload=b"x" * 6) for i in (1, 2, 3)])
    other = driver.submit(task(1, payload=b"x" * 6), peer=OTHER)

    assert accepted(first) == [1]  # 2 waits for room
    [refused] = results(first)
    assert refused.task_id == 3
    assert "client_max_bytes" in error_report(refused)["message"]
    assert accepted(other, OTHER) == [1]


def test_a_flooding_client_does_not_hold_up_another_on_the_same_function() -> None:
    driver = Driver()
    driver.hello()
    driver.hello(OTHER, session="bob")
    driver.submit(*[task(i) for i in range(100)])
    driver.submit(task(1000), task(1001), peer=OTHER)

    running = assignments(driver.ready(W1, capacity=4), W1)

    sessions = [driver.scheduler.tasks[a.ticket].session for a in running]
    assert sessions.count("bob") == 2


def test_task_refused_by_the_shell_fails_as_rejected_with_its_reason(
    driver: Driver,
) -> None:
    driver.scheduler.reject(CLIENT, 7, "key bob may not submit jobs:work")
    effects = driver.flush()

    [entry] = results(effects)
    assert entry.task_id == 7
    assert entry.status is p.Status.REJECTED
    assert error_report(entry)["message"] == "key bob may not submit jobs:work"


def test_revoked_worker_gives_its_tasks_back_without_blame(driver: Driver) -> None:
    driver.submit(task(1))
    [running] = assignments(driver.ready(W1), W1)

    driver.scheduler.revoke_worker(W1, "its key was removed", driver.now)
    effects = driver.flush()

    [lost] = notices(effects, WorkerLost)
    assert (lost.requeued, lost.poisoned) == (1, 0)
    assert driver.scheduler.tasks[running.ticket].deaths == 0
    assert error_codes(driver.worker(W1, p.Heartbeat()), W1) == ["unknown_worker"]


def test_a_connection_that_says_hello_as_a_sink_leaves_its_session_away(
    driver: Driver,
) -> None:
    driver.submit(task(1))

    driver.hello(sink="totals")

    assert driver.scheduler.recipients["alice"].peer is None
    assert driver.scheduler.recipients[sink_recipient("totals")].peer == CLIENT


def test_a_connection_that_says_hello_under_a_new_name_forgets_an_idle_session(
    driver: Driver,
) -> None:
    driver.hello(session="bob")

    assert "alice" not in driver.scheduler.recipients
    assert driver.scheduler.recipients["bob"].peer == CLIENT


def test_client_is_told_when_no_connected_worker_serves_its_function(
    driver: Driver,
) -> None:
    effects = driver.submit(task(1), task(2), task(3, function="jobs:other"))

    told = [c.message for c in sent(effects, CLIENT, p.Error) if c.code == p.UNSERVED]
    assert len(told) == 2  # once per function of the SUBMIT
    assert FUNCTION in told[0] and "jobs:other" in told[1]
    assert accepted(effects) == [1, 2, 3]  # a notice: the tasks wait


def test_client_is_not_told_of_unserved_functions_while_workers_come_back(
    driver: Driver,
) -> None:
    # A tester's client, back before the workers of a restarted broker,
    # warned that no worker served its function; they registered 1-40 ms
    # later. A start is when workers come (back) too, embedded ones as well.
    driver.scheduler.await_returning_workers(driver.now)
    early = driver.submit(task(1), task(2, function="jobs:typo"))
    driver.ready(W1)  # serves FUNCTION
    after_the_start = driver.tick(
        RETURN_WAIT_BEATS * driver.scheduler.limits.heartbeat_interval_s
    )

    assert [c for c in sent(early, CLIENT, p.Error) if c.code == p.UNSERVED] == []
    # What is still unserved then is told, once.
    [told] = [c for c in sent(after_the_start, CLIENT, p.Error)]
    assert isinstance(told, p.Error) and "jobs:typo" in told.message
    assert sent(driver.tick(1.0), CLIENT, p.Error) == []


def test_client_is_not_told_of_a_function_a_connected_worker_serves(
    driver: Driver,
) -> None:
    driver.ready(W1, capacity=1)
    driver.submit(task(1))  # the worker's one slot is taken now

    effects = driver.submit(task(2))

    assert error_codes(effects, CLIENT) == []


# --- the broker's own stall ----------------------------------------------------------


def test_peers_silent_only_while_the_broker_stood_still_are_not_expired(
    driver: Driver,
) -> None:
    driver.hello()
    driver.submit(task(1))
    driver.ready(W1)

    # The broker was stopped for 8 s (heartbeat 1 s x liveness 3): nobody
    # could be heard meanwhile.
    driver.now += 8.0
    driver.scheduler.stood_still(8.0, driver.now)
    effects = driver.tick(0.0)

    assert not notices(effects, WorkerLost)
    assert not notices(effects, ClientLost)
    assert driver.scheduler.tasks[1].state is State.RUNNING


def test_peers_silent_past_a_stall_of_the_broker_are_still_expired(
    driver: Driver,
) -> None:
    driver.submit(task(1))
    driver.ready(W1)

    driver.now += 8.0
    driver.scheduler.stood_still(8.0, driver.now)
    effects = driver.tick(3.5)  # silent for longer than its liveness since

    [lost] = notices(effects, WorkerLost)
    assert lost.requeued == 1


def one_chance_task_running_through_a_broker_stall() -> Driver:
    """A task that fails at its first blamed death runs on W1 while the
    broker stands still for 8 s (its peers' liveness is 3 s)."""
    driver = Driver(Limits(max_attempts=1))
    driver.hello()
    driver.submit(task(1))
    driver.ready(W1)
    driver.now += 8.0
    driver.scheduler.stood_still(8.0, driver.now)
    return driver


def test_worker_whose_connection_closed_during_a_broker_stall_is_not_blamed() -> None:
    driver = one_chance_task_running_through_a_broker_stall()

    # It gave up on the stopped broker and reconnected: its old connection is
    # gone, the first send to it fails.
    effects = driver.unreachable(W1)

    [lost] = notices(effects, WorkerLost)
    assert (lost.requeued, lost.poisoned) == (1, 0)


def test_client_whose_connection_closed_during_a_broker_stall_is_reconnecting() -> None:
    driver = Driver()
    driver.hello()
    driver.now += 8.0
    driver.scheduler.stood_still(8.0, driver.now)

    effects = driver.unreachable(CLIENT)

    [gone] = notices(effects, ClientLost)
    assert gone.how is Departure.CUT_BY_STALL


def test_a_worker_silent_after_a_broker_stall_is_not_blamed() -> None:
    driver = one_chance_task_running_through_a_broker_stall()

    # It gave up on the stopped broker; its READY on a new connection is slow
    # to come on a loaded machine, and the old one falls silent meanwhile.
    effects = driver.tick(3.5)

    [lost] = notices(effects, WorkerLost)
    assert (lost.requeued, lost.poisoned) == (1, 0)


def test_worker_unreachable_long_after_a_broker_stall_is_blamed() -> None:
    driver = one_chance_task_running_through_a_broker_stall()
    for _ in range(5):  # heard over as long as the stall and a silence
        driver.now += 2.5
        driver.worker(W1, p.Heartbeat())

    effects = driver.unreachable(W1)  # the stall explains nothing any more

    [lost] = notices(effects, WorkerLost)
    assert (lost.requeued, lost.poisoned) == (0, 1)


# --- what a poison task's message says was seen ---------------------------------------


def test_task_whose_workers_were_lost_fails_saying_so_not_claiming_a_death() -> None:
    driver = Driver(Limits(max_attempts=2))
    driver.hello()
    driver.submit(task(1))
    driver.ready(W1)
    driver.tick(3.5)  # W1 silent: lost
    driver.hello()  # the client, silent as long, is back
    driver.ready(W2)

    poisoned = driver.unreachable(W2)

    [entry] = results(poisoned)
    message = error_report(entry)["message"]
    assert entry.status is p.Status.POISON
    assert "its worker was lost 2 times" in message
    assert "unreachable" in message
    assert "died" not in message


def test_task_whose_process_died_fails_saying_its_task_process_died() -> None:
    driver = Driver(Limits(max_attempts=1))
    driver.hello()
    driver.submit(task(1))
    [running] = assignments(driver.ready(W1), W1)

    poisoned = driver.done(W1, running, p.Status.CRASHED)

    [entry] = results(poisoned)
    message = error_report(entry)["message"]
    assert "its task process died once" in message
    assert "lost" not in message


def test_a_worker_joins_with_its_slots_and_its_credit_told_apart(
    driver: Driver,
) -> None:
    # Its credit grows with tiny tasks while its slots stay: one number for
    # both read as a capacity that changed for the same worker.
    effects = driver.ready(W1, capacity=64, slots=1)

    [joined] = notices(effects, WorkerJoined)
    assert (joined.slots, joined.capacity) == (1, 64)

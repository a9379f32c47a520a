"""A sink task counts against its sender's window until the sink acknowledges
its result; what a sender sends past its window waits at the broker for room.
So a slow or absent sink slows its senders, and nobody else."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.policy import Limits

from .driver import (
    CLIENT,
    Driver,
    accepted,
    assignments,
    error_codes,
    error_report,
    results,
    sent,
    task,
)

W1 = b"worker-1"
OTHER = b"client-2"
SINK = b"sink-peer"


def sink_tasks(*task_ids: int) -> list[p.TaskSpec]:
    return [task(task_id, sink="nobody") for task_id in task_ids]


def run_all(driver: Driver) -> None:
    """Let a worker of ample capacity run every queued task to its end."""
    for assignment in assignments(driver.ready(W1, capacity=1000), W1):
        driver.done(W1, assignment)


def waiting_for_room(driver: Driver, session: str = "alice") -> int:
    status = driver.scheduler.status(driver.now)
    [client] = [c for c in status["clients"] if c["name"] == session]  # type: ignore[attr-defined]
    return int(client["waiting_for_room"])


def test_results_waiting_for_a_sink_count_against_their_sender() -> None:
    driver = Driver(Limits(client_window=2))
    driver.hello()
    driver.submit(*sink_tasks(1, 2))
    run_all(driver)  # both results wait: nobody receives the sink

    effects = driver.submit(*sink_tasks(3))

    assert not accepted(effects) and not results(effects)
    assert waiting_for_room(driver) == 1


def test_a_task_that_waited_is_accepted_once_the_sink_acknowledges() -> None:
    driver = Driver(Limits(client_window=2))
    driver.hello()
    driver.submit(*sink_tasks(1, 2))
    run_all(driver)
    driver.submit(*sink_tasks(3, 4))
    received = driver.hello(SINK, session="reader", sink="nobody")

    effects = driver.ack(
        *[(r.origin, r.task_id) for r in results(received, SINK)][:1], peer=SINK
    )

    assert accepted(effects) == [3]  # one freed, one in
    assert waiting_for_room(driver) == 1
    assert [t.task_id for t in effects.accepted] == [3]


def test_a_sender_to_an_absent_sink_does_not_fill_the_broker_for_others() -> None:
    # As a tester saw: window 50, 120 tasks in all; one client sent to a sink
    # nobody received, had 100 accepted, and another's submit was refused.
    driver = Driver(Limits(client_window=50, max_queued_tasks=120))
    driver.hello()
    driver.hello(OTHER, session="bob")
    for batch in range(4):
        driver.submit(*sink_tasks(*range(batch * 50, batch * 50 + 50)))
        run_all(driver)

    other = driver.submit(task(1), peer=OTHER)

    assert sum(t.session == "alice" for t in driver.scheduler.tasks.values()) == 50
    assert accepted(other, OTHER) == [1]
    assert waiting_for_room(driver) == 50


def test_a_plain_task_waits_too_while_sink_results_fill_the_window() -> None:
    # Our client counts a sink task gone once accepted: it sends a plain task
    # into a window the broker sees full.
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(*sink_tasks(1))
    run_all(driver)

    effects = driver.submit(task(2))

    assert not results(effects), "refused while the client kept to its window"
    assert waiting_for_room(driver) == 1


def test_tasks_wait_in_the_order_they_came() -> None:
    driver = Driver(Limits(client_window=2))
    driver.hello()
    driver.hello(SINK, session="reader", sink="nobody")
    driver.submit(*sink_tasks(1, 2, 3, 4))  # 3 and 4 wait

    handed = assignments(driver.ready(W1), W1)
    order = []
    while handed:
        assignment = handed.pop(0)
        order.append(driver.scheduler.tasks[assignment.ticket].task_id)
        done = driver.done(W1, assignment)
        [result] = results(done, SINK)
        acked = driver.ack((result.origin, result.task_id), peer=SINK)
        handed += assignments(done, W1) + assignments(acked, W1)

    assert order == [1, 2, 3, 4]
    assert not driver.scheduler.tasks


def test_a_resubmitted_waiting_task_waits_once() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(*sink_tasks(1, 2))

    again = driver.submit(*sink_tasks(2))

    assert not results(again) and not accepted(again)
    assert waiting_for_room(driver) == 1


def test_a_cancelled_waiting_task_is_never_accepted() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(task(1), task(2))

    driver.cancel(2)
    [first] = assignments(driver.ready(W1), W1)
    driver.done(W1, first)
    effects = driver.ack(("", 1))

    assert not accepted(effects)
    assert driver.scheduler.find_task("alice", 2) is None
    assert waiting_for_room(driver) == 0


def test_a_client_that_says_bye_leaves_no_task_waiting() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(*sink_tasks(1, 2))

    driver.client(CLIENT, p.Bye())
    run_all(driver)
    received = driver.hello(SINK, session="reader", sink="nobody")
    effects = driver.ack(
        *[(r.origin, r.task_id) for r in results(received, SINK)], peer=SINK
    )

    assert not effects.accepted
    assert not driver.scheduler.tasks


def test_a_busy_client_hears_of_its_waiting_tasks_on_its_connection() -> None:
    # Given up for its silence, it still reads its connection (a paused process).
    driver = Driver(Limits(client_window=1, heartbeat_interval_s=1.0, liveness=3))
    driver.hello()
    driver.submit(*sink_tasks(1, 2))
    run_all(driver)
    driver.hello(SINK, session="reader", sink="nobody")
    driver.tick(4.0)  # everyone silent: given up on

    effects = driver.ack(("alice", 1), peer=SINK)

    assert driver.scheduler.recipients["alice"].peer is None
    assert accepted(effects, CLIENT) == [2]


def test_past_another_window_waiting_a_sender_is_refused() -> None:
    driver = Driver(Limits(client_window=2))
    driver.hello()

    effects = driver.submit(*sink_tasks(1, 2, 3, 4, 5))

    assert accepted(effects) == [1, 2]
    [refused] = results(effects)
    assert refused.task_id == 5
    assert "wait at the broker for room" in error_report(refused)["message"]


def test_the_refusals_of_one_submit_travel_in_one_message() -> None:
    # Before, a sender far past its window heard of each refused task in a
    # message of its own: thousands of messages for a few SUBMITs.
    driver = Driver(Limits(client_window=5))
    driver.hello()
    driver.submit(*sink_tasks(1, 2, 3, 4, 5))
    driver.submit(*sink_tasks(6, 7, 8, 9, 10))  # waiting for room

    effects = driver.submit(*sink_tasks(11, 12, 13, 14, 15))

    [message] = sent(effects, CLIENT, p.Results)
    assert isinstance(message, p.Results)
    assert [r.task_id for r in message.results] == [11, 12, 13, 14, 15]
    assert {r.status for r in message.results} == {p.Status.REJECTED}


def test_refusals_for_the_sender_s_rights_travel_with_the_others() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(task(1), task(2))  # one accepted, one waiting for room

    driver.scheduler.reject(CLIENT, 3, "key bob may not submit jobs:work")
    effects = driver.submit(task(4), task(5))

    [message] = sent(effects, CLIENT, p.Results)
    assert isinstance(message, p.Results)
    assert [r.task_id for r in message.results] == [3, 4, 5]


def test_a_task_larger_than_a_client_may_hold_is_refused_not_kept_waiting() -> None:
    driver = Driver(Limits(client_max_bytes=10))
    driver.hello()

    effects = driver.submit(task(1, payload=b"x" * 11))

    [refused] = results(effects)
    assert "client_max_bytes" in error_report(refused)["message"]
    assert waiting_for_room(driver) == 0


def test_purging_a_session_that_left_drops_its_waiting_tasks() -> None:
    driver = Driver(Limits(client_window=1, heartbeat_interval_s=1.0, liveness=3))
    driver.hello()
    driver.submit(task(1), task(2))
    driver.hello(OTHER, session="operator")
    driver.tick(2.0)
    driver.client(OTHER, p.Heartbeat())
    driver.tick(2.0)  # alice fell silent

    effects = driver.client(OTHER, p.Purge(session="alice"))

    [reply] = sent(effects, OTHER, p.OperatorReply)
    assert reply.report["queued"] == 2  # type: ignore[union-attr]
    assert "alice" not in driver.scheduler.recipients


def test_submitting_to_a_sink_nobody_receives_says_so() -> None:
    driver = Driver()
    driver.hello()
    driver.ready(W1)  # served: no word about the function

    absent = driver.submit(*sink_tasks(1))
    driver.hello(SINK, session="reader", sink="nobody")
    present = driver.submit(*sink_tasks(2))

    [notice] = sent(absent, CLIENT, p.Error)
    assert notice.code == p.UNSERVED
    assert "no sink 'nobody' is connected" in notice.message
    assert accepted(absent) == [1]
    assert not error_codes(present, CLIENT)


def test_a_task_id_twice_in_one_submit_past_the_waiting_room_is_refused_once() -> None:
    # As a tester's raw client saw: its window full and a window's worth
    # waiting, both copies of 3 were refused, the first for room, so that the
    # client heard of 3 twice and never that it had sent 3 twice.
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(task(1))
    driver.submit(task(2))  # waits for room: a window's worth waits now

    effects = driver.submit(task(3), task(3))

    [refusal] = results(effects)
    assert (refusal.task_id, refusal.status) == (3, p.Status.REJECTED)
    message = error_report(refusal)["message"]
    assert "task_id 3 appears twice" in message
    assert "wait at the broker for room" in message  # why the first copy was


def test_a_task_id_twice_in_one_submit_that_waits_is_refused_once_and_waits() -> None:
    driver = Driver(Limits(client_window=1))
    driver.hello()
    driver.submit(task(1))

    effects = driver.submit(task(3, b"first"), task(3, b"second"))

    [refusal] = results(effects)
    assert "task_id 3 appears twice" in error_report(refusal)["message"]
    assert waiting_for_room(driver) == 1

"""A full broker makes room from the results of client sessions that left:
those of a session with no client connected for `orphan_grace_s` become
tombstones, oldest first, before a task is refused; a session within its
grace, a connected one and a sink keep theirs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ventilator import protocol as p
from ventilator._full_queues import FullQueues
from ventilator._notice_log import NoticeLog
from ventilator.journal import SqliteJournal
from ventilator.notices import OrphansDropped
from ventilator.orphans import ROOM_HEADROOM_TASKS, Shortfall, headroom, pick_orphans
from ventilator.policy import Limits

from .driver import (
    CLIENT,
    Driver,
    accepted,
    assignments,
    error_report,
    notices,
    results,
    task,
)

W1 = b"worker-1"
BOB = b"client-bob"
BACK = b"client-back"
GRACE_S = 30.0
# Beats of 1 s, a silent client given up after 3; room for four tasks.
LIMITS = Limits(
    heartbeat_interval_s=1.0, liveness=3, max_queued_tasks=4, orphan_grace_s=GRACE_S
)


def results_left_behind(
    driver: Driver,
    count: int = 4,
    session: str = "alice",
    peer: bytes = CLIENT,
    sink: str | None = None,
) -> None:
    """`session` submits tasks 1..count, they finish, and its client is killed
    (no BYE) before it reads their results: the broker is full of them."""
    finished(driver, count, session, peer, sink)
    driver.unreachable(peer)


def finished(
    driver: Driver,
    count: int,
    session: str,
    peer: bytes = CLIENT,
    sink: str | None = None,
) -> None:
    """`session`, connected on `peer`, submits tasks 1..count; they finish,
    reported by a worker in one DONE."""
    driver.hello(peer, session)
    driver.submit(*(task(i, sink=sink) for i in range(1, count + 1)), peer=peer)
    running = assignments(driver.ready(W1, capacity=count), W1)
    outcomes = [p.Outcome(a.ticket, a.attempt, p.Status.OK, b"result") for a in running]
    driver.worker(W1, p.Done(outcomes))


def statuses(driver: Driver, session: str) -> set[p.Status | None]:
    return {t.status for t in driver.scheduler.tasks.values() if t.session == session}


def bob_submits(driver: Driver, *task_ids: int) -> tuple[list[int], list[str]]:
    """Session bob submits `task_ids`: the ids accepted, and the refusals."""
    effects = driver.submit(*(task(i) for i in task_ids), peer=BOB)
    refused = [
        error_report(entry)["message"]
        for entry in results(effects, BOB)
        if entry.status is p.Status.REJECTED
    ]
    return accepted(effects, BOB), refused


def test_a_full_broker_makes_room_from_a_session_gone_past_its_grace() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver)
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S + 1.0)

    taken, refused = bob_submits(driver, 1, 2)

    assert (taken, refused) == ([1, 2], [])
    statuses = [
        t.status for t in driver.scheduler.tasks.values() if t.session == "alice"
    ]
    # Room for two, the oldest two: a broker of 4 makes no headroom.
    assert statuses == [p.Status.EXPIRED] * 2 + [p.Status.OK] * 2


def test_status_says_a_full_broker_accepts_while_it_can_make_room() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver)

    driver.tick(GRACE_S - 5.0)
    within_grace = driver.scheduler.status(driver.now)["not_accepting"]
    driver.tick(10.0)
    past_grace = driver.scheduler.status(driver.now)["not_accepting"]

    assert "max_queued_tasks" in str(within_grace)
    assert past_grace is None  # the next task is taken, room made for it


def test_room_made_is_said_once_for_the_whole_submit() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver)
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S + 1.0)

    effects = driver.submit(task(1), task(2), task(3), peer=BOB)

    [dropped] = notices(effects, OrphansDropped)
    assert (dropped.count, dropped.sessions) == (3, 1)
    assert (dropped.limit, dropped.grace_s) == ("max_queued_tasks", GRACE_S)


def test_a_session_within_its_grace_keeps_its_results_and_the_task_is_refused() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver, count=2, session="carol", peer=b"carol")
    driver.tick(10.0)
    results_left_behind(driver, count=2, session="alice")
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S - 5.0)  # carol gone GRACE_S + 5 s, alice GRACE_S - 5 s

    taken, [refusal] = bob_submits(driver, 1, 2, 3)

    assert taken == [1, 2]  # the room of carol's results
    assert "2 results waiting for delivery" in refusal
    assert "orphan_grace_s" in refusal  # what happens to them, said
    assert statuses(driver, "carol") == {p.Status.EXPIRED}
    assert statuses(driver, "alice") == {p.Status.OK}


def test_a_connected_sessions_results_are_never_dropped() -> None:
    # Heartbeats every 100 s: alice is not given up on, though silent past
    # the grace; connected, its results are on their way to it.
    limits = Limits(heartbeat_interval_s=100.0, max_queued_tasks=4, orphan_grace_s=10.0)
    driver = Driver(limits)
    results_left_behind(driver, count=2, session="carol", peer=b"carol")
    finished(driver, 2, "alice")
    driver.hello(BOB, "bob")
    driver.tick(60.0)

    taken, refused = bob_submits(driver, 1, 2, 3)

    assert taken == [1, 2] and len(refused) == 1
    assert driver.scheduler.recipients["alice"].peer == CLIENT
    assert statuses(driver, "carol") == {p.Status.EXPIRED}
    assert statuses(driver, "alice") == {p.Status.OK}


def test_a_sinks_results_are_not_dropped() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver, count=2, session="carol", peer=b"carol")
    # Nobody receives the sink; the session that sent to it left too.
    results_left_behind(driver, count=2, sink="reports")
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S + 1.0)

    taken, refused = bob_submits(driver, 1, 2, 3)

    assert taken == [1, 2] and len(refused) == 1
    assert statuses(driver, "carol") == {p.Status.EXPIRED}
    assert statuses(driver, "alice") == {p.Status.OK}


def test_a_client_of_the_session_that_comes_back_hears_why_its_results_went() -> None:
    driver = Driver(LIMITS)
    results_left_behind(driver)
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S + 1.0)
    bob_submits(driver, 1)

    back = driver.hello(BACK, "alice")

    by_id = {entry.task_id: entry for entry in results(back, BACK)}
    assert sorted(by_id) == [1, 2, 3, 4]
    [tombstone] = [e for e in by_id.values() if e.status is p.Status.EXPIRED]
    assert tombstone.task_id == 1  # the oldest, for bob's one task
    message = error_report(tombstone)["message"]
    assert "max_queued_tasks" in message and "orphan_grace_s" in message


def test_the_oldest_results_are_dropped_first_and_no_more_than_needed() -> None:
    limits = Limits(heartbeat_interval_s=1.0, max_queued_tasks=3000, orphan_grace_s=5)
    driver = Driver(limits)
    results_left_behind(driver, count=1500, session="early", peer=b"early")
    driver.tick(1.0)
    results_left_behind(driver, count=1500, session="late", peer=b"late")
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S)

    taken, _ = bob_submits(driver, 1)

    expired = driver.scheduler.status(driver.now)["results_expired"]
    assert taken == [1]
    # One task asked for and the headroom: 31 of early's, none of late's.
    assert expired == 1 + headroom(3000, ROOM_HEADROOM_TASKS) == 31
    assert statuses(driver, "early") == {p.Status.OK, p.Status.EXPIRED}
    assert statuses(driver, "late") == {p.Status.OK}


def test_a_later_turn_drops_the_next_oldest_past_the_tombstones() -> None:
    limits = Limits(heartbeat_interval_s=1.0, max_queued_tasks=2000, orphan_grace_s=5)
    driver = Driver(limits)
    results_left_behind(driver, count=2000)
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S)
    bob_submits(driver, 1)  # alice's 21 oldest go: 1 and the headroom

    taken, refused = bob_submits(driver, *range(2, 1102))

    assert len(taken) == 1100 and refused == []
    expired = driver.scheduler.status(driver.now)["results_expired"]
    # The next oldest, past the first tombstones: what was asked, and at
    # most the headroom (20) more.
    assert 21 + 1100 <= expired <= 21 + 1100 + 20


def test_room_is_made_for_max_queued_bytes_too() -> None:
    limits = Limits(
        heartbeat_interval_s=1.0, max_queued_bytes=1_000_000, orphan_grace_s=GRACE_S
    )
    driver = Driver(limits)
    driver.hello(CLIENT, "alice")
    driver.submit(task(1))
    [assignment] = assignments(driver.ready(W1), W1)
    driver.done(W1, assignment, payload=b"r" * 900_000)
    driver.unreachable(CLIENT)
    driver.hello(BOB, "bob")
    driver.tick(GRACE_S + 1.0)

    effects = driver.submit(task(1, payload=b"a" * 200_000), peer=BOB)

    assert accepted(effects, BOB) == [1]
    [dropped] = notices(effects, OrphansDropped)
    assert dropped.limit == "max_queued_bytes"


def test_the_journal_keeps_the_tombstones_over_a_restart(path: Path) -> None:
    journal = SqliteJournal(path)
    driver = Driver(LIMITS)
    turns = []
    driver.hello(CLIENT, "alice")
    turns.append(driver.submit(*(task(i) for i in range(1, 5))))
    for assignment in assignments(driver.ready(W1, capacity=4), W1):
        turns.append(driver.done(W1, assignment))
    turns.append(driver.unreachable(CLIENT))
    driver.hello(BOB, "bob")
    turns.append(driver.tick(GRACE_S + 1.0))
    turns.append(driver.submit(task(1), peer=BOB))
    for effects in turns:
        journal.commit(effects.accepted, effects.finished, effects.forgotten)
    journal.close()

    journal = SqliteJournal(path)
    try:
        restored = journal.load()
    finally:
        journal.close()
    after = Driver(LIMITS)
    for restored_task in restored:
        after.scheduler.restore(restored_task, after.now)
    back = after.hello(BACK, "alice")

    alices = {t.task_id: t.status for t in restored if t.session == "alice"}
    assert alices == {
        1: p.Status.EXPIRED,  # the oldest, for bob's one task
        2: p.Status.OK,
        3: p.Status.OK,
        4: p.Status.OK,
    }
    assert after.scheduler.status(after.now)["results_expired"] == 1
    told = {entry.task_id: entry.status for entry in results(back, BACK)}
    assert told == alices


def test_results_restored_from_the_journal_wait_a_grace_for_their_client() -> None:
    before = Driver(LIMITS)
    results_left_behind(before)
    restored = list(before.scheduler.tasks.values())

    after = Driver(LIMITS)
    after.now = before.now + GRACE_S * 10  # the restart came much later
    for finished_task in restored:
        after.scheduler.restore(finished_task, after.now)
    after.hello(BOB, "bob")

    taken, refused = bob_submits(after, 1)

    assert taken == [] and len(refused) == 1


def test_a_pick_looks_at_no_more_results_than_its_budget() -> None:
    driver = Driver(Limits(heartbeat_interval_s=1.0, max_queued_tasks=100))
    results_left_behind(driver, count=50)
    scheduler = driver.scheduler
    shortfall = Shortfall(tasks=50, bytes=0)

    picked = pick_orphans(
        scheduler.recipients.values(),
        scheduler.tasks,
        driver.now,
        shortfall,
        max_looked_at=10,
    )

    assert len(picked) == 10
    assert [t.task_id for t in picked] == list(range(1, 11))  # the oldest


def test_the_operator_is_warned_of_the_results_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = NoticeLog(FullQueues(queue_messages=1000))
    dropped = OrphansDropped(3000, 2, "max_queued_tasks", GRACE_S)

    with caplog.at_level(logging.DEBUG, logger="ventilator.broker"):
        log.log([dropped], now=1.0)
        log.log([dropped], now=2.0)  # the next turn: not a second WARNING

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3000 results" in warnings[0].getMessage()
    assert "max_queued_tasks" in warnings[0].getMessage()

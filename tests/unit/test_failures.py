"""Failures: the bounded record of failed tasks, and how tasks ended."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.effects import Effects
from ventilator.failures import RETRY_PAYLOAD_BYTES, FailedTask, Failures
from ventilator.notices import FailureForgotten
from ventilator.scope import Scope
from ventilator.serialization import pack_value
from ventilator.tasks import Task

ERROR = pack_value({"type": "ValueError", "message": "bad"})


def task(ticket: int, payload: bytes = b"args", flags: int = 0) -> Task:
    return Task(ticket, "s", ticket, "m:f", payload, flags, None, 0, "s")


def end(failures: Failures, effects: Effects, ticket: int, status: p.Status) -> None:
    failures.count_ending(task(ticket), status, ERROR, 1.0, effects)


def test_a_success_is_counted_and_not_remembered() -> None:
    failures, effects = Failures(kept=2), Effects()
    end(failures, effects, 1, p.Status.OK)
    assert failures.finished_by_status[p.Status.OK] == 1
    assert not failures.records
    assert not effects.failures


def test_a_failure_is_remembered_and_journalled() -> None:
    failures, effects = Failures(kept=2), Effects()
    end(failures, effects, 1, p.Status.RAISED)
    assert [r.ticket for r in failures.records] == [1]
    assert effects.failures == list(failures.records)
    assert failures.records[0].payload == b"args"


def test_large_arguments_are_not_kept_for_a_retry() -> None:
    failures, effects = Failures(kept=2), Effects()
    large = task(1, b"x" * (RETRY_PAYLOAD_BYTES + 1))
    failures.count_ending(large, p.Status.RAISED, ERROR, 1.0, effects)
    assert failures.records[0].payload is None


def test_the_oldest_failures_make_room_with_one_notice_per_run() -> None:
    failures, effects = Failures(kept=2), Effects()
    for ticket in range(1, 6):
        end(failures, effects, ticket, p.Status.RAISED)
    assert [r.ticket for r in failures.records] == [4, 5]
    assert effects.unfailed == [1, 2, 3]
    assert effects.notices == [FailureForgotten(3, 2)]


def test_no_failure_is_remembered_when_none_may_be_kept() -> None:
    failures, effects = Failures(kept=0), Effects()
    end(failures, effects, 1, p.Status.RAISED)
    assert not failures.records
    assert not effects.failures
    assert failures.finished_by_status[p.Status.RAISED] == 1


def test_a_batch_handed_back_to_its_map_is_counted_apart() -> None:
    failures, effects = Failures(kept=2), Effects()
    batch = task(1, flags=int(p.Flags.BATCH))
    failures.count_ending(batch, p.Status.POISON, ERROR, 1.0, effects)
    assert failures.batches_split == 1
    assert not failures.records
    assert sum(failures.finished_by_status) == 0


def test_a_restored_batch_failure_is_dropped_from_the_journal() -> None:
    failures, effects = Failures(kept=2), Effects()
    record = FailedTask(
        1, "s", 1, "m:f", p.Status.POISON, ERROR, 1.0, b"", int(p.Flags.BATCH), None
    )
    failures.restore(record, effects)
    assert not failures.records
    assert effects.unfailed == [1]


def test_a_retried_failure_is_forgotten_by_the_journal_too() -> None:
    failures, effects = Failures(kept=2), Effects()
    end(failures, effects, 1, p.Status.RAISED)
    failures.forget(failures.records[0], effects)
    assert not failures.records
    assert effects.unfailed == [1]


def test_a_scoped_listing_shows_only_the_clients_own_failures_newest_first() -> None:
    failures, effects = Failures(kept=5), Effects()
    for ticket, session in [(1, "k1.s"), (2, "k2.s"), (3, "k1.s")]:
        own = Task(ticket, session, ticket, "m:f", b"", 0, None, 0, session)
        failures.count_ending(own, p.Status.RAISED, ERROR, 1.0, effects)
    scope = Scope("k1.", lambda function, flags: True)

    listed = failures.listed(limit=5, scope=scope, now=2.0)

    reports = listed["failed"]
    assert isinstance(reports, list)
    assert [report["ticket"] for report in reports] == [3, 1]
    assert listed["kept"] == 2


def test_a_retry_naming_no_ticket_chooses_every_failure_in_scope() -> None:
    failures, effects = Failures(kept=5), Effects()
    for ticket in (1, 2, 3):
        end(failures, effects, ticket, p.Status.RAISED)

    assert [r.ticket for r in failures.chosen(set(), None)] == [1, 2, 3]
    assert [r.ticket for r in failures.chosen({3, 9}, None)] == [3]
    assert failures.chosen(set(), Scope("k1.", lambda f, flags: True)) == []

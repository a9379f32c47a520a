"""The SQLite journal: what one broker wrote, the next one reads back."""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from ventilator import journal as journal_module
from ventilator import protocol as p
from ventilator.errors import JournalError, UsageError
from ventilator.journal import (
    CHECKPOINT_EVERY_PAGES,
    DURABILITY_MODES,
    FALLBACK_CHECKPOINT_PAGES,
    MemoryJournal,
    SqliteJournal,
    open_journal,
)
from ventilator.notices import (
    FailureForgotten,
)
from ventilator.policy import Limits
from ventilator.scheduler import (
    RETRY_PAYLOAD_BYTES,
    Effects,
    State,
    Task,
)
from ventilator.segments import IDLE_SEGMENT_KEPT_BYTES, INLINE_MAX_BYTES
from ventilator.serialization import unpack_value

from .driver import CLIENT, Driver, accepted, assignments, notices, results, task
from .journal_tasks import a_task, finished


def reopened(path: Path) -> list[Task]:
    journal = SqliteJournal(path)
    try:
        return journal.load()
    finally:
        journal.close()


def by_key(tasks: list[Task]) -> dict[tuple[str, int], Task]:
    return {t.key: t for t in tasks}


def test_accepted_task_is_loaded_as_queued_after_reopening(
    journal: SqliteJournal, path: Path
) -> None:
    original = a_task(1, timeout_s=2.5, retries_left=3, flags=p.Flags.PICKLED)
    journal.commit([original], [], [])
    journal.close()

    [loaded] = reopened(path)

    assert loaded.state is State.QUEUED
    assert loaded.status is None
    fields = ("session", "task_id", "function", "payload", "flags", "timeout_s")
    assert [getattr(loaded, f) for f in fields] == [
        getattr(original, f) for f in fields
    ]
    assert (loaded.retries_left, loaded.recipient) == (3, "alice")


def test_a_requeued_task_is_loaded_with_its_strikes(
    journal: SqliteJournal, path: Path
) -> None:
    # Forgotten at a restart, they gave a task that kills what runs it a fresh
    # max_attempts each time the broker came back.
    struck, split_item = a_task(1), a_task(2)
    split_item.deaths = 1  # the strike a split batch gives each of its items
    journal.commit([struck, split_item], [], [])
    struck.deaths, struck.losses = 1, 1
    journal.commit([], [], [], struck=[struck])
    journal.close()

    loaded = by_key(reopened(path))

    assert (loaded[struck.key].deaths, loaded[struck.key].losses) == (1, 1)
    assert (loaded[split_item.key].deaths, loaded[split_item.key].losses) == (1, 0)


def test_finished_task_is_loaded_with_its_status_and_result(
    journal: SqliteJournal, path: Path
) -> None:
    one = a_task(1)
    journal.commit([one], [], [])
    journal.commit([], [finished(one, b"report", p.Status.RAISED)], [])
    journal.close()

    [loaded] = reopened(path)

    assert loaded.state is State.FINISHED
    assert (loaded.status, loaded.result, loaded.payload) == (
        p.Status.RAISED,
        b"report",
        b"",
    )


def test_forgotten_task_is_gone_after_reopening(
    journal: SqliteJournal, path: Path
) -> None:
    first = a_task(1)
    journal.commit([first, a_task(2)], [], [])
    journal.commit([], [], [first.ticket])
    journal.close()

    assert [t.task_id for t in reopened(path)] == [2]


def test_accepted_finished_and_forgotten_in_one_turn_leaves_nothing(
    journal: SqliteJournal,
) -> None:
    one = a_task(1)

    journal.commit([one], [finished(one, b"")], [one.ticket])

    assert journal.load() == []


def test_sink_recipient_and_ok_status_survive(journal: SqliteJournal) -> None:
    one = a_task(1, recipient="sink:totals")
    journal.commit([one], [finished(one, b"49")], [])

    [loaded] = journal.load()

    assert (loaded.recipient, loaded.status, loaded.result) == (
        "sink:totals",
        p.Status.OK,
        b"49",
    )


def test_same_task_id_in_two_sessions_are_two_rows(journal: SqliteJournal) -> None:
    alices = a_task(1, "alice")
    journal.commit([alices, a_task(1, "bob")], [], [])
    journal.commit([], [], [alices.ticket])

    assert [t.key for t in journal.load()] == [("bob", 1)]


def test_failed_commit_leaves_the_journal_as_it_was(journal: SqliteJournal) -> None:
    first = a_task(1)
    journal.commit([first], [], [])
    broken = a_task(2, session=object())  # sqlite cannot bind it

    with pytest.raises(JournalError, match=str(journal.path)):
        journal.commit([broken], [], [first.ticket])

    assert [t.task_id for t in journal.load()] == [1]


def test_a_turn_of_several_rows_of_one_kind_is_all_or_nothing(
    journal: SqliteJournal,
) -> None:
    broken = a_task(2, session=object())  # sqlite cannot bind it

    with pytest.raises(JournalError):
        journal.commit([a_task(1), broken], [], [])

    assert journal.load() == []


def test_the_wal_is_copied_into_the_database_after_the_helper_flushed_it(
    journal: SqliteJournal, path: Path
) -> None:
    empty_size = path.stat().st_size
    task_ids = itertools.count()

    # One row per commit, as a sequential client's turns are; the broker
    # checkpoints at the first commit after the helper's flush.
    for _ in range(CHECKPOINT_EVERY_PAGES):
        journal.commit([a_task(next(task_ids))], [], [])
    deadline = time.monotonic() + 10
    while path.stat().st_size == empty_size:
        assert time.monotonic() < deadline, "the WAL was never copied"
        time.sleep(0.01)
        journal.commit([a_task(next(task_ids))], [], [])

    written = next(task_ids)
    # Far fewer pages than SQLite's own automatic checkpoint waits for.
    assert written < FALLBACK_CHECKPOINT_PAGES
    assert len(journal.load()) == written


def test_closing_stops_the_helper_and_leaves_no_wal_behind(path: Path) -> None:
    def helpers() -> int:
        return sum(t.name == "journal-wal-flush" for t in threading.enumerate())

    before = helpers()
    journal = SqliteJournal(path)
    journal.commit([a_task(1)], [], [])
    assert helpers() == before + 1

    journal.close()

    assert helpers() == before
    # The last connection to close copies the WAL and deletes it.
    assert not Path(f"{path}-wal").exists()
    assert [t.task_id for t in reopened(path)] == [1]


def test_journal_is_in_wal_mode(journal: SqliteJournal, path: Path) -> None:
    journal.commit([a_task(1)], [], [])
    journal.close()

    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_no_one_else_reads_the_journal_while_it_is_open(
    journal: SqliteJournal, path: Path
) -> None:
    journal.commit([a_task(1)], [], [])

    with (
        contextlib.closing(sqlite3.connect(path, timeout=0)) as other,
        pytest.raises(sqlite3.OperationalError, match="locked"),
    ):
        other.execute("SELECT count(*) FROM tasks").fetchone()


def test_load_gives_tasks_oldest_first(journal: SqliteJournal) -> None:
    journal.commit([a_task(9, "zoe")], [], [])
    journal.commit([a_task(5, "adam")], [], [])
    journal.commit([a_task(1, "zoe")], [], [])

    assert [t.key for t in journal.load()] == [("zoe", 9), ("adam", 5), ("zoe", 1)]


def test_scheduler_state_survives_a_restart_through_the_journal(path: Path) -> None:
    journal = SqliteJournal(path)
    before = Driver()
    before.hello()
    turns = [before.submit(task(1), task(2), task(3))]
    work = assignments(before.ready(b"w1", capacity=2), b"w1")
    turns.append(before.done(b"w1", work[0], payload=b"one"))
    turns.append(before.ack(("", 1)))
    turns.append(before.done(b"w1", work[1], payload=b"two"))
    for effects in turns:
        journal.commit(effects.accepted, effects.finished, effects.forgotten)
    journal.close()

    after = Driver()
    for one in reopened(path):
        after.scheduler.restore(one, after.now)
    queued = assignments(after.ready(b"w2", capacity=5), b"w2")
    delivered = results(after.hello())

    assert [(r.task_id, r.payload) for r in delivered] == [(2, b"two")]
    assert [after.scheduler.tasks[a.ticket].task_id for a in queued] == [3]
    resubmitted = after.submit(task(3))
    assert accepted(resubmitted) == [3]  # known again, not run twice
    assert not resubmitted.accepted and not assignments(resubmitted, b"w2")


@pytest.mark.parametrize("then", ["broker stops", "worker reports", "worker dies"])
def test_task_cancelled_while_running_is_not_queued_again_after_a_restart(
    path: Path, then: str
) -> None:
    journal = SqliteJournal(path)
    before = Driver()
    before.hello()
    turns = [before.submit(task(1, payload=b"p" * BIG), task(2))]
    [work, _] = assignments(before.ready(b"w1", capacity=2), b"w1")
    turns.append(before.cancel(1))
    if then == "worker reports":
        turns.append(before.done(b"w1", work, payload=b"r" * BIG))
    elif then == "worker dies":
        turns.append(before.unreachable(b"w1"))
    for effects in turns:
        commit_turn(journal, effects)
    journal.close()

    # Task 2 was running and not cancelled: it comes back; task 1 does not.
    assert [(t.task_id, t.state) for t in reopened(path)] == [(2, State.QUEUED)]
    assert segment_files(path) == []  # its payload's segment went with it


# --- the operator's failed list -----------------------------------------------------


def commit_turn(journal: SqliteJournal, effects: Effects) -> None:
    journal.commit(
        effects.accepted,
        effects.finished,
        effects.forgotten,
        effects.failures,
        effects.unfailed,
    )


def fail(driver: Driver, *specs: p.TaskSpec) -> list[Effects]:
    """Submit `specs` and have a worker's code raise in each."""
    turns = [driver.submit(*specs)]
    for work in assignments(driver.ready(b"w1", capacity=len(specs)), b"w1"):
        turns.append(driver.done(b"w1", work, p.Status.RAISED, b"\x80"))
    return turns


def restarted_failures(path: Path, limits: Limits | None = None) -> Driver:
    """A new scheduler given the failure records the journal at `path` holds."""
    driver = Driver(limits)
    journal = SqliteJournal(path)
    try:
        for record in journal.load_failures():
            driver.scheduler.restore_failure(record)
    finally:
        journal.close()
    return driver


def test_failed_tasks_are_remembered_across_a_restart(path: Path) -> None:
    journal = SqliteJournal(path)
    before = Driver()
    before.hello()
    big = b"x" * (RETRY_PAYLOAD_BYTES + 1)
    for effects in fail(before, task(1, timeout_s=2.0), task(2, payload=big)):
        commit_turn(journal, effects)
    journal.close()

    after = restarted_failures(path)

    kept = {r.task_id: r for r in after.scheduler.failed}
    assert sorted(kept) == [1, 2]
    assert kept[1] == replace(
        next(r for r in before.scheduler.failed if r.task_id == 1),
        failed_at=kept[1].failed_at,
    )
    assert kept[2].payload is None  # too large to retry: not kept, as before
    # On the broker's monotonic clock, which starts again with each process.
    assert 0 <= time.monotonic() - kept[1].failed_at < 60


def test_a_retried_failure_leaves_the_journal(path: Path) -> None:
    journal = SqliteJournal(path)
    driver = Driver()
    driver.hello()
    for effects in fail(driver, task(1), task(2)):
        commit_turn(journal, effects)
    first = driver.scheduler.failed[0].ticket

    commit_turn(journal, driver.client(CLIENT, p.Retry([first], "retried")))
    journal.close()

    assert [r.ticket for r in restarted_failures(path).scheduler.failed] == [
        r.ticket for r in driver.scheduler.failed
    ]
    assert first not in {r.ticket for r in driver.scheduler.failed}


def test_the_oldest_failures_go_first_and_the_journal_follows(path: Path) -> None:
    journal = SqliteJournal(path)
    driver = Driver(Limits(failed_kept=2))
    driver.hello()
    turns = fail(driver, task(1), task(2), task(3))
    for effects in turns:
        commit_turn(journal, effects)
    journal.close()

    assert [r.task_id for r in driver.scheduler.failed] == [2, 3]
    [forgotten] = [n for e in turns for n in notices(e, FailureForgotten)]
    assert forgotten == FailureForgotten(count=1, kept=2)
    again = restarted_failures(path, Limits(failed_kept=2))
    assert [r.task_id for r in again.scheduler.failed] == [2, 3]


def test_a_lower_bound_after_a_restart_drops_the_oldest_from_the_journal(
    path: Path,
) -> None:
    journal = SqliteJournal(path)
    driver = Driver()
    driver.hello()
    for effects in fail(driver, task(1), task(2), task(3)):
        commit_turn(journal, effects)
    journal.close()

    smaller = restarted_failures(path, Limits(failed_kept=1))
    journal = SqliteJournal(path)
    commit_turn(journal, smaller.flush())
    journal.close()

    assert [r.task_id for r in smaller.scheduler.failed] == [3]
    assert [r.task_id for r in restarted_failures(path).scheduler.failed] == [3]


# --- choosing a journal ---------------------------------------------------------------


def test_memory_journal_loads_nothing() -> None:
    journal = MemoryJournal()
    journal.commit([a_task(1)], [], [])

    assert journal.load() == []


def test_memory_durability_gives_a_memory_journal_and_writes_no_file(
    path: Path,
) -> None:
    assert isinstance(open_journal(path, "memory"), MemoryJournal)
    assert not path.exists()


def test_no_path_gives_a_memory_journal() -> None:
    assert isinstance(open_journal(None, "power"), MemoryJournal)


@pytest.mark.parametrize("durability", ["process", "power"])
def test_file_durability_gives_a_sqlite_journal(durability: str, path: Path) -> None:
    journal = open_journal(path, durability)
    try:
        assert isinstance(journal, SqliteJournal)
        assert path.exists()
    finally:
        journal.close()


def test_unknown_durability_is_refused_naming_it(path: Path) -> None:
    with pytest.raises(UsageError, match="'fsync-always'") as caught:
        open_journal(path, "fsync-always")

    assert all(mode in str(caught.value) for mode in DURABILITY_MODES)
    assert not path.exists()


def test_journal_that_cannot_be_opened_is_refused_naming_its_path(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-folder" / "journal.db"

    with pytest.raises(UsageError, match="no-such-folder"):
        open_journal(missing)


def test_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.db"
    garbage.write_bytes(b"these are not the tasks you are looking for" * 100)

    with pytest.raises(UsageError, match=r"notes\.db"):
        open_journal(garbage)


def test_a_second_broker_cannot_open_a_journal_in_use(tmp_path: Path) -> None:
    first = SqliteJournal(tmp_path / "journal.db")
    try:
        with pytest.raises(UsageError, match="in use by another broker"):
            SqliteJournal(tmp_path / "journal.db")
    finally:
        first.close()

    SqliteJournal(tmp_path / "journal.db").close()  # free again once closed


def test_a_link_to_a_journal_in_use_is_refused_too(tmp_path: Path) -> None:
    first = SqliteJournal(tmp_path / "journal.db")
    (tmp_path / "symbolic.db").symlink_to(tmp_path / "journal.db")
    (tmp_path / "hard.db").hardlink_to(tmp_path / "journal.db")
    try:
        for link in ("symbolic.db", "hard.db"):
            with pytest.raises(UsageError, match="in use by another broker"):
                SqliteJournal(tmp_path / link)
    finally:
        first.close()


# --- large blobs in segment files -------------------------------------------------

BIG = INLINE_MAX_BYTES + 1


def segment_files(path: Path) -> list[Path]:
    return sorted(Path(f"{path}.blobs").glob("*.seg"))


def test_large_payload_lives_in_a_segment_and_loads_back(
    journal: SqliteJournal, path: Path
) -> None:
    payload = bytes(range(256)) * (BIG // 256 + 1)
    journal.commit([a_task(1, payload=payload)], [], [])
    journal.close()

    [loaded] = reopened(path)

    assert loaded.payload == payload
    assert len(segment_files(path)) == 1
    row = sqlite3.connect(path).execute("SELECT length(payload) FROM tasks").fetchone()
    assert row == (0,)  # the row holds a reference, not the bytes


def test_large_result_replaces_a_large_payload_and_loads_back(
    journal: SqliteJournal, path: Path
) -> None:
    one = a_task(1, payload=b"p" * BIG)
    journal.commit([one], [], [])
    journal.commit([], [finished(one, b"r" * BIG)], [])
    journal.close()

    [loaded] = reopened(path)

    assert loaded.state is State.FINISHED
    assert loaded.result == b"r" * BIG
    assert loaded.payload == b""


def test_segment_is_deleted_once_nothing_refers_to_it(path: Path) -> None:
    journal = SqliteJournal(path)
    one = a_task(1, payload=b"p" * BIG)
    journal.commit([one], [], [])
    journal.close()
    journal = SqliteJournal(path)  # a new broker writes to a new segment
    [loaded] = journal.load()

    journal.commit([], [finished(loaded, b"done")], [])
    journal.commit([], [], [loaded.ticket])
    journal.close()

    assert segment_files(path) == []


def test_segment_being_written_is_emptied_once_nothing_in_it_is_referenced(
    journal: SqliteJournal, path: Path
) -> None:
    one = a_task(1, payload=b"p" * (IDLE_SEGMENT_KEPT_BYTES + 1))
    journal.commit([one], [], [])
    journal.commit([], [finished(one, b"done")], [])

    [segment] = segment_files(path)
    assert segment.stat().st_size == 0  # an idle broker keeps no dead blobs

    two = a_task(2, payload=b"q" * BIG)
    journal.commit([two], [], [])
    journal.close()
    loaded = {task.task_id: task for task in reopened(path)}
    assert loaded[2].payload == b"q" * BIG  # appends start again from the start


def test_segment_being_written_goes_when_the_broker_stops_with_nothing_in_it(
    journal: SqliteJournal, path: Path
) -> None:
    one = a_task(1, payload=b"p" * BIG)
    journal.commit([one], [], [])
    journal.commit([], [finished(one, b"done")], [])

    journal.close()

    assert segment_files(path) == []


def test_segment_a_crashed_broker_left_unreferenced_is_deleted_on_load(
    path: Path,
) -> None:
    journal = SqliteJournal(path)
    journal.commit([a_task(1)], [], [])
    journal.close()
    orphan = Path(f"{path}.blobs") / "00000007.seg"
    orphan.parent.mkdir()  # no large blob yet: the journal made no folder
    orphan.write_bytes(b"written, never committed")

    reopened(path)

    assert not orphan.exists()


def journal_of_large_tasks(path: Path, count: int) -> None:
    journal = SqliteJournal(path)
    journal.commit([a_task(i, payload=b"%08d" % i * BIG) for i in range(count)], [], [])
    journal.close()


def test_a_journal_without_its_blob_folder_is_refused_naming_the_folder(
    path: Path,
) -> None:
    journal_of_large_tasks(path, 2)
    blobs = Path(f"{path}.blobs")
    for segment in blobs.iterdir():
        segment.unlink()
    blobs.rmdir()

    with pytest.raises(UsageError, match=rf"cannot open journal .*{blobs.name}"):
        reopened(path)
    # Refused, not emptied: the tasks still wait for their folder to come back.
    assert not blobs.exists()


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_task_whose_blob_is_unreadable_fails_and_the_others_load(
    path: Path, damage: str
) -> None:
    journal_of_large_tasks(path, 1)
    journal = SqliteJournal(path)  # a later broker writes a segment of its own
    journal.load()
    journal.commit([a_task(7, payload=b"seven" * BIG)], [], [])
    journal.close()
    first_segment = segment_files(path)[0]
    if damage == "truncated":
        first_segment.write_bytes(first_segment.read_bytes()[:100])
    else:
        first_segment.unlink()

    damaged, intact = reopened(path)

    assert damaged.state is State.FINISHED and damaged.status is p.Status.REJECTED
    error = unpack_value(damaged.result)
    assert error["type"] == "JournalDamaged"
    assert first_segment.name in error["message"]
    assert intact.state is State.QUEUED and intact.payload == b"seven" * BIG


def flip_byte(segment: Path, offset: int) -> None:
    """Change one byte of `segment` in place, as a failing disk or a careless
    hand would, leaving its size alone."""
    data = bytearray(segment.read_bytes())
    data[offset] ^= 0xFF
    segment.write_bytes(bytes(data))


def test_a_payload_changed_on_disk_fails_its_task_and_the_others_load(
    path: Path,
) -> None:
    journal_of_large_tasks(path, 1)
    journal = SqliteJournal(path)  # a later broker writes a segment of its own
    journal.load()
    journal.commit([a_task(7, payload=b"seven" * BIG)], [], [])
    journal.close()
    first_segment = segment_files(path)[0]
    flip_byte(first_segment, 100)

    damaged, intact = reopened(path)

    assert damaged.state is State.FINISHED and damaged.status is p.Status.REJECTED
    error = unpack_value(damaged.result)
    assert error["type"] == "JournalDamaged"
    for named in ("checksum mismatch", first_segment.name, "offset 0", path.name):
        assert named in error["message"]
    assert intact.state is State.QUEUED and intact.payload == b"seven" * BIG


def test_a_malformed_blob_reference_fails_its_task_and_the_others_load(
    journal: SqliteJournal, path: Path
) -> None:
    # A reference of neither known length (a row edited by hand, a page the
    # disk damaged) stopped the whole load with a struct.error.
    large = [a_task(1, payload=b"p" * BIG), a_task(2, payload=b"q" * BIG)]
    journal.commit(large, [], [])
    journal.close()
    db = sqlite3.connect(path)
    with db:
        broken = "UPDATE tasks SET payload_ref = x'0102' WHERE seq = ?"
        db.execute(broken, (large[0].ticket,))
    db.close()

    damaged, intact = reopened(path)

    assert damaged.state is State.FINISHED and damaged.status is p.Status.REJECTED
    error = unpack_value(damaged.result)
    assert error["type"] == "JournalDamaged"
    assert "reference" in error["message"]
    assert intact.state is State.QUEUED and intact.payload == b"q" * BIG


def test_a_result_changed_on_disk_reaches_its_client_as_an_error(
    journal: SqliteJournal, path: Path
) -> None:
    one = a_task(1, payload=b"p" * BIG)
    journal.commit([one], [], [])
    journal.commit([], [finished(one, b"r" * BIG)], [])
    journal.close()
    [segment] = segment_files(path)
    flip_byte(segment, segment.stat().st_size - 1)  # the result's last byte

    [loaded] = reopened(path)

    assert loaded.status is p.Status.REJECTED
    assert "checksum mismatch" in unpack_value(loaded.result)["message"]


def test_a_task_failed_as_damaged_is_on_the_failed_list_once(path: Path) -> None:
    journal_of_large_tasks(path, 1)
    flip_byte(segment_files(path)[0], 100)

    for _ in range(2):  # a second restart remembers it, and only once
        journal = SqliteJournal(path)
        [damaged] = journal.load()
        failures = journal.load_failures()
        journal.close()

    [record] = failures
    assert (record.ticket, record.status) == (damaged.ticket, p.Status.REJECTED)
    assert record.payload is None  # the bytes are not there to retry with
    assert "checksum mismatch" in unpack_value(record.error)["message"]


def test_a_damaged_segment_is_one_error_in_the_log_whatever_its_tasks(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal_of_large_tasks(path, 3)
    [segment] = segment_files(path)
    segment.write_bytes(bytes(segment.stat().st_size))  # zeroed, every blob

    with caplog.at_level(logging.ERROR, logger="ventilator.journal"):
        loaded = reopened(path)

    assert [task.status for task in loaded] == [p.Status.REJECTED] * 3
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert segment.name in error.getMessage()


def test_a_reference_written_without_a_checksum_loads_as_before(
    path: Path,
) -> None:
    journal_of_large_tasks(path, 1)
    # Journals written before checksums hold a reference of 20 bytes: the
    # segment, offset and length only.
    with contextlib.closing(sqlite3.connect(path)) as db:
        [(packed,)] = db.execute("SELECT payload_ref FROM tasks")
        db.execute("UPDATE tasks SET payload_ref = ?", (packed[:20],))
        db.commit()

    [loaded] = reopened(path)

    assert loaded.state is State.QUEUED
    assert loaded.payload == b"%08d" % 0 * BIG


def test_a_blob_that_cannot_be_written_is_a_journal_error_naming_the_journal(
    journal: SqliteJournal, path: Path
) -> None:
    Path(f"{path}.blobs").write_text("a file where the folder should be")

    with pytest.raises(JournalError, match=str(path)):
        journal.commit([a_task(1, payload=b"p" * BIG)], [], [])


def test_journal_of_an_earlier_version_gains_the_reference_columns(
    path: Path,
) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE tasks (seq INTEGER PRIMARY KEY, session TEXT NOT NULL,"
        " task_id INTEGER NOT NULL, function TEXT NOT NULL, flags INTEGER NOT NULL,"
        " timeout_s REAL, retries INTEGER NOT NULL, recipient TEXT NOT NULL,"
        " payload BLOB NOT NULL, status INTEGER, result BLOB)"
    )
    db.execute(
        "INSERT INTO tasks VALUES (1, 's', 7, 'm:f', 0, NULL, 0, 's', x'01',"
        " NULL, NULL)"
    )
    db.commit()
    db.close()

    [loaded] = reopened(path)

    assert (loaded.task_id, loaded.payload) == (7, b"\x01")


# --- a write-ahead log left behind, cut short or damaged ---------------------------

FRAME_BYTES = 24 + 4096  # a frame header and a page of SQLite's default size
WAL_HEADER_BYTES = 32


def crashed_copy(path: Path, turns: int, rows: int = 3) -> Path:
    """The journal as a broker killed after `turns` commits of `rows` tasks
    leaves it (its WAL not yet copied into the database), copied elsewhere."""
    journal = SqliteJournal(path)
    for turn in range(turns):
        journal.commit([a_task(turn * rows + row) for row in range(rows)], [], [])
    copy = path.parent / "crashed" / path.name
    copy.parent.mkdir()
    for suffix in ("", "-wal"):
        Path(f"{copy}{suffix}").write_bytes(Path(f"{path}{suffix}").read_bytes())
    journal.close()
    return copy


def reopened_with_log(
    path: Path, caplog: pytest.LogCaptureFixture
) -> tuple[list[Task], list[logging.LogRecord]]:
    """The tasks a broker replays from `path`, and the journal's warnings."""
    with caplog.at_level(logging.WARNING, logger="ventilator.journal"):
        tasks = reopened(path)
    return tasks, [r for r in caplog.records if r.levelno >= logging.WARNING]


def damage_wal(path: Path, damage: Callable[[bytes], bytes]) -> None:
    wal = Path(f"{path}-wal")
    wal.write_bytes(damage(wal.read_bytes()))


def test_a_wal_left_by_a_killed_broker_replays_everything_without_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = crashed_copy(path, turns=10)

    tasks, warnings = reopened_with_log(copy, caplog)

    assert len(tasks) == 30
    assert warnings == []


def test_a_wal_cut_short_inside_a_frame_is_reported_naming_the_journal(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = crashed_copy(path, turns=10)
    damage_wal(copy, lambda wal: wal[: WAL_HEADER_BYTES + 7 * FRAME_BYTES + 1000])

    tasks, warnings = reopened_with_log(copy, caplog)

    assert len(tasks) < 30  # SQLite replays what it can, and drops the rest
    [warning] = warnings
    assert str(copy) in warning.getMessage() and "cut short" in warning.getMessage()


def test_a_damaged_frame_that_drops_whole_commits_is_an_error(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = crashed_copy(path, turns=10)
    flipped = WAL_HEADER_BYTES + 2 * FRAME_BYTES + 100  # in the third page

    def flip(wal: bytes) -> bytes:
        return wal[:flipped] + bytes([wal[flipped] ^ 1]) + wal[flipped + 1 :]

    damage_wal(copy, flip)

    tasks, warnings = reopened_with_log(copy, caplog)

    assert len(tasks) < 30
    [error] = warnings
    assert error.levelno == logging.ERROR
    assert str(copy) in error.getMessage() and "commits" in error.getMessage()


def test_a_last_commit_with_a_stale_page_is_not_taken_for_lost_work(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker killed between writing a frame's header and its page, over a
    # frame of an earlier log: the frame has its full size, the new header,
    # and an old page. SQLite drops that commit; nobody was told of it.
    copy = crashed_copy(path, turns=10)
    frames = (Path(f"{copy}-wal").stat().st_size - WAL_HEADER_BYTES) // FRAME_BYTES
    last_page = WAL_HEADER_BYTES + (frames - 1) * FRAME_BYTES + 24

    def stale(wal: bytes) -> bytes:
        return wal[:last_page] + bytes(4096) + wal[last_page + 4096 :]

    damage_wal(copy, stale)

    tasks, warnings = reopened_with_log(copy, caplog)

    assert len(tasks) == 27  # the last turn's three tasks were never committed
    [warning] = warnings
    assert warning.levelno == logging.WARNING
    assert "ends inside a commit" in warning.getMessage()


@pytest.mark.parametrize("lost", ["emptied", "deleted"])
def test_a_wal_whose_database_is_gone_stops_the_broker_and_keeps_the_wal(
    path: Path, lost: str
) -> None:
    # SQLite would start the database afresh and reset its log, dropping the
    # accepted tasks in it (and, under the reading of the log's checksums,
    # the broker stopped with "unpack requires a buffer of 8 bytes").
    copy = crashed_copy(path, turns=10)
    wal = Path(f"{copy}-wal").read_bytes()
    if lost == "emptied":
        copy.write_bytes(b"")
    else:
        copy.unlink()

    with pytest.raises(UsageError, match="database file is empty or was deleted"):
        reopened(copy)

    assert Path(f"{copy}-wal").read_bytes() == wal  # nothing dropped yet


def test_a_wal_whose_header_is_cut_short_is_reported(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = crashed_copy(path, turns=10)
    damage_wal(copy, lambda wal: wal[:20])

    tasks, warnings = reopened_with_log(copy, caplog)

    [warning] = warnings
    assert str(copy) in warning.getMessage() and "header" in warning.getMessage()
    assert len(tasks) < 30


def test_stale_frames_after_a_restarted_log_are_not_taken_for_damage(
    path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite checkpoints after a large turn, starts the log again over its old
    # frames, and cuts the file to the size limit inside one of them: a WAL
    # of the current log, then stale frames, then part of one.
    monkeypatch.setattr(journal_module, "FALLBACK_CHECKPOINT_PAGES", 4)
    limit = WAL_HEADER_BYTES + 12 * FRAME_BYTES + 1000
    monkeypatch.setattr(journal_module, "WAL_SIZE_LIMIT_BYTES", limit)
    journal = SqliteJournal(path)
    journal.commit([a_task(n, payload=b"p" * 4000) for n in range(40)], [], [])
    for n in range(40, 43):
        journal.commit([a_task(n)], [], [])
    assert Path(f"{path}-wal").stat().st_size == limit  # as described above
    copy = path.parent / "crashed" / path.name
    copy.parent.mkdir()
    for suffix in ("", "-wal"):
        Path(f"{copy}{suffix}").write_bytes(Path(f"{path}{suffix}").read_bytes())
    journal.close()

    tasks, warnings = reopened_with_log(copy, caplog)

    assert len(tasks) == 43
    assert warnings == []


def test_a_results_age_carries_over_a_restart(path: Path) -> None:
    limits = Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0)
    journal = SqliteJournal(path)
    before = Driver(limits)
    before.hello()
    turns = [before.submit(task(1))]
    turns.append(before.done(b"w1", assignments(before.ready(b"w1"), b"w1")[0]))
    for effects in turns:
        journal.commit(effects.accepted, effects.finished, effects.forgotten)
    journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE tasks SET finished_wall = ?", (time.time() - 59.0,))

    after = Driver(limits)
    after.now = time.monotonic()  # the clock the journal converts ages to
    [finished] = reopened(path)
    after.scheduler.restore(finished, after.now)
    after.tick(2.0)
    [tombstone] = results(after.hello())

    assert after.now - finished.finished_at == pytest.approx(61.0, abs=1.0)
    assert tombstone.status is p.Status.EXPIRED


def test_a_forgotten_tombstone_does_not_come_back_after_a_restart(path: Path) -> None:
    limits = Limits(result_ttl_s=60.0, heartbeat_interval_s=100.0)
    journal = SqliteJournal(path)
    driver = Driver(limits)
    driver.hello()
    turns = [driver.submit(task(1))]
    turns.append(driver.done(b"w1", assignments(driver.ready(b"w1"), b"w1")[0]))
    turns.append(driver.unreachable(CLIENT))
    turns.append(driver.tick(61.0))  # expired to a tombstone
    for effects in turns:
        journal.commit(effects.accepted, effects.finished, effects.forgotten)
    journal.close()
    [tombstone] = reopened(path)

    journal = SqliteJournal(path)
    forgotten = driver.tick(61.0)
    journal.commit(forgotten.accepted, forgotten.finished, forgotten.forgotten)
    journal.close()

    assert tombstone.status is p.Status.EXPIRED
    assert reopened(path) == []


def test_a_result_of_a_journal_without_finish_times_counts_as_finished_now(
    path: Path,
) -> None:
    journal = SqliteJournal(path)
    driver = Driver()
    driver.hello()
    driver.submit(task(1))
    done = driver.done(b"w1", assignments(driver.ready(b"w1"), b"w1")[0])
    journal.commit([driver.scheduler.tasks[1]], done.finished, [])
    journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE tasks SET finished_wall = NULL")  # as older versions left

    started = time.monotonic()
    [finished] = reopened(path)

    assert started <= finished.finished_at <= time.monotonic()


def test_a_journal_in_place_is_not_missing(journal: SqliteJournal) -> None:
    journal.commit([a_task(1, payload=b"x" * BIG)], [], [])

    assert journal.missing() is None


def test_a_journal_deleted_under_the_broker_says_it_is_missing(
    journal: SqliteJournal, path: Path
) -> None:
    journal.commit([a_task(1)], [], [])
    path.unlink()

    assert journal.missing() == f"{path} was deleted or replaced"


def test_a_journal_replaced_under_the_broker_says_it_is_missing(
    journal: SqliteJournal, path: Path
) -> None:
    path.rename(path.with_name("aside.db"))
    path.write_bytes(b"")

    assert journal.missing() == f"{path} was deleted or replaced"


def test_a_journal_whose_log_was_deleted_says_it_is_missing(
    journal: SqliteJournal, path: Path
) -> None:
    journal.commit([a_task(1)], [], [])
    Path(f"{path}-wal").unlink()

    assert "write-ahead log" in (journal.missing() or "")


def test_a_journal_whose_blob_folder_was_deleted_says_it_is_missing(
    journal: SqliteJournal, path: Path
) -> None:
    journal.commit([a_task(1, payload=b"x" * BIG)], [], [])
    shutil.rmtree(f"{path}.blobs")

    assert "blob folder" in (journal.missing() or "")


def test_a_journal_whose_folder_takes_no_new_file_says_where_and_why(
    path: Path,
) -> None:
    open_journal(path).close()  # the journal exists; its log cannot be made
    chattr = shutil.which("chattr")
    if (
        chattr is None
        or subprocess.run(
            [chattr, "+i", str(path.parent)], check=False, capture_output=True
        ).returncode
    ):
        pytest.skip("cannot make a folder immutable here (chattr +i, as root)")

    try:
        with pytest.raises(UsageError) as refused:
            open_journal(path)
    finally:
        subprocess.run([chattr, "-i", str(path.parent)], check=True)

    assert f"{path.parent} must let this user create files" in str(refused.value)


# A journal written past the process's file size limit, in a process of its own.
FILE_SIZE_LIMIT_PROGRAM = """
import resource, signal, sys
from tests.unit.journal_tasks import a_task
from ventilator.errors import JournalError
from ventilator.journal import SqliteJournal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the limit kills the process
journal = SqliteJournal(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    for turn in range(100):
        journal.commit([a_task(turn, payload=b"x" * 4000)], [], [])
except JournalError as error:
    print(error)
"""


def test_a_write_past_the_file_size_limit_names_the_limit(path: Path) -> None:
    # A tester's broker under `ulimit -f` said only "disk I/O error": the
    # disk had room, and nothing pointed at the limit.
    ran = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_PROGRAM, str(path)],
        cwd=Path(__file__).parents[2],  # where `tests` is a package
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert "SQLITE_IOERR" in ran.stdout, ran.stdout + ran.stderr
    assert "ulimit -f" in ran.stdout and "100000 bytes" in ran.stdout


def test_a_payload_in_shared_memory_is_journalled_as_its_bytes(path: Path) -> None:
    # A restarted broker has no arenas: the reference would be unreadable.
    reference = p.SHARED_REFERENCE.pack(0, 100_000, 1) + b"/dev/shm/an.arena"
    payload = bytes(range(256)) * 400
    journal = SqliteJournal(path, read_shared={reference: payload}.get)
    shared = a_task(1, payload=reference, flags=p.Flags.SHARED | p.Flags.PICKLED)
    journal.commit([shared], [], [])
    journal.close()

    [loaded] = reopened(path)

    assert loaded.payload == payload
    assert loaded.flags == p.Flags.PICKLED


def test_a_shared_payload_that_cannot_be_read_is_journalled_as_it_came(
    path: Path,
) -> None:
    reference = p.SHARED_REFERENCE.pack(0, 100_000, 1) + b"/dev/shm/an.arena"
    journal = SqliteJournal(path, read_shared=lambda reference: None)
    journal.commit([a_task(1, payload=reference, flags=p.Flags.SHARED)], [], [])
    journal.close()

    [loaded] = reopened(path)

    assert (loaded.payload, loaded.flags) == (reference, p.Flags.SHARED)

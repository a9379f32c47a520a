"""Compaction of the journal's segments: real SQLite files and segment files,
with segments made small (8 MiB) so that a test fills several quickly."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import pytest

from ventilator import journal as journal_module
from ventilator import protocol as p
from ventilator import segments as segments_module
from ventilator.journal import COMPACT_QUIET_S, SqliteJournal
from ventilator.scheduler import State, Task

from .journal_tasks import a_task, finished

SEGMENT_BYTES = 8 * 2**20
BLOB_BYTES = 256 * 1024
BLOBS_PER_SEGMENT = SEGMENT_BYTES // BLOB_BYTES
NO_LIMIT = math.inf


def blob(task_id: int, size: int = BLOB_BYTES) -> bytes:
    """Bytes that differ from task to task and along the blob."""
    pattern = task_id.to_bytes(4, "little", signed=True) + bytes(range(256))
    return (pattern * (size // len(pattern) + 1))[:size]


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", SEGMENT_BYTES)


def segment_files(path: Path) -> list[Path]:
    return sorted(Path(f"{path}.blobs").glob("*.seg"))


def blob_bytes_on_disk(path: Path) -> int:
    return sum(segment.stat().st_size for segment in segment_files(path))


def fill_segment_leaving_one(
    journal: SqliteJournal, first_id: int, straggler: str
) -> Task:
    """Fill one segment with blobs that all go but one: the payload of a task
    left queued ("queued"), or the large result of a task nobody collects
    ("result", written as the segment's last blob). Return that task."""
    count = BLOBS_PER_SEGMENT - (straggler == "result")
    batch = [a_task(first_id + i, payload=blob(first_id + i)) for i in range(count)]
    journal.commit(batch, [], [])
    kept, gone = batch[0], batch[1:]
    if straggler == "result":
        journal.commit([], [finished(kept, blob(-kept.task_id))], [])
    journal.commit([], [finished(one, b"done") for one in gone], [])
    journal.commit([], [], [one.ticket for one in gone])
    return kept


def stored(task: Task) -> bytes:
    """What the journal keeps of a task: its result once finished."""
    return task.result if task.state is State.FINISHED else task.payload


def compact_until_done(journal: SqliteJournal, room_bytes: float = NO_LIMIT) -> int:
    """Let the journal see its sparse segments, then run compaction steps once
    they stayed so, until none is left; return how many steps (the last one
    finding nothing)."""
    assert not journal.compact(0.0, room_bytes)
    return steps_until_done(journal, room_bytes)


def steps_until_done(journal: SqliteJournal, room_bytes: float = NO_LIMIT) -> int:
    for steps in itertools.count(1):
        if not journal.compact(COMPACT_QUIET_S + steps, room_bytes):
            return steps
    raise AssertionError("unreachable")


def finish_and_forget(journal: SqliteJournal, gone: list[Task]) -> None:
    journal.commit([], [finished(one, b"done") for one in gone], [])
    journal.commit([], [], [one.ticket for one in gone])


def by_task_id(path: Path) -> dict[int, Task]:
    journal = SqliteJournal(path)
    try:
        return {task.task_id: task for task in journal.load()}
    finally:
        journal.close()


def stragglers_in_three_segments(journal: SqliteJournal) -> dict[int, bytes]:
    """Three closed segments, each pinned by one task or result, and the one
    being written; what each live task must read back as."""
    expected = {}
    for n, kind in enumerate(["queued", "result", "queued"]):
        kept = fill_segment_leaving_one(journal, 1000 * (n + 1), kind)
        expected[kept.task_id] = stored(kept)
    journal.commit([a_task(9999, payload=blob(9999))], [], [])  # closes the third
    expected[9999] = blob(9999)
    return expected


def test_stragglers_in_several_segments_are_compacted_and_the_files_shrink(
    journal: SqliteJournal, path: Path
) -> None:
    expected = stragglers_in_three_segments(journal)
    assert len(segment_files(path)) == 4
    before = blob_bytes_on_disk(path)

    compact_until_done(journal)

    # What is left: the segment being written, holding the four live blobs.
    assert len(segment_files(path)) == 1
    assert blob_bytes_on_disk(path) == 4 * BLOB_BYTES
    assert before >= 3 * SEGMENT_BYTES
    journal.close()
    assert {i: stored(t) for i, t in by_task_id(path).items()} == expected


def test_compacted_blobs_read_back_byte_for_byte_after_a_restart(
    journal: SqliteJournal, path: Path
) -> None:
    expected = stragglers_in_three_segments(journal)
    compact_until_done(journal)
    journal.close()

    first, second = by_task_id(path), by_task_id(path)

    for loaded in (first, second):
        assert sorted(loaded) == sorted(expected)
        for task_id, data in expected.items():
            assert stored(loaded[task_id]) == data


def test_a_compacted_task_still_finishes_and_goes_with_its_segment(
    journal: SqliteJournal, path: Path
) -> None:
    kept = fill_segment_leaving_one(journal, 1, "queued")
    journal.commit(
        [a_task(2000, payload=blob(2000))], [], []
    )  # closes the first segment
    compact_until_done(journal)

    journal.commit([], [finished(kept, b"ok")], [])
    journal.commit([], [], [kept.ticket])
    journal.close()

    assert 1 not in by_task_id(path)
    assert by_task_id(path)[2000].payload == blob(2000)


def test_a_segment_still_a_quarter_live_is_left_alone(
    journal: SqliteJournal, path: Path
) -> None:
    batch = [a_task(i, payload=blob(i)) for i in range(BLOBS_PER_SEGMENT)]
    journal.commit(batch, [], [])
    journal.commit([a_task(999, payload=blob(999))], [], [])  # closes it
    quarter = BLOBS_PER_SEGMENT // 4
    finish_and_forget(journal, batch[quarter:])

    assert compact_until_done(journal) == 1
    assert len(segment_files(path)) == 2


def test_the_segment_being_written_is_not_compacted(
    journal: SqliteJournal, path: Path
) -> None:
    fill_segment_leaving_one(journal, 1, "queued")  # full, but still current

    assert compact_until_done(journal) == 1
    assert segment_files(path)[0].stat().st_size == SEGMENT_BYTES


def test_each_step_copies_a_bounded_share(
    journal: SqliteJournal, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ten of the segment's 32 blobs stay; a step copies at most two of them.
    monkeypatch.setattr(journal_module, "COMPACT_BYTES_PER_TURN", 2 * BLOB_BYTES)
    batch = [a_task(i, payload=blob(i)) for i in range(BLOBS_PER_SEGMENT)]
    journal.commit(batch, [], [])
    journal.commit([a_task(999, payload=blob(999))], [], [])
    finish_and_forget(journal, batch[: BLOBS_PER_SEGMENT - 7])
    first, current = segment_files(path)
    size_before = current.stat().st_size

    assert not journal.compact(0.0, NO_LIMIT)
    assert journal.compact(COMPACT_QUIET_S, NO_LIMIT)
    assert first.exists()
    assert current.stat().st_size == size_before + 2 * BLOB_BYTES

    steps = steps_until_done(journal)
    assert steps == 3 + 1  # 2, 2 and 1 blobs more, then nothing left
    assert not first.exists()
    journal.close()
    assert {i: t.payload for i, t in by_task_id(path).items()} == {
        one.task_id: one.payload
        for one in [*batch[-7:], a_task(999, payload=blob(999))]
    }


def test_compaction_waits_while_the_disk_has_no_room_for_the_copies(
    journal: SqliteJournal, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill_segment_leaving_one(journal, 1, "queued")
    journal.commit([a_task(2000, payload=blob(2000))], [], [])
    sparse = segment_files(path)[0]

    with caplog.at_level(logging.WARNING, logger="ventilator.journal"):
        assert compact_until_done(journal, BLOB_BYTES - 1) == 1
        assert not journal.compact(COMPACT_QUIET_S + 2, BLOB_BYTES - 1)
    assert sparse.exists()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    compact_until_done(journal, room_bytes=BLOB_BYTES)
    assert not sparse.exists()


def test_compaction_says_at_info_what_it_freed(
    journal: SqliteJournal, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill_segment_leaving_one(journal, 1, "queued")
    journal.commit([a_task(2000, payload=blob(2000))], [], [])
    sparse = segment_files(path)[0]

    with caplog.at_level(logging.INFO, logger="ventilator.journal"):
        compact_until_done(journal)

    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sparse.name in line
    freed_mib = (SEGMENT_BYTES - BLOB_BYTES) // 2**20
    assert f"{freed_mib} MiB" in line


def test_a_blob_that_cannot_be_read_stops_compaction_for_a_while_not_the_journal(
    journal: SqliteJournal, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill_segment_leaving_one(journal, 1, "queued")
    journal.commit([a_task(2000, payload=blob(2000))], [], [])
    sparse = segment_files(path)[0]
    sparse.write_bytes(b"")  # damaged outside the broker

    with caplog.at_level(logging.WARNING, logger="ventilator.journal"):
        assert compact_until_done(journal) == 1
        assert not journal.compact(COMPACT_QUIET_S + 2, NO_LIMIT)  # no 2nd warning

    assert len(caplog.records) == 1
    assert sparse.name in caplog.records[0].getMessage()
    journal.commit([a_task(3000, payload=blob(3000))], [], [])  # the journal goes on
    journal.close()
    assert by_task_id(path)[3000].payload == blob(3000)


def test_a_blob_changed_on_disk_is_never_copied_under_a_new_checksum(
    journal: SqliteJournal, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = fill_segment_leaving_one(journal, 1, "queued")
    journal.commit([a_task(2000, payload=blob(2000))], [], [])
    sparse = segment_files(path)[0]
    with sparse.open("r+b") as changed:
        changed.write(b"rot")  # the kept task's payload is the first blob

    with caplog.at_level(logging.WARNING, logger="ventilator.journal"):
        compact_until_done(journal)
        compact_until_done(journal)  # left alone from now on: no second line

    [error] = caplog.records
    assert error.levelno == logging.ERROR
    assert sparse.name in error.getMessage()
    assert "checksum mismatch" in error.getMessage()
    assert sparse.exists()  # the row still points at it
    journal.close()
    assert by_task_id(path)[kept.task_id].status is p.Status.REJECTED


def test_a_checksum_survives_compaction_and_catches_damage_to_the_copy(
    journal: SqliteJournal, path: Path
) -> None:
    kept = fill_segment_leaving_one(journal, 1, "queued")
    journal.commit([a_task(2000, payload=blob(2000))], [], [])
    compact_until_done(journal)
    journal.close()
    [segment] = segment_files(path)  # the copy follows task 2000's payload
    with segment.open("r+b") as changed:
        changed.seek(BLOB_BYTES + 10)
        changed.write(b"rot")

    loaded = by_task_id(path)

    assert loaded[kept.task_id].status is p.Status.REJECTED
    assert loaded[2000].payload == blob(2000)


def test_a_segment_still_draining_waits_until_its_live_blobs_stay_put(
    journal: SqliteJournal, path: Path
) -> None:
    # A backlog drained in order passes under a quarter live on its way to
    # empty: copying what is about to go anyway would be wasted.
    batch = [a_task(i, payload=blob(i)) for i in range(BLOBS_PER_SEGMENT)]
    journal.commit(batch, [], [])
    journal.commit([a_task(999, payload=blob(999))], [], [])
    finish_and_forget(journal, batch[:-5])
    assert not journal.compact(0.0, NO_LIMIT)

    finish_and_forget(journal, batch[-5:-4])  # at 4 s, one more goes
    assert not journal.compact(4.0, NO_LIMIT)
    assert not journal.compact(4.0 + COMPACT_QUIET_S - 0.5, NO_LIMIT)

    assert journal.compact(4.0 + COMPACT_QUIET_S, NO_LIMIT)
    assert steps_until_done(journal) == 1
    assert len(segment_files(path)) == 1

"""The durable record of accepted tasks, undelivered results and failures.

SQLite in WAL mode: one row per task, written when the broker accepts it,
updated when it finishes, deleted when its recipient acknowledges the result.
Beside them, the operator's list of failed tasks (`Scheduler.failed`): a row
per failure, written when the task fails, deleted when an operator retries it
or a newer failure takes its place in the bounded list.
The broker commits once per loop turn (group commit), before it tells anyone
anything, so a task a client heard "accepted" for is on disk. Payloads and
results larger than a few KiB go to append-only segment files beside the
database (see `ventilator.segments`), written before the commit that refers to
them, each with a CRC-32 checked whenever it is read back: a blob whose bytes
changed on disk fails its task as JournalDamaged (to its client and the failed
list), never reaches anyone, and is never copied by a compaction. Blobs kept
inline in the rows have no checksum of their own (see docs/architecture.md).
A segment whose live blobs became a small part of it is compacted a few MiB
per loop turn (`SqliteJournal.compact`): its live blobs are copied into the
segment being written, their rows pointed at the copies in one commit, and the
segment deleted once no row refers to it. A kill between any two of those steps
leaves every row pointing at bytes that are there: the copies nothing refers to
yet, or the old segment nothing refers to any more, are dead bytes the next
compaction or load removes.

Durability modes:

- ``process`` (default): survives a kill of the broker process. WAL with
  ``synchronous=NORMAL``: a commit reaches the OS before the broker answers.
- ``power``: survives power loss too; ``synchronous=FULL`` fsyncs every commit.
- ``memory``: no journal at all, for tests, benchmarks and embedded clusters
  that live and die with their client.

The journal paces its own checkpoints (see `CHECKPOINT_EVERY_PAGES`) so that no
commit waits for a thousand pages of WAL to reach the disk, and holds SQLite's
locks for as long as it is open: nobody else reads the file meanwhile.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from . import _wal
from . import protocol as p
from ._words import counted
from .errors import JournalError, TaskRejected, UsageError
from .failures import FailedTask
from .policy import DURABILITY_MODES
from .segments import INLINE_MAX_BYTES, BlobDamaged, BlobRef, SegmentStore
from .serialization import pack_error
from .tasks import State, Task

_SHARED = int(p.Flags.SHARED)

__all__ = [
    "DURABILITY_MODES",
    "Journal",
    "MemoryJournal",
    "SqliteJournal",
    "open_journal",
]

log = logging.getLogger(__name__)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq         INTEGER PRIMARY KEY,  -- the broker's ticket: acceptance order
    session     TEXT    NOT NULL,
    task_id     INTEGER NOT NULL,
    function    TEXT    NOT NULL,
    flags       INTEGER NOT NULL,
    timeout_s   REAL,
    retries     INTEGER NOT NULL,
    recipient   TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    status      INTEGER,
    result      BLOB,
    payload_ref BLOB,  -- where a large payload lies in the segments, else NULL
    result_ref  BLOB,  -- where a large result lies, else NULL
    finished_wall REAL, -- when it finished (wall clock): its result's age
    deaths      INTEGER, -- strikes towards poison (Task.deaths), NULL: none
    losses      INTEGER  -- strikes towards poison (Task.losses), NULL: none
)
"""
# Failure records: when a task failed is kept as wall-clock time, since the
# broker's monotonic clock starts again with the process.
_FAILED_SCHEMA = """
CREATE TABLE IF NOT EXISTS failed (
    ticket      INTEGER PRIMARY KEY,
    session     TEXT    NOT NULL,
    task_id     INTEGER NOT NULL,
    function    TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    error       BLOB    NOT NULL,
    failed_wall REAL    NOT NULL,
    payload     BLOB,  -- the arguments for a retry; NULL when too large to keep
    flags       INTEGER NOT NULL,
    timeout_s   REAL
)
"""
# Columns that journals of earlier versions lack, added when they are opened.
_ADDED_COLUMNS = {
    "payload_ref": "BLOB",
    "result_ref": "BLOB",
    "finished_wall": "REAL",
    "deaths": "INTEGER",
    "losses": "INTEGER",
}

# Tasks are keyed by the ticket (the rowid): no secondary index to keep up.
_INSERT_TASKS = (
    "INSERT INTO tasks (seq, session, task_id, function, flags,"
    " timeout_s, retries, recipient, payload, payload_ref, deaths, losses)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A task put back in the queue after its process died or its worker was lost:
# its strikes are kept, or each restart of the broker would give a task that
# kills what runs it a fresh max_attempts.
_STRIKE_TASKS = "UPDATE tasks SET deaths = ?, losses = ? WHERE seq = ?"
_FINISH_TASKS = (
    "UPDATE tasks SET status = ?, result = ?, result_ref = ?, finished_wall = ?,"
    " payload = x'', payload_ref = NULL WHERE seq = ?"
)
_FORGET_TASKS = "DELETE FROM tasks WHERE seq = ?"
_INSERT_FAILURES = (
    "INSERT OR REPLACE INTO failed (ticket, session, task_id, function,"
    " status, error, failed_wall, payload, flags, timeout_s)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_FAILURES_ONCE = _INSERT_FAILURES.replace("OR REPLACE", "OR IGNORE")
_FORGET_FAILURES = "DELETE FROM failed WHERE ticket = ?"
# A statement and the rows (parameters) it runs for.
_Statement = tuple[str, list[tuple[object, ...]]]

# A checkpoint copies the WAL back into the database. It fsyncs the WAL first,
# and that is the slow part: the WAL's dirty pages (4 KiB per commit) go to
# the disk then, 3 to 12 ms in a commit on a shared disk, where SQLite's
# automatic checkpoint put it (one round trip in about 430 of a sequential
# client). So a helper thread writes the WAL to the disk with fdatasync()
# once the WAL has grown by about this many pages, and the broker checkpoints
# at its next commit, left with little to flush: about 0.7 ms instead.
CHECKPOINT_EVERY_PAGES = 1000
# How the WAL grows, estimated without asking SQLite: a commit writes at least
# one page, and rows of small tasks fill a page about every 20 (measured: 6.7
# pages per turn of 151 rows, and one page per turn of a sequential client).
_ROWS_PER_PAGE = 20
# SQLite's own automatic checkpoint stays, at this many pages (4 KiB each),
# to bound the WAL should the helper fall behind.
FALLBACK_CHECKPOINT_PAGES = 8192
# A WAL that grew past the fallback size (one very large turn) is cut back to
# it when it starts again.
WAL_SIZE_LIMIT_BYTES = FALLBACK_CHECKPOINT_PAGES * 4096

# Live bytes a loop turn copies out of a sparse segment, at least one blob:
# measured at a few milliseconds a turn, no longer than a turn of a busy
# broker's own commit, so heartbeats keep their pace (see docs/architecture.md).
COMPACT_BYTES_PER_TURN = 4 * 1024 * 1024
# A sparse segment is compacted once its live bytes stayed the same this long.
# A segment that a backlog drains in order passes under a quarter live on its
# way to empty: copying that last quarter, about to go anyway, would add up to
# a quarter to every byte a busy broker writes. A straggler stays; a segment
# drained slower than this copies little for the time it takes.
COMPACT_QUIET_S = 5.0
# After a compaction could not read or write its blobs, it waits this long
# before trying again, rather than failing (and logging) every loop turn.
COMPACT_RETRY_S = 60.0

# Tasks failed on loading because a segment could not give their blobs back,
# by segment, each with the reason; under _NO_SEGMENT, those whose row held a
# reference that names no segment it could be read from.
_Found = tuple[Task, OSError]
_Damage = dict[int, list[_Found]]
_NO_SEGMENT = -1

# The column of `tasks` that holds a blob's reference.
_Column = Literal["payload_ref", "result_ref"]
_COLUMNS: tuple[_Column, ...] = ("payload_ref", "result_ref")
_REPOINT = {
    "payload_ref": "UPDATE tasks SET payload_ref = ? WHERE seq = ?",
    "result_ref": "UPDATE tasks SET result_ref = ? WHERE seq = ?",
}


class Journal(Protocol):
    """What the broker needs from a journal."""

    # Bytes of payloads and results stored since it opened: how fast its disk
    # fills between two looks at the free space.
    written_bytes: int

    def load(self) -> list[Task]:
        """Every task still on record, oldest first, with its ticket.

        Raises:
            UsageError: the journal cannot be read ("cannot open journal ...").
        """
        ...

    def load_failures(self) -> list[FailedTask]:
        """The failure records, oldest first, `failed_at` on the monotonic clock."""
        ...

    def commit(
        self,
        accepted: Iterable[Task],
        finished: Iterable[Task],
        forgotten: Iterable[int],
        failures: Iterable[FailedTask] = (),
        unfailed: Iterable[int] = (),
        struck: Iterable[Task] = (),
    ) -> None:
        """Record one loop turn's changes atomically: tasks accepted, finished
        and forgotten; failure records added and removed (by ticket); the
        strikes of tasks requeued after their process died or worker was lost.

        Raises:
            JournalError: the journal cannot be written; the message names it.
        """
        ...

    def compact(self, now: float, room_bytes: float) -> bool:
        """Copy a bounded share of the live blobs out of a sparse segment, so
        that it can go; `room_bytes` is what the disk may take meanwhile.
        Return whether more waits for the next turn.

        Raises:
            JournalError: the journal cannot be written; the message names it.
        """
        ...

    def missing(self) -> str | None:
        """Why the journal's files are no longer where a restart would read
        them (deleted or replaced under the broker), in words; None while
        they are."""
        ...

    def close(self) -> None: ...


class MemoryJournal:
    """No journal: nothing survives the broker. For tests and embedded clusters."""

    written_bytes = 0

    def load(self) -> list[Task]:
        return []

    def load_failures(self) -> list[FailedTask]:
        return []

    def commit(
        self,
        accepted: Iterable[Task],
        finished: Iterable[Task],
        forgotten: Iterable[int],
        failures: Iterable[FailedTask] = (),
        unfailed: Iterable[int] = (),
        struck: Iterable[Task] = (),
    ) -> None:
        pass

    def compact(self, now: float, room_bytes: float) -> bool:
        return False

    def missing(self) -> str | None:
        return None

    def close(self) -> None:
        pass


class SqliteJournal:
    """The journal in one SQLite file (plus its WAL), owned by one broker.

    `read_shared` gives the bytes a task's payload in shared memory stands
    for (see _shared): the journal keeps the bytes, as a restarted broker
    has no arenas; None when the reference cannot be read.
    """

    def __init__(
        self,
        path: str | Path,
        durability: str = "process",
        read_shared: Callable[[p.Payload], bytes | None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.written_bytes = 0
        self._read_shared = read_shared
        self._lock = _lock_exclusively(self.path)
        # Read before SQLite recovers the log, which may overwrite what it drops.
        left_behind = _wal.survey(Path(f"{self.path}-wal"))
        if left_behind is not None and left_behind.frames:
            self._refuse_a_lost_database(left_behind)
        # An embedded broker opens its journal in bind(), in the caller's
        # thread, and commits from serve(), often another. One thread at a
        # time uses the connection, which is all SQLite asks.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        # Set before WAL mode: SQLite then keeps the WAL's index in this
        # process's memory and holds its locks until it closes, where it took
        # and dropped six fcntl() locks per commit (about 8 µs of CPU each
        # commit). The flock above already keeps other brokers off; this shuts
        # out outside readers too (a sqlite3 shell) while the broker runs.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        if left_behind is not None:
            self._report_wal_loss(left_behind)
        sync = "FULL" if durability == "power" else "NORMAL"
        self._db.execute(f"PRAGMA synchronous={sync}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_CHECKPOINT_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        self._db.execute(_SCHEMA)
        self._db.execute(_FAILED_SCHEMA)
        self._add_missing_columns()
        self._wal_flusher = _WalFlusher(Path(f"{self.path}-wal"))
        self._pages_since_checkpoint = 0
        self._blobs = Path(f"{self.path}.blobs")
        self._segments = SegmentStore(self._blobs, fsync=durability == "power")
        self._owners = _BlobOwners()
        self._compaction: _Compaction | None = None
        self._compaction_retry_at = 0.0
        self._compaction_waits_for_room = False
        # Sparse segments: their live bytes when last seen, and since when.
        self._sparse_since: dict[int, tuple[int, float]] = {}
        # Segments found damaged (checksum mismatch), said once and never
        # compacted: copying their bytes would keep them under a new checksum.
        self._damaged_segments: set[int] = set()

    def _refuse_a_lost_database(self, left_behind: _wal.WalSurvey) -> None:
        """Stop before SQLite opens a log whose database is gone or empty.

        SQLite starts such a database afresh and resets the log, dropping
        every commit in it without a word: the tasks a broker accepted since
        its last checkpoint. Left alone, the files can still be put back.
        """
        if os.fstat(self._lock.fileno()).st_size:
            return
        self._lock.close()
        raise UsageError(
            f"cannot open journal {str(self.path)!r}: the database file is "
            f"empty or was deleted, but its write-ahead log {self.path}-wal "
            f"holds {left_behind.frames} pages of it, which SQLite would drop; "
            "put the database file back, or move the log away to start afresh"
        )

    def _report_wal_loss(self, left_behind: _wal.WalSurvey) -> None:
        """Say what SQLite's recovery dropped of the WAL an earlier broker left.

        SQLite drops a log's damaged or unfinished tail without a word, and
        there is no getting it back; but its operator hears of it. Asking how
        many frames the log holds checkpoints them too: the same copy into the
        database the first paced checkpoint would have made.
        """
        kept_frames = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        loss = left_behind.loss(kept_frames)
        if loss is None:
            return
        log.log(
            logging.ERROR if loss.certain else logging.WARNING,
            "journal %s: its write-ahead log %s-wal was cut short or damaged: %s; "
            "the broker goes on with what SQLite kept (%d frames)",
            self.path,
            self.path,
            loss.describe(),
            kept_frames,
        )

    def _add_missing_columns(self) -> None:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")

    def load(self) -> list[Task]:
        try:
            tasks, damage = self._load_tasks()
            self._remember_damaged(damage)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open journal {str(self.path)!r}: {exc}") from exc
        for segment, found in damage.items():
            self._report_damaged_segment(segment, found)
        self._segments.collect_unreferenced_on_disk()
        return tasks

    def _load_tasks(self) -> tuple[list[Task], _Damage]:
        """The tasks on record, and those failed as damaged, by segment."""
        rows = self._db.execute(
            "SELECT seq, session, task_id, function, flags, timeout_s, retries,"
            " recipient, payload, status, result, deaths, losses, payload_ref,"
            " result_ref, finished_wall FROM tasks ORDER BY seq"
        )
        blobs_missing = not self._blobs.is_dir()
        # A result's age carries over a restart (its TTL runs on); the
        # monotonic clock does not. Journals of earlier versions have no time:
        # their results count as finished now.
        now_wall, now = time.time(), time.monotonic()
        tasks: list[Task] = []
        damage: _Damage = {}
        for row in rows:
            *columns, payload_ref, result_ref, finished_wall = row
            task = _task_from_row(columns)
            if blobs_missing and (payload_ref or result_ref):
                raise self._missing_blobs(task)
            unreadable = self._read_blobs(task, payload_ref, result_ref)
            if unreadable is not None:
                segment, exc = unreadable
                _fail_as_damaged(task, self.path, exc)
                damage.setdefault(segment, []).append((task, exc))
            if task.state is State.FINISHED:
                task.finished_at = _on_this_clock(finished_wall, now_wall, now)
            tasks.append(task)
        return tasks, damage

    def _read_blobs(
        self, task: Task, payload_ref: bytes | None, result_ref: bytes | None
    ) -> tuple[int, OSError] | None:
        """Put the blobs `task` keeps in the segments back into it; return the
        segment that could not give one back, and why, or None."""
        kept: tuple[tuple[_Column, bytes | None], ...] = (
            ("payload_ref", payload_ref),
            ("result_ref", result_ref),
        )
        for column, packed in kept:
            if packed is None:
                continue
            try:
                ref = BlobRef.unpack(packed)
            except BlobDamaged as exc:
                return _NO_SEGMENT, exc
            try:
                blob = self._adopt(column, task, ref)
            except OSError as exc:
                return ref.segment, exc
            if column == "payload_ref":
                task.payload = blob
            else:
                task.result = blob
        return None

    def _remember_damaged(self, damage: _Damage) -> None:
        """Put the tasks failed as damaged on the operator's list of failures,
        as any failed task is. Kept as first written: a later restart that
        finds them damaged again adds nothing."""
        failed_wall = time.time()
        rows = [
            _failure_row(_damaged_record(task), failed_wall)
            for found in damage.values()
            for task, _ in found
        ]
        if rows:
            self._write([(_INSERT_FAILURES_ONCE, rows)])

    def _report_damaged_segment(self, segment: int, found: list[_Found]) -> None:
        # One line per segment, not per task: a segment zeroed by the disk
        # fails all its tasks for one reason.
        if segment == _NO_SEGMENT:
            self._report_damaged_rows(found)
            return
        self._damaged_segments.add(segment)
        tickets = [task.ticket for task, _ in found]
        log.error(
            "journal replay: segment %s of journal %s is damaged: %s failed as "
            "JournalDamaged and their clients are told so; the segment stays on "
            "disk until they are acknowledged; first: %s tickets=%s",
            self._segments.path(segment),
            self.path,
            counted(len(found), "task"),
            found[0][1],
            ",".join(map(str, tickets[:10])) + (",..." if len(tickets) > 10 else ""),
        )

    def _report_damaged_rows(self, found: list[_Found]) -> None:
        log.error(
            "journal replay: journal %s holds damaged rows: %s failed as "
            "JournalDamaged and their clients are told so; first: %s tickets=%s",
            self.path,
            counted(len(found), "task"),
            found[0][1],
            ",".join(str(task.ticket) for task, _ in found[:10])
            + (",..." if len(found) > 10 else ""),
        )

    def _missing_blobs(self, task: Task) -> UsageError:
        # Copied or restored without its folder, most likely: nothing is lost
        # yet, so say what to put back rather than fail the tasks.
        return UsageError(
            f"cannot open journal {str(self.path)!r}: its folder of large payloads "
            f"{str(self._blobs)!r} is missing, and task ticket={task.ticket} keeps "
            "its payload there; put the folder back beside the journal (a journal "
            "is PATH, PATH-wal and PATH.blobs together)"
        )

    def load_failures(self) -> list[FailedTask]:
        rows = self._db.execute(
            "SELECT ticket, session, task_id, function, status, error, failed_wall,"
            " payload, flags, timeout_s FROM failed ORDER BY failed_wall, ticket"
        )
        # Ages carry over a restart; the monotonic clock does not.
        now_wall, now = time.time(), time.monotonic()
        return [_failure_from_row(row, now_wall, now) for row in rows]

    def _adopt(self, column: _Column, task: Task, ref: BlobRef) -> bytes:
        # Counted before it is read: a damaged blob's segment stays on disk,
        # for the operator to look at, until its task is acknowledged.
        self._owners.set(column, task.ticket, ref)
        self._segments.adopt(ref)
        return self._segments.get(ref)

    def commit(
        self,
        accepted: Iterable[Task],
        finished: Iterable[Task],
        forgotten: Iterable[int],
        failures: Iterable[FailedTask] = (),
        unfailed: Iterable[int] = (),
        struck: Iterable[Task] = (),
    ) -> None:
        try:
            self._commit(accepted, finished, forgotten, failures, unfailed, struck)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(
                f"cannot write journal {str(self.path)!r} "
                f"(or its folder {str(self._blobs)!r}): {_cause(exc)}"
            ) from exc

    def _commit(
        self,
        accepted: Iterable[Task],
        finished: Iterable[Task],
        forgotten: Iterable[int],
        failures: Iterable[FailedTask],
        unfailed: Iterable[int],
        struck: Iterable[Task],
    ) -> None:
        # Blobs first, then the rows that refer to them; blobs the turn no
        # longer needs are released only once the rows that held them are gone.
        released: list[BlobRef] = []
        accepted_rows = [self._accepted_row(task) for task in accepted]
        finished_wall = time.time()  # the results came in this loop turn
        finished_rows = [
            self._finished_row(task, finished_wall, released) for task in finished
        ]
        forgotten_rows: list[tuple[object, ...]] = [
            self._forgotten_row(ticket, released) for ticket in forgotten
        ]
        self._segments.sync()

        statements: list[_Statement] = [
            (_INSERT_TASKS, accepted_rows),
            (_STRIKE_TASKS, [(t.deaths, t.losses, t.ticket) for t in struck]),
            (_FINISH_TASKS, finished_rows),
            (_FORGET_TASKS, forgotten_rows),
            *self._failure_statements(failures, unfailed),
        ]
        # Statements without rows are left out: each costs a call into SQLite.
        statements = [(sql, rows) for sql, rows in statements if rows]
        self._write(statements)

        for ref in released:
            self._segments.release(ref)
        self._segments.collect()
        self._pace_checkpoints(sum(len(rows) for _, rows in statements))

    def _write(self, statements: list[_Statement]) -> None:
        """Run `statements` (each with its rows) as one transaction."""
        db = self._db
        if not statements:
            return
        if len(statements) == 1 and len(statements[0][1]) == 1:
            # One statement run once is a transaction of its own: BEGIN and
            # COMMIT would add two statements to a turn with a single change
            # (most turns of a sequential client). Run for several rows, each
            # row would be a transaction: those go between BEGIN and COMMIT.
            sql, (row,) = statements[0]
            db.execute(sql, row)
            return
        db.execute("BEGIN")
        try:
            for sql, rows in statements:
                db.executemany(sql, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _failure_statements(
        self, failures: Iterable[FailedTask], unfailed: Iterable[int]
    ) -> list[_Statement]:
        # Added before removed: a record may come and go in one turn.
        failed_wall = time.time()  # the records were made in this loop turn
        added = [_failure_row(record, failed_wall) for record in failures]
        removed: list[tuple[object, ...]] = [(ticket,) for ticket in unfailed]
        return [(_INSERT_FAILURES, added), (_FORGET_FAILURES, removed)]

    def _pace_checkpoints(self, rows: int) -> None:
        """Count the pages a commit of `rows` added to the WAL; ask for a
        flush when enough have, and checkpoint once one has finished."""
        if not rows:
            return
        self._pages_since_checkpoint += 1 + rows // _ROWS_PER_PAGE
        if self._pages_since_checkpoint >= CHECKPOINT_EVERY_PAGES:
            self._pages_since_checkpoint = 0
            self._wal_flusher.request()
        elif self._wal_flusher.take_flushed():
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database, its pages already on the disk.

        Run right after a commit by the only connection, so it copies every
        page and the next commit starts the WAL again from its first page.
        """
        try:
            busy, wal_pages, copied = self._db.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning(
                "journal checkpoint failed path=%s: %s; the turn's commit stands, "
                "and the WAL is copied into the database at the next checkpoint "
                "(SQLite's own at %d pages, should this keep failing)",
                self.path,
                exc,
                FALLBACK_CHECKPOINT_PAGES,
            )
            return
        log.debug(
            "journal checkpoint busy=%s wal_pages=%s copied=%s", busy, wal_pages, copied
        )

    def compact(self, now: float, room_bytes: float) -> bool:
        try:
            return self._compact(now, room_bytes)
        except sqlite3.Error as exc:
            raise JournalError(
                f"cannot write journal {str(self.path)!r} while compacting its "
                f"folder {str(self._blobs)!r}: {type(exc).__name__}: {exc}"
            ) from exc

    def _compact(self, now: float, room_bytes: float) -> bool:
        if now < self._compaction_retry_at:
            return False
        compaction = self._compaction or self._start_compaction(now, room_bytes)
        if compaction is None:
            return False

        try:
            moves = self._copy_live_blobs(compaction.segment, COMPACT_BYTES_PER_TURN)
        except BlobDamaged as exc:
            self._leave_damaged_segment(compaction, exc)
            return False
        except OSError as exc:
            self._give_up_compaction(compaction, exc, now)
            return False
        self._repoint(moves)
        self._release_moved(moves)

        compaction.count(moves)
        if moves and self._segments.live_bytes(compaction.segment):
            return True
        self._finish_compaction(compaction, now)
        # The next turn looks for another sparse segment, unless this one had
        # nothing left to move (its last blobs went meanwhile).
        return bool(moves)

    def _start_compaction(self, now: float, room_bytes: float) -> _Compaction | None:
        """The compaction of the sparsest quiet segment, if the disk has room
        for its live bytes: they are on the disk twice until it goes."""
        segment = self._quiet_sparse_segment(now)
        if segment is None:
            return None
        live_bytes = self._segments.live_bytes(segment)
        if live_bytes > room_bytes:
            self._wait_for_room(segment, live_bytes, room_bytes)
            return None
        self._compaction_waits_for_room = False
        self._compaction = _Compaction(segment, self._segments.size(segment), now)
        return self._compaction

    def _quiet_sparse_segment(self, now: float) -> int | None:
        """The sparsest segment worth compacting whose live bytes have not
        changed for `COMPACT_QUIET_S`; None if there is none yet."""
        sparse = [
            segment
            for segment in self._segments.sparse_segments()
            if segment not in self._damaged_segments
        ]
        seen: dict[int, tuple[int, float]] = {}
        for segment in sparse:
            live_bytes = self._segments.live_bytes(segment)
            seen_live_bytes, since = self._sparse_since.get(segment, (live_bytes, now))
            seen[segment] = (
                live_bytes,
                since if seen_live_bytes == live_bytes else now,
            )
        self._sparse_since = seen
        quiet = (
            segment for segment in sparse if now - seen[segment][1] >= COMPACT_QUIET_S
        )
        return next(quiet, None)

    def _wait_for_room(self, segment: int, live_bytes: int, room_bytes: float) -> None:
        if self._compaction_waits_for_room:
            return
        self._compaction_waits_for_room = True
        log.warning(
            "journal compaction of segment %s waits for disk room: its %d KiB of "
            "live blobs are more than the disk may take now (%d KiB, after "
            "--journal-min-free-bytes); it starts once the broker finds room",
            self._segments.path(segment),
            live_bytes // 1024,
            max(0, int(room_bytes)) // 1024,
        )

    def _copy_live_blobs(self, segment: int, budget_bytes: int) -> list[_Move]:
        """Step 1: append the first of `segment`'s live blobs, up to
        `budget_bytes` (at least one), to the segment being written, and make
        them durable. Nothing refers to the copies yet."""
        chunk = _first_within(self._owners.in_segment(segment), budget_bytes)
        if not chunk:
            return []
        blobs = self._segments.get_many([ref for _, _, ref in chunk])
        moves: list[_Move] = []
        try:
            for (column, ticket, old), blob in zip(chunk, blobs, strict=True):
                # Checked as it was read: its checksum carries over to the copy.
                new = self._segments.put(blob, old.crc32)
                moves.append(_Move(column, ticket, old, new))
            self._segments.sync()
        except OSError:
            self._forget_copies(moves)
            raise
        self.written_bytes += sum(move.new.length for move in moves)
        return moves

    def _repoint(self, moves: list[_Move]) -> None:
        """Step 2: point the rows at the copies, all in one commit."""
        rows: dict[_Column, list[tuple[object, ...]]] = {}
        for move in moves:
            rows.setdefault(move.column, []).append((move.new.pack(), move.ticket))
        try:
            self._write([(_REPOINT[column], found) for column, found in rows.items()])
        except sqlite3.Error:
            self._forget_copies(moves)
            raise
        self._pace_checkpoints(len(moves))

    def _release_moved(self, moves: list[_Move]) -> None:
        """Step 3, after the commit: the old places are dead; a segment left
        with no live blob is deleted."""
        for move in moves:
            self._owners.set(move.column, move.ticket, move.new)
            self._segments.release(move.old)
        self._segments.collect()

    def _forget_copies(self, moves: list[_Move]) -> None:
        """Copies no row will refer to: dead bytes, counted as such."""
        for move in moves:
            self._segments.release(move.new)

    def _give_up_compaction(
        self, compaction: _Compaction, exc: OSError, now: float
    ) -> None:
        self._compaction = None
        self._compaction_retry_at = now + COMPACT_RETRY_S
        log.warning(
            "journal compaction of segment %s failed: %s; its rows still point at "
            "it, and the broker tries again in %.0fs",
            self._segments.path(compaction.segment),
            exc,
            COMPACT_RETRY_S,
        )

    def _leave_damaged_segment(self, compaction: _Compaction, exc: BlobDamaged) -> None:
        """A blob to copy is not the blob written: the segment is never
        compacted again. Its tasks run with the bytes this broker holds in
        memory; their rows still point at the damaged bytes, so a restart
        before they finish fails them as JournalDamaged."""
        self._compaction = None
        self._damaged_segments.add(compaction.segment)
        log.error(
            "journal segment %s of journal %s is damaged: %s; it is no longer "
            "compacted, its tasks run from memory, and a restart before they "
            "finish fails them as JournalDamaged",
            self._segments.path(compaction.segment),
            self.path,
            exc,
        )

    def _finish_compaction(self, compaction: _Compaction, now: float) -> None:
        self._compaction = None
        log.info(
            "journal compaction freed %d MiB: segment %s (%d MiB) deleted after "
            "%d live blobs (%d KiB) were copied out in %d turns over %.2fs",
            (compaction.size - compaction.moved_bytes) // 2**20,
            self._segments.path(compaction.segment),
            compaction.size // 2**20,
            compaction.moved_blobs,
            compaction.moved_bytes // 1024,
            compaction.turns,
            now - compaction.started_at,
        )

    def _accepted_row(self, task: Task) -> tuple[object, ...]:
        payload, flags = self._kept_payload(task)
        payload, ref = self._store(payload, "payload_ref", task.ticket)
        return (
            task.ticket,
            task.session,
            task.task_id,
            task.function,
            flags,
            task.timeout_s,
            task.retries_left,
            task.recipient,
            payload,
            ref,
            task.deaths or None,  # a split item's first strike (Flags.SPLIT)
            task.losses or None,
        )

    def _kept_payload(self, task: Task) -> tuple[p.Payload, int]:
        """A task's payload and flags as the journal keeps them: the bytes of
        a payload in shared memory, not the reference, which no broker after
        this one could read."""
        if not task.flags & _SHARED or self._read_shared is None:
            return task.payload, task.flags
        payload = self._read_shared(task.payload)
        if payload is None:
            # Its client freed it already: a restart would fail the task
            # for its unreadable reference, as a worker does now.
            return task.payload, task.flags
        return payload, task.flags & ~_SHARED

    def _finished_row(
        self, task: Task, finished_wall: float, released: list[BlobRef]
    ) -> tuple[object, ...]:
        # The payload's, and an expired result's when a task finishes again.
        self._owners.release(task.ticket, released)
        result, ref = self._store(task.result, "result_ref", task.ticket)
        return (int(task.status or 0), result, ref, finished_wall, task.ticket)

    def _forgotten_row(self, ticket: int, released: list[BlobRef]) -> tuple[int]:
        self._owners.release(ticket, released)
        return (ticket,)

    def _store(
        self, blob: p.Payload, column: _Column, ticket: int
    ) -> tuple[p.Payload, bytes | None]:
        """What the row holds for `blob`: the blob itself when small, else a
        reference to where it was written in the segments."""
        self.written_bytes += len(blob)
        if len(blob) <= INLINE_MAX_BYTES:
            return blob, None
        ref = self._segments.put(blob)
        self._owners.set(column, ticket, ref)
        return b"", ref.pack()

    def missing(self) -> str | None:
        # SQLite and the segments go on writing into files that were deleted
        # under them, without an error, and a restart would find nothing.
        if not _still_at(self.path, os.fstat(self._lock.fileno())):
            return f"{self.path} was deleted or replaced"
        if not os.path.exists(f"{self.path}-wal"):
            return f"its write-ahead log {self.path}-wal was deleted"
        if self._segments.current_deleted():
            return f"its blob folder {self._blobs} was deleted"
        return None

    def close(self) -> None:
        self._wal_flusher.close()
        try:
            self._segments.close()
        finally:
            self._db.close()
            self._lock.close()


class _BlobOwners:
    """Whose payload or result each blob in the segments is, by ticket and by
    segment: the rows that release it, and the rows a compaction repoints."""

    def __init__(self) -> None:
        self._refs: dict[tuple[_Column, int], BlobRef] = {}
        self._by_segment: dict[int, set[tuple[_Column, int]]] = {}

    def set(self, column: _Column, ticket: int, ref: BlobRef) -> None:
        """Record that the row of `ticket` refers to `ref` in `column`."""
        self._forget((column, ticket))
        self._refs[column, ticket] = ref
        self._by_segment.setdefault(ref.segment, set()).add((column, ticket))

    def release(self, ticket: int, released: list[BlobRef]) -> None:
        """Append the references the row of `ticket` held, if any, to
        `released`. Called for every task that finishes or is forgotten, most
        often with no blob in the segments at all: that case costs one test."""
        if not self._refs:
            return
        for column in _COLUMNS:
            ref = self._forget((column, ticket))
            if ref is not None:
                released.append(ref)

    def in_segment(self, segment: int) -> list[tuple[_Column, int, BlobRef]]:
        """The references into `segment`, in the order of its bytes."""
        owners = self._by_segment.get(segment, ())
        found = [
            (column, ticket, self._refs[column, ticket]) for column, ticket in owners
        ]
        return sorted(found, key=lambda owner: owner[2].offset)

    def _forget(self, key: tuple[_Column, int]) -> BlobRef | None:
        ref = self._refs.pop(key, None)
        if ref is not None:
            owners = self._by_segment[ref.segment]
            owners.discard(key)
            if not owners:
                del self._by_segment[ref.segment]
        return ref


@dataclass(frozen=True, slots=True)
class _Move:
    """A live blob a compaction copied: the row, and its old and new places."""

    column: _Column
    ticket: int
    old: BlobRef
    new: BlobRef


@dataclass(slots=True)
class _Compaction:
    """The compaction of one segment under way, counted for its log line."""

    segment: int
    size: int
    started_at: float
    moved_blobs: int = 0
    moved_bytes: int = 0
    turns: int = 0

    def count(self, moves: list[_Move]) -> None:
        self.turns += 1
        self.moved_blobs += len(moves)
        self.moved_bytes += sum(move.new.length for move in moves)


def _first_within(
    owners: list[tuple[_Column, int, BlobRef]], budget_bytes: int
) -> list[tuple[_Column, int, BlobRef]]:
    """The first of `owners` whose blobs add up to `budget_bytes`, at least one."""
    chunk: list[tuple[_Column, int, BlobRef]] = []
    total = 0
    for owner in owners:
        if chunk and total + owner[2].length > budget_bytes:
            break
        chunk.append(owner)
        total += owner[2].length
    return chunk


class _WalFlusher:
    """A thread that writes the journal's WAL to the disk when asked.

    fdatasync() on a descriptor of its own is all it does: it never touches
    SQLite's state, and the checkpoint that follows still syncs as SQLite
    would (with nothing much left to write). Python lets go of the GIL while
    the call waits for the disk, so the broker's loop carries on meanwhile.
    """

    def __init__(self, wal: Path) -> None:
        self._wal = wal
        self._wanted = threading.Event()
        self._flushed = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="journal-wal-flush", daemon=True
        )
        self._thread.start()

    def request(self) -> None:
        """Ask for the WAL to be written to the disk; returns at once."""
        self._wanted.set()

    def take_flushed(self) -> bool:
        """Whether a flush finished since the last call said so."""
        if not self._flushed.is_set():
            return False
        self._flushed.clear()
        return True

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        fd: int | None = None
        try:
            while self._next_request():
                fd = self._flush(fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _next_request(self) -> bool:
        """Wait for a request; False once the journal closes."""
        self._wanted.wait()
        self._wanted.clear()
        return not self._stopping

    def _flush(self, fd: int | None) -> int | None:
        """fdatasync() the WAL, opened on first use; return its descriptor."""
        try:
            if fd is None:
                # No fcntl() lock of SQLite's is on the WAL (in exclusive
                # mode they are on the database file), so this descriptor
                # may come and go freely.
                fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
            os.fdatasync(fd)
        except OSError as exc:
            # Nothing is lost: SQLite checkpoints by itself at
            # FALLBACK_CHECKPOINT_PAGES, syncing the WAL as it always did.
            log.warning(
                "journal WAL flush failed path=%s: %s; the broker's own "
                "checkpoints sync it instead",
                self._wal,
                exc,
            )
            return fd
        self._flushed.set()
        return fd


def _cause(exc: BaseException) -> str:
    """What went wrong, in words an operator can act on. SQLite says "disk
    I/O error" of a write refused for any reason; its error name tells a
    little more, and a file size limit (ulimit -f) is a likely one that the
    disk's free space does not show."""
    cause = f"{type(exc).__name__}: {exc}"
    name = getattr(exc, "sqlite_errorname", None)
    if name is None:
        return cause
    cause += f" ({name})"
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if name.startswith("SQLITE_IOERR") and limit != resource.RLIM_INFINITY:
        cause += (
            f"; this process may write files of at most {limit} bytes (ulimit "
            "-f): raise the limit"
        )
    return cause


def _lock_exclusively(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on the journal file for as long as it is open.

    Two brokers replaying one journal would both run its tasks; SQLite's own
    locks only keep their writes apart. flock() on the file itself covers any
    path to it (symbolic or hard links) and does not touch SQLite's fcntl()
    locks; the descriptor stays open until after SQLite has closed, since
    closing any descriptor of the file would drop SQLite's locks. The OS
    releases the lock when the broker dies, however it dies.
    """
    lock = open(path, "ab")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(
            f"journal {str(path)!r} is in use by another broker; give each broker "
            "its own --journal"
        ) from None
    return lock


def _still_at(path: Path, opened: os.stat_result) -> bool:
    """Whether the file opened as `opened` is still the one at `path`."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def open_journal(
    path: str | Path | None,
    durability: str = "process",
    read_shared: Callable[[p.Payload], bytes | None] | None = None,
) -> Journal:
    """The journal a broker was configured with (see SqliteJournal for
    `read_shared`).

    Raises:
        UsageError: an unknown durability mode, or a journal file that cannot be
            opened (the message names the path).
    """
    if durability not in DURABILITY_MODES:
        raise UsageError(
            f"unknown durability {durability!r}; expected one of {DURABILITY_MODES}"
        )
    if durability == "memory" or path is None:
        _warn_of_a_journal_left_aside(path)
        return MemoryJournal()

    try:
        return SqliteJournal(path, durability, read_shared)
    except (sqlite3.Error, OSError) as exc:
        hint = _cannot_open_hint(path) if _is_cantopen(exc) else ""
        raise UsageError(f"cannot open journal {str(path)!r}: {exc}{hint}") from exc


def _is_cantopen(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorname", None) == "SQLITE_CANTOPEN"


def _cannot_open_hint(path: str | Path) -> str:
    # SQLite's own words ("unable to open database file") name no file: most
    # often the file opened, and the log beside it could not be created.
    folder = os.path.dirname(os.path.abspath(path))
    return (
        f" (SQLite creates {os.path.basename(path)}-wal beside it: the folder "
        f"{folder} must let this user create files)"
    )


def _warn_of_a_journal_left_aside(path: str | Path | None) -> None:
    """A broker started without a journal next to one an earlier broker wrote:
    the tasks in it are not served now, and come back when a broker opens it
    again, which an operator switching to memory may not expect."""
    if path is None or not os.path.isfile(path) or not os.path.getsize(path):
        return
    log.warning(
        "durability is memory, but journal %s exists: the tasks and results "
        "it holds are not served by this broker; they come back when a "
        "broker starts on it with durability process or power",
        path,
    )


def _fail_as_damaged(task: Task, journal: Path, exc: OSError) -> None:
    """Finish a task whose payload or result cannot be read back: its client
    gets an error that says so, rather than waiting for ever or being handed
    bytes that are not its own."""
    error = TaskRejected(
        "JournalDamaged",
        f"the broker's journal {journal} lost this task's payload or result "
        f"({exc}); submit it again",
    )
    task.state = State.FINISHED
    task.status = p.Status.REJECTED
    task.result = pack_error(error)


def _damaged_record(task: Task) -> FailedTask:
    """The failure record of a task `_fail_as_damaged` finished. Its arguments
    are not kept: the bytes that could be are the damaged ones."""
    return FailedTask(
        task.ticket,
        task.session,
        task.task_id,
        task.function,
        p.Status.REJECTED,
        task.result,
        0.0,  # the record's time is written as the wall clock's, by the caller
        None,
        task.flags,
        task.timeout_s,
    )


def _on_this_clock(wall: object, now_wall: float, now: float) -> float:
    """A wall-clock time of the journal as a time of this process's monotonic
    clock (`now` being `now_wall`); `now` for an unknown time."""
    if wall is None:
        return now
    return now - max(0.0, now_wall - float(wall))  # type: ignore[arg-type]


def _task_from_row(row: Sequence[object]) -> Task:
    seq, session, task_id, function, flags, timeout_s, retries = row[:7]
    recipient, payload, status, result, deaths, losses = row[7:]
    task = Task(
        ticket=int(seq),  # type: ignore[call-overload]
        session=str(session),
        task_id=int(task_id),  # type: ignore[call-overload]
        function=str(function),
        payload=bytes(payload or b""),  # type: ignore[call-overload]
        flags=int(flags),  # type: ignore[call-overload]
        timeout_s=None if timeout_s is None else float(timeout_s),  # type: ignore[arg-type]
        retries_left=int(retries),  # type: ignore[call-overload]
        recipient=str(recipient),
        deaths=int(deaths or 0),  # type: ignore[call-overload]
        losses=int(losses or 0),  # type: ignore[call-overload]
    )
    if status is not None:
        task.state = State.FINISHED
        task.status = p.Status(int(status))  # type: ignore[call-overload]
        task.result = bytes(result or b"")  # type: ignore[call-overload]
    return task


def _failure_row(record: FailedTask, failed_wall: float) -> tuple[object, ...]:
    return (
        record.ticket,
        record.session,
        record.task_id,
        record.function,
        int(record.status),
        bytes(record.error),
        failed_wall,
        record.payload,
        record.flags,
        record.timeout_s,
    )


def _failure_from_row(
    row: tuple[object, ...], now_wall: float, now: float
) -> FailedTask:
    ticket, session, task_id, function, status, error, failed_wall = row[:7]
    payload, flags, timeout_s = row[7:]
    age_s = max(0.0, now_wall - float(failed_wall))  # type: ignore[arg-type]
    return FailedTask(
        ticket=int(ticket),  # type: ignore[call-overload]
        session=str(session),
        task_id=int(task_id),  # type: ignore[call-overload]
        function=str(function),
        status=p.Status(int(status)),  # type: ignore[call-overload]
        error=bytes(error),  # type: ignore[call-overload]
        failed_at=now - age_s,
        payload=None if payload is None else bytes(payload),  # type: ignore[call-overload]
        flags=int(flags),  # type: ignore[call-overload]
        timeout_s=None if timeout_s is None else float(timeout_s),  # type: ignore[arg-type]
    )

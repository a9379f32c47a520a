"""The raw write speed of the disk the journal lives on, as D's yardstick.

D with the journal on must put every payload on that disk; these two figures,
measured in the same run, say how fast the disk takes 100 KiB blobs at all:

    file         appended to one file with write() (as the journal's segments)
    sqlite_wal   inserted as rows of a SQLite database in WAL mode, one
                 transaction per 20 rows (as a journal that kept blobs inline)

and a third says how fast ventilator's journal alone takes the same tasks, with
no sockets or processes around it:

    journal      each task accepted, finished and forgotten through the
                 broker's own SqliteJournal, 20 tasks per loop turn

Both write where `tempfile` puts things, which is where the benchmark's journals
go, with the journal's default durability (no fsync).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

from ventilator import protocol as p
from ventilator.journal import open_journal
from ventilator.scheduler import State, Task

ROWS_PER_COMMIT = 20


def file_write(blobs: int, size: int) -> dict[str, float]:
    """MB/s of appending `blobs` blobs of `size` bytes to a file."""
    blob = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as folder:
        path = Path(folder) / "segment"
        started = time.perf_counter()
        with open(path, "wb", buffering=0) as target:
            for _ in range(blobs):
                target.write(blob)
        elapsed = time.perf_counter() - started
    return {"mb_per_s": blobs * size / elapsed / 1e6}


def sqlite_wal_write(blobs: int, size: int) -> dict[str, float]:
    """MB/s of inserting `blobs` blobs of `size` bytes into SQLite in WAL mode."""
    blob = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as folder:
        db = sqlite3.connect(Path(folder) / "blobs.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE blobs (seq INTEGER PRIMARY KEY, data BLOB)")
        started = time.perf_counter()
        for first in range(0, blobs, ROWS_PER_COMMIT):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO blobs VALUES (?, ?)",
                [(seq, blob) for seq in range(first, first + ROWS_PER_COMMIT)],
            )
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        db.close()
    return {"mb_per_s": blobs * size / elapsed / 1e6}


def journal_write(blobs: int, size: int) -> dict[str, float]:
    """MB/s of payloads through the journal's whole life of a task: the turn
    that accepts it, the one that records its result, the one that forgets it."""
    blob = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as folder:
        journal = open_journal(Path(folder) / "journal.db", "process")
        started = time.perf_counter()
        for first in range(0, blobs, ROWS_PER_COMMIT):
            tickets = range(first + 1, first + 1 + ROWS_PER_COMMIT)
            tasks = [_task(ticket, blob) for ticket in tickets]
            journal.commit(tasks, [], [])
            for task in tasks:
                task.state, task.status = State.FINISHED, p.Status.OK
                task.payload, task.result = b"", b"\x01"
            journal.commit([], tasks, [])
            journal.commit([], [], [task.ticket for task in tasks])
        elapsed = time.perf_counter() - started
        journal.close()
    return {"mb_per_s": blobs * size / elapsed / 1e6}


def _task(ticket: int, payload: bytes) -> Task:
    return Task(
        ticket=ticket,
        session="bench",
        task_id=ticket,
        function="benchmarks.workloads:length",
        payload=payload,
        flags=0,
        timeout_s=None,
        retries_left=0,
        recipient="bench",
    )

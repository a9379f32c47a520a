"""The raw write speed of the disk the journal lives on, as D's yardstick.

D with the journal on must put every payload on that disk; these two figures,
measured in the same run, say how fast the disk takes 100 KiB blobs at all:

    file         appended to one file with write() (as the journal's segments)
    sqlite_wal   inserted as rows of a SQLite database in WAL mode, one
                 transaction per 20 rows (as a journal that kept blobs inline)

Both write where `tempfile` puts things, which is where the benchmark's journals
go, with the journal's default durability (no fsync).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

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

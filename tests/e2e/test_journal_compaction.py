"""Compaction of the journal's segments, across real process deaths: a journal
killed between the steps of a compaction, and a real broker whose one queued
task would have pinned a 64 MiB segment."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ventilator import protocol as p
from ventilator import segments as segments_module
from ventilator.journal import COMPACT_QUIET_S, SqliteJournal
from ventilator.scheduler import State, Task
from ventilator.segments import BlobRef

from . import tasks
from .conftest import MORE_TASKS, REPO_ROOT, Launcher, child_env, wait_until
from .journal_crash import STEPS

SMALL_SEGMENT_BYTES = 8 * 2**20
BLOB_BYTES = 256 * 1024
CRASH_TIMEOUT_S = 30.0

_TICKETS = itertools.count(1)


def blob(task_id: int, size: int = BLOB_BYTES) -> bytes:
    pattern = task_id.to_bytes(4, "little") + bytes(range(256))
    return (pattern * (size // len(pattern) + 1))[:size]


def a_task(task_id: int) -> Task:
    return Task(
        ticket=next(_TICKETS),
        session="alice",
        task_id=task_id,
        function="jobs:f",
        payload=blob(task_id),
        flags=0,
        timeout_s=None,
        retries_left=0,
        recipient="alice",
    )


def journal_with_a_sparse_segment(path: Path, live: int) -> dict[int, bytes]:
    """A closed segment of 32 blobs of which `live` stay queued, and the
    payload every queued task must read back as."""
    journal = SqliteJournal(path)
    batch = [a_task(i) for i in range(SMALL_SEGMENT_BYTES // BLOB_BYTES)]
    journal.commit(batch, [], [])
    gone = batch[live:]
    for one in gone:
        one.state, one.status, one.result = State.FINISHED, p.Status.OK, b"done"
    journal.commit([], gone, [])
    journal.commit([], [], [one.ticket for one in gone])
    journal.commit([a_task(999)], [], [])  # closes the first segment
    journal.close()
    return {i: blob(i) for i in [*range(live), 999]}


def kill_during_compaction(path: Path, last_step: str, budget_bytes: int) -> None:
    crashed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.e2e.journal_crash",
            str(path),
            last_step,
            str(budget_bytes),
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        timeout=CRASH_TIMEOUT_S,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr


def loaded_payloads(path: Path, compact: bool = False) -> dict[int, bytes]:
    """The tasks a restarted broker finds, none of them damaged; compacting
    what is left first when asked."""
    journal = SqliteJournal(path)
    try:
        loaded = journal.load()
        journal.compact(0.0, math.inf)  # sees the sparse segments first
        while compact and journal.compact(COMPACT_QUIET_S, math.inf):
            pass
    finally:
        journal.close()
    assert all(task.state is State.QUEUED for task in loaded)
    return {task.task_id: task.payload for task in loaded}


def referenced_segment_files(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        refs = [ref for (ref,) in db.execute("SELECT payload_ref FROM tasks") if ref]
    return {f"{BlobRef.unpack(ref).segment:08d}.seg" for ref in refs}


def segment_file_names(path: Path) -> set[str]:
    return {segment.name for segment in Path(f"{path}.blobs").glob("*.seg")}


@pytest.mark.parametrize("copied_blobs", [2, 3], ids=["part", "all"])
@pytest.mark.parametrize("last_step", STEPS)
def test_a_compaction_killed_after_any_step_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last_step: str, copied_blobs: int
) -> None:
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", SMALL_SEGMENT_BYTES)
    path = tmp_path / "journal.db"
    expected = journal_with_a_sparse_segment(path, live=3)
    sparse = Path(f"{path}.blobs") / "00000001.seg"

    kill_during_compaction(path, last_step, copied_blobs * BLOB_BYTES)

    assert loaded_payloads(path) == expected
    # Every segment left is one a row refers to: copies nobody referred to yet,
    # or a segment nobody refers to any more, went on loading.
    assert segment_file_names(path) == referenced_segment_files(path)
    assert loaded_payloads(path, compact=True) == expected
    assert not sparse.exists()
    assert loaded_payloads(path) == expected


def test_one_queued_task_does_not_pin_a_segment_of_a_real_broker(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    journal = restartable["journal"]
    broker = launch.broker(**restartable)
    client = launch.client(broker)
    # Nobody serves it until the end: its payload is the first blob of the
    # first segment, and stays there while 70 MB of other tasks come and go.
    straggler_payload = os.urandom(300_000)
    straggler = client.submit(f"{MORE_TASKS}:identity", straggler_payload)
    launch.worker(broker, concurrency=2)
    payload = os.urandom(100_000)
    futures = [client.submit(tasks.length, payload) for _ in range(720)]
    assert {future.result(120) for future in futures} == {len(payload)}

    first_segment = Path(f"{journal}.blobs") / "00000001.seg"
    wait_until(lambda: not first_segment.exists(), 30, "the first segment to go")
    blob_bytes = sum(f.stat().st_size for f in Path(f"{journal}.blobs").iterdir())
    # Left: the segment being written, which the copy of the straggler keeps
    # until it is closed in turn.
    assert blob_bytes < segments_module.SEGMENT_BYTES // 2

    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(10)
    restarted = launch.broker(**restartable)
    launch.worker(restarted, MORE_TASKS)
    assert straggler.result(30) == straggler_payload

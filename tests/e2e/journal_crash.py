"""A broker's journal killed in the middle of a compaction, as a process.

Run as ``python -m tests.e2e.journal_crash JOURNAL STEP BUDGET_BYTES``: opens
the journal as a broker would, runs the steps of one compaction turn by hand
up to STEP ("copy", "repoint" or "release"), then kills itself with SIGKILL:
no close, no cleanup, the SQLite connection and segment files left as a
crashed broker leaves them. The steps are the journal's private methods, run
one by one because a broker's turn runs them back to back.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

from ventilator.journal import COMPACT_QUIET_S, SqliteJournal

STEPS = ("copy", "repoint", "release")


def main(path: Path, last_step: str, budget_bytes: int) -> None:
    journal = SqliteJournal(path)
    journal.load()
    # The first look sees the segment sparse, the second sees it stayed so.
    journal._start_compaction(0.0, math.inf)
    compaction = journal._start_compaction(COMPACT_QUIET_S, math.inf)
    if compaction is None:
        sys.exit("no segment to compact")

    moves = journal._copy_live_blobs(compaction.segment, budget_bytes)
    if last_step != "copy":
        journal._repoint(moves)
    if last_step == "release":
        journal._release_moved(moves)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))

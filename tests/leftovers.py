"""Processes a command or task starts, seen by the pids they record.

The commands of these tests write their pids into a file, so that a test can
count them, see them gone, and end any that a failure left behind, by pid: only
a process still running their `sleep 600` (or the shell about to become it),
so that a reused pid is never taken for one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.conftest import ProcessId, stop_process_ids


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def sleeper(self) -> str:
        """A shell command that records its pid and sleeps long."""
        return f"echo $$ >> {self.path}; exec sleep 600"

    def until_recorded(self, count: int) -> str:
        """A shell command that returns once `count` pids are recorded."""
        return f"until [ $(wc -l < {self.path}) -ge {count} ]; do sleep 0.01; done"

    def recorded(self) -> list[int]:
        return [int(pid) for pid in self.path.read_text().split()]

    def alive(self) -> list[ProcessId]:
        """The recorded processes still sleeping (or about to)."""
        found = []
        for pid in self.recorded():
            process_id = ProcessId.of(pid)
            sleeping = b"sleep 600" in _cmdline(pid) or _cmdline(pid) == _SLEEP
            if process_id is not None and process_id.alive() and sleeping:
                found.append(process_id)
        return found


_SLEEP = b"sleep\x00600\x00"


@contextlib.contextmanager
def pid_file(directory: Path) -> Iterator[PidFile]:
    """A PidFile in `directory`; what it recorded is ended on the way out."""
    pids = PidFile(directory / "pids")
    try:
        yield pids
    finally:
        stop_process_ids(pids.alive())


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""

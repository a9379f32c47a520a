"""Tasks that start processes of their own, for tests of what outlives a task."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# How long `start_then_die` waits for its commands to record their pids.
RECORD_WAIT_S = 30.0


def run_program(argv: list[str]) -> int:
    """Run `argv` to its end; return its exit status."""
    return subprocess.run(argv, check=False).returncode


def start_then_die(argvs: list[list[str]], pid_file: str) -> None:
    """Start each command of `argvs`, which records its pid in `pid_file`;
    once all have, end this process at once, leaving them running."""
    for argv in argvs:
        subprocess.Popen(argv)
    recorded = Path(pid_file)
    give_up_at = time.monotonic() + RECORD_WAIT_S
    while len(recorded.read_text().split()) < len(argvs):
        if time.monotonic() >= give_up_at:
            break
        time.sleep(0.01)  # the task's own wait for its commands, not a test's
    os._exit(1)

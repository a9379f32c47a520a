"""Tasks for the fault-injection scenarios: each run leaves a mark in a log.

Every execution appends its task number to the file named by the environment
variable VENTILATOR_FAULT_LOG (one short O_APPEND write, atomic between
processes), so a scenario can count how often each task ran.
"""

from __future__ import annotations

import os
import time


def _mark(i: int) -> None:
    path = os.environ.get("VENTILATOR_FAULT_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{i}\n".encode())
        finally:
            os.close(fd)


def work(i: int, seconds: float) -> int:
    """Take about `seconds`, then return `i`."""
    _mark(i)
    time.sleep(seconds)
    return i


def explode(i: int) -> int:
    """Kill the process running it, every time."""
    _mark(i)
    os._exit(13)


def linger(i: int, seconds: float) -> int:
    """Sleep for `seconds` (longer than any sensible timeout)."""
    _mark(i)
    time.sleep(seconds)
    return i

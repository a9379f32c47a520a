"""Run a command as a task: what `ventilator exec` sends to workers.

A worker serves these functions only when started with this module named
(`ventilator worker ventilator.shell`), because serving them lets any client
run programs on the worker's machine. The embedded cluster of `exec` does so.
"""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["run"]


def run(argv: list[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Run `argv` without a shell and report how it ended.

    Returns:
        ``{"exit_code": int, "stdout": str, "stderr": str}``; output is decoded
        as UTF-8 with undecodable bytes replaced.

    Raises:
        FileNotFoundError: the program does not exist on this worker.
        subprocess.TimeoutExpired: it ran past `timeout_s` and was killed.
    """
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise ValueError(f"argv must be a non-empty list of strings, got {argv!r:.80}")

    completed = subprocess.run(
        argv,
        capture_output=True,
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return {
        "exit_code": completed.returncode,
        "stdout": completed.stdout.decode("utf-8", "replace"),
        "stderr": completed.stderr.decode("utf-8", "replace"),
    }

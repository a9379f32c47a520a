"""Run a command as a task: what `ventilator exec` sends to workers.

A worker serves these functions only when started with this module named
(`ventilator worker ventilator.shell`), because serving them lets any client
run programs on the worker's machine. The embedded cluster of `exec` does so.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

__all__ = ["run", "run_call"]


def run(argv: list[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Run `argv` without a shell and report how it ended.

    Returns:
        ``{"exit_code": int, "stdout": ..., "stderr": ...}``; each output is a
        str when it is valid UTF-8, else the bytes exactly as written (which
        `ventilator exec` prints as ``{"$base64": ...}``).

    Raises:
        FileNotFoundError: the program does not exist on this worker.
        TimeoutError: it ran past `timeout_s`; it and its process group were
            killed.
    """
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise ValueError(f"argv must be a non-empty list of strings, got {argv!r:.80}")

    # Its own process group, so that a timeout stops whatever it started too.
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise TimeoutError(
            f"{argv[0]} ran past its timeout of {timeout_s:g}s; it and the "
            "processes it started were killed"
        ) from None
    return {
        "exit_code": process.returncode,
        "stdout": _text_if_utf8(stdout),
        "stderr": _text_if_utf8(stderr),
    }


def _text_if_utf8(output: bytes) -> str | bytes:
    # Replacing undecodable bytes would lose binary output without a word;
    # bytes travel as they are, and text stays readable as text.
    try:
        return output.decode("utf-8")
    except UnicodeDecodeError:
        return output


def run_call(call: list[Any]) -> dict[str, Any]:
    """`run(argv, timeout_s)` for ``call = [argv, timeout_s]``.

    What the batches of `ventilator exec` call for each line, since a batch
    hands its function one argument per item.

    Raises:
        ValueError: `call` is not a pair; and as `run`.
    """
    if not isinstance(call, list) or len(call) != 2:
        raise ValueError(f"expected [argv, timeout_s], got {call!r:.80}")
    argv, timeout_s = call
    return run(argv, timeout_s)

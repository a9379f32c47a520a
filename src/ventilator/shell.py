"""Run a command as a task: what `ventilator exec` sends to workers.

A worker serves these functions only when started with this module named
(`ventilator worker ventilator.shell`), because serving them lets any client
run programs on the worker's machine. The embedded cluster of `exec` does so.

A line's command ends with everything it started. It runs in a session of its
own; when it exits (even if a process it left holds its output open), runs
past its timeout or writes too much, its process group, its descendants (found
through /proc, even those that left the group with `setsid`) and, run on a
task process's main thread, the orphans it left (adopted while it runs, see
`_proctree.adopt_orphans`) are killed.

The kernel's parent-death signal is not asked for: it would need code run
between fork and exec, which makes each command cost twice as much to start.
The process pool kills the commands of a task process it stops, and those a
task process that died left running (see pool); only a worker killed outright
leaves them running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _proctree
from .policy import Limits

__all__ = ["ResultTooLarge", "run", "run_call"]

log = logging.getLogger(__name__)

# Output kept when the caller names no limit: the broker's default limit on a
# result, since more could not be sent back anyway.
DEFAULT_MAX_OUTPUT_BYTES = Limits().max_payload_bytes
# Room in a result for what is not output: the exit code, keys, framing.
RESULT_OVERHEAD_BYTES = 1024
_READ_BYTES = 65536
# How long the pipes of a command that exited may stay open once what it left
# running was killed: they close at once unless a process escaped the kill.
DRAIN_AFTER_EXIT_S = 1.0
# Without a pidfd (not Linux), how often a command whose pipes are open is
# checked for having exited.
_EXIT_CHECK_S = 0.05
# Marks the exit notice among the selector's keys.
_EXITED = object()


class ResultTooLarge(RuntimeError):
    """The command wrote more output than a result may carry."""


def run(
    argv: list[str | bytes],
    timeout_s: float | None = None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> dict[str, Any]:
    """Run `argv` without a shell and report how it ended.

    Args:
        argv: the program and its arguments, each str or bytes (bytes go to
            the program as they are: a file name that is not UTF-8).
        timeout_s: kill it (and what it started) after this many seconds.
        max_output_bytes: kill it once its stdout and stderr together pass
            this many bytes (what a result may carry, less some room).

    Returns:
        ``{"exit_code": int, "stdout": ..., "stderr": ...}``; each output is a
        str when it is valid UTF-8, else the bytes exactly as written (which
        `ventilator exec` prints as ``{"$base64": ...}``).

    Raises:
        FileNotFoundError: the program does not exist on this worker.
        TimeoutError: it ran past `timeout_s`; it was killed, with the
            processes it started (the message names any that could not be).
        ResultTooLarge: it wrote more than `max_output_bytes`; killed as well.
    """
    if not argv or not all(isinstance(arg, (str, bytes)) for arg in argv):
        raise ValueError(
            f"argv must be a non-empty list of strings or bytes, got {argv!r:.80}"
        )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    output_limit = max(0, max_output_bytes - RESULT_OVERHEAD_BYTES)

    command = _Command(argv)
    try:
        ended = command.collect(deadline, output_limit)
    finally:
        left = command.stop()
    program = os.fsdecode(argv[0])
    if ended == "timeout":
        raise TimeoutError(
            f"{program} ran past its timeout of {timeout_s:g}s; {_killed(left)}"
        )
    if ended == "too_large":
        raise ResultTooLarge(
            f"{program} wrote more than {output_limit} bytes of output, more than "
            f"a result may carry (the broker's limit is {max_output_bytes} bytes, "
            f"max_payload_bytes); {_killed(left)}"
        )
    return {
        "exit_code": command.process.returncode,
        "stdout": _text_if_utf8(b"".join(command.stdout)),
        "stderr": _text_if_utf8(b"".join(command.stderr)),
    }


def _killed(left: list[int]) -> str:
    if not left:
        return "it and the processes it started were killed"
    return (
        "it and the processes it started were killed, except pids "
        f"{', '.join(map(str, left))}, which this worker may not signal"
    )


@dataclass(eq=False)
class _Command:
    """A running command, its output so far, and what it left behind."""

    argv: list[str | bytes]
    process: subprocess.Popen[bytes] = field(init=False)
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    # Our children before it started: any other child of ours when it ends
    # is an orphan of its that we adopted.
    others: set[int] = field(default_factory=set)
    adopting: bool = False
    kept_bytes: int = 0

    def __post_init__(self) -> None:
        # Adopting orphans is for a process running one command at a time: a
        # task process runs its tasks on its main thread. Elsewhere another
        # thread's children would look like ours.
        if threading.current_thread() is threading.main_thread():
            self.others = set(_proctree.children_of(os.getpid()))
            self.adopting = _proctree.adopt_orphans(True)
        try:
            # A session of its own, so that no terminal signal reaches it and
            # its whole process group can be killed at once.
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            self._stop_adopting()
            raise

    def collect(self, deadline: float | None, limit: int) -> str:
        """Read its output until it ends: "exited", "timeout" or "too_large".

        It ends when it exits, even if processes it left still hold its
        output: those are killed then, and what is in the pipes is read for
        `DRAIN_AFTER_EXIT_S` at most (only a process that could not be found
        or killed keeps them open that long).
        """
        assert self.process.stdout is not None and self.process.stderr is not None
        with (
            selectors.DefaultSelector() as selector,
            _exit_notice(self.process.pid) as exit_fd,
        ):
            selector.register(self.process.stdout, selectors.EVENT_READ, self.stdout)
            selector.register(self.process.stderr, selectors.EVENT_READ, self.stderr)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ, _EXITED)
            ended = self._read(selector, deadline, limit)
            if ended == "exited":
                return self._drain(selector, deadline, limit)
        if ended != "closed":
            return ended
        # Both outputs closed; it may still run (it closed them itself).
        try:
            wait_s = None if deadline is None else max(0, deadline - time.monotonic())
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            return "timeout"
        return "exited"

    def _read(
        self, selector: selectors.BaseSelector, deadline: float | None, limit: int
    ) -> str:
        """Read output until both pipes close ("closed"), it exits with a pipe
        still open ("exited"), "timeout" or "too_large"."""
        watching_exit = any(k.data is _EXITED for k in selector.get_map().values())
        while _outputs_open(selector):
            wait_s = None if deadline is None else deadline - time.monotonic()
            if wait_s is not None and wait_s <= 0:
                return "timeout"
            if not watching_exit:
                # No pidfd on this system: look at the command now and then.
                if self.process.poll() is not None:
                    return "exited"
                wait_s = _EXIT_CHECK_S if wait_s is None else min(wait_s, _EXIT_CHECK_S)
            exited = False
            for key, _events in selector.select(wait_s):
                if key.data is _EXITED:
                    selector.unregister(key.fileobj)
                    exited = True
                elif not (chunk := os.read(key.fd, _READ_BYTES)):
                    selector.unregister(key.fileobj)
                else:
                    key.data.append(chunk)
                    self.kept_bytes += len(chunk)
                    if self.kept_bytes > limit:
                        return "too_large"
            # Its pipes close before its exit is told: one still open is held
            # by what it left running.
            if exited and _outputs_open(selector):
                return "exited"
        return "closed"

    def _drain(
        self, selector: selectors.BaseSelector, deadline: float | None, limit: int
    ) -> str:
        """It exited and left processes holding its output: kill them, then
        keep what is left in the pipes."""
        self._kill_what_it_left()
        drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
        if deadline is not None:
            drain_until = min(drain_until, deadline)
        ended = self._read(selector, drain_until, limit)
        if ended == "timeout":
            log.warning(
                "command pid=%s exited but its output stayed open %gs after what "
                "it left running was killed (a process that left its tree and "
                "was not adopted, or not ours to kill); its line ends with the "
                "output read so far",
                self.process.pid,
                DRAIN_AFTER_EXIT_S,
            )
        return "too_large" if ended == "too_large" else "exited"

    def stop(self) -> list[int]:
        """Kill what is left of it, without reading on; return the pids that
        could not be killed."""
        # Not reaped yet, its pid and its group's id cannot have been reused.
        unreaped = [self.process.pid] if self.process.returncode is None else []
        left = _proctree.kill_trees(unreaped) + self._kill_what_it_left()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        # Not for ever: one we may not kill is left to run (its pid is named).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(_proctree.REAP_WAIT_S)
        adopted = self._adopted()
        unreaped = _proctree.reap(c for c in adopted if c not in left)
        self._stop_adopting()
        if unreaped:
            log.warning(
                "killed processes %s did not end within %gs",
                ", ".join(map(str, unreaped)),
                _proctree.REAP_WAIT_S,
            )
        return sorted(set(left))

    def _kill_what_it_left(self) -> list[int]:
        """Kill its process group and the orphans of its that we adopted;
        return the pids that could not be killed."""
        # Its group may hold processes whose parent died and that init took.
        with contextlib.suppress(OSError):  # none left, or not ours to signal
            os.killpg(self.process.pid, signal.SIGKILL)
        return _proctree.kill_trees(self._adopted())

    def _adopted(self) -> list[int]:
        """Our children that are neither the command nor older than it."""
        if not self.adopting:
            return []
        ours = _proctree.children_of(os.getpid())
        return [c for c in ours if c not in self.others and c != self.process.pid]

    def _stop_adopting(self) -> None:
        if self.adopting:
            _proctree.adopt_orphans(False)
            self.adopting = False


@contextlib.contextmanager
def _exit_notice(pid: int) -> Iterator[int | None]:
    """A descriptor that becomes readable when process `pid` exits (a
    pidfd), or None where this system has none."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield pidfd
    finally:
        os.close(pidfd)


def _outputs_open(selector: selectors.BaseSelector) -> bool:
    return any(key.data is not _EXITED for key in selector.get_map().values())


def _text_if_utf8(output: bytes) -> str | bytes:
    # Replacing undecodable bytes would lose binary output without a word;
    # bytes travel as they are, and text stays readable as text.
    try:
        return output.decode("utf-8")
    except UnicodeDecodeError:
        return output


def run_call(call: list[Any]) -> dict[str, Any]:
    """`run(argv, timeout_s, max_output_bytes)` for ``call = [argv, timeout_s]``
    or ``[argv, timeout_s, max_output_bytes]``.

    What the batches of `ventilator exec` call for each line, since a batch
    hands its function one argument per item.

    Raises:
        ValueError: `call` is not such a list; and as `run`.
    """
    if not isinstance(call, list) or len(call) not in (2, 3):
        raise ValueError(
            f"expected [argv, timeout_s, max_output_bytes], got {call!r:.80}"
        )
    argv, timeout_s, *limit = call
    if limit and not (isinstance(limit[0], int) and limit[0] > 0):
        raise ValueError(
            f"max_output_bytes must be a positive int, got {limit[0]!r:.40}"
        )
    return run(argv, timeout_s, *limit)

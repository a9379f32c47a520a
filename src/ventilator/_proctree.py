"""Stop a process together with every process it started.

A process group is not enough: a command may start processes with `setsid`,
which leave its group and its session. What still ties them to it is the
parent link, which Linux shows in /proc. So: stop each process of the tree
with SIGSTOP as it is found, so that none can start another meanwhile, then
kill them all. A process whose parent died is adopted by the nearest
"subreaper" ancestor (`adopt_orphans`), or else by init, where no walk from
here finds it. What finds it there is a mark in the environment it inherited
(`kill_marked`), the way build servers find what a build left running.

Linux only; elsewhere the walks find no process and only what the caller
kills itself (a process group, say) is stopped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Iterable

__all__ = [
    "adopt_orphans",
    "children_of",
    "children_of_thread",
    "kill_descendants",
    "kill_marked",
    "kill_trees",
    "prctl",
    "reap",
]

log = logging.getLogger(__name__)

# prctl(2): orphans of our descendants become our children, not init's.
_PR_SET_CHILD_SUBREAPER = 36
# Walks of a frozen tree: one more after the first catches a child whose
# fork was under way when its parent was stopped.
_MAX_WALKS = 5
# How long a killed process gets to become reapable (it may be in a system call
# that does not return at once, such as a write to a slow disk).
REAP_WAIT_S = 1.0
_REAP_POLL_S = 0.01


def adopt_orphans(adopt: bool) -> bool:
    """Make this process a child subreaper (or stop being one); say if it is.

    While it is one, a process one of our descendants started and then left
    (its parent exited) becomes our child instead of init's, so it can still
    be found and killed, and must be reaped by us (`reap`).
    """
    call = prctl()
    if call is None:
        return False
    return bool(call(_PR_SET_CHILD_SUBREAPER, int(adopt), 0, 0, 0) == 0) and adopt


@functools.cache
def prctl() -> Callable[..., int] | None:
    """libc's prctl(2), or None where there is none; looked up once, since
    finding libc may run a program."""
    library = ctypes.util.find_library("c")
    call = getattr(ctypes.CDLL(library), "prctl", None) if library else None
    return call


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (zombies included); [] if none or
    if this system cannot tell."""
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as listing:
                children.extend(int(child) for child in listing.read().split())
        except OSError:
            continue  # the thread ended meanwhile
    return children


def children_of_thread(native_id: int) -> list[int]:
    """The processes that a thread of this process started (its children are
    its own in Linux, not its process's); [] if none or if this system cannot
    tell."""
    try:
        with open(f"/proc/{os.getpid()}/task/{native_id}/children", "rb") as listing:
            return [int(child) for child in listing.read().split()]
    except OSError:
        return []


def kill_marked(name: str, values: Collection[str]) -> list[int]:
    """Kill every process whose environment sets `name` to one of `values`,
    and every descendant of theirs; return the marked ones found (any that
    could not be killed is logged).

    The mark is inherited, so this finds what a dead process started even
    where its parent link is gone: adopted by init, in a session of its own.
    A process that cleared its environment is found only as a descendant of
    a marked one.
    """
    marks = {f"{name}={value}".encode() for value in values}
    frozen: list[int] = []
    seen: set[int] = set()
    # Again after the first: a marked process may have forked meanwhile.
    for _ in range(_MAX_WALKS):
        found = [pid for pid in _marked(marks, seen) if _stop_if_marked(pid, marks)]
        if not found:
            break
        frozen.extend(found)
    if frozen:
        kill_trees(frozen)
    return frozen


def _marked(marks: set[bytes], seen: set[int]) -> list[int]:
    """Processes not seen yet whose environment holds one of `marks`."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []  # no /proc here
    found = [pid for pid in pids if pid not in seen and _has_mark(pid, marks)]
    seen.update(found)
    return found


def _has_mark(pid: int, marks: set[bytes]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return not marks.isdisjoint(environ.read().split(b"\0"))
    except OSError:
        return False  # gone, or another user's


def _stop_if_marked(pid: int, marks: set[bytes]) -> bool:
    """Stop the process if it still is a marked one: its pid may have gone to
    another since the scan. A pidfd holds the process the check reads."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        return _has_mark(pid, marks) and _signal(pid, signal.SIGSTOP)
    try:
        if not _has_mark(pid, marks):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # killing it will be refused, and named
    finally:
        os.close(pidfd)


def kill_descendants(pid: int) -> list[int]:
    """Kill every descendant of `pid`, which is held still meanwhile (SIGSTOP)
    and then let go (SIGCONT). Return the descendants that could not be
    killed (another user's, such as a setuid program's)."""
    if not _signal(pid, signal.SIGSTOP):
        return []
    try:
        return _kill_frozen(_freeze_descendants([pid]))
    finally:
        _signal(pid, signal.SIGCONT)


def kill_trees(roots: Iterable[int]) -> list[int]:
    """Kill each process of `roots` and every descendant of theirs; return
    the ones that could not be killed."""
    roots = [pid for pid in roots if _signal(pid, signal.SIGSTOP)]
    return _kill_frozen(roots + _freeze_descendants(roots))


def reap(pids: Iterable[int]) -> list[int]:
    """Wait for these killed children of ours; return those still not gone
    after REAP_WAIT_S."""
    waiting = set(pids)
    give_up_at = time.monotonic() + REAP_WAIT_S
    while waiting:
        for pid in list(waiting):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not ours, or reaped already
            if done:
                waiting.discard(pid)
        if not waiting or time.monotonic() >= give_up_at:
            break
        time.sleep(_REAP_POLL_S)  # cleanup after a kill, not the task's path
    return sorted(waiting)


def _freeze_descendants(roots: list[int]) -> list[int]:
    """Stop every descendant of the (stopped) `roots`; return them."""
    frozen: list[int] = []
    seen = set(roots)
    for _ in range(_MAX_WALKS):
        found = _walk(roots + frozen, seen)
        if not found:
            break
        frozen.extend(found)
    return frozen


def _walk(parents: list[int], seen: set[int]) -> list[int]:
    """Stop the children of `parents` not seen yet, and theirs; return them."""
    found: list[int] = []
    pending = list(parents)
    while pending:
        for child in children_of(pending.pop()):
            if child in seen:
                continue
            seen.add(child)
            # One we may not stop is still walked: its children may be ours.
            _signal(child, signal.SIGSTOP)
            found.append(child)
            pending.append(child)
    return found


def _kill_frozen(pids: list[int]) -> list[int]:
    refused = [pid for pid in pids if not _signal(pid, signal.SIGKILL)]
    if refused:
        log.warning(
            "could not kill processes %s a task started (not ours to signal)",
            ", ".join(map(str, refused)),
        )
    return refused


def _signal(pid: int, signum: signal.Signals) -> bool:
    """Send `signum`; False if the process may not be signalled by us. A
    process already gone counts as signalled."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return True

"""Embedded processes end with the program that started them.

`local()` starts a broker and a worker as processes of their own and stops
them on exit. If that program is killed outright (SIGKILL, the OOM killer),
nothing stops them: they would run on, adopted by init, holding ports and CPU.
So `local()` names itself in their environment (``VENTILATOR_STOP_WITH``, as
``PID:SIGNAL``), and a thread here sends this process that signal, the one
`local()` would have sent, once the parent is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
import time

__all__ = ["ENV", "end_with_parent", "watch_parent"]

log = logging.getLogger(__name__)

ENV = "VENTILATOR_STOP_WITH"
# How often to look. A watchdog, not a hot path: its cost is one getppid().
CHECK_S = 0.5
# prctl(2): ask the kernel for a signal when the parent dies (Linux only).
_PR_SET_PDEATHSIG = 1


def watch_parent() -> None:
    """If started by `local()`, stop when the parent process is gone."""
    value = os.environ.pop(ENV, "")
    if not value:
        return
    parent, _, signal_name = value.partition(":")
    stop_signal = signal.Signals[f"SIG{signal_name}"]
    threading.Thread(
        target=_watch,
        args=(int(parent), stop_signal),
        name="ventilator-lifeline",
        daemon=True,
    ).start()


def _watch(parent: int, stop_signal: signal.Signals) -> None:
    while os.getppid() == parent:
        time.sleep(CHECK_S)
    log.warning(
        "the process that started this one (pid %d) is gone; stopping with %s",
        parent,
        stop_signal.name,
    )
    os.kill(os.getpid(), stop_signal)


def end_with_parent(parent: int) -> None:
    """Die (SIGKILL) as soon as process `parent`, which started us, is gone.

    For task processes: whatever their task is doing, even stuck in C code.
    On Linux the kernel does it (PR_SET_PDEATHSIG); elsewhere a thread looks
    every CHECK_S, which a task holding the GIL for good would defeat.
    """
    if not _ask_kernel_for_death_signal():
        threading.Thread(
            target=_watch,
            args=(parent, signal.SIGKILL),
            name="ventilator-lifeline",
            daemon=True,
        ).start()
    if os.getppid() != parent:  # gone before the kernel was asked
        os.kill(os.getpid(), signal.SIGKILL)


def _ask_kernel_for_death_signal() -> bool:
    library = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(library), "prctl", None) if library else None
    if prctl is None:
        return False
    return bool(prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0)

"""Embedded processes end with the program that started them.

`local()` starts a broker and a worker as processes of their own and stops
them on exit. If that program is killed outright (SIGKILL, the OOM killer),
nothing stops them: they would run on, adopted by init, holding ports and CPU.
So `local()` names itself in their environment (``VENTILATOR_STOP_WITH``, as
``PID:SIGNAL``), and a thread here sends this process that signal, the one
`local()` would have sent, once the parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

__all__ = ["ENV", "watch_parent"]

log = logging.getLogger(__name__)

ENV = "VENTILATOR_STOP_WITH"
# How often to look. A watchdog, not a hot path: its cost is one getppid().
CHECK_S = 0.5


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
        "the program that started this embedded process (pid %d) is gone; "
        "stopping with %s",
        parent,
        stop_signal.name,
    )
    os.kill(os.getpid(), stop_signal)

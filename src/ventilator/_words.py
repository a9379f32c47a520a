"""Counts in correct English, for every line a person reads: one helper, so
that no module says "1 tasks" or "once in a row" of its own; and how a
process ended, in words."""

from __future__ import annotations

import signal


def counted(
    count: int, noun: str, plural: str | None = None, *, bare_one: bool = False
) -> str:
    """`count` `noun`s: "1 task", "3 tasks", "0 tasks"; `plural` for nouns
    that do not take an s. With `bare_one`, one is the noun alone, for lines
    such as "its last handshake" beside "its last 3 handshakes"."""
    if count == 1:
        return noun if bare_one else f"1 {noun}"
    return f"{count} {plural or noun + 's'}"


def times(count: int) -> str:
    """How often: "once", "2 times"."""
    return "once" if count == 1 else f"{count} times"


def how_it_ended(returncode: int) -> str:
    """A process's end as a person reads it: "exit code 2", "killed by SIGKILL"
    (a negative return code is the signal, as `subprocess` gives it)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"

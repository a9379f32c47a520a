"""Counts in correct English, for every line a person reads: one helper, so
that no module says "1 tasks" or "once in a row" of its own."""

from __future__ import annotations


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

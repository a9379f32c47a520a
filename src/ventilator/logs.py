"""Log output for the command line: readable text, or one JSON object per line.

Library modules only ever call `logging.getLogger(__name__)` (the client's
private modules log as `ventilator.client`, the component operators know);
handlers are configured here, and only the CLI calls `configure`. `RateLimit`
keeps a peer's flood of garbage from becoming a flood of log lines;
`Dwindling` keeps a state that lasts (no broker answers) from being logged
every few seconds for hours, and `Routine` an event that recurs for ever (a
load balancer's health check). A record logged with `RAISED_TOO` set in its
`extra` says what its caller is also told by an exception: the CLI, which
prints such exceptions as its error line, leaves it out.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Generic, TypeVar

from ._words import counted

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "RAISED_TOO",
    "REMOTE_TRACEBACK",
    "Dwindling",
    "JsonFormatter",
    "RateLimit",
    "Routine",
    "Routines",
    "configure",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The `extra` key of a record whose news an exception also carries to the caller.
RAISED_TOO = "ventilator_raised_too"
# The `extra` key of a traceback from another process (a task process that
# cannot import its modules), which ends the record's message: in JSON it goes
# under "exception", as the record's own would, and leaves the message.
REMOTE_TRACEBACK = "ventilator_remote_traceback"

K = TypeVar("K")


# A `key=value` pair of a message, as our lines put them after the sentence:
# a lower-case name that starts a word, and a value up to the next space.
_FIELD = re.compile(r"(?<!\S)([a-z][a-z0-9_]*)=(\S+)")
_INTEGER = re.compile(r"-?[0-9]+")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, for log shippers.

    Fields: time (ISO 8601, UTC), level, logger, message, process, thread,
    fields (the message's `key=value` pairs, so that a shipper can filter on a
    ticket or a worker) when it has any, and exception (the formatted
    traceback) when there is one.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _own_message(record),
            "process": record.process,
            "thread": record.threadName,
        }
        fields = _fields(str(entry["message"]))
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif remote := _remote_traceback(record):
            entry["exception"] = remote
        # default=str: a stray object in a log argument must not lose the line.
        return json.dumps(entry, default=str)


def _fields(message: str) -> dict[str, object]:
    """The `key=value` pairs of `message`, the first of each key; integers
    as numbers, the rest as text, without the punctuation that ends a clause."""
    fields: dict[str, object] = {}
    for key, raw in _FIELD.findall(message):
        value = raw.rstrip(";,:")
        fields.setdefault(key, int(value) if _INTEGER.fullmatch(value) else value)
    return fields


def _remote_traceback(record: logging.LogRecord) -> str:
    return str(getattr(record, REMOTE_TRACEBACK, "") or "").rstrip()


def _own_message(record: logging.LogRecord) -> str:
    """The message without the traceback of another process that ends it
    (see REMOTE_TRACEBACK): in text, read under the line; in JSON, a field."""
    message = record.getMessage()
    remote = _remote_traceback(record)
    if remote and message.rstrip().endswith(f"\n{remote}"):
        return message.rstrip()[: -len(remote) - 1]
    return message


def configure(level: str, log_format: str) -> None:
    """Send every log record at `level` or above to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # A command line user reads the error once, on the command's own line.
    handler.addFilter(lambda record: not getattr(record, RAISED_TOO, False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimit:
    """At most one log line per interval; the next one says how many were held
    back, or `held_back` once the interval is over. A flood of garbage must
    not become a flood of log."""

    def __init__(self, per_s: float, what: str, plural: str | None = None) -> None:
        self._interval_s = 1.0 / per_s
        self._next_at = 0.0
        self._suppressed = 0
        # Of one line held back, "refused message", and of more ("refused
        # messages", unless `plural` says otherwise: "clients joined").
        self._what, self._plural = what, plural or f"{what}s"

    def allows(self, now: float) -> bool:
        if now >= self._next_at:
            self._next_at = now + self._interval_s
            return True
        self._suppressed += 1
        return False

    def suppressed_note(self) -> str:
        note = f"; {self._suppressed} more not logged" if self._suppressed else ""
        self._suppressed = 0
        return note

    def held_back(self, now: float) -> str | None:
        """Once the interval of the last line is over, the count of those held
        back since, in words for a line of its own (the owner logs it on a
        tick): the tail of a burst must not wait for the next burst to be
        counted, on another peer's line. None when there is nothing to say."""
        if not self._suppressed or now < self._next_at:
            return None
        count, self._suppressed = self._suppressed, 0
        held = counted(count, f"more {self._what}", f"more {self._plural}")
        return f"{held} not logged in the last seconds"


class Dwindling:
    """When to say again that a state lasts (no broker answers): at once, then
    after `first_interval_s`, then after twice as long each time, at most every
    `max_interval_s`. A broker down overnight is logged a few hundred times,
    not every few seconds; a new outage starts the count again."""

    def __init__(self, first_interval_s: float, max_interval_s: float = 300.0) -> None:
        self._first_s = first_interval_s
        self._max_s = max(first_interval_s, max_interval_s)
        self._began_at: float | None = None
        self._interval_s = 0.0
        self._next_at = 0.0

    def due(self, now: float, began_at: float) -> bool:
        """Whether to say it now, of a state that began at `began_at`."""
        if began_at != self._began_at:
            self._began_at, self._interval_s, self._next_at = began_at, 0.0, now
        if now < self._next_at:
            return False
        self._interval_s = min(self._max_s, max(self._first_s, 2 * self._interval_s))
        self._next_at = now + self._interval_s
        return True

    def would_say(self, now: float, began_at: float) -> bool:
        """What `due` would answer, without counting it as asked."""
        return began_at != self._began_at or now >= self._next_at

    def said_of(self, began_at: float) -> bool:
        """Whether it was said of the state that began at `began_at`: then
        that state's end is worth a line too, for whoever read the first."""
        return began_at == self._began_at and self._interval_s > 0


class Routine:
    """An event worth a line (at `level`) when it starts to happen, not each
    time it recurs: a load balancer's port check every few seconds, a flood of
    questions, a removed key's connections. It is said at once, then less and
    less often (see `Dwindling`), each line counting those since the last;
    between them at DEBUG. After `max_interval_s` without one, the next is
    said at once again."""

    def __init__(
        self,
        log_name: str,
        first_interval_s: float,
        max_interval_s: float = 3600.0,
        level: int = logging.INFO,
    ) -> None:
        self._log = logging.getLogger(log_name)
        self._level = level
        self._when = Dwindling(first_interval_s, max_interval_s)
        self._quiet_s = max_interval_s
        self._began_at = self._last_at = -float("inf")
        self._unsaid = 0
        # The latest occurrence held back, with its count: what `flush` says.
        self._latest: tuple[str, tuple[object, ...], int] | None = None

    def log(self, now: float, count: int, message: str, *args: object) -> None:
        """Log `message % args`, about `count` occurrences seen at `now`."""
        note = self.note(now, count)
        if note is None:
            self._latest = (message, args, count)
            self._log.debug(message, *args)
        else:
            self._latest = None
            self._log.log(self._level, message + "%s", *args, note)

    def flush(self, now: float) -> None:
        """Say the latest occurrence held back once its line is due, with
        the count of the others: the owner calls this now and then (on a
        tick), or the tail of a burst waits for the next burst, for ever if
        none comes (tester 36: two timeouts said only at a fourth)."""
        if self._latest is None or not self._when.would_say(now, self._began_at):
            return
        message, args, count = self._latest
        self._latest = None
        self._unsaid -= count  # the line itself
        note = self.note(now, 0)
        if note is not None:
            self._log.log(self._level, message + "%s", *args, note)

    def due(self, now: float) -> bool:
        """Whether an occurrence at `now` would be said, without counting it:
        for an owner whose own limit may still hold the line back."""
        began_at = now if now - self._last_at > self._quiet_s else self._began_at
        return self._when.would_say(now, began_at)

    def note(self, now: float, count: int) -> str | None:
        """For an owner that logs the line itself: `count` occurrences seen
        at `now`; None if this one is not due to be said, else what to add to
        its line (the count of those unsaid since the last, or nothing)."""
        if now - self._last_at > self._quiet_s:
            self._began_at = now
        self._last_at = now

        if not self._when.due(now, self._began_at):
            self._unsaid += count
            return None

        note = (
            f" ({self._unsaid} more like it since the last line)"
            if self._unsaid
            else ""
        )
        self._unsaid = 0
        return note


class Routines(Generic[K]):
    """A `Routine` per key (a socket and event, a refused key), made when the
    key first occurs. At most `remembered` are kept, the oldest made dropped
    first: keys a peer chooses must not grow the broker without bound, and a
    key forgotten is only said at once again."""

    def __init__(
        self,
        log_name: str,
        first_interval_s: float,
        level: int = logging.INFO,
        remembered: int = 1024,
    ) -> None:
        self._log_name = log_name
        self._first_interval_s = first_interval_s
        self._level = level
        self._remembered = remembered
        self._by_key: dict[K, Routine] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def flush(self, now: float) -> None:
        """`Routine.flush` for each key."""
        for routine in self._by_key.values():
            routine.flush(now)

    def of(self, key: K) -> Routine:
        routine = self._by_key.get(key)
        if routine is None:
            if len(self._by_key) >= self._remembered:
                del self._by_key[next(iter(self._by_key))]
            routine = Routine(self._log_name, self._first_interval_s, level=self._level)
            self._by_key[key] = routine
        return routine

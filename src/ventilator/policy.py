"""Policies as small immutable values: limits, the backoff between retries, MDP's
heartbeats; and the defaults the command line shows, here rather than with the
parts that use them, so that a command loads only the parts it runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ._questions import QUESTIONS_PER_S
from .errors import UsageError

# Room the broker's journal's disk keeps for what is already accepted (its
# results, retries, the SQLite log): new tasks are refused below it.
DEFAULT_JOURNAL_MIN_FREE_BYTES = 64 * 1024 * 1024
# Where clients and sinks find a broker by default (its frontend).
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
# What a journal survives: a process kill, a power loss (fsync), or nothing.
DURABILITY_MODES = ("process", "power", "memory")

__all__ = [
    "MAX_INTERVAL_S",
    "MIN_HEARTBEAT_INTERVAL_S",
    "Backoff",
    "Limits",
    "Prefetch",
    "check_at_least",
    "check_heartbeat",
    "check_seconds",
]

# Below this a heartbeat is a busy loop, not a sign of life: 0 made the client
# spin and the broker lose every worker as poison.
MIN_HEARTBEAT_INTERVAL_S = 0.01
# Beyond a day a peer is never noticed gone, and a poll timeout in ms overflows.
MAX_INTERVAL_S = 24 * 3600.0


def check_at_least(name: str, value: float, least: float) -> None:
    """Refuse a count or size below `least`, naming the setting.

    Raises:
        UsageError: `value` is below `least`, or not a finite number.
    """
    if not math.isfinite(value) or value < least:
        raise UsageError(f"{name} must be a number >= {least:g}, got {value!r}")


def check_seconds(name: str, value: float, least: float, most: float) -> None:
    """Refuse a duration outside [least, most] seconds, naming the setting.

    Raises:
        UsageError: `value` is outside the range, or not a finite number.
    """
    if not (math.isfinite(value) and least <= value <= most):
        raise UsageError(
            f"{name} must be between {least:g} and {most:g} seconds, got {value!r}"
        )


def check_heartbeat(interval_s: float, liveness: int) -> None:
    """Refuse a heartbeat interval or liveness that no peer can keep to.

    Raises:
        UsageError: naming the setting and the range it must be in.
    """
    check_seconds(
        "heartbeat_interval_s", interval_s, MIN_HEARTBEAT_INTERVAL_S, MAX_INTERVAL_S
    )
    check_at_least("liveness", liveness, 1)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter, for retrying tasks that raised.

    The delay before retry number ``n`` (counting from 1) is drawn uniformly from
    ``[(1 - jitter) * d, d]`` where ``d = min(cap_s, base_s * 2 ** (n - 1))``:
    jitter spreads retries of many tasks that failed together.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        check_at_least("Backoff.base_s", self.base_s, 0)
        check_at_least("Backoff.cap_s", self.cap_s, 0)
        if not 0 <= self.jitter <= 1:
            raise UsageError(f"Backoff.jitter must be in [0, 1], got {self.jitter!r}")

    def delay_s(self, attempt: int, unit_random: float) -> float:
        """The delay before the next try, given a number drawn from [0, 1)."""
        # Cap the exponent before using it: 2 ** 2000 is an OverflowError in float.
        doublings = min(max(0, attempt - 1), 64)
        ceiling = min(self.cap_s, math.ldexp(self.base_s, doublings))
        return ceiling * (1 - self.jitter * unit_random)


@dataclass(frozen=True, slots=True)
class Prefetch:
    """How many tasks a worker holds per slot: a fixed number, or adapted.

    Holding more than the running task hides the round trip to the broker, which
    matters only when tasks are short: adapted, a slot holds about `buffer_s`
    of work beyond its running task (up to `most` tasks), and just the running
    one when tasks take `long_task_s` or more, so long tasks are never hoarded
    while another worker sits idle.
    """

    fixed: int | None = None
    buffer_s: float = 0.02
    most: int = 256
    long_task_s: float = 0.5

    def __post_init__(self) -> None:
        if self.fixed is not None:
            check_at_least("prefetch", self.fixed, 1)
        check_at_least("Prefetch.buffer_s", self.buffer_s, 0)
        check_at_least("Prefetch.most", self.most, 1)
        check_at_least("Prefetch.long_task_s", self.long_task_s, 0)

    def per_slot(self, mean_task_s: float | None) -> int:
        """Tasks to hold per slot, given the mean task duration seen so far."""
        if self.fixed is not None:
            return self.fixed
        if mean_task_s is None or mean_task_s >= self.long_task_s:
            return 1
        extra = math.ceil(self.buffer_s / max(mean_task_s, 1e-6))
        return min(self.most, 1 + extra)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the broker allows and how long it waits; one immutable value.

    The defaults suit one machine and tens of clients; every one has a
    ``VENTILATOR_*`` variable and a broker flag.
    """

    # Frames larger than this are refused; the sockets drop anything much larger.
    max_payload_bytes: int = 64 * 1024 * 1024
    # Tasks and bytes the broker keeps in total (queued, running, results held).
    max_queued_tasks: int = 2_000_000
    max_queued_bytes: int = 4 * 1024 * 1024 * 1024
    # Tasks one client may have in the broker at once; clients keep to it.
    client_window: int = 100_000
    # Payload and result bytes one client may have in the broker at once.
    client_max_bytes: int = 1024 * 1024 * 1024
    # Results sent to one recipient and not yet acknowledged, and their bytes
    # (one result goes whatever its size): a slow recipient of large results
    # must not have gigabytes queued towards it in the sockets.
    delivery_window: int = 20_000
    delivery_window_bytes: int = 64 * 1024 * 1024
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    # A task whose worker died under it this many times fails as poison.
    max_attempts: int = 3
    result_ttl_s: float = 24 * 3600.0
    # How long a client session must have had no client connected before a
    # full broker may drop its results to make room (each becomes a tombstone,
    # as at `result_ttl_s`). 200 times the 3 s after which a silent client is
    # given up: a client that restarts, or reconnects after a network cut,
    # is back well within it; a crashed one no longer locks the others out
    # for a day, only for this long.
    orphan_grace_s: float = 600.0
    # Connections to the broker, both sockets together, counted from the moment
    # they are accepted (a peer that never says HELLO counts too).
    max_peers: int = 10_000
    # Sessions and sinks the broker remembers at once; past it a HELLO naming
    # a new one is refused. Each costs memory, and a client could otherwise
    # say HELLO under new names for ever (a task each, beyond its window).
    max_sessions: int = 50_000
    # How long after it was last heard a session that left, owing and holding
    # nothing, is still remembered (and shown by status) before it is forgotten.
    session_grace_s: float = 60.0
    retry_backoff: Backoff = field(default_factory=Backoff)
    # Failed tasks remembered for `ventilator failed` and `retry`, newest kept.
    failed_kept: int = 1000
    # Questions (status, operator commands) one connection may ask in a second;
    # past it each is refused at once, naming the limit (see _questions).
    max_questions_per_s: int = QUESTIONS_PER_S

    def __post_init__(self) -> None:
        for setting in fields(self):
            least = _LIMITS_AT_LEAST.get(setting.name)
            if least is not None:
                check_at_least(setting.name, getattr(self, setting.name), least)
        check_heartbeat(self.heartbeat_interval_s, self.liveness)


# The least each count and size of `Limits` may be; 0 would refuse everything
# or, for a window, hang every client that waits for room.
_LIMITS_AT_LEAST: dict[str, float] = {
    "max_payload_bytes": 1,
    "max_queued_tasks": 1,
    "max_queued_bytes": 1,
    "client_window": 1,
    "client_max_bytes": 1,
    "delivery_window": 1,
    "delivery_window_bytes": 1,
    "max_attempts": 1,
    "result_ttl_s": 0,
    "orphan_grace_s": 0,
    "max_peers": 1,
    "max_sessions": 1,
    "session_grace_s": 0,
    "failed_kept": 0,
    "max_questions_per_s": 1,
}


@dataclass(frozen=True, slots=True)
class MdpSettings:
    """Heartbeats for MDP peers; the defaults are what zguide's peers use."""

    heartbeat_interval_s: float = 2.5
    liveness: int = 3
    # Requests for a service no worker offers: how long one may wait for a
    # worker, and how many may wait per service and in all. zguide's clients
    # give up after 2.5 s (three times for mdcliapi); 30 s outlasts a
    # worker's restart, and 1,000 or 10,000 small bodies are a few MB at most.
    unserved_expiry_s: float = 30.0
    unserved_per_service: int = 1_000
    unserved_total: int = 10_000

    @property
    def max_silence_s(self) -> float:
        return self.heartbeat_interval_s * self.liveness

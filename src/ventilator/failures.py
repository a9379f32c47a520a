"""The operator's record of failed tasks, and the count of how tasks ended.

Every task that finishes is counted by its status, since the broker started,
for `totals` and the metrics. One that failed (see `status.FAILURE_STATUSES`)
is also remembered as a `FailedTask`, with its arguments when they are small,
so that an operator can read why (`ventilator failed`) and run it again
(`ventilator retry`). The list is bounded (`failed_kept`): the oldest record
makes room for the newest, and the log says so once per run of them, not once
per record, so that a storm of failures is one line.

A map's batch handed back to its map is not a failure (see
`split_for_its_map`): its items run again as tasks of their own. It is counted
apart, as `split`.

`Failures` keeps the list and the counts; the scheduler tells it how each task
ended (`count_ending`), and which records a retry took (`forget`) or the
journal brought back (`restore`). What changes goes into the turn's `Effects`,
so that the journal keeps the same list. It answers what an operator, or a
client within its `Scope`, asks of the list (`listed`, `chosen`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import protocol as p
from .mdp import service_queue
from .notices import FailureForgotten, Notice, TaskFailed
from .serialization import unpack_value
from .status import FAILURE_STATUSES, latest_failures

if TYPE_CHECKING:
    from .effects import Effects
    from .scope import Scope
    from .tasks import Task

__all__ = [
    "RETRY_PAYLOAD_BYTES",
    "FailedTask",
    "Failures",
    "error_fields",
    "split_for_its_map",
]

# Arguments of a failed task are kept for a retry up to this size; larger ones
# would make the bounded record of failures unbounded in bytes.
RETRY_PAYLOAD_BYTES = p.ZERO_COPY_BYTES
_SHARED = int(p.Flags.SHARED)
# The flags as plain ints: `int & IntFlag` costs about 2 us in CPython.
_RAW = int(p.Flags.RAW)
_BATCH = int(p.Flags.BATCH)
_SPLITTABLE = int(p.Flags.SPLITTABLE)
# Looked up once: attribute access on an Enum class is slow per task.
_OK = p.Status.OK
_POISON = p.Status.POISON
# Failures the broker's log names: those of the broker's or a worker's doing.
# One its function raised is the function's business, said to its client.
_SAID_TO_THE_OPERATOR = frozenset({p.Status.POISON, p.Status.TIMEOUT})


@dataclass(frozen=True, slots=True)
class FailedTask:
    """What the broker remembers of a failed task, for the operator."""

    ticket: int
    session: str
    task_id: int
    function: str
    status: p.Status
    error: p.Payload  # the packed error report, decoded only when shown
    failed_at: float
    payload: bytes | None  # the arguments, or None when too large to keep
    flags: int
    timeout_s: float | None

    def report(self, now: float, traceback: bool = False) -> dict[str, object]:
        """Plain data for the operator: who, what, and why it failed."""
        error = error_fields(self.error)
        report: dict[str, object] = {
            "ticket": self.ticket,
            "session": self.session,
            "task_id": self.task_id,
            # The same id as text, as sink records give it: a browser reads a
            # 64-bit id as a rounded JavaScript number (the dashboard showed
            # distinct failed tasks under one id).
            "task_id_str": str(self.task_id),
            # An MDP service's queue, as status and the metrics name it.
            "function": service_queue(self.function)
            if self.flags & _RAW
            else self.function,
            "outcome": self.status.name.lower(),
            "type": error.get("type", ""),
            "message": error.get("message", ""),
            "retryable": self.payload is not None,
            "failed_s_ago": round(now - self.failed_at, 3),
        }
        if traceback:
            report["traceback"] = error.get("traceback", "")[-4000:]
        return report


class Failures:
    """How many tasks ended each way since start (`finished_by_status`,
    indexed by `p.Status`; `batches_split` apart), and the latest failed ones
    (`records`, oldest first, at most `kept`)."""

    __slots__ = ("batches_split", "finished_by_status", "records")

    def __init__(self, kept: int) -> None:
        self.records: deque[FailedTask] = deque(maxlen=kept)
        self.finished_by_status = [0] * (max(p.Status) + 1)
        self.batches_split = 0  # not among the failures: see split_for_its_map

    def count_ending(
        self,
        task: Task,
        status: p.Status,
        result: p.Payload,
        now: float,
        effects: Effects,
    ) -> None:
        """Count that `task` ended with `status` and `result` at `now`, and
        remember it if that is a failure. Asked once per finished task, on the
        broker's hot path: a success costs one check of its flags and a count."""
        if split_for_its_map(task.flags, status, result):
            self.batches_split += 1
            return
        if status in FAILURE_STATUSES:
            self._remember(task, status, result, now, effects)
        self.finished_by_status[status] += 1

    def restore(self, record: FailedTask, effects: Effects) -> None:
        """Take back a failure record from the journal after a restart, oldest
        first; `record.failed_at` must be on this process's clock. A batch
        handed back to its map, which older brokers remembered as a failure,
        is dropped from the journal instead."""
        if split_for_its_map(record.flags, record.status, record.error):
            effects.unfailed.append(record.ticket)
        else:
            self._keep(record, effects)

    def forget(self, record: FailedTask, effects: Effects) -> None:
        """Drop `record` (an operator retried it), from the journal too."""
        self.records.remove(record)
        effects.unfailed.append(record.ticket)

    def listed(self, limit: int, scope: Scope | None, now: float) -> dict[str, object]:
        """What `ventilator failed` shows: the latest `limit` records within
        `scope` (None: all), newest first and with their tracebacks, and how
        many are kept there in all."""
        records = latest_failures(self.records, limit, scope)
        kept = sum(1 for r in self.records if scope is None or scope.owns(r.session))
        return {
            "failed": [r.report(now, traceback=True) for r in records],
            "kept": kept,
        }

    def chosen(self, tickets: Set[int], scope: Scope | None) -> list[FailedTask]:
        """The records a retry names by ticket (all of them when `tickets` is
        empty) within `scope` (None: all), oldest first."""
        return [
            r
            for r in self.records
            if (not tickets or r.ticket in tickets)
            and (scope is None or scope.owns(r.session))
        ]

    def _remember(
        self,
        task: Task,
        status: p.Status,
        error: p.Payload,
        now: float,
        effects: Effects,
    ) -> None:
        """Keep a record of `task`, which failed; its arguments only if they
        are small enough to keep for a retry."""
        # A shared payload stands for one at least as large, in memory its
        # client frees.
        keepable = len(task.payload) <= RETRY_PAYLOAD_BYTES
        kept = task.payload if keepable and not task.flags & _SHARED else None
        record = FailedTask(
            task.ticket,
            task.session,
            task.task_id,
            task.function,
            status,
            bytes(error),
            now,
            bytes(kept) if kept is not None else None,
            task.flags,
            task.timeout_s,
        )
        if self._keep(record, effects):
            effects.failures.append(record)
        if status in _SAID_TO_THE_OPERATOR:
            effects.notices.append(_failed_notice(task, status, error))

    def _keep(self, record: FailedTask, effects: Effects) -> bool:
        """Add `record` to the bounded list, the oldest making room; return
        whether it was kept (not when the bound is 0)."""
        kept = self.records.maxlen or 0
        if not kept:
            return False
        if len(self.records) >= kept:
            oldest = self.records.popleft()
            effects.unfailed.append(oldest.ticket)
            _note_forgotten(effects.notices, kept)
        self.records.append(record)
        return True


def _failed_notice(task: Task, status: p.Status, error: p.Payload) -> TaskFailed:
    fields = error_fields(error)
    return TaskFailed(
        task.ticket,
        task.function,
        task.session,
        task.task_id,
        status.name.lower(),
        fields.get("message", ""),
        # Gone by now from a task that ended on its worker; a lost worker's
        # tasks still name it.
        task.worker or task.given_back_by,
    )


def _note_forgotten(notices: list[Notice], kept: int) -> None:
    # One notice per run of them: a storm of failures is one log line.
    last = notices[-1] if notices else None
    if isinstance(last, FailureForgotten):
        notices[-1] = FailureForgotten(last.count + 1, kept)
    else:
        notices.append(FailureForgotten(1, kept))


def error_fields(packed: p.Payload) -> dict[str, str]:
    """The fields of a packed error report (type, message, traceback), as
    strings; a stand-in for one that does not decode: it is a peer's word."""
    try:
        fields = unpack_value(packed)
    except Exception:  # msgpack raises a family of unrelated types
        return {"type": "?", "message": "undecodable error report"}
    if not isinstance(fields, dict):
        return {"type": "?", "message": f"unexpected error report {fields!r:.80}"}
    return {str(k): str(v) for k, v in fields.items()}


def split_for_its_map(flags: int, status: p.Status, report: p.Payload) -> bool:
    """Whether a task that ended with `status` (and the error `report`) is a
    map's batch handed back to its map, which runs its items one by one: one
    whose process died or whose worker was lost (see `_strike`), or one of
    several items its client marked `Flags.SPLITTABLE` that failed whole in
    one of the ways of `p.SPLIT_ENDINGS`.

    That is no failure of anything its user asked for: its items are tasks
    of their own, and one that times out or kills its worker fails as
    itself. So it is neither remembered for `failed` and `retry` nor counted
    as failed.
    """
    if not flags & _BATCH or status is _OK:
        return False
    if status is _POISON:
        return True
    return (
        bool(flags & _SPLITTABLE)
        and status in p.SPLIT_ENDINGS
        and error_fields(report).get("type") not in p.UNSPLIT_ERROR_TYPES
    )

"""What the broker did, counted cheaply and published as immutable snapshots.

The broker's loop is the only writer. Per loop turn it hands `Telemetry.record`
the turn's `Effects`; counting there is a dict increment and a bisect per task,
with no lock and no prometheus-client object on the way. A few times a second
`Telemetry.publish` freezes everything into a `Snapshot` (the scheduler's
status, totals, a minute-by-minute history, histogram buckets) and swaps it in
with one attribute assignment. Readers in other threads (the HTTP server, the
Prometheus collector) only ever see a whole snapshot, never the scheduler.

Tasks and items: `map` packs many items (calls of the function) into one
batch task (`Flags.BATCH`), which the scheduler sees as one task. Users count
items, so both are counted: a plain task is one item, a batch as many as it
carries (read from its payload's msgpack array header when accepted, and from
its result's per-item statuses when it ran). A batch that failed whole counts
all its items with its outcome, except one handed back to its map
(`split_for_its_map`): one whose process died or whose worker was lost, or one
of several items that timed out or whose result was over the limit, from a
client that said it splits it (`Flags.SPLITTABLE`). It and its items count as
`split`, not failed. Items the client then resubmits one by one are new
submissions, as are the items a batch left unrun at its time budget, which
count as `split` in their batch. So are items that raised in a batch whose
map has retries (`retries=`, which the batch carries and the broker never
uses on it): each counts as `retried` in its batch, and failed only if its
last run alone fails, once, as a plain task with retries counts its end
only. A pickled batch's arguments are opaque to the broker: its items are
counted as submitted when it finishes.

Prometheus metrics (collected from the latest snapshot, in a registry of our
own, not prometheus-client's global one)::

    ventilator_items_submitted_total{function}         calls of the function
    ventilator_items_completed_total{function}
    ventilator_items_failed_total{function,outcome}
    ventilator_items_cancelled_total{function}
    ventilator_tasks_submitted_total{function}         a batch counts once
    ventilator_tasks_completed_total{function}         succeeded
    ventilator_tasks_failed_total{function,outcome}    raised, timeout, poison, ...
    ventilator_tasks_cancelled_total{function}
    ventilator_tasks_split_total{function}             batches handed back to their map
    ventilator_items_split_total{function}             ... and the items they held
    ventilator_items_retried_total{function}           raised in a batch, rerun alone
    ventilator_task_duration_seconds{function}         histogram, as workers measure
    ventilator_task_queue_wait_seconds{function}       histogram, queued to started
    ventilator_queue_depth{function}                   waiting to run (retries too)
    ventilator_tasks_running{function}
    ventilator_oldest_running_task_seconds{worker}     workers holding a task only
    ventilator_workers_connected   ventilator_workers_not_serving
    ventilator_worker_slots   ventilator_worker_credit     serving, not draining
    ventilator_not_accepting                           1 while it refuses new tasks
    ventilator_clients_connected   ventilator_results_waiting
    ventilator_results_expired                         tombstones kept for their clients
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import protocol as p
from .effects import Effects
from .failures import split_for_its_map
from .scheduler import Scheduler
from .serialization import unpack_value
from .status import FAILURE_STATUSES
from .tasks import Task

__all__ = ["Snapshot", "Telemetry", "metrics_registry"]

# Upper bounds (seconds) of the duration and queue-wait histogram buckets: from
# a millisecond (tiny tasks) to five minutes (batch jobs).
BUCKETS_S: tuple[float, ...] = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
# Statuses whose run time a worker measured (a cancelled task never ran; a
# poisoned one died without reporting).
_RAN = frozenset({p.Status.OK, p.Status.RAISED, p.Status.TIMEOUT})
# Looked up once here: attribute access on an Enum class is slow per task.
_OK = p.Status.OK
_EXPIRED = p.Status.EXPIRED
# The outcome under which batches handed back to their map are counted.
_SPLIT = "split"
# ... and items that raised in a batch whose map runs them again alone.
_RETRIED = "retried"
_RAISED = p.Status.RAISED
_FAILURES = FAILURE_STATUSES
_BATCH = int(p.Flags.BATCH)
# Functions named in metric labels, at most. Each costs about 40 series (two
# histograms of 16 buckets, counters by outcome) for as long as the broker
# runs, and any client may name new ones (a typo, a generated name, an MDP
# service): 20,000 names made /metrics 61 MB, its rendering took the broker's
# CPU from its tasks, and a scrape outlasted Prometheus' timeout. Past this
# many, new names are counted together under OTHER_FUNCTIONS.
MAX_FUNCTION_LABELS = 256
OTHER_FUNCTIONS = "(other)"
_PICKLED = int(p.Flags.PICKLED)
# Failures are listed for /api/failed up to this many.
FAILED_SHOWN = 50


class Histogram:
    """Bucket counts and a sum, for one thread; frozen into a tuple to share."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last one is +Inf
        self.total_s = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect_left(BUCKETS_S, value_s)] += 1
        self.total_s += value_s

    def frozen(self) -> tuple[tuple[int, ...], float]:
        return tuple(self.counts), self.total_s


@dataclass(slots=True)
class _Interval:
    """What finished since the last history sample."""

    completed: int = 0  # items
    failed: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    duration_total_s: float = 0.0
    duration_count: int = 0
    duration_max_s: float = 0.0

    def sample(self, at: float, status: dict[str, Any]) -> dict[str, Any]:
        count = self.duration_count
        return {
            "time": round(at, 3),
            "completed": self.completed,
            "failed": self.failed,
            "tasks_completed": self.tasks_completed,
            "tasks_failed": self.tasks_failed,
            "duration_mean_s": self.duration_total_s / count if count else None,
            "duration_max_s": self.duration_max_s if count else None,
            "queued": sum(status["queued"].values()),
            "running": sum(status["running"].values()),
            "workers": len(status["workers"]),
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The broker as of one moment; shared between threads, never changed."""

    taken_at: float  # monotonic
    status: dict[str, Any]
    history: tuple[dict[str, Any], ...]
    failed: tuple[dict[str, Any], ...]
    submitted: dict[str, int]
    finished: dict[tuple[str, str], int]  # (function, outcome) -> count
    items_submitted: dict[str, int]
    items_finished: dict[tuple[str, str], int]
    duration: dict[str, tuple[tuple[int, ...], float]]
    queue_wait: dict[str, tuple[tuple[int, ...], float]]


@dataclass(slots=True)
class Telemetry:
    """Counts from the broker's loop; the latest snapshot for everyone else.

    `record` and `publish` belong to the broker's thread; `latest` may be read
    from any thread.
    """

    publish_every_s: float = 0.5
    sample_every_s: float = 1.0
    history_s: float = 600.0
    latest: Snapshot | None = None

    submitted: dict[str, int] = field(default_factory=dict)
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    items_submitted: dict[str, int] = field(default_factory=dict)
    items_finished: dict[tuple[str, str], int] = field(default_factory=dict)
    # Items of each batch accepted and not finished yet, by ticket: a batch that
    # fails whole has only an error report left to count from.
    _batch_items: dict[int, int] = field(default_factory=dict)
    # The functions named in labels so far (see MAX_FUNCTION_LABELS).
    _labelled: set[str] = field(default_factory=set)
    duration: dict[str, Histogram] = field(default_factory=dict)
    queue_wait: dict[str, Histogram] = field(default_factory=dict)
    _interval: _Interval = field(default_factory=_Interval)
    _history: deque[dict[str, Any]] = field(default_factory=deque)
    _publish_at: float = 0.0
    _sample_at: float = 0.0

    def _add_labelled(self, totals: dict[str, int], tally: dict[str, int]) -> None:
        """Add a turn's `tally` (by function) to `totals` (by label)."""
        for function, count in tally.items():
            label = self._label(function)
            totals[label] = totals.get(label, 0) + count

    def _label(self, function: str) -> str:
        """The `function` label to count `function` under: itself, or
        OTHER_FUNCTIONS once MAX_FUNCTION_LABELS others were named. Asked once
        per function of a turn's tally, not per task."""
        if function in self._labelled:
            return function
        if len(self._labelled) < MAX_FUNCTION_LABELS:
            self._labelled.add(function)
            return function
        return OTHER_FUNCTIONS

    def record(self, effects: Effects) -> None:
        """Count one loop turn's accepted and finished tasks."""
        if effects.accepted:
            self._count_accepted(effects)
        if effects.finished:
            self._count_finished(effects)

    def _count_accepted(self, effects: Effects) -> None:
        # Tally per function first: one dict update per function, not per task.
        tally: dict[str, int] = {}
        items: dict[str, int] = {}
        for task in effects.accepted:
            function = task.queue
            tally[function] = tally.get(function, 0) + 1
            if task.flags & _BATCH:
                count = self._accepted_batch(task)
                items[function] = items.get(function, 0) + count - 1
        self._add_labelled(self.submitted, tally)
        # A plain task is one item: only batches make the figures differ.
        self._add_labelled(self.items_submitted, tally)
        self._add_labelled(self.items_submitted, items)

    def _accepted_batch(self, task: Task) -> int:
        """The items of an accepted batch, 0 if they are counted when it ends."""
        if task.flags & _PICKLED:
            return 0
        count = _array_length(task.payload)
        self._batch_items[task.ticket] = count
        return count

    def _count_finished(self, effects: Effects) -> None:
        # The broker's hot path: histograms are updated inline, and looked up
        # once per function per turn, since a method call per task would cost
        # as much as the counting itself.
        tally: dict[tuple[str, p.Status], int] = {}
        histograms: dict[str, tuple[Histogram, Histogram]] = {}
        batches: list[tuple[Task, p.Status]] = []
        ran = self._interval
        for task in effects.finished:
            status = task.status
            if status is None or status is _EXPIRED:
                continue  # an expired result is a tombstone, not a second ending
            # Asked of failed batches only: a call per task would cost as
            # much as the counting.
            if (
                status is not _OK
                and task.flags & _BATCH
                and split_for_its_map(task.flags, status, task.result)
            ):
                self._count_split(task, status)
                continue
            function = task.queue
            key = (function, status)
            tally[key] = tally.get(key, 0) + 1
            if task.flags & _BATCH:
                batches.append((task, status))
            if not task.started_at and status not in _RAN:
                # Never started (cancelled, expired, refused): nothing for the
                # histograms, whose empty buckets cost a series each.
                continue
            pair = histograms.get(function)
            if pair is None:
                pair = histograms[function] = self._histograms(function)
            if task.started_at:
                wait_s = max(0.0, task.started_at - task.queued_at)
                pair[0].counts[bisect_left(BUCKETS_S, wait_s)] += 1
                pair[0].total_s += wait_s
            if status in _RAN:
                run_s = task.run_s
                pair[1].counts[bisect_left(BUCKETS_S, run_s)] += 1
                pair[1].total_s += run_s
                ran.duration_total_s += run_s
                ran.duration_count += 1
                if run_s > ran.duration_max_s:
                    ran.duration_max_s = run_s
        self._add_outcomes(tally)
        self._add_item_outcomes(tally, batches)

    def _count_split(self, task: Task, ending: p.Status) -> None:
        """Count a batch handed back to its map, and its items, as split."""
        key = (self._label(task.queue), _SPLIT)
        self.finished[key] = self.finished.get(key, 0) + 1
        items = self._finished_batch(task, ending)[ending]
        self.items_finished[key] = self.items_finished.get(key, 0) + items

    def _histograms(self, function: str) -> tuple[Histogram, Histogram]:
        """(queue wait, duration) histograms of `function`."""
        label = self._label(function)
        return (
            self._histogram(self.queue_wait, label),
            self._histogram(self.duration, label),
        )

    def _add_outcomes(self, tally: dict[tuple[str, p.Status], int]) -> None:
        interval = self._interval
        for (function, status), count in tally.items():
            key = (self._label(function), _outcome(status))
            self.finished[key] = self.finished.get(key, 0) + count
            if status is _OK:
                interval.tasks_completed += count
            elif status in _FAILURES:
                interval.tasks_failed += count

    def _add_item_outcomes(
        self,
        tally: dict[tuple[str, p.Status], int],
        batches: list[tuple[Task, p.Status]],
    ) -> None:
        """Count items: the tasks' tally, with each batch replaced by its items."""
        items = dict(tally)
        for task, ending in batches:
            function = task.queue
            items[(function, ending)] -= 1
            outcomes = self._finished_batch(task, ending)
            if ending is _OK and task.retries_left:
                self._count_retried(function, outcomes.pop(_RAISED, 0))
            for status, count in outcomes.items():
                items[(function, status)] = items.get((function, status), 0) + count
        interval = self._interval
        for (function, status), count in items.items():
            shown = (self._label(function), _outcome(status))
            self.items_finished[shown] = self.items_finished.get(shown, 0) + count
            if status is _OK:
                interval.completed += count
            elif status in _FAILURES:
                interval.failed += count

    def _count_retried(self, function: str, count: int) -> None:
        """Count items that raised in a batch with retries as retried: their
        map runs each again alone (one retry fewer), a task of its own that
        counts as submitted and ends as the item does. Counted failed here
        too, an item that raised twice with retries=1 counted failed twice,
        while a plain task's retries count nothing."""
        if count:
            key = (self._label(function), _RETRIED)
            self.items_finished[key] = self.items_finished.get(key, 0) + count

    def _count_unrun(self, function: str, count: int) -> None:
        """Count the items a batch stopped at its time budget did not run as
        split: its map sends them again, new submissions, or the items
        submitted would outnumber every ending."""
        if count > 0:
            key = (self._label(function), _SPLIT)
            self.items_finished[key] = self.items_finished.get(key, 0) + count

    def _finished_batch(self, task: Task, ending: p.Status) -> dict[p.Status, int]:
        """How many items of a finished batch ended how."""
        known = self._batch_items.pop(task.ticket, None)
        outcomes = _item_outcomes(task.result) if ending is _OK else None
        if outcomes is None:
            # It failed whole (or its result is not a batch's): every item
            # shares its ending. Unknown count: one restored or pickled batch.
            outcomes = {ending: known or 1}
        elif known is not None:
            self._count_unrun(task.queue, known - sum(outcomes.values()))
        if known is None and task.flags & _PICKLED:
            submitted = sum(outcomes.values())
            self._add_labelled(self.items_submitted, {task.queue: submitted})
        return outcomes

    @staticmethod
    def _histogram(histograms: dict[str, Histogram], function: str) -> Histogram:
        histogram = histograms.get(function)
        if histogram is None:
            histogram = histograms[function] = Histogram()
        return histogram

    def due_at(self) -> float:
        """When `publish` next has work to do (monotonic)."""
        return self._publish_at

    def publish(self, now: float, scheduler: Scheduler) -> None:
        """Freeze a new snapshot if one is due; cheap to call every turn."""
        if now < self._publish_at:
            return
        self._publish_at = now + self.publish_every_s
        # Every worker and function: a gauge per function or worker must not
        # come and go with what `status` lists to its clients.
        status = scheduler.status(now, full=True)
        status["items"] = self._item_totals()
        if now >= self._sample_at:
            self._take_sample(now, status)
        self.latest = Snapshot(
            taken_at=now,
            status=status,
            history=tuple(self._history),
            failed=tuple(
                record.report(now)
                for record in reversed(list(scheduler.failed)[-FAILED_SHOWN:])
            ),
            submitted=dict(self.submitted),
            finished=dict(self.finished),
            items_submitted=dict(self.items_submitted),
            items_finished=dict(self.items_finished),
            duration={f: h.frozen() for f, h in self.duration.items()},
            queue_wait={f: h.frozen() for f, h in self.queue_wait.items()},
        )

    def _item_totals(self) -> dict[str, int]:
        """Items since start, as `Scheduler.totals` counts tasks."""
        by_outcome: dict[str, int] = {}
        for (_, outcome), count in self.items_finished.items():
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
        return {
            "submitted": sum(self.items_submitted.values()),
            "completed": by_outcome.pop("ok", 0),
            "cancelled": by_outcome.pop("cancelled", 0),
            "split": by_outcome.pop(_SPLIT, 0),
            "retried": by_outcome.pop(_RETRIED, 0),
            "failed": sum(by_outcome.values()),
        }

    def _take_sample(self, now: float, status: dict[str, Any]) -> None:
        # Wall-clock time, for the charts' axis only; nothing expires by it.
        self._history.append(self._interval.sample(time.time(), status))
        self._interval = _Interval()
        self._sample_at = now + self.sample_every_s
        while len(self._history) > self.history_s / self.sample_every_s:
            self._history.popleft()


def _outcome(status: p.Status) -> str:
    return "ok" if status is p.Status.OK else status.name.lower()


def _array_length(payload: p.Payload) -> int:
    """The length of the msgpack array `payload` starts with, without decoding
    the rest (a batch's items); 1 when it is not an array."""
    head = bytes(payload[:5])
    if head[:1] and 0x90 <= head[0] <= 0x9F:
        return head[0] & 0x0F
    if head[:1] == b"\xdc" and len(head) >= 3:
        return int.from_bytes(head[1:3], "big")
    if head[:1] == b"\xdd" and len(head) >= 5:
        return int.from_bytes(head[1:5], "big")
    return 1


def _item_outcomes(result: p.Payload) -> dict[p.Status, int] | None:
    """How many items of a batch's result ``[elapsed_s, [[status, value], ...]]``
    ended how; None when the result does not have that shape."""
    try:
        outcomes = unpack_value(result)[1]
        # Plain ints while counting: an Enum lookup per item would cost more
        # than the decoding.
        codes: dict[int, int] = {}
        for entry in outcomes:
            code = entry[0]
            codes[code] = codes.get(code, 0) + 1
        return {p.Status(code): count for code, count in codes.items()}
    except Exception:  # msgpack, index, type and value errors alike: not a batch's
        return None


# --- Prometheus ----------------------------------------------------------------------


def metrics_registry(latest: Callable[[], Snapshot | None]) -> CollectorRegistry:
    """A registry whose metrics come from the latest snapshot `latest()` gives."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(latest))
    return registry


class _SnapshotCollector(Collector):
    def __init__(self, latest: Callable[[], Snapshot | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        yield from _counters(snapshot)
        yield _refused(snapshot.status)
        yield _not_accepting(snapshot.status)
        yield _histogram(
            "ventilator_task_duration_seconds",
            "How long tasks ran, as their workers measured.",
            snapshot.duration,
        )
        yield _histogram(
            "ventilator_task_queue_wait_seconds",
            "How long tasks waited in the broker's queue before a worker got them.",
            snapshot.queue_wait,
        )
        yield from _gauges(snapshot.status)


def _counters(snapshot: Snapshot) -> Iterator[Metric]:
    yield from _ending_counters(
        "items",
        "calls of the function (a batch of map counts each of its items)",
        snapshot.items_submitted,
        snapshot.items_finished,
    )
    yield from _ending_counters(
        "tasks",
        "tasks (a batch of map items counts once)",
        snapshot.submitted,
        snapshot.finished,
    )


def _refused(status: dict[str, Any]) -> Metric:
    """Tasks refused as they were submitted: never accepted, so in no other
    counter. One that rises is a broker past a limit, or whose journal's disk
    is nearly full, refusing work that its clients see fail."""
    refused = CounterMetricFamily(
        "ventilator_tasks_refused",
        "Refused as they were submitted, never accepted (over a limit, the "
        "journal's disk nearly full, a function the key may not submit): tasks.",
    )
    refused.add_metric([], status["totals"].get("rejected", 0))
    return refused


def _ending_counters(
    unit: str,
    what: str,
    submitted: dict[str, int],
    finished: dict[tuple[str, str], int],
) -> Iterator[Metric]:
    """Submitted, completed, failed, cancelled, split (and for items,
    retried) counters of one unit."""
    families = {
        "submitted": f"Accepted by the broker: {what}.",
        "completed": f"Returned a result: {what}.",
        "failed": (
            f"Failed, by outcome (raised, timeout, poison, not_found, rejected): "
            f"{what}."
        ),
        "cancelled": (
            f"Cancelled by a client or an operator, queued or running: {what}."
        ),
        "split": (
            "Handed back to their map, which ran the items one by one, as a "
            "process died or a worker was lost running them together, or they "
            "timed out or returned too much together; not "
            f"failed: {what}."
        ),
    }
    if unit == "items":  # a task is retried within the broker, uncounted
        families[_RETRIED] = (
            "Raised in their map's batch, whose map runs each again alone "
            "(retries=), as a task that is submitted again and ends as the item "
            f"does; not failed: {what}."
        )
    counters = {
        name: CounterMetricFamily(
            f"ventilator_{unit}_{name}",
            documentation,
            labels=["function", "outcome"] if name == "failed" else ["function"],
        )
        for name, documentation in families.items()
    }
    for function, count in sorted(submitted.items()):
        counters["submitted"].add_metric([function], count)
    for (function, outcome), count in sorted(finished.items()):
        if outcome == "ok":
            counters["completed"].add_metric([function], count)
        elif outcome in ("cancelled", _SPLIT, _RETRIED):
            counters[outcome].add_metric([function], count)
        else:
            counters["failed"].add_metric([function, outcome], count)
    yield from counters.values()


def _histogram(
    name: str, documentation: str, data: dict[str, tuple[tuple[int, ...], float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["function"])
    for function, (counts, total_s) in sorted(data.items()):
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        bounds = [repr(bound) for bound in BUCKETS_S] + ["+Inf"]
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([function], buckets, sum_value=total_s)
    return family


def _oldest_running(workers: list[dict[str, Any]]) -> Metric:
    """How long each worker has run its oldest task: the number to alert on
    for a hung task (it grows while the worker still heartbeats)."""
    oldest = GaugeMetricFamily(
        "ventilator_oldest_running_task_seconds",
        "Seconds since each worker was handed the oldest task it holds, which "
        "it runs; workers that hold none are left out.",
        labels=["worker"],
    )
    for worker in workers:
        # A broker that predates the field does not say.
        age_s = worker.get("oldest_running_s")
        if age_s is not None:
            oldest.add_metric([worker["id"]], age_s)
    return oldest


def _worker_gauges(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """How many workers there are, how many serve nothing, and what those
    that serve can take. A worker whose task processes cannot start stays
    registered without functions: counting its slots made a broker where no
    task could run look as able as a healthy one, so no alert could fire."""
    serving = [w for w in workers if w["services"]]
    # A draining worker finishes what it holds and takes nothing new: no
    # room for the queue either.
    taking = [w for w in serving if not w["draining"]]
    yield GaugeMetricFamily(
        "ventilator_workers_connected",
        "Workers registered, serving or not.",
        value=len(workers),
    )
    yield GaugeMetricFamily(
        "ventilator_workers_not_serving",
        "Workers registered that serve no function, as no task can run there "
        "(task processes that cannot start, every slot held by a stuck "
        "thread); `ventilator status` says why. Their slots and credit are "
        "in no other gauge.",
        value=len(workers) - len(serving),
    )
    yield GaugeMetricFamily(
        "ventilator_worker_slots",
        "Tasks the workers that serve a function and are not draining run "
        "at once, as they declared it (--concurrency; 1 per MDP worker). "
        "Workers with a fixed --prefetch declare none.",
        value=sum(w["slots"] or 0 for w in taking),
    )
    yield GaugeMetricFamily(
        "ventilator_worker_credit",
        "Tasks the workers that serve a function and are not draining may "
        "hold at once: their slots times what prefetch lets each slot hold, "
        "running or waiting.",
        value=sum(w["capacity"] for w in taking),
    )


def _not_accepting(status: dict[str, Any]) -> Metric:
    """1 while the broker refuses every new task, the state /health calls
    not_accepting: alive and serving what it holds, so nothing else to alert
    on shows it until clients' tasks fail (tasks_refused_total rises only
    once one is submitted)."""
    return GaugeMetricFamily(
        "ventilator_not_accepting",
        "1 while the broker refuses every new task (its journal's disk nearly "
        "full, its journal's files gone, or it holds all its limits allow); "
        "status and /health say why. Else 0.",
        value=int(status["not_accepting"] is not None),
    )


def _gauges(status: dict[str, Any]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "ventilator_queue_depth",
        "Tasks waiting for a worker, retries waiting out their backoff included.",
        labels=["function"],
    )
    for function, count in sorted(status["queued"].items()):
        depth.add_metric([function], count)
    running = GaugeMetricFamily(
        "ventilator_tasks_running", "Tasks held by workers.", labels=["function"]
    )
    for function, count in sorted(status["running"].items()):
        running.add_metric([function], count)
    workers = status["workers"]
    yield depth
    yield running
    yield _oldest_running(workers)
    yield from _worker_gauges(workers)
    yield GaugeMetricFamily(
        "ventilator_clients_connected",
        "Clients and sinks connected.",
        value=status["client_counts"]["connected"],
    )
    yield GaugeMetricFamily(
        "ventilator_results_waiting",
        "Finished tasks whose result was not acknowledged yet (their result "
        "not expired).",
        value=status["results_waiting"],
    )
    yield GaugeMetricFamily(
        "ventilator_results_expired",
        "Results that expired uncollected, or that a full broker dropped to "
        "make room once their session had no client for orphan_grace_s, kept "
        "as a few bytes each for one more result TTL to tell their clients; "
        "in no limit.",
        value=status["results_expired"],
    )

"""What the broker did, counted cheaply and published as immutable snapshots.

The broker's loop is the only writer. Per loop turn it hands `Telemetry.record`
the turn's `Effects`; counting there is a dict increment and a bisect per task,
with no lock and no prometheus-client object on the way. A few times a second
`Telemetry.publish` freezes everything into a `Snapshot` (the scheduler's
status, totals, a minute-by-minute history, histogram buckets) and swaps it in
with one attribute assignment. Readers in other threads (the HTTP server, the
Prometheus collector) only ever see a whole snapshot, never the scheduler.

Prometheus metrics (collected from the latest snapshot, in a registry of our
own, not prometheus-client's global one)::

    ventilator_tasks_submitted_total{function}
    ventilator_tasks_completed_total{function}         succeeded
    ventilator_tasks_failed_total{function,outcome}    raised, timeout, poison, ...
    ventilator_tasks_cancelled_total{function}
    ventilator_task_duration_seconds{function}         histogram, as workers measure
    ventilator_task_queue_wait_seconds{function}       histogram, queued to started
    ventilator_queue_depth{function}                   waiting to run (retries too)
    ventilator_tasks_running{function}
    ventilator_workers_connected   ventilator_worker_slots
    ventilator_clients_connected   ventilator_results_waiting
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
from .scheduler import FAILURE_STATUSES, Effects, Scheduler

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
_FAILURES = FAILURE_STATUSES
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

    completed: int = 0
    failed: int = 0
    duration_total_s: float = 0.0
    duration_count: int = 0
    duration_max_s: float = 0.0

    def sample(self, at: float, status: dict[str, Any]) -> dict[str, Any]:
        count = self.duration_count
        return {
            "time": round(at, 3),
            "completed": self.completed,
            "failed": self.failed,
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
    duration: dict[str, Histogram] = field(default_factory=dict)
    queue_wait: dict[str, Histogram] = field(default_factory=dict)
    _interval: _Interval = field(default_factory=_Interval)
    _history: deque[dict[str, Any]] = field(default_factory=deque)
    _publish_at: float = 0.0
    _sample_at: float = 0.0

    def record(self, effects: Effects) -> None:
        """Count one loop turn's accepted and finished tasks."""
        if effects.accepted:
            self._count_accepted(effects)
        if effects.finished:
            self._count_finished(effects)

    def _count_accepted(self, effects: Effects) -> None:
        # Tally per function first: one dict update per function, not per task.
        tally: dict[str, int] = {}
        for task in effects.accepted:
            tally[task.queue] = tally.get(task.queue, 0) + 1
        for function, count in tally.items():
            self.submitted[function] = self.submitted.get(function, 0) + count

    def _count_finished(self, effects: Effects) -> None:
        # The broker's hot path: histograms are updated inline, and looked up
        # once per function per turn, since a method call per task would cost
        # as much as the counting itself.
        tally: dict[tuple[str, p.Status], int] = {}
        histograms: dict[str, tuple[Histogram, Histogram]] = {}
        ran = self._interval
        for task in effects.finished:
            status = task.status
            if status is None or status is _EXPIRED:
                continue  # an expired result is a tombstone, not a second ending
            function = task.queue
            key = (function, status)
            tally[key] = tally.get(key, 0) + 1
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

    def _histograms(self, function: str) -> tuple[Histogram, Histogram]:
        """(queue wait, duration) histograms of `function`."""
        return (
            self._histogram(self.queue_wait, function),
            self._histogram(self.duration, function),
        )

    def _add_outcomes(self, tally: dict[tuple[str, p.Status], int]) -> None:
        interval = self._interval
        for (function, status), count in tally.items():
            key = (function, _outcome(status))
            self.finished[key] = self.finished.get(key, 0) + count
            if status is _OK:
                interval.completed += count
            elif status in _FAILURES:
                interval.failed += count

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
        status = scheduler.status(now)
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
            duration={f: h.frozen() for f, h in self.duration.items()},
            queue_wait={f: h.frozen() for f, h in self.queue_wait.items()},
        )

    def _take_sample(self, now: float, status: dict[str, Any]) -> None:
        # Wall-clock time, for the charts' axis only; nothing expires by it.
        self._history.append(self._interval.sample(time.time(), status))
        self._interval = _Interval()
        self._sample_at = now + self.sample_every_s
        while len(self._history) > self.history_s / self.sample_every_s:
            self._history.popleft()


def _outcome(status: p.Status) -> str:
    return "ok" if status is p.Status.OK else status.name.lower()


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
    submitted = CounterMetricFamily(
        "ventilator_tasks_submitted",
        "Tasks the broker accepted.",
        labels=["function"],
    )
    for function, count in sorted(snapshot.submitted.items()):
        submitted.add_metric([function], count)
    completed = CounterMetricFamily(
        "ventilator_tasks_completed",
        "Tasks that returned a result.",
        labels=["function"],
    )
    failed = CounterMetricFamily(
        "ventilator_tasks_failed",
        "Tasks that failed, by outcome: raised, timeout, poison, not_found, rejected.",
        labels=["function", "outcome"],
    )
    cancelled = CounterMetricFamily(
        "ventilator_tasks_cancelled",
        "Tasks cancelled before they ran, by their client or an operator.",
        labels=["function"],
    )
    for (function, outcome), count in sorted(snapshot.finished.items()):
        if outcome == "ok":
            completed.add_metric([function], count)
        elif outcome == "cancelled":
            cancelled.add_metric([function], count)
        else:
            failed.add_metric([function, outcome], count)
    yield from (submitted, completed, failed, cancelled)


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
    yield GaugeMetricFamily(
        "ventilator_workers_connected", "Workers registered.", value=len(workers)
    )
    yield GaugeMetricFamily(
        "ventilator_worker_slots",
        "Tasks all workers may hold at once (their credit).",
        value=sum(w["capacity"] for w in workers),
    )
    yield GaugeMetricFamily(
        "ventilator_clients_connected",
        "Clients and sinks connected.",
        value=sum(1 for c in status["clients"] if c["connected"]),
    )
    yield GaugeMetricFamily(
        "ventilator_results_waiting",
        "Finished tasks whose result was not acknowledged yet.",
        value=status["results_waiting"],
    )

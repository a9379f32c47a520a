"""The broker's status report: a plain-data picture for `ventilator status`.

The report only reads the scheduler's state, and reads it through a
`StatusReport` that names what it needs: the tasks, workers and recipients,
how many tasks each session holds and has waiting for room, the failures kept,
the tombstones, the queued tasks per function and the running totals. The
scheduler builds one per question (see `Scheduler.status`); nothing here
changes what it reads.

Its cost grows with workers, running tasks, queues and clients, never with
the number of queued tasks, so that a dashboard may ask every second; and
it lists only the most relevant few of each, with exact counts of them all,
so that the answer fits in a frame however many there are.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from . import protocol as p

if TYPE_CHECKING:
    from .failures import FailedTask
    from .scope import Scope
    from .sessions import Recipient
    from .tasks import Task, Worker
    from .waiting_room import Parked

__all__ = [
    "FAILURE_STATUSES",
    "STATUS_CLIENTS",
    "STATUS_QUEUES",
    "STATUS_SERVICES",
    "STATUS_WORKERS",
    "StatusReport",
    "busiest_first",
    "latest_failures",
    "name_order",
    "outcome_totals",
]

# How many clients and sinks `status` lists, the most relevant first (owed
# the most results, connected, heard last); its counts cover every one. A
# client reads answers of up to protocol.MAX_BODY_BYTES: past about 100,000
# sessions a full list no longer fitted, and status stopped working.
STATUS_CLIENTS = 100
# The same for workers (serving nothing first, then holding the oldest task,
# then the most), for functions (the most tasks queued and on workers first),
# and for the functions each listed worker serves: thousands of workers or of
# functions made the answer grow as fast, and every worker may serve every
# function. Exact counts cover what is not listed.
STATUS_WORKERS = 100
STATUS_QUEUES = 100
STATUS_SERVICES = 100
# How a task ended, as it is counted and shown: the statuses that are failures.
FAILURE_STATUSES = frozenset(
    {
        p.Status.RAISED,
        p.Status.TIMEOUT,
        p.Status.POISON,
        p.Status.NOT_FOUND,
        p.Status.REJECTED,
    }
)
# How many failures a report shows, newest first.
RECENT_FAILURES = 10

# Function names whose sort key is kept (see `name_order`): far more than a
# broker serves, and a few MB at most.
NAME_ORDER_CACHE = 16_384
_DIGITS = re.compile(r"\d+")

# Serves nothing, -(when it was handed its oldest task), tasks held, -order.
WorkerRelevance: TypeAlias = tuple[bool, float, int, int]


@functools.lru_cache(maxsize=NAME_ORDER_CACHE)
def name_order(name: str) -> str:
    """The order a reader expects names in: as text, but numbers in them by
    value, so that ``resize2`` comes before ``resize10`` (as text it comes
    after, and ``job9`` after ``job10``).

    A string that sorts so as text: each number loses its leading zeros and
    gains its length in front, so a smaller number sorts first and numbers
    as long compare digit by digit; the name itself follows, after the
    lowest character, to settle ``f07`` against ``f7``. A string, not a
    tuple of parts, for the speed of a plain comparison; cached, as the same
    few names are sorted at every status."""
    return f"{_DIGITS.sub(_length_first, name)}\0{name}"


def _length_first(digits: re.Match[str]) -> str:
    value = digits.group().lstrip("0") or "0"
    return f"{min(len(value), 999):03d}{value}"


def busiest_first(queued: Mapping[str, int], running: Mapping[str, int]) -> list[str]:
    """The functions of `queued` and `running` (tasks of each), those with the
    most tasks in both first, equal ones in `name_order`: the order `status`
    lists them in, in its answer and on screen."""
    functions = sorted(queued.keys() | running.keys(), key=name_order)
    # Stable, reversed too: equal ones stay in name order.
    functions.sort(
        key=lambda name: queued.get(name, 0) + running.get(name, 0), reverse=True
    )
    return functions


def outcome_totals(
    submitted: int,
    restored: int,
    finished_by_status: Sequence[int],
    split: int,
    rejected: int = 0,
) -> dict[str, int]:
    """Tasks taken on and finished since the broker started, by outcome, from
    its running counts (`finished_by_status` is indexed by `p.Status`), and
    those refused as they were submitted (`rejected`: never accepted, so in
    no other count)."""
    return {
        "submitted": submitted,
        "restored": restored,
        "completed": finished_by_status[p.Status.OK],
        "failed": sum(finished_by_status[status] for status in FAILURE_STATUSES),
        "cancelled": finished_by_status[p.Status.CANCELLED],
        "split": split,
        "rejected": rejected,
    }


def latest_failures(
    failed: Sequence[FailedTask], limit: int, scope: Scope | None
) -> list[FailedTask]:
    """The latest `limit` records of `failed` (kept oldest first) within
    `scope`, newest first."""
    newest_first: Iterable[FailedTask] = reversed(failed)
    if scope is not None:
        newest_first = (r for r in newest_first if scope.owns(r.session))
    return list(itertools.islice(newest_first, limit))


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What a status report reads of the scheduler, and the report it makes:
    `whole` for the operator, `within` for a client with limited rights.

    `held` counts, per submitting session, the tasks the broker holds of it;
    `parked`, per session, the tasks it sent past its window; `result_bytes`,
    per session, the bytes of its results kept (tombstones aside), and
    `expected_bytes`, those its running tasks are expected to return;
    `held_back`, the sessions whose results fill client_max_bytes, whose
    queued tasks are not dispatched until they are read; `tombstones`,
    the expired results kept; `queued`, the tasks waiting per function
    (queued, or due for a retry); `retrying`, those of them that wait out a
    retry's backoff, the next of them due at `next_retry_at` (monotonic);
    `totals`, as `outcome_totals` makes them.
    """

    tasks: Mapping[int, Task]
    workers: Collection[Worker]
    recipients: Collection[Recipient]
    held: Mapping[str, int]
    parked: Mapping[str, Parked]
    result_bytes: Mapping[str, int]
    expected_bytes: Mapping[str, int]
    held_back: Collection[str]
    failed: Sequence[FailedTask]
    tombstones: int
    queued: Mapping[str, int]
    retrying: Mapping[str, int]
    next_retry_at: float | None
    totals: dict[str, int]
    # The session asking, listed even if it only asked (see `_listed`).
    asker: str | None = None
    # Why the broker refuses every new task now (its journal's disk nearly
    # full, or it holds all its limits allow); None while it accepts them.
    not_accepting: str | None = None
    # Why results are held back now (no room on the journal's disk to record
    # their delivery); None while they go.
    delivery_held: str | None = None
    # Whether a connected worker that is not draining serves a queue.
    serves: Callable[[str], bool] = lambda _queue: True

    def whole(self, now: float, full: bool = False) -> dict[str, object]:
        """The whole broker: the most relevant `STATUS_WORKERS` workers,
        `STATUS_QUEUES` functions and `STATUS_CLIENTS` clients, with exact
        counts of them all; `full` lists every worker and function (the
        broker's own metrics, which no frame carries)."""
        running = self._running_by_function()
        every_worker = ((w, w.services) for w in self.workers)
        return {
            **self._workers_status(every_worker, now, full),
            **self._queues_status(self.queued, self.retrying, running, full),
            **self._retries_due(now),
            **self._results_held(running),
            **self._clients_status(self.recipients),
            "totals": self.totals,
            "not_accepting": self.not_accepting,
            "delivery_held": self.delivery_held,
            "recent_failures": [
                record.report(now)
                for record in latest_failures(self.failed, RECENT_FAILURES, None)
            ],
        }

    def within(self, scope: Scope, now: float) -> dict[str, object]:
        """The broker as a client with limited rights sees it: its own sessions
        (and the sinks it receives) and their failures; the workers and queues
        of the functions it may submit, counting every client's tasks in them
        (how far back its own wait); and the totals, which are only numbers.
        Other clients' sessions and failures, and functions outside its
        rights, are not its business."""
        running = self._running_by_function()
        return {
            "scope": scope.sessions,
            **self._workers_status(
                self._workers_within(scope), now, full=False, owns=scope.owns
            ),
            **self._queues_status(
                {q: n for q, n in self.queued.items() if scope.shows_queue(q)},
                {q: n for q, n in self.retrying.items() if scope.shows_queue(q)},
                {q: n for q, n in running.items() if scope.shows_queue(q)},
                full=False,
            ),
            **self._retries_due(now),
            **self._results_held(running),
            **self._clients_status(
                recipient
                for recipient in self.recipients
                if scope.owns(recipient.name) or scope.owns(recipient.holder or "")
            ),
            "totals": self.totals,
            "not_accepting": self.not_accepting,
            "delivery_held": self.delivery_held,
            "recent_failures": [
                record.report(now)
                for record in latest_failures(self.failed, RECENT_FAILURES, scope)
            ],
        }

    def _results_held(self, running: Mapping[str, int]) -> dict[str, int]:
        """Finished tasks waiting for their recipients: results, and apart
        from them the tombstones of expired ones. Their sum is that of every
        client's `pending` and `unacknowledged`."""
        unfinished = sum(self.queued.values()) + sum(running.values())
        return {
            "results_waiting": len(self.tasks) - unfinished - self.tombstones,
            "results_expired": self.tombstones,
        }

    def _clients_status(self, recipients: Iterable[Recipient]) -> dict[str, object]:
        """The `STATUS_CLIENTS` most relevant of `recipients`, and exact counts
        of them all: the answer stays readable however many there are.

        Most relevant: owed the most results (pending or unacknowledged),
        then connected, then heard last. A dashboard may ask every second:
        one pass over them all, and a heap of the listed few.
        """
        counts = {"all": 0, "connected": 0, "sinks": 0, "connected_sinks": 0}

        def counted() -> Iterator[tuple[tuple[int, bool, float, int], Recipient]]:
            for order, recipient in enumerate(filter(self._listed, recipients)):
                is_sink = recipient.name.startswith(p.SINK_PREFIX)
                connected = recipient.peer is not None
                counts["all"] += 1
                counts["connected"] += connected
                counts["sinks"] += is_sink
                counts["connected_sinks"] += is_sink and connected
                owed = len(recipient.pending) + len(recipient.unacked)
                owed += self.held.get(recipient.name, 0)
                yield (owed, connected, recipient.last_seen, -order), recipient

        # Fed an iterator, nlargest keeps a heap of the listed few only.
        kept = heapq.nlargest(STATUS_CLIENTS, counted(), key=lambda entry: entry[0])
        return {
            "clients": [self._client_status(recipient) for _, recipient in kept],
            "client_counts": {**counts, "listed": len(kept)},
        }

    def _listed(self, recipient: Recipient) -> bool:
        """Whether the answer lists and counts `recipient`: every one but the
        sessions that only asked questions and hold nothing, as a `ventilator
        status` run's own does, which leaves with its answer; two runs at once
        listed each other. The asker's own is listed all the same."""
        if not recipient.only_asked or recipient.name == self.asker:
            return True
        name = recipient.name
        return bool(
            recipient.pending
            or recipient.unacked
            or self.held.get(name)
            or self._parked_count(name)
        )

    def _client_status(self, recipient: Recipient) -> dict[str, object]:
        return {
            "name": recipient.name,
            "kind": "sink" if recipient.name.startswith("sink:") else "client",
            "connected": recipient.peer is not None,
            "pending": len(recipient.pending),
            # Sent and not yet acknowledged: a busy sink holds them.
            "unacknowledged": len(recipient.unacked),
            # Tasks it submitted that the broker holds, queued, running or
            # finished: a session that left with tasks queued owes nothing
            # yet, and shows here what `purge --session` would drop.
            "tasks": self.held.get(recipient.name, 0),
            # Of those two, the tombstones of expired results.
            "expired": recipient.expired,
            # Tasks it sent past its window, not accepted yet (see _park).
            "waiting_for_room": self._parked_count(recipient.name),
            # Bytes of its results the broker keeps, for it or for a sink.
            "result_bytes": self.result_bytes.get(recipient.name, 0),
            # What its running tasks are expected to return (their function's
            # mean result size, raised at once by a larger one), which counts
            # with the above.
            "expected_result_bytes": self.expected_bytes.get(recipient.name, 0),
            # Its results fill client_max_bytes: its queued tasks are not
            # dispatched until it (or the sink) reads some.
            "held_back": recipient.name in self.held_back,
        }

    def _parked_count(self, session: str) -> int:
        parked = self.parked.get(session)
        return 0 if parked is None else len(parked.specs)

    def _workers_within(self, scope: Scope) -> Iterator[tuple[Worker, list[str]]]:
        """The workers as a client with limited rights sees them: those that
        serve functions of its rights, with those functions only."""
        for worker in self.workers:
            services = [name for name in worker.services if scope.shows_queue(name)]
            if services:
                yield worker, services

    def _workers_status(
        self,
        shown: Iterable[tuple[Worker, Sequence[str]]],
        now: float,
        full: bool,
        owns: Callable[[str], bool] = lambda _session: True,
    ) -> dict[str, object]:
        """The `STATUS_WORKERS` most relevant of the `shown` workers (each with
        the functions shown of it), all of them if `full`, and exact counts
        of them all. One pass over them, and a heap of the listed few. The
        oldest task of each is named only to the client that `owns` its
        session."""
        counts = dict.fromkeys(
            ("all", "draining", "not_serving", "held", "slots", "capacity"), 0
        )
        entries: list[tuple[WorkerRelevance, Worker, Sequence[str]]] = []
        for order, (worker, services) in enumerate(shown):
            counts["all"] += 1
            counts["draining"] += worker.draining
            counts["not_serving"] += not services
            counts["held"] += len(worker.running)
            counts["slots"] += worker.slots or 0
            counts["capacity"] += worker.capacity
            relevance = self._worker_relevance(worker, services, order)
            entries.append((relevance, worker, services))
        limit = len(entries) if full else STATUS_WORKERS
        kept = heapq.nlargest(limit, entries, key=lambda entry: entry[0])
        return {
            "workers": [
                self._worker_status(worker, now, services, full, owns)
                for _, worker, services in kept
            ],
            "worker_counts": {**counts, "listed": len(kept)},
        }

    def _worker_relevance(
        self, worker: Worker, services: Sequence[str], order: int
    ) -> WorkerRelevance:
        """How much an operator wants to see a worker, most first: one that
        serves nothing (there is something to fix), then the one holding the
        oldest task (a hung task shows), then the one holding the most, then
        the one that registered first."""
        started = (self.tasks[ticket].started_at for ticket in worker.running)
        oldest = min(started, default=math.inf)
        return (not services, -oldest, len(worker.running), -order)

    def _queues_status(
        self,
        queued: Mapping[str, int],
        retrying: Mapping[str, int],
        running: Mapping[str, int],
        full: bool,
    ) -> dict[str, object]:
        """Tasks `queued` (of which `retrying`) and `running` of the
        `STATUS_QUEUES` functions with the most of both (every function if
        `full`), and exact totals."""
        functions = busiest_first(queued, running)
        kept = functions if full else functions[:STATUS_QUEUES]
        counts = {
            "all": len(functions),
            "queued": sum(queued.values()),
            "retrying": sum(retrying.values()),
            "running": sum(running.values()),
            "listed": len(kept),
        }
        return {
            "queued": {name: queued[name] for name in kept if name in queued},
            "retrying": {name: retrying[name] for name in kept if name in retrying},
            "running": {name: running[name] for name in kept if name in running},
            # Queued where no worker serves them: they wait for one to
            # connect (a typo in a function's name waits for ever), which
            # otherwise looks like a slow queue.
            "unserved": [
                name for name in kept if queued.get(name) and not self.serves(name)
            ],
            "queue_counts": counts,
        }

    def _retries_due(self, now: float) -> dict[str, float | None]:
        """Seconds until the next retry runs; None when none waits."""
        if self.next_retry_at is None:
            return {"next_retry_in_s": None}
        return {"next_retry_in_s": round(max(0.0, self.next_retry_at - now), 3)}

    def _worker_status(
        self,
        worker: Worker,
        now: float,
        services: Sequence[str],
        full: bool,
        owns: Callable[[str], bool],
    ) -> dict[str, object]:
        held = len(worker.running)
        # A worker runs at most `slots` of the tasks it holds; the rest wait
        # on it. Without slots the broker cannot tell them apart.
        running = held if worker.slots is None else min(held, worker.slots)
        listed = services if full else services[:STATUS_SERVICES]
        return {
            "id": worker.worker_id,
            "services": list(listed),
            "service_count": len(services),
            "capacity": worker.capacity,
            "slots": worker.slots,
            "held": held,
            "running": running,
            "prefetched": None if worker.slots is None else held - running,
            **self._oldest_held(worker, now, owns),
            "draining": worker.draining,
            "last_seen_s": round(now - worker.last_seen, 3),
            "problem": worker.problem,
            "shared_memory": worker.shared_memory,
        }

    def _oldest_held(
        self, worker: Worker, now: float, owns: Callable[[str], bool]
    ) -> dict[str, object]:
        """The oldest task the worker holds: seconds since it was handed it,
        and which it is, as `cancel` names it (an operator looking at a hung
        one has nothing else to find its id by; tester 36). Workers start
        tasks in the order they get them, so that task runs, and has run at
        most this long: a hung task shows as a number that keeps growing.
        None for both when it holds none; the task is None when it is a
        session's that the asker does not `own`."""
        if not worker.running:
            return {"oldest_running_s": None, "oldest_task": None}
        oldest = min((self.tasks[t] for t in worker.running), key=_started_at)
        task = None
        if owns(oldest.session):
            task = {
                "session": oldest.session,
                "task_id": oldest.task_id,
                "function": oldest.function,
            }
        return {
            "oldest_running_s": round(now - oldest.started_at, 3),
            "oldest_task": task,
        }

    def _running_by_function(self) -> dict[str, int]:
        running: dict[str, int] = {}
        for worker in self.workers:
            for ticket in worker.running:
                queue = self.tasks[ticket].queue
                running[queue] = running.get(queue, 0) + 1
        return running


def _started_at(task: Task) -> float:
    return task.started_at

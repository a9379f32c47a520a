"""What the broker keeps of each task and each worker, between events.

A `Task` lives from its acceptance until its result is acknowledged, and is in
one `State` at a time (the scheduler's docstring draws the transitions). A
`Worker` is one registered worker: what it serves, the credit it gave, and the
tasks it holds. Both are plain records the scheduler changes as events come;
the journal stores tasks, and status and telemetry read both. They hold no
rules of their own beyond a few read-outs (`Task.queue`, `Worker.free`), so
that the modules that only read them need not import the scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import protocol as p
from .mdp import service_queue

__all__ = ["PICKLE_QUEUE", "State", "Task", "Worker"]

# Pickled callables have no function name a worker registered; they share one
# queue, served only by workers that opted in to unpickling.
PICKLE_QUEUE = "<pickled>"
# The flags as plain ints: `int & IntFlag` costs about 2 us in CPython, and
# `Task.queue` is asked on every enqueue.
_PICKLED = int(p.Flags.PICKLED)
_RAW = int(p.Flags.RAW)


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # for a retry's backoff to pass
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Task:
    """One accepted task, from its acceptance until its result is acknowledged."""

    ticket: int
    session: str
    task_id: int
    function: str
    payload: p.Payload
    flags: int
    timeout_s: float | None
    retries_left: int
    recipient: str
    state: State = State.QUEUED
    attempt: int = 0
    # Strikes towards POISON: `deaths`, its task process died (the worker saw
    # it and said CRASHED); `losses`, its worker was lost (silent, unreachable)
    # while it ran, which a task can cause only in a thread pool. Journaled, so
    # a restart of the broker gives a task no fresh tries.
    deaths: int = 0
    losses: int = 0
    worker: str | None = None
    # Who may name it in a READY and keep it, while it waits in its queue and
    # nobody took it since (see Scheduler._claimable): the worker it was
    # taken back from, which may still run it; and, for a task the journal
    # brought back after a restart, any worker (`restored`), since the broker
    # no longer knows who ran it.
    given_back_by: str | None = None
    restored: bool = False
    status: p.Status | None = None
    result: p.Payload = b""
    finished_at: float = 0.0
    # Cancelled by its submitter while held by a worker that cannot be told to
    # stop it (an MDP worker): dropped, not requeued and not delivered, once
    # that worker is done with it or gone.
    cancelled: bool = False
    # When the broker ends it as timed out unless its worker reports first
    # (see Scheduler._expire_leases); None: no timeout_s, or it waits on its
    # worker behind busy slots and its clock has not started.
    deadline: float | None = None
    # For metrics: when it last entered its queue and last left it, and how long
    # the worker said it ran. Plain floats, so they cost next to nothing.
    queued_at: float = 0.0
    started_at: float = 0.0
    run_s: float = 0.0
    # While it runs: the bytes its result is expected to take (its queue's
    # mean so far), counted against its session's room for results (see
    # result_room); 0 otherwise.
    expected: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.session, self.task_id)

    @property
    def queue(self) -> str:
        if self.flags & _PICKLED:
            return PICKLE_QUEUE
        if self.flags & _RAW:
            return service_queue(self.function)
        return self.function


@dataclass(slots=True, eq=False)
class Worker:
    worker_id: str
    peer: bytes
    services: tuple[str, ...]
    capacity: int
    last_seen: float
    running: set[int] = field(default_factory=set)
    # The tasks it runs at once, if it leaves to the broker how many more of
    # each function it holds (see Scheduler._allowance); None: no such limit.
    slots: int | None = None
    # Whether it reads payloads from shared memory (its READY's probe matched).
    shared_memory: bool = False
    # How many of `running` each queue gave it.
    held: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    # Whether it is counted among the workers sharing its queues' work (see
    # credit_index): registered and not draining.
    sharing: bool = False
    # Tasks it may hold above `capacity` after lowering it: those it had then.
    grace: int = 0
    # Silence after which it is presumed dead; None: the broker's default.
    max_silence_s: float | None = None
    # MDP workers send nothing while they work: silence while busy is not death
    # (a dead busy worker is noticed when a send to it fails instead).
    silent_while_busy: bool = False
    # Whether it stops the tasks a RELEASE names: ours do; an MDP worker
    # cannot be told to (7/MDP has no such command).
    obeys_release: bool = True
    # Whether it is in the index of workers with free credit, under each of
    # its services (see credit_index).
    offered: bool = False
    # When it last reported an outcome, registered, or was given a task for a
    # free slot: see Scheduler._frees_a_slot_soon.
    last_progress: float = 0.0
    # Why it serves nothing, as it said in its READY; for the status.
    problem: str | None = None
    # Tickets it holds beyond its slots, in the order they were sent: each
    # starts (and its deadline with it) when a slot frees.
    unstarted: dict[int, None] = field(default_factory=dict)
    # Tasks in a row whose deadline passed before it reported them.
    overruns: int = 0
    # When it registered, and last reported outcomes (None: not yet): while it
    # reports, the broker leaves its tasks to its own timeouts (see
    # deadlines.LeaseTerms.trusted_until).
    registered_at: float = 0.0
    reported_at: float | None = None
    # (ticket, attempt) it was told to give up (see `p.Release`): tasks its
    # READY named that the broker did not keep, and tasks stopped since. A
    # result of one that follows crossed the RELEASE, and is not a fault.
    # Oldest first, with when; those older than scheduler.RELEASED_KEPT_S are
    # shed at its next RELEASE.
    released: dict[tuple[int, int], float] = field(default_factory=dict)

    def presumed_dead(self, now: float, default_silence_s: float) -> bool:
        if self.silent_while_busy and self.running:
            return False
        limit_s = self.max_silence_s
        if limit_s is None:
            limit_s = default_silence_s
        return now - self.last_seen > limit_s

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.capacity - len(self.running))

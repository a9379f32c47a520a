"""A test double for the broker shell: drives a `Scheduler` one loop turn at a time.

Each call feeds one command (or the passing of time), flushes, checks the
scheduler's invariants and returns the turn's `Effects`. The clock is a number
the test moves by hand; nothing here sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TypeVar

from ventilator import protocol as p
from ventilator.policy import Limits
from ventilator.scheduler import Effects, Scheduler, Scope
from ventilator.serialization import unpack_value

FUNCTION = "jobs:work"
CLIENT = b"client-1"

N = TypeVar("N")


class Driver:
    """One scheduler, one clock, and the commands a shell would feed it."""

    def __init__(
        self,
        limits: Limits | None = None,
        durable: bool = True,
        defer_acceptance: bool = False,
    ) -> None:
        self.scheduler = Scheduler(limits, rng=random.Random(1), durable=durable)
        self.now = 1000.0
        # As the broker does: ACCEPTED waits a little for a result to say it.
        # Off, every turn announces its acceptances at once.
        self.defer_acceptance = defer_acceptance

    # --- one loop turn each -----------------------------------------------------------

    def client(
        self, peer: bytes, command: p.Command, scope: Scope | None = None
    ) -> Effects:
        self.scheduler.client_command(peer, command, self.now, scope)
        return self.flush()

    def worker(self, peer: bytes, command: p.Command) -> Effects:
        self.scheduler.worker_command(peer, command, self.now)
        return self.flush()

    def unreachable(self, peer: bytes) -> Effects:
        self.scheduler.peer_unreachable(peer, self.now)
        return self.flush()

    def tick(self, advance_s: float) -> Effects:
        self.now += advance_s
        self.scheduler.tick(self.now)
        return self.flush()

    def flush(self) -> Effects:
        effects = self.scheduler.flush(self.now if self.defer_acceptance else None)
        self.scheduler.check_invariants()
        return effects

    # --- the same, in the words of the tests ------------------------------------------

    def hello(
        self,
        peer: bytes = CLIENT,
        session: str = "alice",
        sink: str | None = None,
        instance: int | None = None,
    ) -> Effects:
        return self.client(peer, p.Hello(session, sink, instance))

    def submit(self, *specs: p.TaskSpec, peer: bytes = CLIENT) -> Effects:
        return self.client(peer, p.Submit(list(specs)))

    def ack(self, *keys: tuple[str, int], peer: bytes = CLIENT) -> Effects:
        return self.client(peer, p.Ack(list(keys)))

    def cancel(self, *task_ids: int, peer: bytes = CLIENT) -> Effects:
        return self.client(peer, p.Cancel(list(task_ids)))

    def ready(
        self,
        peer: bytes,
        capacity: int = 1,
        services: Iterable[str] = (FUNCTION,),
        worker_id: str | None = None,
        allow_pickle: bool = False,
        slots: int | None = None,
        held: Iterable[p.Assignment] = (),
    ) -> Effects:
        worker_id = worker_id or peer.decode()
        named = [(a.ticket, a.attempt) for a in held]
        ready = p.Ready(
            worker_id, list(services), capacity, allow_pickle, slots, held=named
        )
        return self.worker(peer, ready)

    def done(
        self,
        peer: bytes,
        assignment: p.Assignment,
        status: p.Status = p.Status.OK,
        payload: bytes = b"result",
        duration_s: float = 0.0,
    ) -> Effects:
        outcome = p.Outcome(
            assignment.ticket, assignment.attempt, status, payload, duration_s
        )
        return self.worker(peer, p.Done([outcome]))


def task(
    task_id: int,
    payload: bytes = b"args",
    function: str = FUNCTION,
    **fields: object,
) -> p.TaskSpec:
    """A task spec with defaults a test can override by name."""
    return p.TaskSpec(task_id, function, payload, **fields)  # type: ignore[arg-type]


# --- reading effects ------------------------------------------------------------------


def sent(effects: Effects, peer: bytes, kind: type) -> list[p.Command]:
    """Every command of type `kind` sent to `peer`, clients and workers alike."""
    return [
        command
        for to, command in effects.to_clients + effects.to_workers
        if to == peer and isinstance(command, kind)
    ]


def assignments(effects: Effects, peer: bytes) -> list[p.Assignment]:
    return [a for tasks in sent(effects, peer, p.Tasks) for a in tasks.tasks]


def results(effects: Effects, peer: bytes = CLIENT) -> list[p.ResultEntry]:
    return [r for batch in sent(effects, peer, p.Results) for r in batch.results]


def accepted(effects: Effects, peer: bytes = CLIENT) -> list[int]:
    return [i for batch in sent(effects, peer, p.Accepted) for i in batch.task_ids]


def error_codes(effects: Effects, peer: bytes) -> list[str]:
    return [error.code for error in sent(effects, peer, p.Error)]


def notices(effects: Effects, kind: type[N]) -> list[N]:
    return [notice for notice in effects.notices if isinstance(notice, kind)]


def error_report(entry: p.ResultEntry) -> dict[str, str]:
    """The error report a non-OK result carries, decoded."""
    report = unpack_value(entry.payload)
    assert isinstance(report, dict)
    return report

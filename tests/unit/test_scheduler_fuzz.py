"""Arbitrary frames through the decoder into the scheduler, as the broker feeds
them: nothing but ProtocolError leaves the decoder, and whatever decodes leaves
the scheduler's invariants whole."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ventilator import protocol as p
from ventilator.errors import ProtocolError
from ventilator.policy import Limits
from ventilator.scheduler import Scheduler

from .test_protocol import almost_right_messages, msgpack_values

PEERS = [b"peer-a", b"peer-b", b"peer-c"]
FUNCTIONS = ["jobs:f", "jobs:g"]
LIMITS = Limits(
    max_payload_bytes=16,
    max_queued_tasks=12,
    max_queued_bytes=80,
    client_window=5,
    client_max_bytes=30,
    delivery_window=3,
)

small = st.integers(min_value=0, max_value=6)
names = st.sampled_from(["alice", "bob", "w1", "w2", *FUNCTIONS])
payloads = st.binary(max_size=8) | st.binary(min_size=16, max_size=17)

# Well-formed commands, so that the scheduler is driven somewhere interesting.
client_commands = st.one_of(
    st.builds(p.Hello, names, st.none() | st.just("sink")),
    st.builds(
        lambda specs: p.Submit(specs),
        st.lists(
            st.builds(
                p.TaskSpec,
                small,
                st.sampled_from(FUNCTIONS),
                payloads,
                st.sampled_from([0, 0, 1]),
                st.none() | st.just(1.0),
                small,
                st.none() | st.just("sink"),
            ),
            min_size=1,
            max_size=4,
        ),
    ),
    st.builds(lambda keys: p.Ack(keys), st.lists(st.tuples(names, small), max_size=3)),
    st.builds(lambda ids: p.Cancel(ids), st.lists(small, max_size=3)),
    st.sampled_from([p.Heartbeat(), p.Bye(), p.StatusRequest()]),
).map(p.encode)

worker_commands = st.one_of(
    st.builds(
        p.Ready,
        names,
        st.lists(st.sampled_from(FUNCTIONS), max_size=2),
        st.integers(min_value=1, max_value=4),
        st.booleans(),
    ),
    st.builds(
        lambda outcomes: p.Done(outcomes),
        st.lists(
            st.builds(
                p.Outcome,
                st.integers(min_value=1, max_value=12),
                st.integers(min_value=1, max_value=2),
                st.sampled_from(p.Status),
                payloads,
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.builds(p.Credit, st.integers(min_value=1, max_value=4)),
    st.sampled_from([p.Heartbeat(), p.Bye(), p.Drain()]),
).map(p.encode)

garbage = st.one_of(
    st.lists(st.binary(max_size=12), max_size=6),
    almost_right_messages(),
    st.builds(
        lambda cmd, body: [p.HEADER, bytes([cmd]), p.msgpack.packb(body)],
        st.sampled_from(p.Cmd),
        msgpack_values,
    ),
)
peers = st.sampled_from(PEERS)
sides = st.sampled_from(["client", "worker"])

steps = st.lists(
    st.one_of(
        st.tuples(st.just("client"), peers, client_commands),
        st.tuples(st.just("client"), peers, client_commands),
        st.tuples(st.just("worker"), peers, worker_commands),
        st.tuples(st.just("worker"), peers, worker_commands),
        st.tuples(sides, peers, garbage),
        st.tuples(st.sampled_from(["tick", "unreachable"]), peers, st.just([])),
        st.tuples(st.just("finish"), peers, st.sampled_from(p.Status)),
    ),
    min_size=1,
    max_size=40,
)


def finish_running(scheduler: Scheduler, peer: bytes, status: p.Status) -> Any:
    """A DONE for everything the worker on `peer` holds, as a real worker sends."""
    outcomes = [
        p.Outcome(ticket, scheduler.tasks[ticket].attempt, status, b"r")
        for worker in scheduler.workers.values()
        if worker.peer == peer
        for ticket in worker.running
    ]
    return p.encode(p.Done(outcomes))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps)
def test_any_frames_keep_the_scheduler_consistent(
    steps: list[tuple[str, bytes, Any]],
) -> None:
    scheduler = Scheduler(LIMITS, rng=random.Random(0))
    now = 0.0
    # Peers that said hello and registered, so that well-formed traffic that
    # follows has something to act on; garbage and steps may undo it all.
    for peer, session in zip(PEERS, ["alice", "bob", "carol"], strict=True):
        scheduler.client_command(peer, p.Hello(session), now)
        scheduler.worker_command(peer, p.Ready(session, FUNCTIONS, 2), now)
    for side, peer, frames in steps:
        now += 0.25
        if side == "finish":
            frames = finish_running(scheduler, peer, frames)
            side = "worker"
        if side == "tick":
            scheduler.tick(now + 5)
        elif side == "unreachable":
            scheduler.peer_unreachable(peer, now)
        else:
            allowed = p.FROM_CLIENT if side == "client" else p.FROM_WORKER
            try:
                command = p.decode(frames, allowed)
            except ProtocolError:
                continue
            feed = (
                scheduler.client_command
                if side == "client"
                else scheduler.worker_command
            )
            feed(peer, command, now)
        scheduler.flush()
        scheduler.check_invariants()

"""Large payloads through shared memory between processes of one machine:
real brokers, workers and clients, the bytes checked at the other end."""

from __future__ import annotations

import glob
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import ventilator
from ventilator import _shared
from ventilator import protocol as p
from ventilator.serialization import pack_value

from .conftest import (
    FAST_HEARTBEAT_S,
    TASKS,
    BrokerProcess,
    Launcher,
    Processes,
    paused,
    read_json_line,
    restartable_broker,
    status_when,
    wait_for_workers,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(_shared.SHM_ROOT), reason="no shared memory on this machine"
)

RESULT_TIMEOUT_S = 30.0
ECHO = f"{TASKS}:echo"


def payloads(count: int, size: int = 100_000) -> list[bytes]:
    """Payloads that differ, so that one read in place of another shows."""
    return [bytes([i % 256]) * (size - 1) + os.urandom(1) for i in range(count)]


def arenas_of(broker: BrokerProcess) -> list[str]:
    return glob.glob(os.path.join(_shared.SHM_ROOT, f"ventilator-{broker.pid}-*", "*"))


def written_to(broker: BrokerProcess) -> bool:
    """Whether a client wrote payloads into an arena of `broker`: its file
    is sparse until then."""
    return any(os.stat(arena).st_blocks for arena in arenas_of(broker))


def test_large_payloads_go_through_shared_memory_and_arrive_whole(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, concurrency=2)
    client = launch.client(broker)
    sent = payloads(40)

    futures = [client.submit(ECHO, payload) for payload in sent]

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == sent
    assert written_to(broker)  # the client's arena, while it is connected


def test_a_worker_that_does_not_share_memory_is_sent_the_bytes(
    launch: Launcher, broker: BrokerProcess
) -> None:
    apart = launch.worker(broker, extra=["--no-shared-memory"])
    client = launch.client(broker)
    sent = payloads(10)

    futures = [client.submit(ECHO, payload) for payload in sent]

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == sent
    assert written_to(broker)  # the client still writes to it
    sharing = launch.worker(broker)
    status = wait_for_workers(client, 2)
    assert (apart.entry(status) or {})["shared_memory"] is False
    assert (sharing.entry(status) or {})["shared_memory"] is True


def echoed_whole(launch: Launcher, broker: BrokerProcess) -> bool:
    launch.worker(broker)
    client = launch.client(broker)
    sent = payloads(5)
    futures = [client.submit(ECHO, payload) for payload in sent]
    return [f.result(RESULT_TIMEOUT_S) for f in futures] == sent


def test_a_broker_told_not_to_share_memory_offers_no_arena(launch: Launcher) -> None:
    broker = launch.broker("--no-shared-memory")

    assert echoed_whole(launch, broker)
    assert not arenas_of(broker)


def test_a_durable_broker_journals_shared_payloads_as_their_bytes(
    launch: Launcher, tmp_path: Path
) -> None:
    options = restartable_broker(tmp_path)
    broker = launch.broker(**options)
    client = launch.client(broker)
    sent = payloads(6)
    futures = [client.submit(ECHO, payload) for payload in sent]
    status_when(client, lambda s: s["queued"].get(ECHO) == 6, 10, "6 queued")
    assert written_to(broker)

    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(10)
    restarted = launch.broker(**options)  # with no arena of the first one's
    launch.worker(restarted)

    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == sent
    assert not arenas_of(broker)  # the restarted broker swept them


def test_tasks_of_a_client_that_left_run_with_the_broker_s_copy_of_their_payloads(
    launch: Launcher, broker: BrokerProcess
) -> None:
    sent = payloads(6)
    with ventilator.Client(broker.frontend, session="leaver") as leaver:
        futures = [leaver.submit(ECHO, payload) for payload in sent]
        watcher = launch.client(broker)
        status_when(watcher, lambda s: s["queued"].get(ECHO) == 6, 10, "6 queued")
        ids = [future.task_id for future in futures]
    # The client said BYE with its tasks queued: only the broker has them now.

    launch.worker(broker)
    resumed = launch.client(broker, session="leaver")
    collected = {f.task_id: f.result(0) for f in resumed.collect(6, RESULT_TIMEOUT_S)}

    assert [collected[i] for i in ids] == sent


def test_tasks_of_a_client_killed_outright_run_and_its_arena_goes(
    launch: Launcher, broker: BrokerProcess, processes: Processes
) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys, time, ventilator
        client = ventilator.Client({broker.frontend!r}, session="killed")
        futures = [client.submit({ECHO!r}, bytes([i]) * 100_000) for i in range(4)]
        print(json.dumps([f.task_id for f in futures]), flush=True)
        time.sleep(600)
        """
    )
    doomed = processes.start("client", [sys.executable, "-c", script], stdout=-1)
    ids = read_json_line(doomed, 20)
    watcher = launch.client(broker, shared_memory=False)
    status_when(watcher, lambda s: s["queued"].get(ECHO) == 4, 10, "4 queued")
    arenas = arenas_of(broker)
    assert len(arenas) == 1  # the killed client's

    os.kill(doomed.pid, signal.SIGKILL)
    launch.worker(broker)
    resumed = launch.client(broker, session="killed")
    collected = {f.task_id: f.result(0) for f in resumed.collect(4, RESULT_TIMEOUT_S)}

    assert [collected[i] for i in ids] == [bytes([i]) * 100_000 for i in range(4)]
    # Once the broker gave up on it.
    wait_until(lambda: not set(arenas) & set(arenas_of(broker)), 30, "arena removed")


def test_a_forged_reference_fails_its_task_alone(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker)
    client = launch.client(broker)
    wait_for_workers(client, 1)
    forged = p.SHARED_REFERENCE.pack(0, 100_000, 99)
    specs = [p.TaskSpec(0, ECHO, pack_value([[i]])) for i in range(4)]
    specs.insert(2, p.TaskSpec(0, ECHO, forged, int(p.Flags.SHARED)))

    futures = client._enqueue(specs, client._future)

    bad = futures.pop(2)
    with pytest.raises(ventilator.TaskRejected, match="is not generation 99"):
        bad.result(RESULT_TIMEOUT_S)
    assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [0, 1, 2, 3]


def test_a_reference_from_a_client_without_an_arena_is_refused_naming_why(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker)
    client = launch.client(broker, shared_memory=False)
    forged = p.SHARED_REFERENCE.pack(0, 100_000, 1)
    specs = [p.TaskSpec(0, ECHO, forged, int(p.Flags.SHARED))]

    [future] = client._enqueue(specs, client._future)

    with pytest.raises(ventilator.TaskRejected, match="no arena"):
        future.result(RESULT_TIMEOUT_S)
    assert (
        client.submit(ECHO, b"x" * 100_000).result(RESULT_TIMEOUT_S) == b"x" * 100_000
    )


def test_map_batches_and_pickled_calls_with_large_payloads_arrive_whole(
    launch: Launcher, broker: BrokerProcess
) -> None:
    launch.worker(broker, concurrency=2, allow_pickle=True)
    client = launch.client(broker, allow_pickle=True)
    sent = payloads(30, size=70_000)

    mapped = list(client.map(ECHO, sent, chunksize=3))  # 210 KB a batch
    assert mapped == sent
    assert written_to(broker)

    pickled = client.submit(lambda blob: blob[::-1], sent[0])
    assert pickled.result(RESULT_TIMEOUT_S) == sent[0][::-1]


PAUSED_CLIENT = """
import json, sys, ventilator
client = ventilator.Client(sys.argv[1], session="paused", heartbeat_interval_s=0.1)
def echoed(first):
    sent = [bytes([i]) * 100_000 for i in first]
    futures = [client.submit(sys.argv[2], payload) for payload in sent]
    return [f.result(timeout=30) == payload for f, payload in zip(futures, sent)]
print(json.dumps(echoed(range(4))), flush=True)
sys.stdin.readline()  # paused and resumed meanwhile
print(json.dumps(echoed(range(4, 8))), flush=True)
client.close()
"""


def test_a_client_paused_past_its_silence_gets_new_shared_memory_and_goes_on(
    launch: Launcher, processes: Processes
) -> None:
    # The broker takes it for gone and drops its arena; resumed, it carries
    # on, on the same connection, and every large task was refused (tester 27).
    broker = launch.broker(heartbeat_interval_s=FAST_HEARTBEAT_S)
    launch.worker(broker)
    argv = [sys.executable, "-c", PAUSED_CLIENT, broker.frontend, ECHO]
    paused_client = processes.start("client", argv, stdin=-1, stdout=-1)
    assert read_json_line(paused_client, 20) == [True] * 4
    watcher = launch.client(broker, shared_memory=False)

    with paused(paused_client.pid):
        status_when(watcher, lambda s: not connected(s, "paused"), 10, "given up")
    assert paused_client.stdin is not None
    paused_client.stdin.write(b"go\n")
    paused_client.stdin.flush()

    assert read_json_line(paused_client, 30) == [True] * 4


def connected(status: dict[str, Any], session: str) -> bool:
    return any(c["name"] == session and c["connected"] for c in status["clients"])

"""Large payloads through shared memory (`_shared`): probes, arenas, references,
and the scheduler's copies of a departed client's payloads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ventilator import _arenas, _shared
from ventilator import protocol as p
from ventilator._arenas import Arenas, probe_matches
from ventilator._shared import (
    ArenaWriter,
    ClientShare,
    Probe,
    SharedPayloadGone,
    SharedReader,
)
from ventilator.disk_budget import DiskBudget
from ventilator.errors import TaskError
from ventilator.policy import Limits
from ventilator.serialization import pack_error

from .driver import (
    CLIENT,
    FUNCTION,
    Driver,
    accepted,
    assignments,
    error_report,
    results,
    task,
)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(_shared.SHM_ROOT), reason="no shared memory on this machine"
)

WORKER = b"worker-1"
MIB = 1024 * 1024


@pytest.fixture
def arenas() -> Iterator[Arenas]:
    made = Arenas(enabled=True, max_arena_bytes=64 * MIB, worker_peers=set)
    yield made
    made.close()


def welcomed(arenas: Arenas, peer: bytes = CLIENT, size: int = 2 * MIB) -> str:
    """Have `peer` prove it shares our memory and be welcomed with an arena."""
    probe = Probe.create()
    assert probe is not None
    arenas.hello(peer, p.SharedAsk(probe.path, probe.token, size))
    welcome = arenas.welcome(peer, p.Welcome(10, 100, 1.0, False))
    assert welcome.arena is not None
    return welcome.arena


def shared_spec(task_id: int, reference: bytes) -> p.TaskSpec:
    return p.TaskSpec(task_id, FUNCTION, reference, int(p.Flags.SHARED))


def written(arenas: Arenas, writer: ArenaWriter, task_id: int, payload: bytes) -> bytes:
    """Write `payload` as the client would, and return the reference the
    broker passes on for it (naming the arena)."""
    reference = writer.put(task_id, payload)
    assert reference is not None
    resolved = arenas.resolve(
        CLIENT, p.Submit([shared_spec(task_id, reference)]), reject
    )
    assert resolved is not None
    return bytes(resolved.tasks[0].payload)


# --- extents ------------------------------------------------------------------


def test_extents_given_back_merge_with_their_neighbours() -> None:
    extents = _shared._Extents(1000)
    first, second, third = extents.take(100), extents.take(100), extents.take(100)
    assert (first, second, third) == (0, 100, 200)

    extents.give(0, 100)
    extents.give(200, 100)  # merges with the free tail
    extents.give(100, 100)  # joins both sides: one range again

    assert extents.take(1000) == 0


def test_extents_take_nothing_too_large_for_any_free_range() -> None:
    extents = _shared._Extents(300)
    extents.take(100)
    middle = extents.take(100)
    extents.take(100)
    assert middle is not None
    extents.give(middle, 100)

    assert extents.take(101) is None
    assert extents.take(100) == middle


# --- probes -------------------------------------------------------------------


def test_a_probe_matches_its_own_token_once_and_is_removed() -> None:
    probe = Probe.create()
    assert probe is not None

    assert probe_matches(probe.path, probe.token)
    assert not os.path.exists(probe.path)
    assert not probe_matches(probe.path, probe.token)


def test_a_probe_with_another_token_does_not_match() -> None:
    probe = Probe.create()
    assert probe is not None
    try:
        assert not probe_matches(probe.path, "0" * 32)
    finally:
        probe.remove()


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        os.path.join(_shared.SHM_ROOT, "not-a-probe"),
        os.path.join(_shared.SHM_ROOT, "sub", "ventilator-probe-1-" + "a" * 32),
    ],
)
def test_a_path_that_is_not_a_probe_is_not_opened(path: str) -> None:
    assert not probe_matches(path, "x")


def test_a_fifo_named_as_a_probe_does_not_block_the_broker() -> None:
    name = f"ventilator-probe-{os.getpid()}-{'b' * 32}"
    path = os.path.join(_shared.SHM_ROOT, name)
    os.mkfifo(path, 0o600)
    try:
        assert not probe_matches(path, "x" * 32)  # returns: no writer needed
    finally:
        os.unlink(path)


def test_a_link_named_as_a_probe_is_not_followed() -> None:
    probe = Probe.create()
    assert probe is not None
    link = os.path.join(_shared.SHM_ROOT, f"ventilator-probe-{os.getpid()}-{'c' * 32}")
    os.symlink(probe.path, link)
    try:
        assert not probe_matches(link, probe.token)
    finally:
        os.unlink(link)
        probe.remove()


# --- writing and reading ------------------------------------------------------


def test_a_payload_written_by_a_client_reads_whole_where_the_broker_names_it(
    arenas: Arenas,
) -> None:
    path = welcomed(arenas)
    writer = ArenaWriter(path)
    payload = os.urandom(100_000)

    reference = written(arenas, writer, 7, payload)

    assert SharedReader().decode(reference, bytes) == payload
    assert arenas.materialize(reference) == payload
    writer.close()


def test_a_reference_to_a_freed_extent_is_stale_even_once_the_extent_is_reused(
    arenas: Arenas,
) -> None:
    writer = ArenaWriter(welcomed(arenas))
    reference = written(arenas, writer, 1, b"a" * 70_000)

    writer.free(1)
    assert writer.put(2, b"b" * 70_000) is not None  # the same extent, reused

    with pytest.raises(SharedPayloadGone, match="its client freed it"):
        SharedReader().decode(reference, bytes)
    assert arenas.materialize(reference) is None
    writer.close()


def test_the_same_task_written_again_gets_the_same_reference(arenas: Arenas) -> None:
    writer = ArenaWriter(welcomed(arenas))

    assert writer.put(1, b"x" * 70_000) == writer.put(1, b"x" * 70_000)
    writer.close()


def test_a_full_arena_frees_the_extents_of_ended_tasks_before_giving_up(
    arenas: Arenas,
) -> None:
    share = ClientShare(arena_bytes=0)  # the smallest arena: 1 MiB
    probe_ask = share.ask()
    assert probe_ask is not None
    arenas.hello(CLIENT, probe_ask)
    share.welcomed(arenas.welcome(CLIENT, p.Welcome(10, 100, 1.0, False)).arena)
    payload = b"x" * 300_000
    unfinished = {1, 2, 3}

    sent = [
        share.on_wire(p.TaskSpec(i, FUNCTION, payload), unfinished.__contains__)
        for i in (1, 2, 3)
    ]
    assert all(spec.flags & p.Flags.SHARED for spec in sent)
    fourth = share.on_wire(p.TaskSpec(4, FUNCTION, payload), unfinished.__contains__)
    assert not fourth.flags & p.Flags.SHARED  # no room: sent in its frame

    unfinished.discard(2)  # cancelled, say: its extent is free for the next
    fifth = share.on_wire(p.TaskSpec(5, FUNCTION, payload), unfinished.__contains__)
    assert fifth.flags & p.Flags.SHARED
    share.close()


def test_small_payloads_and_sink_tasks_travel_in_frames(arenas: Arenas) -> None:
    share = ClientShare(arena_bytes=MIB)
    ask = share.ask()
    assert ask is not None
    arenas.hello(CLIENT, ask)
    share.welcomed(arenas.welcome(CLIENT, p.Welcome(10, 100, 1.0, False)).arena)
    big = b"x" * _shared.SHARED_MIN_BYTES

    small = share.on_wire(p.TaskSpec(1, FUNCTION, b"tiny"), lambda _: True)
    to_sink = share.on_wire(p.TaskSpec(2, FUNCTION, big, sink="s"), lambda _: True)

    assert small.payload == b"tiny" and not small.flags
    assert to_sink.payload == big and not to_sink.flags
    share.close()


def test_a_disabled_client_asks_for_nothing() -> None:
    assert ClientShare(MIB, enabled=False).ask() is None


# --- the broker's checks ------------------------------------------------------

refused: list[tuple[bytes, int, str]] = []


def reject(peer: bytes, task_id: int, reason: str, kind: str) -> None:
    refused.append((peer, task_id, f"{kind}: {reason}"))


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        (b"short", "must be 24 bytes"),
        (p.SHARED_REFERENCE.pack(0, 10, 0), "outside"),
        (p.SHARED_REFERENCE.pack(2 * MIB, 10, 1), "outside"),
        (p.SHARED_REFERENCE.pack(0, 10, 99), "is not generation 99"),
    ],
)
def test_a_bad_reference_refuses_its_task_alone(
    arenas: Arenas, reference: bytes, words: str
) -> None:
    welcomed(arenas)
    refused.clear()
    good = p.TaskSpec(2, FUNCTION, b"inline")

    resolved = arenas.resolve(
        CLIENT, p.Submit([shared_spec(1, reference), good]), reject
    )

    assert resolved is not None and list(resolved.tasks) == [good]
    assert [(task_id, words in reason) for _, task_id, reason in refused] == [(1, True)]


def test_a_reference_from_a_connection_without_an_arena_is_refused(
    arenas: Arenas,
) -> None:
    refused.clear()
    reference = p.SHARED_REFERENCE.pack(0, 10, 1)

    assert arenas.resolve(CLIENT, p.Submit([shared_spec(1, reference)]), reject) is None
    assert refused[0][2].startswith(f"{p.SHARED_MEMORY_GONE}: ")
    assert "no arena" in refused[0][2]


def test_a_client_whose_probe_fails_gets_no_arena(arenas: Arenas) -> None:
    arenas.hello(
        CLIENT, p.SharedAsk("/dev/shm/ventilator-probe-1-" + "d" * 32, "t", MIB)
    )

    assert arenas.welcome(CLIENT, p.Welcome(10, 100, 1.0, False)).arena is None


def test_a_worker_that_shares_gets_references_and_another_the_bytes(
    arenas: Arenas,
) -> None:
    writer = ArenaWriter(welcomed(arenas))
    reference = written(arenas, writer, 1, b"y" * 70_000)
    assignment = p.Assignment(5, 1, FUNCTION, reference, int(p.Flags.SHARED))
    probe = Probe.create()
    assert probe is not None
    arenas.ready(WORKER, p.SharedAsk(probe.path, probe.token))

    local = arenas.for_worker(WORKER, p.Tasks([assignment])).tasks[0]
    remote = arenas.for_worker(b"elsewhere", p.Tasks([assignment])).tasks[0]

    assert local.flags & p.Flags.SHARED and local.payload == assignment.payload
    assert remote.payload == b"y" * 70_000 and not remote.flags & p.Flags.SHARED
    writer.close()


def test_a_dropped_arena_whose_tasks_are_not_running_goes_at_once(
    arenas: Arenas,
) -> None:
    # Its queued tasks have copies: nothing reads it any more.
    path = welcomed(arenas)

    arenas.drop(CLIENT)

    assert not os.path.exists(path)


def test_a_dropped_arena_stays_while_a_task_sent_a_reference_into_it_runs(
    arenas: Arenas,
) -> None:
    # A task process reads the payload as it starts the task, which may wait
    # in its pipe behind a long one.
    path = welcomed(arenas)
    running = {(7, 1)}

    arenas.drop(CLIENT, running=[(7, 1)])
    arenas.tick(runs=lambda *attempt: attempt in running)
    assert os.path.exists(path)
    running.clear()  # it ended, or runs again as another attempt with a copy
    arenas.tick(runs=lambda *attempt: attempt in running)

    assert not os.path.exists(path)


def test_closing_removes_the_broker_s_folder() -> None:
    arenas = Arenas(enabled=True, max_arena_bytes=64 * MIB, worker_peers=set)
    folder = os.path.dirname(welcomed(arenas))

    arenas.close()

    assert not os.path.exists(folder)


def test_a_disabled_broker_offers_no_arena() -> None:
    arenas = Arenas(enabled=False, max_arena_bytes=64 * MIB, worker_peers=set)
    probe = Probe.create()
    assert probe is not None
    try:
        arenas.hello(CLIENT, p.SharedAsk(probe.path, probe.token, MIB))
        assert arenas.welcome(CLIENT, p.Welcome(10, 100, 1.0, False)).arena is None
    finally:
        probe.remove()


def test_what_a_process_killed_outright_left_is_swept(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(gone.stdout)
    folder = Path(_shared.SHM_ROOT) / f"ventilator-{pid}-{'e' * 16}"
    folder.mkdir()
    (folder / "1.arena").write_bytes(b"x")
    probe = Path(_shared.SHM_ROOT) / f"ventilator-probe-{pid}-{'f' * 32}"
    probe.write_bytes(b"x")
    ours = Probe.create()
    assert ours is not None

    assert _arenas.sweep_stale() >= 2

    assert not folder.exists() and not probe.exists()
    assert os.path.exists(ours.path)  # a live process's is kept
    ours.remove()


# --- the scheduler's copies ---------------------------------------------------


ARENA = b"/dev/shm/ventilator-1-0000000000000000/1.arena"


def shared_task(task_id: int) -> p.TaskSpec:
    """A task whose 100,000-byte payload lies in ARENA, as the shell passes
    it on: the client's reference, then the arena's path."""
    reference = p.SHARED_REFERENCE.pack(0, 100_000, 1) + ARENA
    return task(task_id, reference, flags=int(p.Flags.SHARED))


def with_shared_task() -> tuple[Driver, p.TaskSpec]:
    """A scheduler holding one shared task (see shared_task)."""
    driver = Driver(durable=False)
    driver.hello()
    spec = shared_task(1)
    driver.submit(spec)
    return driver, spec


def test_a_departed_client_s_unfinished_tasks_get_copies_of_their_payloads() -> None:
    driver, _ = with_shared_task()

    running = driver.scheduler.unshare(ARENA, lambda reference: b"the payload")
    driver.flush()  # the invariants hold: its bytes are counted anew

    assert running == []  # it was queued: no worker holds its reference
    driver.ready(WORKER)
    [assignment] = assignments(driver.flush(), WORKER) or assignments(
        driver.ready(WORKER), WORKER
    )
    assert assignment.payload == b"the payload"
    assert not assignment.flags & p.Flags.SHARED


def test_a_finished_task_s_payload_is_not_copied() -> None:
    driver, _ = with_shared_task()
    [assignment] = assignments(driver.ready(WORKER), WORKER)
    effects = driver.done(WORKER, assignment)
    assert [r.task_id for r in results(effects)] == [1]

    assert driver.scheduler.unshare(ARENA, lambda reference: b"copy") == []
    assert ARENA not in driver.scheduler._shared


def test_a_client_that_leaves_is_named_for_its_arena_to_go() -> None:
    driver = Driver(durable=False)
    driver.hello()

    effects = driver.client(CLIENT, p.Bye())

    assert CLIENT in effects.departed


def test_a_failed_shared_task_is_not_kept_for_a_retry() -> None:
    driver, _ = with_shared_task()
    [assignment] = assignments(driver.ready(WORKER), WORKER)

    driver.done(WORKER, assignment, p.Status.RAISED, b"\x80")

    [record] = driver.scheduler.failed
    assert record.payload is None


def test_a_full_shared_memory_sends_payloads_in_frames_instead_of_crashing(
    arenas: Arenas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write into a sparse tmpfs page that cannot be backed is a SIGBUS.
    writer = ArenaWriter(welcomed(arenas))

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    assert writer.put(1, b"x" * 70_000) is None
    monkeypatch.undo()

    assert writer.put(1, b"x" * 70_000) is not None  # the extent was given back
    writer.close()


def test_a_payload_that_cannot_be_copied_keeps_its_reference() -> None:
    driver, spec = with_shared_task()

    assert driver.scheduler.unshare(ARENA, lambda reference: None) == []
    driver.flush()  # still listed under its arena: the invariants hold

    [assignment] = assignments(driver.ready(WORKER), WORKER)
    assert assignment.payload == spec.payload


def test_the_running_attempts_of_a_departed_client_s_tasks_are_named() -> None:
    driver, _ = with_shared_task()
    [assignment] = assignments(driver.ready(WORKER), WORKER)

    running = driver.scheduler.unshare(ARENA, lambda reference: b"copy")

    assert running == [(assignment.ticket, assignment.attempt)]
    assert driver.scheduler.runs(assignment.ticket, assignment.attempt)
    driver.done(WORKER, assignment)
    assert not driver.scheduler.runs(assignment.ticket, assignment.attempt)


def test_a_removed_arena_frees_its_memory_though_a_reader_keeps_it_mapped(
    arenas: Arenas,
) -> None:
    writer = ArenaWriter(welcomed(arenas))
    reference = written(arenas, writer, 1, os.urandom(500_000))
    reader = SharedReader()
    reader.decode(reference, bytes)  # a task process now keeps the arena mapped
    held = os.open(writer.path, os.O_RDONLY)  # to look at the file once unlinked
    writer.close()

    arenas.drop(CLIENT)

    assert os.fstat(held).st_blocks == 0
    with pytest.raises(SharedPayloadGone):
        reader.decode(reference, bytes)
    os.close(held)
    reader.close()


def test_a_shared_payload_is_held_to_the_limits_by_the_size_it_stands_for() -> None:
    driver = Driver(Limits(max_payload_bytes=50_000), durable=False)
    driver.hello()

    effects = driver.submit(shared_task(1))

    [refused] = results(effects)
    assert (
        "payload of 100000 bytes is over the limit" in error_report(refused)["message"]
    )


def test_a_shared_payload_spends_the_disk_budget_it_will_take_in_the_journal() -> None:
    driver, _ = with_shared_task()
    driver.scheduler.disk_budget = DiskBudget.after_look(free=150_000, reserve=0)

    driver.submit(shared_task(2))  # 100,000 bytes of the 150,000
    effects = driver.submit(shared_task(3))

    [refused] = results(effects)
    assert refused.task_id == 3 and refused.status is p.Status.REJECTED


def test_shared_payloads_count_against_a_client_s_bytes_by_their_size() -> None:
    # A raw peer sent ten references to one 5 MiB extent past a 20 MB limit,
    # and the broker copied out 50 MiB once it left (tester 27).
    driver = Driver(Limits(client_max_bytes=250_000), durable=False)
    driver.hello()

    effects = driver.submit(shared_task(1), shared_task(2), shared_task(3))

    assert accepted(effects) == [1, 2]
    assert driver.scheduler._held_bytes["alice"] == 200_000


def test_a_payload_freed_while_it_is_decoded_is_gone_not_decoded(
    arenas: Arenas,
) -> None:
    writer = ArenaWriter(welcomed(arenas))
    reference = written(arenas, writer, 1, b"z" * 70_000)
    reader = SharedReader()

    def decode_while_freed(view: memoryview) -> bytes:
        writer.free(1)  # its client reused it meanwhile
        return bytes(view)

    with pytest.raises(SharedPayloadGone, match="its client freed it"):
        reader.decode(reference, decode_while_freed)
    reader.close()  # no view of the arena is left out
    writer.close()


def test_a_zombie_s_leftovers_are_swept_as_a_dead_process_s() -> None:
    # A broker killed outright stays a zombie until reaped: one restarted
    # meanwhile took its folder for a live broker's (tester 28).
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    folder = Path(_shared.SHM_ROOT) / f"ventilator-{zombie.pid}-{'a' * 16}"
    folder.mkdir()
    try:
        wait_until_zombie(zombie.pid)

        assert not _arenas._alive(zombie.pid)
        assert _arenas.sweep_stale() >= 1
        assert not folder.exists()
    finally:
        zombie.wait()
        if folder.exists():
            folder.rmdir()


def wait_until_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z":
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.01)


def test_tasks_waiting_for_room_get_copies_of_a_departed_client_s_payloads() -> None:
    # A raw peer past its window, then silent: its waiting tasks were
    # accepted later with references into a removed arena (tester 28).
    driver = Driver(Limits(client_max_bytes=150_000), durable=False)
    driver.hello()
    effects = driver.submit(shared_task(1), shared_task(2))
    assert accepted(effects) == [1]  # 2 waits for room

    driver.scheduler.unshare(ARENA, lambda reference: b"w" * 100_000)
    driver.flush()
    [first] = assignments(driver.ready(WORKER), WORKER)
    [second] = assignments(driver.done(WORKER, first), WORKER)  # room for it now

    assert second.payload == b"w" * 100_000
    assert not second.flags & p.Flags.SHARED


def test_a_reference_refused_for_a_dropped_arena_is_no_refusal_to_count() -> None:
    # Our client sends the task again, unseen by its caller.
    driver = Driver(durable=False)
    driver.hello()

    driver.scheduler.reject(CLIENT, 1, "no arena", p.SHARED_MEMORY_GONE)
    effects = driver.flush()

    [refused] = results(effects)
    assert error_report(refused)["type"] == p.SHARED_MEMORY_GONE
    assert driver.scheduler.rejected == 0
    assert not effects.notices


def gone(assignment: p.Assignment) -> p.Outcome:
    """The outcome of a task process that could not read its payload."""
    report = pack_error(TaskError(p.PAYLOAD_GONE, "arena x is gone"))
    return p.Outcome(assignment.ticket, assignment.attempt, p.Status.CRASHED, report)


def test_a_task_whose_arena_went_under_it_runs_again_with_the_copy_unblamed() -> None:
    driver, _ = with_shared_task()
    [sent] = assignments(driver.ready(WORKER), WORKER)
    driver.scheduler.unshare(ARENA, lambda reference: b"the copy")  # client left

    effects = driver.worker(WORKER, p.Done([gone(sent)]))

    [again] = assignments(effects, WORKER)
    assert again.payload == b"the copy" and again.attempt == sent.attempt + 1
    assert driver.scheduler.tasks[again.ticket].deaths == 0


def test_a_payload_that_stays_unreadable_ends_as_poison_saying_so() -> None:
    driver, _ = with_shared_task()
    effects = driver.ready(WORKER)

    for _ in range(3):  # max_attempts
        [sent] = assignments(effects, WORKER)
        effects = driver.worker(WORKER, p.Done([gone(sent)]))

    [poisoned] = results(effects)
    assert poisoned.status is p.Status.POISON
    assert (
        "its payload could not be read (arena x is gone)"
        in (error_report(poisoned)["message"])
    )

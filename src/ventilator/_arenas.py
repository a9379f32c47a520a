"""Shared memory, the broker's side: one arena per sharing client connection.

See `_shared` for what travels how, and why. Here the broker checks probes
(`probe_matches`), makes and drops arenas, checks the references its clients
send against their own arena, copies payloads out of an arena for a worker that
does not share, for the journal, or for a client that left (`materialize`),
and removes what processes killed outright left (`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import _shared as sh
from . import protocol as p

__all__ = ["Arenas", "probe_matches", "sweep_stale"]

log = logging.getLogger(__name__)


def probe_matches(path: str, token: str) -> bool:
    """Whether `path` is a probe holding `token`, written by this user: then
    its writer shares this process's memory. Removes the probe once read.

    A peer's word: the path must be a probe's name directly under SHM_ROOT,
    is opened without following links or waiting on a FIFO, and is read only
    if it is a small regular file of ours.
    """
    folder, name = os.path.split(path)
    if folder != sh.SHM_ROOT or not sh.PROBE_NAME.fullmatch(name):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        expected = token.encode()
        if not sh.own_regular_file(info) or info.st_size != len(expected):
            return False
        matches = os.read(fd, len(expected)) == expected
    finally:
        os.close(fd)
    if matches:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return matches


# --- the broker's side: one arena per sharing client connection --------------------


@dataclass
class _Arena:
    path: str
    key: bytes  # the path as references carry it
    mapping: mmap.mmap
    # Once dropped: the attempts (ticket, attempt) that were sent references
    # into it and may not have read them yet.
    readers: list[tuple[int, int]] = field(default_factory=list)


class Arenas:
    """The broker's arenas, the peers that share its memory, and the
    references they exchange. Used by the broker's loop only.

    `enabled` is False with a durable journal, or when asked to: then no
    client is offered an arena, and references are refused.
    """

    def __init__(
        self,
        enabled: bool,
        max_arena_bytes: int,
        worker_peers: Callable[[], set[bytes]] = set,
    ) -> None:
        self.enabled = enabled and os.path.isdir(sh.SHM_ROOT)
        # The connections of the registered workers (the scheduler's).
        self._worker_peers = worker_peers
        self._max_arena_bytes = min(sh.MAX_ARENA_BYTES, max_arena_bytes)
        self._folder: str | None = None
        self._made = 0
        # Client connections whose probe matched, and the arena size each may
        # have; then those that have one.
        self._asked: dict[bytes, int] = {}
        self._of_peer: dict[bytes, _Arena] = {}
        self._of_key: dict[bytes, _Arena] = {}
        self._local_workers: set[bytes] = set()
        # Dropped arenas whose readers have not all ended (see drop).
        self._lingering: list[_Arena] = []

    # --- who shares -------------------------------------------------------

    def hello(self, peer: bytes, shared: p.SharedAsk | None) -> None:
        """A client's HELLO: note whether it may have an arena."""
        if peer in self._of_peer:
            return  # a HELLO again on the same connection keeps its arena
        size = min(self._max_arena_bytes, shared.arena_bytes) if shared else 0
        if (
            self.enabled
            and shared
            and size >= sh.MIN_ARENA_BYTES
            and probe_matches(shared.probe_path, shared.token)
        ):
            self._asked[peer] = size
            return
        self._asked.pop(peer, None)

    def ready(self, peer: bytes, shared: p.SharedAsk | None) -> bool:
        """A worker's READY: note, and return, whether it reads references."""
        matched = bool(
            self.enabled and shared and probe_matches(shared.probe_path, shared.token)
        )
        if matched:
            self._local_workers.add(peer)
        else:
            self._local_workers.discard(peer)
        # Connections of workers gone are forgotten once they outnumber the
        # live ones, not looked for at each departure.
        if len(self._local_workers) > 2 * len(self._worker_peers()) + 16:
            self._local_workers &= self._worker_peers()
        return matched

    def welcome(self, peer: bytes, welcome: p.Welcome) -> p.Welcome:
        """The WELCOME for `peer`, naming its arena if it may have one."""
        arena = self._of_peer.get(peer)
        if arena is None and peer in self._asked:
            arena = self._make(peer, self._asked.pop(peer))
        if arena is None:
            return welcome
        return p.Welcome(
            welcome.window,
            welcome.max_payload_bytes,
            welcome.heartbeat_interval_s,
            welcome.durable,
            welcome.client_max_bytes,
            arena.path,
        )

    def _make(self, peer: bytes, size: int) -> _Arena | None:
        try:
            folder = self._own_folder()
            self._made += 1
            path = os.path.join(folder, f"{self._made}.arena")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)  # sparse: memory is taken as it is written
                mapping = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "cannot make an arena of shared memory for a client peer=%s: %s; "
                "its payloads travel in frames",
                peer.hex(),
                exc,
            )
            return None
        arena = _Arena(path, path.encode(), mapping)
        self._of_peer[peer] = self._of_key[arena.key] = arena
        log.debug("arena made peer=%s path=%s bytes=%d", peer.hex(), path, size)
        return arena

    def _own_folder(self) -> str:
        if self._folder is None:
            name = f"ventilator-{os.getpid()}-{secrets.token_hex(8)}"
            folder = os.path.join(sh.SHM_ROOT, name)
            os.mkdir(folder, 0o700)
            self._folder = folder
        return self._folder

    # --- references ---------------------------------------------------------

    def resolve(
        self,
        peer: bytes,
        submit: p.Submit,
        reject: Callable[[bytes, int, str, str], None],
    ) -> p.Submit | None:
        """`submit` with each shared payload's reference checked against the
        sender's arena and naming it; a task whose reference is bad is
        refused through `reject`, alone. None when no task is left."""
        if not any(spec.flags & sh.SHARED_FLAG for spec in submit.tasks):
            return submit
        arena = self._of_peer.get(peer)
        kept = []
        for spec in submit.tasks:
            if not spec.flags & sh.SHARED_FLAG:
                kept.append(spec)
                continue
            if arena is None:
                reject(peer, spec.task_id, _NO_ARENA, p.SHARED_MEMORY_GONE)
                continue
            problem = _reference_problem(arena, spec.payload)
            if problem is not None:
                reject(peer, spec.task_id, problem, "TaskRejected")
                continue
            payload = bytes(spec.payload) + arena.key
            kept.append(sh.with_payload(spec, payload))
        return p.Submit(kept) if kept else None

    def for_worker(self, peer: bytes, tasks: p.Tasks) -> p.Tasks:
        """`tasks` as `peer` can take them: references for a worker that
        shares our memory, the bytes themselves for another."""
        if peer in self._local_workers:
            return tasks
        if not any(task.flags & sh.SHARED_FLAG for task in tasks.tasks):
            return tasks
        return p.Tasks([self._readable(task) for task in tasks.tasks])

    def _readable(self, task: p.Assignment) -> p.Assignment:
        if not task.flags & sh.SHARED_FLAG:
            return task
        payload = self.materialize(task.payload)
        if payload is None:
            return task  # the worker reports it cannot read it; see materialize
        return p.Assignment(
            task.ticket,
            task.attempt,
            task.function,
            payload,
            task.flags & ~sh.SHARED_FLAG,
            task.timeout_s,
        )

    def materialize(self, reference: p.Payload) -> bytes | None:
        """A copy of the payload `reference` points to, read from our own
        mapping; None (and a warning) when it cannot be read, which only a
        client that freed an extent its task still needed causes."""
        try:
            offset, length, generation, path = sh.parse_reference(reference)
            arena = self._of_key.get(path.encode())
            if arena is None:
                raise sh.SharedPayloadGone(f"arena {path} is not one of ours")
            return sh.decode_extent(
                arena.mapping, offset, length, generation, path, bytes
            )
        except sh.SharedPayloadGone as exc:
            log.warning("a shared payload cannot be read: %s", exc)
            return None

    # --- lifetimes ----------------------------------------------------------

    def arena_of(self, peer: bytes) -> bytes | None:
        """The key of `peer`'s arena, for the scheduler to copy its tasks'
        payloads out (`Scheduler.unshare`) before `drop`."""
        arena = self._of_peer.get(peer)
        return None if arena is None else arena.key

    def drop(self, peer: bytes, running: Sequence[tuple[int, int]] = ()) -> None:
        """`peer` is gone, and its tasks have copies of their payloads: its
        arena goes now, or once the `running` attempts (ticket, attempt),
        whose workers were sent references into it, have ended. A task
        process reads one only as it starts the task, which may wait in its
        pipe behind a long one."""
        self._asked.pop(peer, None)
        arena = self._of_peer.pop(peer, None)
        if arena is None:
            return
        if running:
            arena.readers = list(running)
            self._lingering.append(arena)
        else:
            self._remove(arena)

    def tick(self, runs: Callable[[int, int], bool]) -> None:
        """Remove the dropped arenas whose readers have all ended (`runs`
        says whether an attempt still runs)."""
        kept = []
        for arena in self._lingering:
            arena.readers = [reader for reader in arena.readers if runs(*reader)]
            if arena.readers:
                kept.append(arena)
            else:
                self._remove(arena)
        self._lingering = kept

    def _remove(self, arena: _Arena) -> None:
        self._of_key.pop(arena.key, None)
        # Its memory goes now, not when the last task process that mapped it
        # lets go: a worker's task processes keep the arenas they read from
        # mapped (SharedReader), and would hold the memory of every client
        # that came and went. A late reader finds zeros, not a payload: its
        # stamp check fails.
        with contextlib.suppress(OSError, ValueError):
            arena.mapping.madvise(mmap.MADV_REMOVE)
        with contextlib.suppress(OSError):
            os.unlink(arena.path)
        with contextlib.suppress(BufferError):
            arena.mapping.close()

    def close(self) -> None:
        """Remove every arena and the broker's folder."""
        for arena in list(self._of_key.values()):
            self._remove(arena)
        self._of_peer.clear()
        self._lingering.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


_NO_ARENA = (
    "its payload was sent by reference to shared memory, but this connection "
    "has no arena (it was not offered one, or went silent and lost it); our "
    "clients say HELLO again and send it again"
)


def _reference_problem(arena: _Arena, reference: p.Payload) -> str | None:
    """Why a client's reference cannot stand for its task's payload."""
    if len(reference) != sh.REFERENCE.size:
        return (
            f"a shared payload reference must be {sh.REFERENCE.size} bytes "
            f"(offset, length, generation), got {len(reference)}"
        )
    offset, length, generation = sh.REFERENCE.unpack_from(bytes(reference))
    try:
        sh.check_stamp(arena.mapping, offset, length, generation, arena.path)
    except sh.SharedPayloadGone as exc:
        return f"its shared payload cannot be read: {exc}"
    return None


def sweep_stale() -> int:
    """Remove what brokers and peers of this user killed outright left under
    SHM_ROOT: arena folders and probes whose process is gone. Returns how
    many were removed."""
    try:
        names = os.listdir(sh.SHM_ROOT)
    except OSError:
        return 0
    removed = 0
    for name in names:
        found = sh.FOLDER_NAME.fullmatch(name) or sh.PROBE_NAME.fullmatch(name)
        if found is None or _alive(int(found.group(1))):
            continue
        path = os.path.join(sh.SHM_ROOT, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            continue  # another broker swept it first
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: not gone, and not a zombie (a broker killed
    outright stays one until its parent reaps it, seconds when that is init,
    and a broker restarted meanwhile took its folder for a live one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: kill(0) has the last word
    return state != b"Z"

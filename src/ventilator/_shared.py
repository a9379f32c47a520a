"""Large payloads through shared memory, between processes of one machine.

A 100 KiB argument sent to a broker on the same machine crosses two TCP
connections, and each costs its bytes twice in the kernel and once more in
each libzmq I/O thread: more CPU than all of ventilator's own work per task.
A client and the workers that share the broker's memory skip that: the client
writes the payload once into a file in memory (tmpfs) and sends a 24-byte
reference; the worker reads it from there. The broker never touches the bytes
unless someone who cannot read them needs them.

Who shares: a client (HELLO) or a worker (READY) writes a probe, a file under
`SHM_ROOT` holding a random token, and names both; the broker reads it back
(`_arenas.probe_matches`). Only a peer of the same user, on the same machine and
mount namespace, can have written it. A remote peer, an older one, or one in
a container with its own /dev/shm simply does not share, and every payload it
sends or receives travels in frames as before.

Arenas (the broker's side is `_arenas`): each sharing client connection gets one
file in the broker's own folder (mode 0700), as large as the client asks
within the broker's per-client byte limit, named in its WELCOME. The client
(`ArenaWriter`) writes each large payload into a free extent of it, behind an
8-byte generation stamp, and submits `Flags.SHARED` with a reference
(offset, length, generation). The broker checks the reference against the
connection's arena and appends the arena's path, so a task's reference names
its file wherever it goes. A worker that shares gets the reference, and its
task process reads the bytes (`read_payload`), checking the stamp before and
after; a worker that does not gets the bytes, read from the broker's own
mapping. A client's large bytes arguments reach the arena with one copy
(`serialization.Pieces`).

Lifetimes. The client frees an extent when its task ends for it (a result, a
cancel, a failure): a stale reference to a reused extent fails its stamp check
instead of reading another task's bytes. When the connection goes (BYE,
silence, replaced), the broker copies the payloads of that arena's unfinished
tasks into its own memory (`Arenas.materialize`), so they no longer depend on the
file, and removes the file once the attempts that were sent references into it
have ended (at once if none was): a task process reads one as it starts the
task, which may have waited in its pipe. The broker's folder goes when
the broker stops; one left by a broker killed outright is removed by the next
broker to start on the machine (`_arenas.sweep_stale`).

With a durable journal, the journal reads a shared payload's bytes into its
segment as the task is accepted (`SqliteJournal(read_shared=...)`): a
broker restarted after a crash has no arenas, and loads the bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from . import protocol as p
from .serialization import Pieces

__all__ = [
    "SHARED_MIN_BYTES",
    "ArenaWriter",
    "ClientShare",
    "Probe",
    "SharedPayloadGone",
    "SharedReader",
    "WorkerShare",
    "read_payload",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Where shared files live: a tmpfs on every Linux; no sharing without it.
SHM_ROOT = "/dev/shm"
# Payloads at least this large go through an arena: below it a frame costs
# less than the file's bookkeeping (pyzmq's own zero-copy threshold).
SHARED_MIN_BYTES = p.ZERO_COPY_BYTES
# An arena is as large as its client's byte window, within these bounds.
MIN_ARENA_BYTES = 1024 * 1024
MAX_ARENA_BYTES = 256 * 1024 * 1024
# Extents start on cache lines, so that two payloads never share one.
_ALIGN = 64
# An extent: the generation stamp, then the payload.
_STAMP = struct.Struct("<Q")
# madvise(2)'s advice to fault a range's pages in, writable, in one call
# (Linux 5.14); Python's mmap module does not name it. Arenas live in
# /dev/shm, so only on Linux.
_MADV_POPULATE_WRITE = 23
# What a client sends for a shared payload: offset, length, generation. The
# broker appends the arena's path for the workers.
REFERENCE = p.SHARED_REFERENCE
PROBE_NAME = re.compile(r"ventilator-probe-(\d+)-[0-9a-f]{32}")
FOLDER_NAME = re.compile(r"ventilator-(\d+)-[0-9a-f]{16}")
_ARENA_PATH = re.compile(
    re.escape(SHM_ROOT) + r"/ventilator-\d+-[0-9a-f]{16}/\d+\.arena"
)
# Arenas a worker keeps mapped at once: one per sharing client connection.
_MAPPINGS_KEPT = 64
SHARED_FLAG = int(p.Flags.SHARED)


class SharedPayloadGone(Exception):
    """A shared payload cannot be read: its arena is gone, or its extent was
    reused (the reference is stale). The message says which."""


# --- probes: does a peer share the broker's memory? ----------------------------


@dataclass(frozen=True)
class Probe:
    """A peer's proof that it can write where the broker reads: a file under
    `SHM_ROOT` holding `token`. The peer removes it once welcomed; the broker
    removes it once read."""

    path: str
    token: str

    @classmethod
    def create(cls) -> Probe | None:
        """Write a new probe; None where there is no shared memory to offer."""
        token = secrets.token_hex(16)
        name = f"ventilator-probe-{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(SHM_ROOT, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None  # no /dev/shm here: payloads travel in frames
        try:
            os.write(fd, token.encode())
        finally:
            os.close(fd)
        return cls(path, token)

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # the broker removed it already
            os.unlink(self.path)


class _ProbeHolder:
    """A peer's probe, made when its HELLO or READY first asks, and removed
    once the broker answered (it may have removed it already)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._probe: Probe | None = None

    def ask(self, arena_bytes: int) -> p.SharedAsk | None:
        if not self._enabled:
            return None
        if self._probe is None:
            self._probe = Probe.create()
        if self._probe is None:
            return None
        return p.SharedAsk(self._probe.path, self._probe.token, arena_bytes)

    def remove(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None


def own_regular_file(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()


# --- the client's side: writing payloads into its arena --------------------------


class ArenaWriter:
    """A client's arena: payloads written into free extents, freed by key
    (the task id) when their task ends for the client.

    Used by the client's I/O thread only.
    """

    def __init__(self, path: str) -> None:
        """Map the arena the broker named; raises OSError when this process
        cannot (then the client sends payloads in frames)."""
        self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(self._fd).st_size
            self._map = mmap.mmap(self._fd, size)
        except OSError:
            os.close(self._fd)
            raise
        self.path = path
        self._free = _Extents(size)
        # key -> (offset, extent size, reference)
        self._held: dict[int, tuple[int, int, bytes]] = {}
        self._generation = 0
        # The arena's file is sparse: its first bytes up to here have memory
        # (see _reserve).
        self._reserved = 0
        self._full_said = False

    def put(self, key: int, payload: p.Payload) -> bytes | None:
        """Write `payload` for task `key` and return its reference; the same
        reference again for a key already written (a resend); None when no
        extent is free (the payload then travels in a frame)."""
        held = self._held.get(key)
        if held is not None:
            return held[2]

        length = len(payload)
        size = _aligned(_STAMP.size + length)
        offset = self._free.take(size)
        if offset is None:
            return None
        if not self._reserve(offset + size):
            self._free.give(offset, size)
            return None

        self._generation += 1
        generation = self._generation
        # Unstamped while written: a stale reader fails its check, not reads
        # half a payload.
        _STAMP.pack_into(self._map, offset, 0)
        self._write(offset + _STAMP.size, payload)
        _STAMP.pack_into(self._map, offset, generation)
        reference = REFERENCE.pack(offset, length, generation)
        self._held[key] = (offset, size, reference)
        return reference

    def _reserve(self, end: int) -> bool:
        """Give the arena memory up to `end`, or say there is none: a write
        into a sparse page that a full tmpfs cannot back kills the writer
        with SIGBUS. Extents are taken first fit, so the reserved part grows
        from the start and is reserved once."""
        if end <= self._reserved:
            return True
        try:
            os.posix_fallocate(self._fd, self._reserved, end - self._reserved)
        except OSError as exc:
            if not self._full_said:
                self._full_said = True
                log.info(
                    "shared memory is full (%s arena=%s); large payloads travel "
                    "in messages until some is free",
                    exc,
                    self.path,
                )
            return False
        self._populate(self._reserved, end)
        self._reserved = end
        self._full_said = False
        return True

    def _populate(self, start: int, end: int) -> None:
        """Map the newly reserved pages into this process at once: written
        one by one, each page costs a fault, which made the first pass over
        a fresh arena about five times slower than the next (measured, 100
        KiB writes). Not every kernel can (Linux 5.14 and later): then the
        writes fault the pages in as before."""
        first_page = start - start % mmap.PAGESIZE
        with contextlib.suppress(OSError):
            self._map.madvise(_MADV_POPULATE_WRITE, first_page, end - first_page)

    def _write(self, start: int, payload: p.Payload) -> None:
        parts = payload.parts if isinstance(payload, Pieces) else (payload,)
        for part in parts:
            end = start + len(part)
            self._map[start:end] = part
            start = end

    def reclaim(self, unfinished: Callable[[int], bool]) -> int:
        """Free the extents of tasks no longer `unfinished`: those that ended
        without a result (cancelled, failed by the client); return how many."""
        ended = [key for key in self._held if not unfinished(key)]
        for key in ended:
            self.free(key)
        return len(ended)

    def free(self, key: int) -> None:
        """Task `key` ended for the client: its extent may be reused."""
        held = self._held.pop(key, None)
        if held is None:
            return
        offset, size, _ = held
        _STAMP.pack_into(self._map, offset, 0)  # any reference to it is stale now
        self._free.give(offset, size)

    def close(self) -> None:
        self._held.clear()
        with contextlib.suppress(BufferError):  # a view still out: the GC closes it
            self._map.close()
        os.close(self._fd)


class ClientShare:
    """What a client's I/O thread needs of shared memory: the probe its
    HELLO carries, the arena its WELCOME names, and its payloads' references.

    `arena_bytes` is what it asks for: its byte window, which bounds the
    payloads it has in the broker at once.
    """

    def __init__(self, arena_bytes: int, enabled: bool = True) -> None:
        self._arena_bytes = min(MAX_ARENA_BYTES, arena_bytes + MIN_ARENA_BYTES)
        self._probe = _ProbeHolder(enabled)
        self._writer: ArenaWriter | None = None
        self._lost = False

    def ask(self) -> p.SharedAsk | None:
        """What a HELLO asks for; None where there is no shared memory, or
        when it is not to be used."""
        return self._probe.ask(self._arena_bytes)

    def welcomed(self, arena: str | None) -> None:
        """The broker's WELCOME named `arena` (None: it offers none). A new
        arena replaces the old, whose references died with its connection."""
        self._probe.remove()
        self._lost = False
        if self._writer is not None and self._writer.path == arena:
            return  # the same connection, welcomed again
        self._close_writer()
        if arena is None:
            return
        try:
            self._writer = ArenaWriter(arena)
        except OSError as exc:
            log.debug("cannot map the broker's arena %s: %s", arena, exc)

    def on_wire(
        self, spec: p.TaskSpec, unfinished: Callable[[int], bool]
    ) -> p.TaskSpec:
        """`spec` as sent: by reference when its payload is large and fits
        the arena (freeing the extents of tasks no longer `unfinished` if it
        does not), else as it is."""
        writer = self._writer
        if writer is None or len(spec.payload) < SHARED_MIN_BYTES or spec.sink:
            return _in_one_frame(spec)
        reference = writer.put(spec.task_id, spec.payload)
        if reference is None and writer.reclaim(unfinished):
            reference = writer.put(spec.task_id, spec.payload)
        if reference is None:
            return _in_one_frame(spec)
        return p.TaskSpec(
            spec.task_id,
            spec.function,
            reference,
            spec.flags | SHARED_FLAG,
            spec.timeout_s,
            spec.retries,
            spec.sink,
        )

    @property
    def sent_references(self) -> bool:
        """Whether payloads went to an arena on this connection: it has one,
        or had one until the broker dropped it (see lost)."""
        return self._writer is not None or self._lost

    def lost(self) -> None:
        """The broker dropped our arena (it took us for gone): payloads go in
        frames until a WELCOME names a new one."""
        self._close_writer()
        self._lost = True

    def done(self, task_id: int) -> None:
        """Task `task_id` ended for the client: its extent is free."""
        if self._writer is not None:
            self._writer.free(task_id)

    def close(self) -> None:
        self._probe.remove()
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _in_one_frame(spec: p.TaskSpec) -> p.TaskSpec:
    if not isinstance(spec.payload, Pieces):
        return spec
    return with_payload(spec, spec.payload.joined())


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


class _Extents:
    """Free byte ranges of an arena, first fit, merged with their neighbours
    when given back. An arena holds a few hundred payloads at most (its size
    over SHARED_MIN_BYTES), so lists searched from the start are enough."""

    def __init__(self, size: int) -> None:
        self._starts = [0]
        self._sizes = [size]

    def take(self, size: int) -> int | None:
        for index, free in enumerate(self._sizes):
            if free >= size:
                start = self._starts[index]
                if free == size:
                    del self._starts[index], self._sizes[index]
                else:
                    self._starts[index] += size
                    self._sizes[index] -= size
                return start
        return None

    def give(self, start: int, size: int) -> None:
        index = bisect.bisect(self._starts, start)
        # Merge with the free range after it, then with the one before.
        if index < len(self._starts) and start + size == self._starts[index]:
            size += self._sizes[index]
            del self._starts[index], self._sizes[index]
        if index and self._starts[index - 1] + self._sizes[index - 1] == start:
            self._sizes[index - 1] += size
            return
        self._starts.insert(index, start)
        self._sizes.insert(index, size)

    def free_bytes(self) -> int:
        return sum(self._sizes)


# --- reading: the worker's side, and the broker's for those who cannot ---------


class SharedReader:
    """The arenas a process reads payloads from, mapped once each and kept
    while it is sent references into them (the latest `_MAPPINGS_KEPT`).

    A mapping outlives its file: a payload the broker dropped the file of
    after it was sent still reads, as long as its arena was mapped here.
    """

    def __init__(self) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def decode(self, reference: p.Payload, decode: Callable[[memoryview], T]) -> T:
        """`decode` of a view of the payload `reference` (as the broker sends
        it) points to; raises SharedPayloadGone naming why it cannot be read
        (see decode_extent)."""
        offset, length, generation, path = parse_reference(reference)
        arena = self._mapping(path)
        return decode_extent(arena, offset, length, generation, path, decode)

    def _mapping(self, path: str) -> mmap.mmap:
        arena = self._maps.get(path)
        if arena is not None:
            self._maps.move_to_end(path)
            return arena
        arena = _map_for_reading(path)
        self._maps[path] = arena
        if len(self._maps) > _MAPPINGS_KEPT:
            _, oldest = self._maps.popitem(last=False)
            oldest.close()
        return arena

    def close(self) -> None:
        for arena in self._maps.values():
            arena.close()
        self._maps.clear()


class WorkerShare:
    """The probe a worker's READY carries, to be sent payloads by reference;
    its task processes (or threads) read them (`read_payload`). Removed once
    the broker welcomed the worker."""

    def __init__(self, enabled: bool = True) -> None:
        self._probe = _ProbeHolder(enabled)

    def ask(self) -> p.SharedAsk | None:
        """What a READY offers; None where there is no shared memory, or
        when it is not to be used."""
        return self._probe.ask(arena_bytes=0)

    def welcomed(self) -> None:
        self._probe.remove()

    close = welcomed


# The arenas of this process, for the tasks it runs: read where the task runs,
# so that a payload is copied once, out of the arena, and never through the
# worker's pipe to its task process.
_reader = SharedReader()
_reader_lock = threading.Lock()  # a thread pool's threads share it


def read_payload(reference: p.Payload, decode: Callable[[memoryview], T]) -> T:
    """What `decode` makes of the payload a task's reference points to, given
    a view of it in shared memory: decoding copies what it keeps, so the
    payload is copied once. Raises SharedPayloadGone when the payload cannot
    be read, or was freed while it was decoded (whatever `decode` made of
    it is dropped then).

    A task process that cannot read it reports its task CRASHED, with the
    type `p.PAYLOAD_GONE`: the broker runs it again, unblamed if it has a
    copy since (its client left), else as a strike (Scheduler._crashed)."""
    with _reader_lock:
        return _reader.decode(reference, decode)


def parse_reference(reference: p.Payload) -> tuple[int, int, int, str]:
    data = bytes(reference)
    if len(data) <= REFERENCE.size:
        raise SharedPayloadGone(
            f"a shared payload reference of {len(data)} bytes names no arena"
        )
    offset, length, generation = REFERENCE.unpack_from(data)
    path = data[REFERENCE.size :].decode("ascii", "replace")
    if not _ARENA_PATH.fullmatch(path):
        raise SharedPayloadGone(f"{path!r} is not a broker's arena")
    return offset, length, generation, path


def _map_for_reading(path: str) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SharedPayloadGone(
            f"arena {path} is gone: the client that wrote the payload left, "
            "and the broker sends its own copy to the next try"
        ) from None
    except OSError as exc:
        raise SharedPayloadGone(f"arena {path} cannot be opened: {exc}") from None
    try:
        info = os.fstat(fd)
        if not own_regular_file(info) or not info.st_size:
            raise SharedPayloadGone(f"{path} is not an arena of this user")
        return mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def decode_extent(
    arena: mmap.mmap,
    offset: int,
    length: int,
    generation: int,
    where: str,
    decode: Callable[[memoryview], T],
) -> T:
    """`decode` of a view of the `length` bytes behind the stamp at `offset`,
    if the stamp says `generation` before and after: otherwise the extent was
    freed, and perhaps reused, since the reference was made, and whatever
    `decode` made of it is dropped. `decode` must copy what it keeps: the
    view is released as it returns."""
    check_stamp(arena, offset, length, generation, where)
    start = offset + _STAMP.size
    try:
        with memoryview(arena) as whole, whole[start : start + length] as view:
            return decode(view)
    finally:
        # Raised here, this replaces whatever decode made of bytes that
        # changed under it.
        check_stamp(arena, offset, length, generation, where)


def check_stamp(
    arena: mmap.mmap, offset: int, length: int, generation: int, where: str
) -> None:
    if generation == 0 or not length or offset + _STAMP.size + length > len(arena):
        raise SharedPayloadGone(
            f"reference (offset {offset}, {length} bytes, generation "
            f"{generation}) lies outside arena {where} of {len(arena)} bytes"
        )
    if _STAMP.unpack_from(arena, offset)[0] != generation:
        raise SharedPayloadGone(
            f"the payload at offset {offset} of arena {where} is not generation "
            f"{generation}: its client freed it (its task ended for it, or was "
            "cancelled), or never wrote it"
        )


def with_payload(spec: p.TaskSpec, payload: bytes) -> p.TaskSpec:
    return p.TaskSpec(
        spec.task_id,
        spec.function,
        payload,
        spec.flags,
        spec.timeout_s,
        spec.retries,
        spec.sink,
    )

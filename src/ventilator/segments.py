"""Large blobs of the journal, in append-only segment files beside its database.

SQLite writes a blob twice (to its WAL, then to the database at a checkpoint),
page by page, at several hundred microseconds of CPU per 100 KiB. A segment file
takes it with one write(). The journal's rows keep a reference (segment, offset,
length) instead of the blob, written in the same transaction that makes the
task exist, after the blob itself: a reference never points at bytes that are
not there.

A segment is deleted once no row references it; the one being written is
emptied instead (past a megabyte, so that a broker that went idle keeps no
dead blobs on disk, and a busy one does not pay for it per task), and deleted
when the broker stops. A broker never appends to a segment an earlier broker
wrote: bytes after the last committed reference of a crashed broker are
garbage nobody reads, and go with their segment.

Each reference carries the CRC-32 of its blob, and every read checks it: a
blob whose bytes changed on disk (a failing disk, a hand that edited the file)
raises `BlobDamaged` rather than hand over bytes nobody gave the broker. The
checksum lives in the row, not in the segment, so a segment file is nothing but
the blobs, and one a broker wrote before checksums reads as it always did.

A closed segment whose live blobs became a small part of it (one task that
stays queued, one result nobody collects) is compacted: the journal copies
its live blobs into the current segment, points their rows at the copies in
one commit, and the segment, now unreferenced, goes like any other (see
`SegmentStore.sparse_segments`).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INLINE_MAX_BYTES", "BlobDamaged", "BlobRef", "SegmentStore"]

log = logging.getLogger(__name__)

# Blobs up to this size stay in the SQLite row: for them a row costs less than
# a write() and a reference.
INLINE_MAX_BYTES = 8 * 1024
# A new segment starts once the current one holds this much.
SEGMENT_BYTES = 64 * 1024 * 1024
# The current segment, once no row refers to anything in it, is emptied when it
# holds more than this: a truncate per megabyte written at most.
IDLE_SEGMENT_KEPT_BYTES = 1024 * 1024
# A closed segment is compacted once less than this part of it is live: each
# byte copied then frees at least three, so copying costs at most a third of
# what it frees, and the segments never hold more than four times their live
# bytes (plus the dead bytes below). A half would free only as much as it
# copies, and copied blobs may be copied again when their new segment thins.
COMPACT_BELOW_LIVE_FRACTION = 0.25
# ... and only once it holds at least this much dead: below it a copy and a
# commit buy back less than the idle current segment may keep anyway.
COMPACT_MIN_DEAD_BYTES = 4 * 1024 * 1024

# A reference packs its segment, offset and length, then the blob's CRC-32.
# References written before checksums lack the last field: the two forms are
# told apart by their size alone (20 or 24 bytes), with no flag or version.
_REF = struct.Struct("<IQQ")
_CHECKED_REF = struct.Struct("<IQQI")
_SUFFIX = ".seg"


class BlobDamaged(OSError):
    """A blob read back is not the blob that was written: its checksum does
    not match. The message names the segment file, the offset and the length."""


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a blob lies: which segment, from which byte, how long; and its
    CRC-32, None for a reference written before checksums (nothing to check)."""

    segment: int
    offset: int
    length: int
    crc32: int | None = None

    def pack(self) -> bytes:
        if self.crc32 is None:
            return _REF.pack(self.segment, self.offset, self.length)
        return _CHECKED_REF.pack(self.segment, self.offset, self.length, self.crc32)

    @classmethod
    def unpack(cls, data: bytes) -> BlobRef:
        """Raises:
        BlobDamaged: `data` has neither length a reference is written with
            (its row was damaged, or edited by hand)."""
        if len(data) == _REF.size:
            return cls(*_REF.unpack(data))
        if len(data) == _CHECKED_REF.size:
            return cls(*_CHECKED_REF.unpack(data))
        raise BlobDamaged(
            f"a blob reference of {len(data)} bytes, where one is written with "
            f"{_REF.size} or {_CHECKED_REF.size}: the row holding it is damaged"
        )


class SegmentStore:
    """The segment files of one journal, in their own folder.

    Args:
        directory: created with the first segment; nothing else may write in
            it. Left alone until then, so that a journal whose folder went
            missing is noticed on loading, not taken for one without blobs.
        fsync: make `sync` flush written blobs to the disk (durability "power").
    """

    def __init__(self, directory: Path, fsync: bool) -> None:
        self._directory = directory
        self._fsync = fsync
        self._references: Counter[int] = Counter()
        self._live_bytes: Counter[int] = Counter()
        # Sizes of closed segments, to tell how much of each is dead.
        self._sizes: dict[int, int] = {}
        self._unreferenced: set[int] = set()
        self._current = max(self._segments_on_disk(), default=0) + 1
        self._fd: int | None = None
        self._size = 0
        self._unsynced = False

    def current_deleted(self) -> bool:
        """Whether the segment being written was deleted (its folder with it)."""
        return self._fd is not None and os.fstat(self._fd).st_nlink == 0

    def put(self, blob: bytes | memoryview, crc32: int | None = None) -> BlobRef:
        """Append `blob` to the current segment and count one reference to it.

        `crc32` is the blob's checksum when the caller already checked it (a
        compaction's copy), so that it is not computed twice.
        """
        if self._fd is None or self._size >= SEGMENT_BYTES:
            self._start_segment()
        assert self._fd is not None

        if crc32 is None:
            crc32 = zlib.crc32(blob)
        ref = BlobRef(self._current, self._size, len(blob), crc32)
        self._unsynced = True
        try:
            _write_all(self._fd, blob)
        except OSError:
            # Part of it may be written: appends go on from the file's end,
            # and the next blob's offset must say where that is.
            self._size = os.fstat(self._fd).st_size
            raise
        self._size += len(blob)
        self.adopt(ref)
        return ref

    def get(self, ref: BlobRef) -> bytes:
        """Read a blob back.

        Raises:
            BlobDamaged: its bytes are not those written (checksum mismatch).
            OSError: its segment is missing or too short (the journal was
                damaged outside the broker); the message names the segment.
        """
        return self.get_many([ref])[0]

    def get_many(self, refs: list[BlobRef]) -> list[bytes]:
        """Read several blobs of one segment back, opening it once.

        Raises:
            OSError: as `get`.
        """
        path = self._path(refs[0].segment)
        with open(path, "rb") as segment:
            return [_read_exactly(segment.fileno(), ref, path) for ref in refs]

    def sync(self) -> None:
        """Make written blobs durable, before a commit references them."""
        if self._fsync and self._unsynced and self._fd is not None:
            os.fsync(self._fd)
        self._unsynced = False

    def adopt(self, ref: BlobRef) -> None:
        """Count a reference found on loading the journal."""
        self._references[ref.segment] += 1
        self._live_bytes[ref.segment] += ref.length

    def release(self, ref: BlobRef) -> None:
        """One reference fewer; a segment left with none goes at `collect`."""
        self._references[ref.segment] -= 1
        self._live_bytes[ref.segment] -= ref.length
        if self._references[ref.segment] <= 0:
            del self._references[ref.segment]
            del self._live_bytes[ref.segment]
            self._unreferenced.add(ref.segment)

    def sparse_segments(self) -> list[int]:
        """The closed segments worth compacting, sparsest first.

        Worth it when under `COMPACT_BELOW_LIVE_FRACTION` of one is live and at
        least `COMPACT_MIN_DEAD_BYTES` of it dead. The segment being written is
        never one: its dead bytes go when it is emptied or, once closed, here.
        """
        sparse = sorted(
            (self._live_bytes[segment] / size, segment)
            for segment, size in self._sizes.items()
            if segment in self._references
            and _worth_compacting(self._live_bytes[segment], size)
        )
        return [segment for _, segment in sparse]

    def live_bytes(self, segment: int) -> int:
        """Bytes of `segment` that rows still refer to."""
        return self._live_bytes[segment]

    def size(self, segment: int) -> int:
        """Bytes in closed `segment`, live or dead (0 once deleted)."""
        return self._sizes.get(segment, 0)

    def collect(self) -> None:
        """Delete the segments nothing references any more, but the current one.

        Called after the commit that dropped their last references, so that a
        crash before it finds every referenced blob still there.
        """
        for segment in self._unreferenced - {self._current}:
            if segment not in self._references:
                _unlink(self._path(segment))
                self._sizes.pop(segment, None)
        self._unreferenced &= {self._current}
        if self._size > IDLE_SEGMENT_KEPT_BYTES and self._current_unreferenced():
            self._empty_current()

    def _current_unreferenced(self) -> bool:
        return self._fd is not None and self._current not in self._references

    def _empty_current(self) -> None:
        """Drop the bytes of the segment being written, none of them referenced
        (by a committed row: `collect` runs after the commit). Appends go on
        from its start, in the same file."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            log.warning(
                "could not empty journal segment %s: %s; its dead bytes stay on "
                "the disk, and it is tried again after the next commit",
                self._path(self._current),
                exc,
            )
            return
        self._size = 0

    def collect_unreferenced_on_disk(self) -> None:
        """After loading: delete segments no loaded row references."""
        on_disk = self._segments_on_disk()
        self._unreferenced |= set(on_disk) - set(self._references)
        self.collect()
        for segment in set(on_disk) & set(self._references):
            self._sizes[segment] = self._path(segment).stat().st_size

    def close(self) -> None:
        """Close the segment being written; delete it if nothing refers to it."""
        if self._fd is None:
            return
        unreferenced = self._current_unreferenced()
        self.sync()
        os.close(self._fd)
        self._fd = None
        if unreferenced:
            _unlink(self._path(self._current))

    def _start_segment(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._sizes[self._current] = self._size
            if self._current not in self._references:
                self._unreferenced.add(self._current)
            self._current += 1

        self._directory.mkdir(exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self._path(self._current), flags, 0o600)
        self._size = 0
        if self._fsync:
            _fsync_directory(self._directory)  # the new file's name must last too

    def path(self, segment: int) -> Path:
        """The file of `segment`, for messages."""
        return self._path(segment)

    def _path(self, segment: int) -> Path:
        return self._directory / f"{segment:08d}{_SUFFIX}"

    def _segments_on_disk(self) -> list[int]:
        if not self._directory.is_dir():
            return []
        numbers = []
        for path in self._directory.glob(f"*{_SUFFIX}"):
            if path.stem.isdigit():
                numbers.append(int(path.stem))
        return numbers


def _worth_compacting(live_bytes: int, size: int) -> bool:
    dead_bytes = size - live_bytes
    return (
        live_bytes < size * COMPACT_BELOW_LIVE_FRACTION
        and dead_bytes >= COMPACT_MIN_DEAD_BYTES
    )


def _read_exactly(fd: int, ref: BlobRef, path: Path) -> bytes:
    blob = os.pread(fd, ref.length, ref.offset)
    if len(blob) != ref.length:
        raise OSError(
            f"segment {path} ends before the {ref.length} bytes at {ref.offset}"
        )
    if ref.crc32 is not None and zlib.crc32(blob) != ref.crc32:
        raise BlobDamaged(
            f"checksum mismatch in segment {path} at offset {ref.offset} "
            f"({ref.length} bytes): its bytes changed on disk since they were "
            "written"
        )
    return blob


def _write_all(fd: int, blob: bytes | memoryview) -> None:
    view = memoryview(blob)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Not tried again by this broker: the next one to open the journal
        # deletes every segment no row refers to (collect_unreferenced_on_disk).
        log.warning(
            "could not delete journal segment %s: %s; its space stays in use "
            "until a broker next opens this journal, which deletes it",
            path,
            exc,
        )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

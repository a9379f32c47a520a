"""What a SQLite write-ahead log left by an earlier broker holds.

SQLite recovers a WAL by replaying its frames up to the last whole commit
whose checksums hold, and drops the rest without a word: a log cut short (a
full disk, a copy cut short) or damaged replays fewer commits, and nothing
says so. The journal reads the log's own layout here before SQLite opens it,
then asks SQLite how many frames it kept, and says what went missing.

The layout (https://www.sqlite.org/fileformat.html, "The Write-Ahead Log"): a
32-byte header (magic, version, page size, checkpoint sequence, two salts, a
checksum), then frames of a 24-byte header and one page each. A frame header
holds its page number, the database size in pages if the frame ends a commit
(0 otherwise), and the log header's two salts. Each checkpoint starts the log
again with new salts over the old frames, so the frames of the current log
are those, from the first, whose salts match the header's; the ones after are
stale and never replayed.

Only what the file shows is told apart: a log cut exactly after a whole commit
looks like a shorter log, and a log deleted outright like none at all.

A dropped commit counts as whole (certainly lost) only if each of its frames
holds the checksum its header claims. SQLite writes a frame's header and its
page apart: a broker killed between the two, over frames of an earlier log
(the log starts again over them after a checkpoint), leaves a frame of the
right size with the new header and a stale page. That commit was never
finished, and nobody was told of it: not a loss.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["WalLoss", "WalSurvey", "survey"]

_HEADER = struct.Struct(">8I")  # magic, version, page size, seq, salts, checksum
_HEADER_BYTES = _HEADER.size
_LOG_SALTS_START, _LOG_SALTS_END = 16, 24  # after four fields of the header
_MAGICS = (0x377F0682, 0x377F0683)  # checksums little- or big-endian
# A frame header: page number, database size if the frame ends a commit (else
# 0), the two salts, a checksum.
_FRAME_HEADER_BYTES = 24
_COMMIT_FIELD = struct.Struct(">I")
_COMMIT_FIELD_AT = 4
_FRAME_SALTS_START, _FRAME_SALTS_END = 8, 16
_CHECKSUM = struct.Struct(">2I")  # a frame's at offset 16, the log's at 24
_FRAME_CHECKSUM_AT, _LOG_CHECKSUM_AT = 16, 24
# What a frame's checksum covers: its header's first 8 bytes, then its page.
_CHECKSUMMED_HEAD_BYTES = 8
_PAGE_SIZES = {1 << n for n in range(9, 17)}
_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class WalLoss:
    """What SQLite's recovery of a WAL dropped, as far as the file shows."""

    wal_bytes: int
    header_unreadable: bool  # SQLite ignored the whole log
    dropped_frames: int  # whole frames of the current log SQLite did not keep
    dropped_commits: int  # commits ending among those: work certainly lost
    cut_bytes: int  # bytes of a last frame cut short (0: none)
    frame_bytes: int

    @property
    def certain(self) -> bool:
        """Whether commits were certainly lost (rather than maybe only the tail
        of one the broker was writing when it stopped)."""
        ignored_frames = self.header_unreadable and self.wal_bytes > _HEADER_BYTES
        return ignored_frames or self.dropped_commits > 0

    def describe(self) -> str:
        """What was dropped and what it means, in one sentence for the log."""
        if self.header_unreadable:
            return (
                f"its header is cut short or not a WAL header ({self.wal_bytes} "
                "bytes in all), so SQLite ignored the whole log: every commit "
                "since the last checkpoint is lost, if it held any"
            )
        if self.certain:
            return (
                f"SQLite's recovery dropped {self.dropped_frames} frames{self._cut}, "
                f"ending {self.dropped_commits} whole commits: tasks they "
                "accepted are lost, and what they finished or forgot is back as "
                "it was before them"
            )
        dropped = (
            f"SQLite's recovery dropped {self.dropped_frames} frames after its "
            f"last whole commit{self._cut}"
            if self.dropped_frames
            else f"its last frame is cut short at {self.cut_bytes} of "
            f"{self.frame_bytes} bytes"
        )
        return (
            f"{dropped}: it ends inside a commit, either one the broker was "
            "writing when it stopped (nobody was told of it) or one cut short "
            "with the log (a full disk, a copy cut short), and then any later "
            "commits are lost without a trace"
        )

    @property
    def _cut(self) -> str:
        if not self.cut_bytes:
            return ""
        return f", and its last frame is cut short ({self.cut_bytes} bytes)"


@dataclass(frozen=True, slots=True)
class WalSurvey:
    """The frames of a WAL's current log, read before SQLite recovers it."""

    wal_bytes: int
    header_unreadable: bool
    frames: int  # whole frames whose salts are the header's
    commit_frames: tuple[int, ...]  # the numbers (from 1) of those ending a commit
    cut_bytes: int  # bytes of a frame of the current log cut short at the end
    frame_bytes: int
    # Whether each of those frames holds the checksum its header claims,
    # by number: asked only of the frames SQLite dropped (see `loss`).
    frame_is_whole: Callable[[int], bool] = lambda _number: True

    def loss(self, kept_frames: int) -> WalLoss | None:
        """What was lost when SQLite kept `kept_frames` of them; None if nothing
        (that the file shows)."""
        dropped = max(0, self.frames - kept_frames)
        if not (self.header_unreadable or dropped or self.cut_bytes):
            return None
        return WalLoss(
            wal_bytes=self.wal_bytes,
            header_unreadable=self.header_unreadable,
            dropped_frames=dropped,
            dropped_commits=self._whole_commits_after(kept_frames),
            cut_bytes=self.cut_bytes,
            frame_bytes=self.frame_bytes,
        )

    def _whole_commits_after(self, kept_frames: int) -> int:
        """Dropped commits whose every frame is whole: finished, and lost. One
        with a frame that is not was being written when the broker stopped, or
        holds the damage that made SQLite stop there."""
        whole = 0
        first = kept_frames + 1
        for last in (n for n in self.commit_frames if n > kept_frames):
            whole += all(self.frame_is_whole(n) for n in range(first, last + 1))
            first = last + 1
        return whole


def survey(wal: Path) -> WalSurvey | None:
    """Read the WAL at `wal`; None when there is none, or it is empty.

    The frames' checksums are read later, and only for the frames SQLite
    dropped (see `WalSurvey.loss`): its recovery reads the log and writes
    nothing to it, and the broker asks before its first commit, which could.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        file = open(wal, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return None
        return _read(file, size, wal)


def _read(file: BinaryIO, size: int, wal: Path) -> WalSurvey:
    header = file.read(_HEADER_BYTES)
    fields = _HEADER.unpack(header) if len(header) == _HEADER_BYTES else None
    if fields is None or fields[0] not in _MAGICS or fields[2] not in _PAGE_SIZES:
        return WalSurvey(
            wal_bytes=size,
            header_unreadable=True,
            frames=0,
            commit_frames=(),
            cut_bytes=0,
            frame_bytes=0,
        )
    salts = header[_LOG_SALTS_START:_LOG_SALTS_END]
    frame_bytes = _FRAME_HEADER_BYTES + fields[2]
    frames, commits, cut = 0, [], 0
    offset = _HEADER_BYTES
    while offset < size:
        file.seek(offset)
        head = file.read(_FRAME_HEADER_BYTES)
        if not _of_log(head, salts):
            break  # stale frames of an earlier log, never replayed
        if size - offset < frame_bytes:
            cut = size - offset
            break
        frames += 1
        if _ends_commit(head):
            commits.append(frames)
        offset += frame_bytes
    checksums = _FrameChecksums(wal, frame_bytes, little_endian=fields[0] == _MAGICS[0])
    return WalSurvey(
        wal_bytes=size,
        header_unreadable=False,
        frames=frames,
        commit_frames=tuple(commits),
        cut_bytes=cut,
        frame_bytes=frame_bytes,
        frame_is_whole=checksums.holds,
    )


class _FrameChecksums:
    """Whether a frame of a WAL holds the checksum its header claims.

    SQLite chains the checksums: each frame's starts from the one stored in
    the frame before it (the log header's, for the first). So one frame can
    be checked alone, whatever became of those before it.
    """

    def __init__(self, wal: Path, frame_bytes: int, little_endian: bool) -> None:
        self._wal = wal
        self._frame_bytes = frame_bytes
        words = (_CHECKSUMMED_HEAD_BYTES + frame_bytes - _FRAME_HEADER_BYTES) // 4
        self._words = struct.Struct(f"{'<' if little_endian else '>'}{words}I")

    def holds(self, number: int) -> bool:
        offset = _HEADER_BYTES + (number - 1) * self._frame_bytes
        previous = (
            _LOG_CHECKSUM_AT
            if number == 1
            else offset - self._frame_bytes + _FRAME_CHECKSUM_AT
        )
        with open(self._wal, "rb") as file:
            file.seek(previous)
            chained = file.read(_CHECKSUM.size)
            file.seek(offset)
            frame = file.read(self._frame_bytes)
        # Shorter than the survey found: SQLite reset the log meanwhile (it
        # does beside an emptied database). Nothing tells the frame was whole.
        if len(chained) < _CHECKSUM.size or len(frame) < self._frame_bytes:
            return False
        start = _CHECKSUM.unpack(chained)
        head, page = frame[:_FRAME_HEADER_BYTES], frame[_FRAME_HEADER_BYTES:]
        claimed = _CHECKSUM.unpack_from(head, _FRAME_CHECKSUM_AT)
        covered = head[:_CHECKSUMMED_HEAD_BYTES] + page
        return _checksum(self._words.unpack(covered), *start) == claimed


def _checksum(words: tuple[int, ...], s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum of `words`, going on from (s0, s1)."""
    pairs = iter(words)
    for first, second in zip(pairs, pairs, strict=True):
        s0 = (s0 + first + s1) & _MASK
        s1 = (s1 + second + s0) & _MASK
    return s0, s1


def _of_log(frame_header: bytes, salts: bytes) -> bool:
    """Whether a frame belongs to the log whose header has `salts`. A remnant
    too short to show its salts is taken as the log's: it may be its last."""
    if len(frame_header) < _FRAME_SALTS_END:
        return True
    return frame_header[_FRAME_SALTS_START:_FRAME_SALTS_END] == salts


def _ends_commit(frame_header: bytes) -> bool:
    database_pages: int = _COMMIT_FIELD.unpack_from(frame_header, _COMMIT_FIELD_AT)[0]
    return database_pages != 0

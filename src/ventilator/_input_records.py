"""The input of `map` and `exec`: its items (lines, or NUL-separated with
--null), and the value each line stands for, which is its JSON when it parses
and the line itself when it does not. A line whose value cannot reach a task
(a number beyond a float, a lone surrogate) becomes an `Unsendable` that fails
alone, not the run."""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from .errors import UsageError

# Characters read at a time from NUL-separated input (--null).
NUL_READ_CHARS = 65536
# What a UTF-8 byte order mark decodes to, when one opens the input.
BYTE_ORDER_MARK = "\ufeff"


def records_of(stream: IO[str], null_separated: bool) -> Iterator[str]:
    """The input's items: its lines, or with `null_separated` what lies
    between NUL characters. A byte order mark that opens the input (an editor
    on Windows writes one) is not part of the first item."""
    records = _nul_records(_untranslated(stream)) if null_separated else _lines(stream)
    first = next(records, None)
    if first is None:
        return
    yield first.removeprefix(BYTE_ORDER_MARK)
    yield from records


def _lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\r\n")


def _untranslated(stream: IO[str]) -> IO[str]:
    """`stream` as read without newline translation: between NULs, a carriage
    return is part of a name, not a line ending to turn into a newline."""
    binary = getattr(stream, "buffer", None)
    if binary is None:
        return stream  # already text without a byte layer (a test's StringIO)
    return io.TextIOWrapper(
        binary, encoding="utf-8", errors="surrogateescape", newline=""
    )


def _nul_records(stream: IO[str]) -> Iterator[str]:
    """Items ended by NUL, read a block at a time; the last may lack its NUL."""
    partial: list[str] = []
    while block := stream.read(NUL_READ_CHARS):
        *ended, rest = block.split("\0")
        for record in ended:
            yield "".join(partial) + record
            partial.clear()
        partial.append(rest)
    last = "".join(partial)
    if last:
        yield last


def parse_line(line: str) -> Any:
    try:
        value = _LINE_DECODER.decode(line)
    except _OutOfRange as exc:
        return _out_of_range(line, exc)
    except ValueError:
        return line
    except RecursionError:
        # Valid JSON, but nested past what the decoder can read: not a string
        # the caller meant, so the line fails alone rather than run as one.
        return Unsendable(
            ValueError("the input line is JSON nested too deep to decode")
        )
    # Only an escape writes a lone surrogate, and none travels as UTF-8 text.
    if "\\u" in line and _holds_lone_surrogate(value):
        return Unsendable(
            UsageError(
                "the input line's JSON holds a lone surrogate (a \\ud800 to "
                "\\udfff escape not in a pair), which is not text a task can "
                "receive"
            )
        )
    return value


class _OutOfRange(ValueError):
    """A JSON number beyond what a float holds."""


def _out_of_range(line: str, exc: _OutOfRange) -> Any:
    """A line that is JSON with a number no float holds fails, as one with an
    integer beyond 64 bits does: its value cannot reach a task. A line that
    is not JSON anyway (``1e400x``) is still passed on as a string."""
    try:
        json.loads(line, parse_float=str, parse_constant=_reject)
    except (ValueError, RecursionError):
        return line
    return Unsendable(
        UsageError(
            f"the input line holds {exc}, beyond the largest float "
            f'({sys.float_info.max:.1e}); write it as a string ("...") to '
            "pass it on as text"
        )
    )


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds, anywhere, a string that is not
    valid UTF-8 text. Walked without recursion: the value may be nested
    nearly as deep as the decoder reads."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _not_text(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _not_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True, slots=True)
class Unsendable:
    """The item of a line that fails before it is sent, and why."""

    error: Exception


def _reject(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON a task can return as JSON")


def _finite(text: str) -> float:
    # 1e400 parses to infinity, which is not the number the line wrote.
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(text)
    return value


# Made once: json.loads with options builds a new decoder per call, which
# costs more than the rest of a short line's trip through the CLI.
_LINE_DECODER = json.JSONDecoder(parse_constant=_reject, parse_float=_finite)


def not_utf8(line: str) -> dict[str, str] | None:
    """The error fields for a line read from bytes that were not UTF-8."""
    try:
        line.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"the input line is not valid UTF-8: {exc}"
        return {"type": "UnicodeDecodeError", "message": message}
    return None

"""What travels in payload frames: call arguments, results and error reports.

Arguments and results are msgpack by default: safe to decode from anyone, and
fast. A pickled callable (cloudpickle) is used only when both the client and the
worker opted in, because unpickling is running the sender's code.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import Any

import cloudpickle
import msgpack

from .errors import TaskError, UsageError

__all__ = [
    "BatchPacker",
    "Pieces",
    "pack_batch_outcomes",
    "pack_call",
    "pack_call_in_pieces",
    "pack_error",
    "pack_pickled_call",
    "pack_value",
    "unpack_batch",
    "unpack_batch_outcomes",
    "unpack_call",
    "unpack_pickled_call",
    "unpack_value",
]


def pack_value(value: Any, what: str = "a value") -> bytes:
    """Encode a result (or any value) as msgpack; `what` names it in errors.

    Raises:
        UsageError: the value has a type msgpack cannot carry; the message names it.
    """
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(
            f"{what} cannot be sent as msgpack: {_unsendable(value, exc)}; use plain "
            "types: None, bool, int, float, str, bytes, list, dict, and integers "
            "within 64 bits"
        ) from exc


def _unsendable(value: Any, exc: Exception) -> str:
    """What msgpack refused, in words: its own message names the type inside a
    container ("can not serialize 'set' object"); an overflow names nothing."""
    if isinstance(exc, OverflowError):
        return f"an integer is out of range ({exc})"
    return str(exc) or f"a {type(value).__name__} it cannot encode"


def describe_error(exc: BaseException) -> str:
    """An exception's message, or its type's name when the message is empty
    (msgpack raises a bare FormatError for bytes that are not msgpack)."""
    return str(exc) or type(exc).__name__


def unpack_value(payload: Any) -> Any:
    """Decode what `pack_value` encoded."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except TypeError:
        # See _with_tuple_keys: only a payload that needs it pays for it.
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=False, object_pairs_hook=_with_tuple_keys
        )


def _with_tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map whose keys may be lists: msgpack carries a tuple as a list, so a
    dict keyed by tuples, which it packs without complaint, arrived with
    lists for keys and failed to decode ("unhashable type: 'list'"). Such
    keys become tuples again, as they were."""
    return {_hashable(key): value for key, value in pairs}


def _hashable(key: Any) -> Any:
    return tuple(map(_hashable, key)) if isinstance(key, list) else key


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Encode call arguments as msgpack ``[args, kwargs]``."""
    return pack_value([list(args), kwargs] if kwargs else [list(args)], "the arguments")


def pack_call_in_pieces(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bytes | Pieces:
    """`pack_call`, but as `Pieces` when some arguments are large bytes,
    which are then not copied here."""
    if not kwargs and len(args) <= _FIXARRAY_MAX and any(map(_large_bytes, args)):
        return _pieces(args)
    return pack_call(args, kwargs)


# Bytes arguments at least this large are not copied into the encoded call:
# pyzmq's own zero-copy threshold, and that of shared payloads.
LARGE_BYTES = 65536
# What `_pieces` writes by hand: msgpack's fixarray (up to 15 entries) and
# bin 32 (a length of 4 bytes, big-endian, then the bytes).
_FIXARRAY = 0x90
_FIXARRAY_MAX = 15
_BIN32 = struct.Struct(">BI")
_BIN32_MARK = 0xC6


class Pieces:
    """An encoded payload in parts: msgpack around large `bytes` arguments,
    which are held, not copied (bytes cannot change). Joined once, where it
    is written: into a message frame, or into shared memory (see _shared),
    so that a 100 KiB argument is copied once on its way out, not three times.
    """

    __slots__ = ("_size", "parts")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self._size = sum(map(len, parts))

    def __len__(self) -> int:
        return self._size

    def joined(self) -> bytes:
        return b"".join(self.parts)


def _large_bytes(value: Any) -> bool:
    return type(value) is bytes and len(value) >= LARGE_BYTES


def _pieces(args: tuple[Any, ...]) -> Pieces:
    """``[args]`` in msgpack, exactly as `pack_value` encodes it, with each
    large bytes argument a piece of its own."""
    parts = [bytes((_FIXARRAY | 1, _FIXARRAY | len(args)))]
    for arg in args:
        if _large_bytes(arg):
            parts += (_BIN32.pack(_BIN32_MARK, len(arg)), arg)
        else:
            parts.append(pack_value(arg, "the arguments"))
    return Pieces(parts)


def unpack_call(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """Decode call arguments; raise ValueError when they are not ``[args, kwargs]``."""
    call = unpack_value(payload)
    if not isinstance(call, list) or not 1 <= len(call) <= 2:
        raise ValueError("call payload must be [args] or [args, kwargs]")

    args = call[0]
    kwargs = call[1] if len(call) == 2 else {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("call payload must be [list, dict]")
    return args, kwargs


def pack_pickled_batch(
    function: Callable[..., Any], items: list[Any], budget_s: float | None = None
) -> bytes:
    """Pickle a callable with the items of a batch and its time budget (see
    `BatchPacker.batch`), for workers that allow it."""
    return cloudpickle.dumps((function, items, budget_s))  # type: ignore[no-any-return]


def unpack_pickled_batch(
    payload: Any,
) -> tuple[Callable[..., Any], list[Any], float | None]:
    """Unpickle a batch: its callable, items and time budget (see
    `BatchPacker.batch`). This runs the sender's code: only for opted-in workers.
    """
    # A batch journalled before batches had budgets has none.
    function, items, *budget = pickle.loads(payload)
    return function, list(items), _budget(budget[0] if budget else None)


def pack_pickled_call(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bytes:
    """Pickle a callable with its arguments, for workers that allow it."""
    return cloudpickle.dumps((function, args, kwargs))  # type: ignore[no-any-return]


def unpack_pickled_call(
    payload: Any,
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Unpickle a call. This runs the sender's code: only for opted-in workers."""
    function, args, kwargs = pickle.loads(payload)
    return function, tuple(args), dict(kwargs)


def pack_error(error: TaskError) -> bytes:
    """Encode a task error report."""
    return pack_value(error.to_wire())


# --- batches: one task that carries many items of a map --------------------------


class BatchPacker:
    """Encodes a map's items one by one, so that a batch can stop at a size.

    The payload of a batch is a msgpack array of the items, built from each
    item's own encoding: the client learns each item's size as it goes, and
    keeps those encodings to resubmit items alone if the batch fails whole.
    The array may be followed by a second msgpack value, the batch's time
    budget in seconds: the worker runs no item more once the batch has run
    that long, and reports the outcomes of those it ran. The array comes
    first so that the broker counts a batch's items from its header alone.
    """

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def item(self, value: Any) -> bytes:
        """Encode one item.

        Raises:
            UsageError: the item has a type msgpack cannot carry.
        """
        try:
            return self._packer.pack(value)  # type: ignore[no-any-return]
        except UnicodeEncodeError as exc:
            # Lone surrogates: text decoded from bytes that were not UTF-8.
            self._packer.reset()
            raise UsageError(
                f"cannot send an item holding a string that is not valid UTF-8 ({exc})"
            ) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise UsageError(
                f"cannot send an item of type {type(value).__name__} as msgpack "
                f"({exc}); use plain types: None, bool, int, float, str, bytes, "
                "list, dict"
            ) from exc

    def batch(self, encoded_items: list[bytes], budget_s: float | None = None) -> bytes:
        """The payload of a batch of items encoded with `item`, which stops
        after `budget_s` seconds of work; None: it runs every item."""
        header: bytes = self._packer.pack_array_header(len(encoded_items))
        budget = b"" if budget_s is None else self._packer.pack(float(budget_s))
        return header + b"".join(encoded_items) + budget

    @staticmethod
    def single_call(encoded_item: bytes) -> bytes:
        """The payload of one ordinary task calling the function on one item:
        ``[[item]]``, the shape `pack_call` gives."""
        return b"\x91\x91" + encoded_item


def unpack_batch(payload: Any) -> tuple[list[Any], float | None]:
    """Decode a batch's items and its time budget (see `BatchPacker.batch`).

    Raises:
        ValueError: the items are not a list, the budget not a number of
            seconds, or something follows it.
    """
    try:
        values = _unpack_all(payload)
    except TypeError:
        values = _unpack_all(payload, object_pairs_hook=_with_tuple_keys)
    if not values or not isinstance(values[0], list) or len(values) > 2:
        raise ValueError("a batch payload must be a list of items, then a budget")
    return values[0], _budget(values[1] if len(values) == 2 else None)


def _unpack_all(payload: Any, **options: Any) -> list[Any]:
    """Every value packed one after another in `payload`."""
    # The limits of an Unpacker follow its buffer's size; the payload is whole.
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(1, len(payload)),
        **options,
    )
    unpacker.feed(payload)
    return list(unpacker)


def _budget(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"a batch's budget must be seconds, got {value!r}")
    return float(value)


def pack_batch_outcomes(elapsed_s: float, outcomes: list[list[Any]]) -> bytes:
    """Encode a batch's result: ``[elapsed_s, [[status, value or error], ...]]``.

    `elapsed_s` is the time the items took to run, which tells the client how
    many items the next batch should carry. A batch stopped at its budget has
    the outcomes of its first items only; the others did not run.

    Raises:
        UsageError: some value cannot be encoded; the caller finds which.
    """
    return pack_value([elapsed_s, outcomes])


def unpack_batch_outcomes(value: Any, count: int) -> tuple[float, list[Any]]:
    """Check the decoded result of a batch of `count` items: the outcomes of
    its first items, all of them unless it stopped at its budget.

    Raises:
        ValueError: it is not ``[elapsed_s, [[status, value], ...]]`` with one
            to `count` outcomes.
    """
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError("a batch result must be [elapsed_s, outcomes]")
    elapsed_s, outcomes = value
    if not isinstance(elapsed_s, int | float) or not isinstance(outcomes, list):
        raise ValueError("a batch result must be [elapsed_s, outcomes]")
    if not 1 <= len(outcomes) <= count:
        raise ValueError(f"a batch of {count} items came back with {len(outcomes)}")
    if not all(isinstance(o, list) and len(o) == 2 for o in outcomes):
        raise ValueError("each outcome of a batch must be [status, value]")
    return float(elapsed_s), outcomes

"""What travels in payload frames: call arguments, results and error reports.

Arguments and results are msgpack by default: safe to decode from anyone, and
fast. A pickled callable (cloudpickle) is used only when both the client and the
worker opted in, because unpickling is running the sender's code.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle
import msgpack

from .errors import TaskError, UsageError

__all__ = [
    "pack_call",
    "pack_error",
    "pack_pickled_call",
    "pack_value",
    "unpack_call",
    "unpack_pickled_call",
    "unpack_value",
]


def pack_value(value: Any) -> bytes:
    """Encode a result (or any value) as msgpack.

    Raises:
        UsageError: the value has a type msgpack cannot carry; the message names it.
    """
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(
            f"cannot send a value of type {type(value).__name__} as msgpack ({exc}); "
            "use plain types: None, bool, int, float, str, bytes, list, dict"
        ) from exc


def unpack_value(payload: Any) -> Any:
    """Decode what `pack_value` encoded."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Encode call arguments as msgpack ``[args, kwargs]``."""
    return pack_value([list(args), kwargs] if kwargs else [list(args)])


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

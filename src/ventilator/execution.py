"""Running one task where it lands: decode, call, encode, never raise.

Shared by the process and thread pools of a worker. Whatever the task does,
`run_task` returns a status and a payload; an exception becomes an error report
with the remote type, message and traceback.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from . import mdp
from . import protocol as p
from ._shared import SharedPayloadGone, read_payload
from .errors import (
    FunctionNotFound,
    ProtocolError,
    TaskError,
    TaskRaised,
    TaskRejected,
    UsageError,
    plain_args,
)
from .serialization import (
    describe_error,
    pack_batch_outcomes,
    pack_error,
    pack_value,
    unpack_batch,
    unpack_call,
    unpack_pickled_batch,
    unpack_pickled_call,
)

__all__ = ["run_task"]

Unpickled = TypeVar("Unpickled")

# The flags as plain ints: `int & IntFlag` builds an enum member each time.
_BATCH = int(p.Flags.BATCH)
_PICKLED = int(p.Flags.PICKLED)
_RAW = int(p.Flags.RAW)
_SHARED = int(p.Flags.SHARED)
# How an unencodable result is named in its error.
RETURN_VALUE = "the task's return value"


def run_task(
    functions: Mapping[str, Callable[..., Any]],
    allow_pickle: bool,
    function: str,
    flags: int,
    payload: Any,
) -> tuple[p.Status, bytes]:
    """Run one task and return how it ended, with its result or error report."""
    try:
        if not flags & _SHARED:
            run = _decoded(functions, allow_pickle, function, flags, payload)
        else:
            # Decoded in place, in shared memory: the arguments are copied
            # once, out of it (see _shared.read_payload).
            plain = flags & ~_SHARED
            decode = partial(_decoded, functions, allow_pickle, function, plain)
            run = read_payload(payload, decode)
    except SharedPayloadGone as exc:
        # Reported as a death: see read_payload.
        return p.Status.CRASHED, pack_error(TaskError(p.PAYLOAD_GONE, str(exc)))
    except TaskError as error:
        return _status_of(error), pack_error(error)
    return run()


def _decoded(
    functions: Mapping[str, Callable[..., Any]],
    allow_pickle: bool,
    function: str,
    flags: int,
    payload: Any,
) -> Callable[[], tuple[p.Status, bytes]]:
    """The task, decoded, ready to run; raises TaskError when it cannot be."""
    if flags & _BATCH:
        target, items, budget_s = _prepare_batch(
            functions, allow_pickle, function, flags, payload
        )
        return partial(_run_batch, target, items, budget_s)
    target, args, kwargs = _prepare(functions, allow_pickle, function, flags, payload)
    return partial(_run_call, target, args, kwargs, bool(flags & _RAW))


def _run_call(
    target: Callable[..., Any], args: Any, kwargs: Any, raw: bool
) -> tuple[p.Status, bytes]:
    try:
        value = target(*args, **kwargs)
        if raw:
            return p.Status.OK, _mdp_reply(value)
    # Whatever the task raises, SystemExit included, is its result, not our crash.
    except BaseException as exc:
        return p.Status.RAISED, pack_error(_raised(exc))
    try:
        return p.Status.OK, pack_value(value, RETURN_VALUE)
    except UsageError as exc:
        return p.Status.RAISED, pack_error(_unsendable(exc))


def _run_batch(
    target: Callable[..., Any], items: list[Any], budget_s: float | None
) -> tuple[p.Status, bytes]:
    """Call the function on each item of a batch; each item has its own outcome.

    The batch as a whole is OK whenever it ran: an item that raised is reported
    in its place, and the other items keep their results. A batch with a time
    budget stops once it has run that long, with the outcomes it has.
    """
    started = time.perf_counter()
    outcomes = _call_each(target, items, started, budget_s)
    elapsed_s = time.perf_counter() - started
    try:
        return p.Status.OK, pack_batch_outcomes(elapsed_s, outcomes)
    except UsageError:
        # Some result cannot be encoded: find it, and fail that item alone.
        return p.Status.OK, pack_batch_outcomes(elapsed_s, _encodable(outcomes))


def _call_each(
    target: Callable[..., Any], items: list[Any], started: float, budget_s: float | None
) -> list[list[Any]]:
    """The outcomes of the items, in order, up to the first that ends past
    `started + budget_s`: the map sized the batch well under its budget by
    the items before, and sends what is left in batches sized by these."""
    if budget_s is None:
        return [_call_one(target, item) for item in items]
    # Names bound once: the clock is read after every item, and a tiny item
    # costs about as much as the reading.
    clock, deadline = time.perf_counter, started + budget_s
    outcomes: list[list[Any]] = []
    ran = outcomes.append
    for item in items:
        ran(_call_one(target, item))
        if clock() >= deadline:
            break
    return outcomes


def _call_one(target: Callable[..., Any], item: Any) -> list[Any]:
    try:
        return [p.Status.OK.value, target(item)]
    except BaseException as exc:  # as in run_task: the item's result, not our crash
        return [p.Status.RAISED.value, _raised(exc).to_wire()]


def _encodable(outcomes: list[list[Any]]) -> list[list[Any]]:
    checked = []
    for status, value in outcomes:
        try:
            pack_value(value, RETURN_VALUE)
        except UsageError as exc:
            status, value = p.Status.RAISED.value, _unsendable(exc).to_wire()
        checked.append([status, value])
    return checked


def _prepare_batch(
    functions: Mapping[str, Callable[..., Any]],
    allow_pickle: bool,
    function: str,
    flags: int,
    payload: Any,
) -> tuple[Callable[..., Any], list[Any], float | None]:
    if flags & _PICKLED:
        _refuse_pickle_unless(allow_pickle)
        return _unpickled(unpack_pickled_batch, payload, "batch")

    target = _served(functions, function)
    try:
        return target, *unpack_batch(payload)
    except Exception as exc:
        raise TaskRaised(
            "ValueError", f"cannot decode the items: {describe_error(exc)}"
        ) from exc


def _mdp_reply(value: Any) -> bytes:
    """An MDP service's return value as a reply body: bytes or a list of bytes."""
    frames = [value] if isinstance(value, bytes) else value
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise TypeError(
            "an MDP service returns bytes or a list of bytes, "
            f"not {type(value).__name__}"
        )
    return mdp.pack_body(frames)


def _unsendable(exc: UsageError) -> TaskRaised:
    """The task ran, but what it returned cannot travel: its fault, not the
    caller's, so not a UsageError."""
    return TaskRaised("UnsendableResult", str(exc))


def _raised(exc: BaseException) -> TaskRaised:
    args = plain_args(exc.args)
    return TaskRaised(type(exc).__name__, _text(exc), _traceback(exc), args)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the failure it describes
        return f"<{type(exc).__name__} with an unprintable message>"


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ""


def _prepare(
    functions: Mapping[str, Callable[..., Any]],
    allow_pickle: bool,
    function: str,
    flags: int,
    payload: Any,
) -> tuple[Callable[..., Any], Any, Any]:
    if flags & _PICKLED:
        _refuse_pickle_unless(allow_pickle)
        return _unpickled(unpack_pickled_call, payload, "call")

    if flags & _RAW:
        return _mdp_call(functions, function, payload)

    target = _served(functions, function)
    try:
        args, kwargs = unpack_call(payload)
    except Exception as exc:
        raise TaskRaised(
            "ValueError", f"cannot decode the arguments: {describe_error(exc)}"
        ) from exc
    return target, args, kwargs


def _unpickled(
    unpickle: Callable[[Any], Unpickled], payload: Any, what: str
) -> Unpickled:
    try:
        return unpickle(payload)
    except Exception as exc:
        message = f"cannot unpickle the {what}: {exc}"
        raise TaskRaised(type(exc).__name__, message) from exc


def _refuse_pickle_unless(allow_pickle: bool) -> None:
    if not allow_pickle:
        # Never unpickle here: unpickling is running the sender's code.
        raise TaskRejected(
            "PickleNotAllowed",
            "this worker does not run pickled callables; start it with "
            "--allow-pickle to allow them",
        )


def _served(
    functions: Mapping[str, Callable[..., Any]], function: str
) -> Callable[..., Any]:
    target = functions.get(function)
    if target is None:
        raise FunctionNotFound(
            "FunctionNotFound", f"this worker does not serve {function!r}"
        )
    return target


def _mdp_call(
    functions: Mapping[str, Callable[..., Any]], service: str, payload: Any
) -> tuple[Callable[..., Any], Any, Any]:
    target = functions.get(mdp.service_queue(service))
    if target is None:
        raise FunctionNotFound(
            "FunctionNotFound", f"this worker does not serve MDP service {service!r}"
        )
    try:
        frames = mdp.unpack_body(payload)
    except ProtocolError as exc:
        raise TaskRaised("ValueError", str(exc)) from exc
    return target, (frames,), {}


def _status_of(error: TaskError) -> p.Status:
    return {
        "not_found": p.Status.NOT_FOUND,
        "rejected": p.Status.REJECTED,
    }.get(error.kind, p.Status.RAISED)

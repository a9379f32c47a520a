"""Every exception ventilator raises, in one tree.

::

    VentilatorError
    ├── UsageError                  the caller misused the API or the CLI
    │   ├── PickleNotAllowed        a callable was submitted without allow_pickle
    │   └── SessionRefused          the broker refused the client's session
    │       └── SessionInUse        another live client holds the session
    ├── ProtocolError               a peer sent frames we cannot decode
    ├── JournalError                the broker cannot write its journal
    ├── TaskError                   a task did not produce a result
    │   ├── TaskRaised              the task's own code raised an exception
    │   ├── TaskTimeout             the task ran past its timeout_s
    │   ├── PoisonTask              workers died running it max_attempts times
    │   ├── FunctionNotFound        no worker serves, or may run, the function
    │   ├── TaskRejected            the broker refused it (size, queue, rights)
    │   └── ResultExpired           the result outlived the broker's result TTL
    └── NetworkError            the network or the broker went away
        ├── BrokerTimeout           no answer to a question in time (a TimeoutError)
        └── ClientClosed            the client was closed with tasks pending
            └── ClientBroken        its I/O thread failed; it can do nothing more

`TaskError` and its subclasses cross process boundaries: a worker reports one as a
plain dict (`to_wire`), the client rebuilds it (`task_error_from_wire`), and each
instance pickles, so a `Future` holding one can be passed between processes too.
A `TaskRaised` whose remote type is a built-in exception class is an instance of
that class too, as `BrokerTimeout` is a `TimeoutError`: `except ValueError`
catches a task's ValueError, as it would from a `ProcessPoolExecutor`.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "BrokerTimeout",
    "ClientBroken",
    "ClientClosed",
    "FunctionNotFound",
    "JournalError",
    "NetworkError",
    "PickleNotAllowed",
    "PoisonTask",
    "ProtocolError",
    "ResultExpired",
    "SessionInUse",
    "SessionRefused",
    "TaskError",
    "TaskRaised",
    "TaskRejected",
    "TaskTimeout",
    "UsageError",
    "VentilatorError",
    "task_error_from_wire",
]


class VentilatorError(Exception):
    """The root of every exception ventilator raises on purpose."""


class UsageError(VentilatorError):
    """The caller asked for something ventilator cannot do as asked."""


class PickleNotAllowed(UsageError):
    """A callable was submitted but pickled callables were not enabled."""


class SessionRefused(UsageError):
    """The broker refused this client's session for as long as the client
    waited: it has no room for another (`max_sessions`, or the few sessions
    one connection may open); the message names the limit. Close clients
    that are done, or wait for sessions that left to be forgotten."""


class SessionInUse(SessionRefused):
    """Another live `Client` holds this client's session, and kept it for as
    long as this one waited (see docs/python.md, Sessions): close that one, or
    use another session name."""


class JournalError(VentilatorError):
    """The broker could not write its journal (a full or read-only disk, a
    damaged file): it stops rather than answer for what is not on disk. The
    message names the journal's path and the cause."""


class ProtocolError(VentilatorError):
    """A peer sent frames that do not follow the ventilator protocol.

    Attributes:
        code: a short stable identifier of the fault, sent back to the peer.
    """

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code!r})"


class TaskError(VentilatorError):
    """A task ended without a result.

    Attributes:
        kind: which of the documented reasons applies (see the subclasses).
        remote_type: the name of the remote exception type, e.g. ``"ValueError"``.
        message: the remote exception's message.
        remote_traceback: the formatted traceback from the worker, or ``""``.
    """

    kind = "error"

    def __init__(
        self,
        remote_type: str,
        message: str,
        remote_traceback: str = "",
        remote_args: tuple[Any, ...] | None = None,
    ) -> None:
        super().__init__(remote_type, message)
        self._describe(remote_type, message, remote_traceback, remote_args)

    def _describe(
        self,
        remote_type: str,
        message: str,
        remote_traceback: str,
        remote_args: tuple[Any, ...] | None,
    ) -> None:
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback
        # The remote exception's args, when they were plain values (see
        # plain_args); None when they did not travel.
        self.remote_args = remote_args

    def __reduce__(self) -> tuple[Any, ...]:
        # By kind, not by class: a TaskRaised that is also a ValueError has a
        # class made at run time, which pickle cannot find by name.
        return (task_error_from_wire, (self.to_wire(),))

    @property
    def _names_itself(self) -> bool:
        """Whether the remote type is only this class's own name (the broker's
        refusals, timeouts, poison): then saying it again adds nothing."""
        return self.remote_type == type(self).__name__

    @property
    def summary(self) -> str:
        """One line: the remote type (unless it is this class's name) and the
        message, without the traceback."""
        # A traceback line reads "ventilator.errors.TaskRaised: ValueError: x",
        # but "ventilator.errors.TaskRejected: <reason>", not the name twice.
        if self._names_itself:
            return self.message
        return f"{self.remote_type}: {self.message}"

    def __str__(self) -> str:
        text = self.summary
        if self.remote_traceback:
            text += f"\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return text

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._names_itself:
            return f"{name}(message={self.message!r})"
        return f"{name}(remote_type={self.remote_type!r}, message={self.message!r})"

    def to_wire(self) -> dict[str, Any]:
        """The error as a plain dict that msgpack can carry."""
        wire: dict[str, Any] = {
            "kind": self.kind,
            "type": _utf8(self.remote_type),
            "message": _utf8(self.message),
            "traceback": _utf8(self.remote_traceback),
        }
        if self.remote_args is not None:
            wire["args"] = list(self.remote_args)
        return wire


class TaskRaised(TaskError):
    """The task's own code raised; `remote_type` names the exception."""

    kind = "raised"


class TaskTimeout(TaskError):
    """The task ran longer than its ``timeout_s`` and the worker stopped it."""

    kind = "timeout"


class PoisonTask(TaskError):
    """Every attempt to run the task ended with its worker process dying."""

    kind = "poison"


class FunctionNotFound(TaskError):
    """The worker that received the task does not serve its function."""

    kind = "not_found"


class TaskRejected(TaskError):
    """The broker refused the task: too large, queue full, or not allowed."""

    kind = "rejected"


class ResultExpired(TaskError):
    """The result was dropped after the broker kept it for its result TTL."""

    kind = "expired"


class NetworkError(VentilatorError):
    """The broker could not be reached, or stopped answering."""


class BrokerTimeout(NetworkError, TimeoutError):
    """The broker did not answer a question (status, failed, retry, purge,
    an operator's cancel) in time; the message names its address, the wait,
    and whether any broker answered there yet. Also a built-in
    `TimeoutError`, which these questions raised before."""


class ClientClosed(NetworkError):
    """The client was closed while this task was still pending."""


class ClientBroken(ClientClosed):
    """The client's I/O thread failed (the message names why): its pending
    tasks fail with this, and so does every later call; make a new client."""


# What of an exception's args travels: a few plain values, each small (a
# KeyError's key, an OSError's errno and text; a string's length counted in
# characters, a bytes' in bytes). Anything else stays behind:
# the client must not rebuild objects of the task's making.
MAX_ARGS = 8
MAX_ARG_LENGTH = 4096
_PLAIN = (type(None), bool, int, float, str, bytes)


def plain_args(args: Any) -> tuple[Any, ...] | None:
    """`args` as a tuple if it is a short sequence of small plain values
    (None, bool, int, float, str, bytes) that msgpack carries; else None.
    Read from the wire too, where nothing else is trusted."""
    if not isinstance(args, (list, tuple)) or len(args) > MAX_ARGS:
        return None
    for arg in args:
        if type(arg) not in _PLAIN:
            return None
        if isinstance(arg, int) and not -(2**63) <= arg < 2**64:
            return None
        if isinstance(arg, (str, bytes)) and len(arg) > MAX_ARG_LENGTH:
            return None
        if isinstance(arg, str) and not _utf8_encodable(arg):
            return None  # a file name's lone surrogates: msgpack cannot carry it
    return tuple(args)


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_KINDS: dict[str, type[TaskError]] = {
    cls.kind: cls
    for cls in (
        TaskRaised,
        TaskTimeout,
        PoisonTask,
        FunctionNotFound,
        TaskRejected,
        ResultExpired,
    )
}


def task_error_from_wire(fields: Any) -> TaskError:
    """Rebuild a `TaskError` from the dict made by `TaskError.to_wire`.

    Unknown kinds become a plain `TaskError`, so a newer worker never makes an
    older client fail to report an error. A value that is not a dict at all
    still gives an error that says so.
    """
    if not isinstance(fields, dict):
        return TaskError("ProtocolError", f"undecodable error report {fields!r:.80}")

    cls = _KINDS.get(str(fields.get("kind", "")), TaskError)
    remote_type = str(fields.get("type", "Error"))
    if cls is TaskRaised:
        cls = _raised_as(remote_type)
    return cls(
        remote_type,
        str(fields.get("message", "")),
        str(fields.get("traceback", "")),
        plain_args(fields.get("args")),
    )


# Built-in exceptions a task's error does not pose as: they end a program, or
# a generator that happens to call result().
_NOT_MIMICKED = frozenset({StopIteration, StopAsyncIteration})


def _raised_as(remote_type: str) -> type[TaskRaised]:
    """The class of a task's raised error named `remote_type`: TaskRaised,
    and the built-in exception class of that name, if there is one.

    Only built-ins: a class the wire names is never imported, as importing
    would run a module's code. Exceptions that are not `Exception`s
    (KeyboardInterrupt, SystemExit) are not mimicked either.
    """
    builtin = getattr(builtins, remote_type, None)
    if (
        not isinstance(builtin, type)
        or not issubclass(builtin, Exception)
        or builtin in _NOT_MIMICKED
    ):
        return TaskRaised
    mixed = _MIXED.get(builtin)
    if mixed is None:
        mixed = _MIXED[builtin] = _mixed_with(builtin)
    return mixed


# Made once per built-in class: a few dozen at most.
_MIXED: dict[type[Exception], type[TaskRaised]] = {}


def _mixed_with(builtin: type[Exception]) -> type[TaskRaised]:
    namespace = {
        "__module__": __name__,
        "__init__": _init_as_builtin,
        "_builtin": builtin,
    }
    try:
        cls = type("TaskRaised", (TaskRaised, builtin), namespace)
        # One whose __new__ wants arguments of its own cannot pose: an
        # ExceptionGroup's members did not travel.
        cls("ValueError", "", "")
    except TypeError:
        return TaskRaised
    return cls


def _init_as_builtin(
    self: Any,
    remote_type: str,
    message: str,
    remote_traceback: str = "",
    remote_args: tuple[Any, ...] | None = None,
) -> None:
    self._describe(remote_type, message, remote_traceback, remote_args)
    # As the built-in's own: `except KeyError as e: e.args[0]` is the key and
    # an OSError's errno its number, when they travelled; else the message.
    args = (message,) if remote_args is None else remote_args
    try:
        self._builtin.__init__(self, *args)
    except (TypeError, ValueError):
        # It wants arguments that did not travel (a UnicodeDecodeError's
        # object and positions): the message will do.
        BaseException.__init__(self, *args)
    self.args = args
    if isinstance(self, OSError) and self.strerror is None:
        self.strerror = message

"""The exception tree, and task errors crossing processes by msgpack and pickle."""

from __future__ import annotations

import pickle
import traceback

import msgpack
import pytest

import ventilator
from ventilator import errors
from ventilator.errors import (
    BrokerTimeout,
    ClientClosed,
    FunctionNotFound,
    NetworkError,
    PickleNotAllowed,
    PoisonTask,
    ProtocolError,
    ResultExpired,
    SessionInUse,
    SessionRefused,
    TaskError,
    TaskRaised,
    TaskRejected,
    TaskTimeout,
    UsageError,
    VentilatorError,
    task_error_from_wire,
)

TASK_ERRORS = [TaskError, *TaskError.__subclasses__()]
TRACEBACK = 'Traceback (most recent call last):\n  File "t.py", line 1\nValueError: x\n'


def through_msgpack(error: TaskError) -> TaskError:
    wire = msgpack.unpackb(msgpack.packb(error.to_wire()), raw=False)
    return task_error_from_wire(wire)


def test_every_documented_task_error_is_a_subclass() -> None:
    documented = {
        TaskRaised,
        TaskTimeout,
        PoisonTask,
        FunctionNotFound,
        TaskRejected,
        ResultExpired,
    }

    assert set(TaskError.__subclasses__()) == documented


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        (UsageError, VentilatorError),
        (PickleNotAllowed, UsageError),
        (SessionInUse, UsageError),
        (SessionRefused, UsageError),
        (SessionInUse, SessionRefused),
        (ProtocolError, VentilatorError),
        (TaskError, VentilatorError),
        (NetworkError, VentilatorError),
        (ClientClosed, NetworkError),
        (BrokerTimeout, NetworkError),
        (BrokerTimeout, TimeoutError),
    ],
)
def test_exception_tree_is_as_the_docstring_draws_it(child: type, parent: type) -> None:
    assert issubclass(child, parent)
    assert child.__name__ in (errors.__doc__ or "")


@pytest.mark.parametrize("cls", TASK_ERRORS, ids=lambda c: c.__name__)
def test_task_error_survives_msgpack_with_type_message_and_traceback(
    cls: type[TaskError],
) -> None:
    error = cls("ValueError", "bad input: 3", TRACEBACK)

    again = through_msgpack(error)

    assert isinstance(again, cls) and type(again).__name__ == cls.__name__
    assert (again.remote_type, again.message) == ("ValueError", "bad input: 3")
    assert again.remote_traceback == TRACEBACK


@pytest.mark.parametrize("cls", TASK_ERRORS, ids=lambda c: c.__name__)
def test_task_error_survives_pickle_with_type_message_and_traceback(
    cls: type[TaskError],
) -> None:
    error = cls("KeyError", "'missing'", TRACEBACK)

    again = pickle.loads(pickle.dumps(error))

    assert isinstance(again, cls) and type(again).__name__ == cls.__name__
    assert (again.remote_type, again.message) == ("KeyError", "'missing'")
    assert again.remote_traceback == TRACEBACK
    assert str(again) == str(error)


def test_task_kinds_are_distinct() -> None:
    kinds = [cls.kind for cls in TASK_ERRORS]

    assert len(set(kinds)) == len(kinds)


def test_unknown_kind_degrades_to_a_plain_task_error() -> None:
    wire = {"kind": "from_the_future", "type": "Odd", "message": "m", "traceback": ""}

    error = task_error_from_wire(wire)

    assert type(error) is TaskError
    assert (error.remote_type, error.message) == ("Odd", "m")


def test_missing_fields_get_defaults() -> None:
    error = task_error_from_wire({"kind": "raised"})

    assert type(error) is TaskRaised
    assert (error.remote_type, error.message, error.remote_traceback) == (
        "Error",
        "",
        "",
    )


@pytest.mark.parametrize("value", [None, 42, "oops", [1, 2], b"\x00"])
def test_report_that_is_not_a_dict_gives_a_task_error_saying_so(value: object) -> None:
    error = task_error_from_wire(value)

    assert type(error) is TaskError
    assert "undecodable error report" in error.message
    assert repr(value)[:10] in error.message


def test_task_error_message_shows_the_remote_traceback() -> None:
    text = str(TaskRaised("ValueError", "x", TRACEBACK))

    assert text.startswith("ValueError: x")
    assert "Remote traceback:" in text and 'File "t.py"' in text


def test_task_error_without_traceback_is_one_line() -> None:
    assert str(TaskRaised("ValueError", "bad input")) == "ValueError: bad input"


@pytest.mark.parametrize("cls", TASK_ERRORS, ids=lambda c: c.__name__)
def test_task_error_named_after_its_own_type_says_the_name_once(
    cls: type[TaskError],
) -> None:
    error = cls(cls.__name__, "payload of 9 bytes is over the limit")

    line = traceback.format_exception_only(error)[-1]

    assert str(error) == "payload of 9 bytes is over the limit"
    assert line.count(cls.__name__) == 1, line
    assert repr(error).count(cls.__name__) == 1, repr(error)


def test_task_error_repr_names_the_remote_type_when_it_differs() -> None:
    error = TaskRaised("KeyError", "'missing'", TRACEBACK)

    assert repr(error) == "TaskRaised(remote_type='KeyError', message=\"'missing'\")"


def test_protocol_error_repr_shows_its_code() -> None:
    assert repr(ProtocolError("bad header", "header")) == (
        "ProtocolError('bad header', code='header')"
    )


def test_protocol_error_keeps_its_code_through_pickle() -> None:
    again = pickle.loads(pickle.dumps(ProtocolError("bad header", "header")))

    assert (str(again), again.code) == ("bad header", "header")


def test_protocol_error_code_defaults_to_malformed() -> None:
    assert ProtocolError("x").code == "malformed"


@pytest.mark.parametrize(
    "cls",
    [
        UsageError,
        PickleNotAllowed,
        SessionInUse,
        SessionRefused,
        NetworkError,
        ClientClosed,
    ],
)
def test_other_errors_survive_pickle(cls: type[VentilatorError]) -> None:
    again = pickle.loads(pickle.dumps(cls("what went wrong")))

    assert type(again) is cls
    assert str(again) == "what went wrong"


def test_all_names_the_module_exports_exist() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }

    assert set(errors.__all__) == defined | {"task_error_from_wire"}


def test_package_exports_every_public_exception() -> None:
    public = set(errors.__all__) - {"task_error_from_wire"}

    assert public <= set(ventilator.__all__)
    assert all(getattr(ventilator, name) is getattr(errors, name) for name in public)


def test_summary_is_one_line_without_the_traceback() -> None:
    assert TaskRaised("ValueError", "x", TRACEBACK).summary == "ValueError: x"
    assert PoisonTask("PoisonTask", "died twice").summary == "died twice"


def test_broker_timeout_survives_pickle_with_its_message() -> None:
    error = BrokerTimeout("the broker at tcp://127.0.0.1:1 did not answer")

    again = pickle.loads(pickle.dumps(error))

    assert type(again) is BrokerTimeout
    assert str(again) == str(error)


@pytest.mark.parametrize(
    ("remote_type", "builtin"),
    [("ValueError", ValueError), ("KeyError", KeyError), ("OSError", OSError)],
)
def test_a_remote_builtin_exception_is_caught_as_its_own_class(
    remote_type: str, builtin: type[Exception]
) -> None:
    # Tester 24 ported `except ValueError` code from ProcessPoolExecutor, which
    # raises the function's own exception; ours was only a TaskRaised.
    error = through_msgpack(TaskRaised(remote_type, "bad input: 3", TRACEBACK))

    assert isinstance(error, TaskRaised)
    assert isinstance(error, builtin)
    assert error.args == ("bad input: 3",)  # as the built-in's own
    if isinstance(error, OSError):  # the errno did not travel, only the text
        assert (error.errno, error.strerror) == (None, "bad input: 3")
    assert (error.remote_type, error.message) == (remote_type, "bad input: 3")
    assert str(error).startswith(f"{remote_type}: bad input: 3")
    assert repr(error).startswith("TaskRaised(")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, builtin) and again.remote_traceback == TRACEBACK


def test_a_builtin_wanting_arguments_that_did_not_travel_is_mimicked() -> None:
    error = through_msgpack(TaskRaised("UnicodeDecodeError", "'utf-8' codec can't"))

    assert isinstance(error, UnicodeDecodeError) and isinstance(error, ValueError)
    assert error.args == ("'utf-8' codec can't",)


def test_an_exception_group_is_a_plain_task_raised() -> None:
    # Its members did not travel: `except*` could match none of them.
    error = through_msgpack(TaskRaised("ExceptionGroup", "grp (2 sub-exceptions)"))

    assert type(error) is TaskRaised


@pytest.mark.parametrize(
    "forged", [[{"a": 1}], "k", [2**64], ["x" * 5000], list(range(9)), [[1]]]
)
def test_args_on_the_wire_that_are_not_a_few_plain_values_are_ignored(
    forged: object,
) -> None:
    wire = {"kind": "raised", "type": "KeyError", "message": "'k'", "args": forged}

    error = task_error_from_wire(wire)

    assert isinstance(error, KeyError)
    assert error.args == ("'k'",)


@pytest.mark.parametrize(
    "remote_type",
    ["MyError", "KeyboardInterrupt", "SystemExit", "StopIteration", "print", "os"],
)
def test_other_remote_types_are_a_plain_task_raised(remote_type: str) -> None:
    # Only the builtins' exception classes: a class named by the wire is never
    # imported (that would run a module's code), one that ends a program or a
    # generator is not mimicked, and names that are no exception mean nothing.
    error = through_msgpack(TaskRaised(remote_type, "x"))

    assert type(error) is TaskRaised

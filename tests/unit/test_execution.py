"""run_task: whatever the task does, a status and a payload come back."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ventilator import protocol as p
from ventilator.errors import task_error_from_wire
from ventilator.execution import run_task
from ventilator.serialization import (
    pack_call,
    pack_pickled_call,
    pack_value,
    unpack_value,
)


def add(a: int, b: int, c: int = 0) -> int:
    return a + b + c


def divide(a: float, b: float) -> float:
    return a / b


def give_back_a_set() -> set[int]:
    return {1, 2}


FUNCTIONS = {"jobs:add": add, "jobs:divide": divide, "jobs:set": give_back_a_set}


def run(
    function: str,
    payload: Any,
    flags: int = 0,
    allow_pickle: bool = False,
    functions: dict[str, Any] = FUNCTIONS,
) -> tuple[p.Status, Any]:
    status, result = run_task(functions, allow_pickle, function, flags, payload)
    return status, unpack_value(result)


def call(*args: Any, **kwargs: Any) -> bytes:
    return pack_call(args, kwargs)


class MakesADirectoryWhenUnpickled:
    """Unpickling this runs os.mkdir: proof of whether a payload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def test_result_of_a_registered_function_is_ok_and_packed() -> None:
    assert run("jobs:add", call(1, 2, c=3)) == (p.Status.OK, 6)


def test_exception_becomes_raised_with_type_message_and_traceback() -> None:
    status, report = run("jobs:divide", call(1, 0))

    error = task_error_from_wire(report)
    assert status is p.Status.RAISED
    assert (error.kind, error.remote_type) == ("raised", "ZeroDivisionError")
    assert error.message == "division by zero"
    assert "in divide" in error.remote_traceback
    assert "return a / b" in error.remote_traceback


def test_wrong_arguments_become_raised_type_error() -> None:
    status, report = run("jobs:add", call(1, 2, 3, 4))

    assert status is p.Status.RAISED
    assert report["type"] == "TypeError"


def test_unknown_function_is_not_found_naming_it() -> None:
    status, report = run("jobs:missing", call())

    assert status is p.Status.NOT_FOUND
    assert report["kind"] == "not_found"
    assert "'jobs:missing'" in report["message"]


@pytest.mark.parametrize("payload", [b"\xc1", pack_value({"args": [1]}), b""])
def test_arguments_that_cannot_be_decoded_become_raised(payload: bytes) -> None:
    status, report = run("jobs:add", payload)

    assert status is p.Status.RAISED
    assert "cannot decode the arguments" in report["message"]


def test_result_msgpack_cannot_carry_becomes_raised_naming_its_type() -> None:
    status, report = run("jobs:set", call())

    assert status is p.Status.RAISED
    assert report["type"] == "UnsendableResult"  # the task's fault, not the caller's
    assert report["message"].startswith("the task's return value cannot be sent")
    assert "set" in report["message"]


def test_pickled_payload_is_rejected_and_never_unpickled_without_allow_pickle(
    tmp_path: Path,
) -> None:
    witness = tmp_path / "unpickled"
    payload = pickle.dumps(MakesADirectoryWhenUnpickled(witness))

    status, report = run("", payload, flags=p.Flags.PICKLED)

    assert status is p.Status.REJECTED
    assert report["type"] == "PickleNotAllowed"
    assert "--allow-pickle" in report["message"]
    assert not witness.exists()


def test_the_witness_payload_does_show_when_it_is_unpickled(tmp_path: Path) -> None:
    witness = tmp_path / "unpickled"
    payload = pickle.dumps(MakesADirectoryWhenUnpickled(witness))

    status, report = run("", payload, p.Flags.PICKLED, allow_pickle=True)

    assert witness.is_dir()
    assert status is p.Status.RAISED
    assert "cannot unpickle the call" in report["message"]


def test_pickled_call_runs_where_pickle_is_allowed() -> None:
    payload = pack_pickled_call(lambda x: [x, x], ("hi",), {})

    assert run("", payload, p.Flags.PICKLED, allow_pickle=True) == (
        p.Status.OK,
        ["hi", "hi"],
    )


def test_pickled_flag_wins_over_a_registered_function_name() -> None:
    payload = pack_pickled_call(lambda: "pickled", (), {})

    status, _ = run("jobs:add", payload, flags=p.Flags.PICKLED)

    assert status is p.Status.REJECTED


@given(payload=st.binary(max_size=40), function=st.sampled_from([*FUNCTIONS, "x"]))
def test_any_payload_gives_a_status_and_a_report(payload: bytes, function: str) -> None:
    status, result = run_task(FUNCTIONS, False, function, 0, payload)

    assert isinstance(status, p.Status)
    assert status is p.Status.OK or isinstance(unpack_value(result), dict)


def exits() -> None:
    sys.exit(3)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this error cannot describe itself")


def raises_unprintable() -> None:
    raise UnprintableError


def raises_with_an_undecodable_file_name() -> None:
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    raise ValueError(f"cannot read {name}")


def test_task_that_calls_sys_exit_becomes_raised() -> None:
    status, report = run("jobs:exits", call(), functions={"jobs:exits": exits})

    assert (status, report["type"]) == (p.Status.RAISED, "SystemExit")


def test_exception_that_cannot_be_printed_still_becomes_raised() -> None:
    functions = {"jobs:unprintable": raises_unprintable}

    status, report = run("jobs:unprintable", call(), functions=functions)

    assert (status, report["type"]) == (p.Status.RAISED, "UnprintableError")


def test_exception_message_with_an_undecodable_file_name_becomes_raised() -> None:
    functions = {"jobs:read": raises_with_an_undecodable_file_name}

    status, report = run("jobs:read", call(), functions=functions)

    assert (status, report["type"]) == (p.Status.RAISED, "ValueError")
    assert "report-" in report["message"]


def raise_this(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize(
    ("error", "caught_as", "args"),
    [
        (KeyError("k"), KeyError, ("k",)),
        (KeyError(5), LookupError, (5,)),
        (ValueError("a", 2), ValueError, ("a", 2)),
        (ValueError(), ValueError, ()),
        (FileNotFoundError(2, "No such file"), OSError, (2, "No such file")),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), ValueError, None),
    ],
)
def test_a_raised_builtin_comes_back_with_its_plain_args(
    error: Exception, caught_as: type[Exception], args: tuple[object, ...] | None
) -> None:
    # Tester 35: `except KeyError as e: e.args[0]` was the key's repr, and a
    # UnicodeDecodeError was no ValueError at all.
    functions = {"jobs:raise": lambda: raise_this(error)}

    status, report = run("jobs:raise", call(), functions=functions)
    again = task_error_from_wire(report)

    assert status is p.Status.RAISED
    assert isinstance(again, caught_as)
    assert again.args == (error.args if args is None else args)


def test_args_that_are_not_plain_values_stay_behind() -> None:
    functions = {"jobs:raise": lambda: raise_this(ValueError(object(), "x"))}

    _, report = run("jobs:raise", call(), functions=functions)

    assert "args" not in report
    assert task_error_from_wire(report).args == (report["message"],)


def echo_frames(body: list[bytes]) -> list[bytes]:
    return [*body, b"done"]


def join_frames(body: list[bytes]) -> bytes:
    return b"".join(body)


def give_back_text(body: list[bytes]) -> str:
    return "not bytes"


MDP_FUNCTIONS = {
    "mdp:echo": echo_frames,
    "mdp:join": join_frames,
    "mdp:text": give_back_text,
}


def _run_raw(service: str, body: list[bytes]) -> tuple[p.Status, bytes]:
    from ventilator import mdp

    return run_task(MDP_FUNCTIONS, False, service, p.Flags.RAW, mdp.pack_body(body))


def test_an_mdp_service_gets_the_body_frames_and_returns_a_body() -> None:
    from ventilator import mdp

    status, payload = _run_raw("echo", [b"a", b""])
    assert (status, mdp.unpack_body(payload)) == (p.Status.OK, [b"a", b"", b"done"])

    status, payload = _run_raw("join", [b"a", b"b"])
    assert (status, mdp.unpack_body(payload)) == (p.Status.OK, [b"ab"])


def test_an_mdp_service_returning_no_bytes_raised() -> None:
    status, payload = _run_raw("text", [b"a"])

    assert status is p.Status.RAISED
    message = task_error_from_wire(unpack_value(payload)).message
    assert "bytes or a list of bytes" in message


def test_an_mdp_service_the_worker_lacks_is_not_found() -> None:
    status, _ = _run_raw("missing", [b"a"])

    assert status is p.Status.NOT_FOUND

"""What `map` and `exec` run: a `Job` names the function, the task argument
each input line stands for, and the record each outcome is written as.
`map_job` calls a module's function with each line's value; `exec_job` runs a
command per line through the workers' `ventilator.shell`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._input_records import not_utf8, parse_line
from ._run_output import Record, exec_record, map_record, sink_record
from .policy import Limits

if TYPE_CHECKING:
    from .client import Client, ItemOutcome

SHELL_FUNCTION = "ventilator.shell:run_call"
# What a broker takes when it was not told otherwise, as an embedded one is not.
_DEFAULT_MAX_PAYLOAD_BYTES = Limits().max_payload_bytes


@dataclass(frozen=True, slots=True)
class Job:
    """What `map` and `exec` share: an item per line, a record per outcome."""

    function: str
    item_of: Callable[[str], Any]  # the function's argument for one input line
    modules: list[str]  # what embedded workers must serve
    record: Callable[[str, Any, ItemOutcome], Record]
    timeout_s: float | None = None  # per line, enforced by the worker
    retries: int = 0  # per line
    sink: str | None = None  # results go there, not to the output
    # Told the client once it is connected (exec: to learn the broker's limits).
    connected: Callable[[Client], None] | None = None
    # Whether a line that is not UTF-8 can run (exec passes its bytes on).
    takes_any_bytes: bool = False
    # The command the run is, which names its session at a broker.
    command: str = "map"
    # Whether a failed line's record carries the worker's traceback.
    tracebacks: bool = False


class _ResultLimit:
    """The broker's limit on a result, once its client has learnt it."""

    def __init__(self) -> None:
        self._client: Client | None = None

    def learn(self, client: Client) -> None:
        self._client = client

    def max_payload_bytes(self) -> int:
        # The client learns it from the broker's WELCOME; until then (the
        # first lines of an embedded run) the default, which such a broker has.
        client = self._client
        known = client._handover.max_payload_bytes if client is not None else None
        return known or _DEFAULT_MAX_PAYLOAD_BYTES


def map_job(
    function: str,
    timeout_s: float | None,
    retries: int,
    sink: str | None,
    tracebacks: bool = False,
) -> Job:
    """`function` (module:name) called with each line's value; its results
    written, or with `sink` sent there and each line's acceptance written;
    with `tracebacks`, a failed line's record holds where it failed."""
    module = function.partition(":")[0]
    record = map_record if sink is None else sink_record
    return Job(
        function,
        parse_line,
        [module],
        record,
        timeout_s,
        retries,
        sink,
        tracebacks=tracebacks,
    )


def exec_job(command: Sequence[str], timeout_s: float | None, retries: int) -> Job:
    """`command` run once per line, '{}' in an argument replaced by the line,
    or the line appended when no argument holds '{}'."""
    substitute = any("{}" in arg for arg in command)
    limit = _ResultLimit()

    def call(line: str) -> list[Any]:
        texts = (
            [a.replace("{}", line) for a in command] if substitute else [*command, line]
        )
        argv = [_argument(text) for text in texts]
        # The timeout travels with each line: the command's own, which kills
        # its process group, not the task's, which would kill the worker's child.
        # So does the most output a result may carry: past it the command is
        # stopped rather than read into memory for a result the broker refuses.
        return [argv, timeout_s, limit.max_payload_bytes()]

    return Job(
        SHELL_FUNCTION,
        call,
        ["ventilator.shell"],
        exec_record,
        None,
        retries,
        connected=limit.learn,
        takes_any_bytes=True,
        command="exec",
    )


def _argument(text: str) -> str | bytes:
    """A command's argument as it travels: its bytes when they are not UTF-8
    (a file name in another encoding, read with surrogateescape), which the
    command then receives exactly as they were read."""
    if text.isascii() or not_utf8(text) is None:
        return text
    return text.encode("utf-8", "surrogateescape")

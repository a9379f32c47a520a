"""What `map`, `exec` and `sink` write: one JSON object per input line or
result, strict JSON whatever a task returned, to an `Output` whose write
errors name the file and end the run (`OutputFailed`) rather than the
process."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
from typing import IO, TYPE_CHECKING, Any

from ._input_records import Unsendable, not_utf8
from .errors import TaskError

if TYPE_CHECKING:
    from ._jobs import Job
    from .client import ItemOutcome
    from .sink import Sink, SinkResult


class OutputFailed(Exception):
    """Writing the output failed: the run stops, its unfinished tasks cancelled."""

    def __init__(self, name: str, error: OSError) -> None:
        super().__init__(f"cannot write the output to {name}: {error.strerror}")
        self.broken_pipe = isinstance(error, BrokenPipeError)


class Output:
    """The output stream of map and exec, whose write errors say which file
    failed and leave nothing for Python to fail on again at exit."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self.name = name

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except OSError as exc:
            raise self.failed(exc) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self.failed(exc) from exc

    def watched_fd(self) -> int | None:
        """The descriptor to watch for the output's reader leaving, None when
        there is none to watch (a test's StringIO, a closed descriptor)."""
        try:
            fd = self._stream.fileno()
            os.fstat(fd)
        except (OSError, ValueError):
            return None
        return fd

    def failed(self, error: OSError) -> OutputFailed:
        """The error to end the run with, once writing failed or would fail."""
        # What is still buffered would fail again when the stream is closed
        # or at exit ("Exception ignored ..."): let it go to /dev/null instead.
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        return OutputFailed(self.name, error)


Record = tuple[dict[str, Any], bool]


def map_record(line: str, item: Any, outcome: ItemOutcome) -> Record:
    if outcome.error is None:
        return {"input": item, "result": outcome.value}, True
    return {"input": item, "error": _error_fields(outcome.error)}, False


def sink_record(line: str, item: Any, outcome: ItemOutcome) -> Record:
    if outcome.error is None:
        return {"input": item, **outcome.value}, True
    return {"input": item, "error": _error_fields(outcome.error)}, False


def exec_record(line: str, item: Any, outcome: ItemOutcome) -> Record:
    if outcome.error is not None:
        return {
            "input": line,
            "exit_code": None,
            "stdout": "",
            "stderr": "",
            "error": _error_fields(outcome.error),
        }, False
    return {"input": line, **outcome.value}, outcome.value["exit_code"] == 0


def write_record(
    output: Output, job: Job, line: str, item: Any, outcome: ItemOutcome
) -> bool:
    """Write the record of one line; return whether the line succeeded."""
    fields, ok = _record(job, line, item, outcome)
    try:
        text = _json_line(fields)
    except RecursionError:
        # A value nested too deep for the JSON encoder (an echo of a deep
        # input, say) fails its own line, not the run: the line is shown as read.
        message = "the record is nested too deep to write as JSON"
        error = {"type": "RecursionError", "message": message}
        text, ok = _json_line({"input": line, "error": error}), False
    output.write(text)
    return ok


def _record(job: Job, line: str, item: Any, outcome: ItemOutcome) -> Record:
    """The output record of one line, and whether it succeeded."""
    if isinstance(item, Unsendable):
        return {"input": line, "error": _error_fields(item.error)}, False
    fields, ok = job.record(line, item, outcome)
    if job.tracebacks and isinstance(outcome.error, TaskError):
        _add_traceback(fields, outcome.error)
    problem = None if line.isascii() else not_utf8(line)
    if problem is not None:
        # Its bytes as they were, in a form any JSON reader accepts.
        fields["input"] = _jsonable(line.encode("utf-8", "surrogateescape"))
        if outcome.error is not None and not job.takes_any_bytes:
            fields["error"] = problem  # it never left: say why
    return fields, ok


# Made once, as the input's decoder is: json.dumps with options builds a new
# encoder per call, which a short line's record would pay for.
_RECORD_ENCODER = json.JSONEncoder(allow_nan=False)


def _json_line(fields: dict[str, Any]) -> str:
    """One line of strict JSON, whatever msgpack types a task returned."""
    return _RECORD_ENCODER.encode(_jsonable(fields)) + "\n"


def _jsonable(value: Any) -> Any:
    # bytes are kept whole as base64; JSON has no NaN or infinity, so those
    # become the strings Python prints for them; a lone surrogate (which only
    # an escaped JSON input can hold) becomes its \udcxx spelling.
    if isinstance(value, str):
        return value if value.isascii() else _valid_text(value)
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _valid_text(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _add_traceback(fields: dict[str, Any], error: TaskError) -> None:
    """Add where the task failed to its record's error (map --tracebacks):
    a function's failures are its caller's news, listed by no broker."""
    described = fields.get("error")
    if isinstance(described, dict) and error.remote_traceback:
        described["traceback"] = error.remote_traceback


def _error_fields(error: BaseException) -> dict[str, str]:
    if isinstance(error, TaskError):
        return {"type": error.remote_type, "message": error.message}
    return {"type": type(error).__name__, "message": str(error)}


def write_sink_results(
    receiver: Sink, output: Output, idle_timeout_s: float | None
) -> None:
    """Write each result as it comes. A write that fails ends the receiving
    before the sink acknowledges the batch of the result it could not write
    (it acknowledges a batch when asked for the result after its last).

    The sink watches the output while it waits: a reader that left (`| head`
    done, `| true`) ends it as a failed write would, at once, not at the next
    result, which may be hours away while the sink holds its name."""
    watched = receiver.results(idle_timeout_s, output_fd=output.watched_fd())
    with contextlib.closing(watched) as results:
        try:
            for result in results:
                output.write(_json_line(_sink_fields(result)))
                output.flush()
        except BrokenPipeError as exc:  # the sink's, not a write's: those are wrapped
            raise output.failed(exc) from exc


def _sink_fields(result: SinkResult) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "client": result.session,
        "task_id": result.task_id,
        # Ids are 64-bit: readers that parse every JSON number as a double
        # (JavaScript, jq 1.6) round those above 2**53.
        "task_id_str": str(result.task_id),
    }
    if result.error is None:
        fields["result"] = result.value
    else:
        fields["error"] = _error_fields(result.error)
    return fields

"""`map` and `exec` when their output cannot be written: one line or none on
stderr, never a traceback, and an exit status that says what happened."""

from __future__ import annotations

import shlex
import subprocess

from .conftest import (
    TASKS,
    Processes,
    ProcessId,
    descendants,
    json_lines,
    log_of,
    read_json_line,
    run_cli,
    stop_process_ids,
    ventilator_argv,
)


def test_output_to_a_full_disk_says_so_in_one_line_naming_it(
    processes: Processes,
) -> None:
    completed = run_cli(
        processes,
        *("map", f"{TASKS}:square", "--workers", "1", "--output", "/dev/full"),
        input_text="1\n2\n",
    )

    assert completed.returncode == 1
    assert "cannot write the output to '/dev/full': No space left on device" in (
        completed.stderr
    )
    assert "Traceback" not in completed.stderr


def run_closing(
    processes: Processes, redirection: str, input_text: str
) -> subprocess.CompletedProcess[str]:
    """Run a map with a standard stream closed by the shell's `redirection`."""
    argv = ventilator_argv("map", f"{TASKS}:square", "--workers", "1")
    script = f"exec {shlex.join(argv)} {redirection}"
    process = processes.start(
        "map",
        ["sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout, _ = process.communicate(input_text, timeout=60)
    return subprocess.CompletedProcess(
        script, process.returncode, stdout, log_of(process)
    )


def test_output_to_a_closed_stdout_is_a_usage_error_before_anything_runs(
    processes: Processes,
) -> None:
    completed = run_closing(processes, ">&-", "1\n")

    assert completed.returncode == 2
    assert "standard output is closed" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_closed_stderr_does_not_stop_the_output(processes: Processes) -> None:
    completed = run_closing(processes, "2>&-", "3\n4\n")

    assert completed.returncode == 0
    assert [r["result"] for r in json_lines(completed.stdout)] == [9, 16]


def test_a_reader_that_stops_reading_ends_the_run_quietly_with_sigpipes_status(
    processes: Processes,
) -> None:
    command = processes.start(
        "map",
        ventilator_argv("map", f"{TASKS}:square", "--workers", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    embedded: list[ProcessId] = []
    try:
        command.stdin.write(b"5\n")
        command.stdin.flush()
        assert read_json_line(command, 30)["result"] == 25
        embedded = descendants(command.pid)
        # As `| head -1` does: the reader goes; the next record has nowhere to go.
        command.stdout.close()
        command.stdin.write(b"6\n")
        command.stdin.close()

        assert command.wait(30) == 141, log_of(command)
    finally:
        stop_process_ids(embedded)
    assert "Traceback" not in log_of(command)
    assert "Error" not in log_of(command)

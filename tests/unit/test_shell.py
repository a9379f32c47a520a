"""Commands run as tasks (`ventilator exec`), run here for real."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ProcessId, stop_process_ids
from ventilator import shell


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_that_is_utf8_comes_back_as_text() -> None:
    report = shell.run(python("print('caf\\u00e9')"))

    assert report == {"exit_code": 0, "stdout": "café\n", "stderr": ""}


def test_output_that_is_not_utf8_comes_back_as_its_exact_bytes() -> None:
    code = (
        "import sys; sys.stdout.buffer.write(b'\\xff\\x00\\xfe'); "
        "sys.stderr.write('ok')"
    )

    report = shell.run(python(code))

    assert report["stdout"] == b"\xff\x00\xfe"
    assert report["stderr"] == "ok"


# --- what a command started ends with it --------------------------------------------
#
# The commands write the pids of what they start into a file, so that the test
# can count them, see them gone after, and end any that a failure left behind,
# by pid (only a process that still runs their `sleep 600`, or the shell about
# to become it, so that a reused pid is never taken for one of them).


@pytest.fixture
def pid_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pids"
    path.touch()
    try:
        yield path
    finally:
        stop_process_ids(alive(path))


def recorded(pid_file: Path) -> list[int]:
    return [int(pid) for pid in pid_file.read_text().split()]


def alive(pid_file: Path) -> list[ProcessId]:
    """The recorded processes still sleeping."""
    found = []
    for pid in recorded(pid_file):
        process_id = ProcessId.of(pid)
        # Its shell, or the sleep the shell became.
        sleeping = b"sleep 600" in cmdline(pid) or cmdline(pid) == b"sleep\x00600\x00"
        if process_id is not None and process_id.alive() and sleeping:
            found.append(process_id)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def sleeper(pid_file: Path) -> str:
    """A shell command that records its pid and sleeps long."""
    return f"echo $$ >> {pid_file}; exec sleep 600"


@pytest.mark.timeout(60)
def test_timeout_ends_a_line_whose_setsid_process_holds_its_output(
    pid_file: Path,
) -> None:
    # The setsid process leaves the command's process group and session and
    # keeps its stdout open: the line must end on its timeout anyway.
    script = f"setsid sh -c '{sleeper(pid_file)}' & {sleeper(pid_file)}"

    with pytest.raises(TimeoutError, match="it and the processes it started were"):
        shell.run(["sh", "-c", script], timeout_s=1)

    assert len(recorded(pid_file)) == 2
    assert alive(pid_file) == []


@pytest.mark.timeout(60)
def test_timeout_kills_a_setsid_process_whose_parent_already_exited(
    pid_file: Path,
) -> None:
    # The subshell exits at once: its setsid child is an orphan, out of the
    # command's group and tree, that only adoption finds.
    script = f"(setsid sh -c '{sleeper(pid_file)}' &); {sleeper(pid_file)}"

    with pytest.raises(TimeoutError):
        shell.run(["sh", "-c", script], timeout_s=1)

    assert len(recorded(pid_file)) == 2
    assert alive(pid_file) == []


def test_what_a_command_left_running_when_it_exited_is_killed(pid_file: Path) -> None:
    started = f"(setsid sh -c '{sleeper(pid_file)}' > /dev/null 2>&1 &)"
    # It exits once the process it left has recorded itself.
    script = f"{started}; until [ -s {pid_file} ]; do sleep 0.01; done; echo done"

    report = shell.run(["sh", "-c", script])

    assert report["stdout"] == "done\n"
    assert len(recorded(pid_file)) == 1
    assert alive(pid_file) == []


@pytest.mark.timeout(60)
def test_output_past_the_limit_stops_the_command_and_names_the_limit() -> None:
    with pytest.raises(shell.ResultTooLarge, match="limit is 100000 bytes"):
        shell.run(["yes"], max_output_bytes=100_000)


def test_output_is_not_kept_in_memory_past_the_limit() -> None:
    # 200 MB of output against a 1 MB limit, in a fresh interpreter whose
    # peak memory is its own.
    code = (
        "import resource\n"
        "from ventilator import shell\n"
        "try:\n"
        "    shell.run(['head', '-c', '200000000', '/dev/zero'], None, 1_000_000)\n"
        "except shell.ResultTooLarge:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )

    peak_kib = int(subprocess.run(python(code), capture_output=True, check=True).stdout)

    assert peak_kib < 100 * 1024


def test_run_call_takes_the_output_limit_as_a_third_element() -> None:
    with pytest.raises(shell.ResultTooLarge, match="limit is 50000 bytes"):
        shell.run_call([["yes"], None, 50_000])
    with pytest.raises(ValueError, match="max_output_bytes must be a positive int"):
        shell.run_call([["true"], None, "many"])
    assert shell.run_call([["true"], None])["exit_code"] == 0

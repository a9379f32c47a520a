"""Commands run as tasks (`ventilator exec`), run here for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.leftovers import pid_file
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


@pytest.mark.timeout(60)
def test_timeout_ends_a_line_whose_setsid_process_holds_its_output(
    tmp_path: Path,
) -> None:
    # The setsid process leaves the command's process group and session and
    # keeps its stdout open: the line must end on its timeout anyway.
    with pid_file(tmp_path) as pids:
        script = f"setsid sh -c '{pids.sleeper()}' & {pids.sleeper()}"

        with pytest.raises(TimeoutError, match="it and the processes it started"):
            shell.run(["sh", "-c", script], timeout_s=1)

        assert len(pids.recorded()) == 2
        assert pids.alive() == []


@pytest.mark.timeout(60)
def test_timeout_kills_a_setsid_process_whose_parent_already_exited(
    tmp_path: Path,
) -> None:
    # The subshell exits at once: its setsid child is an orphan, out of the
    # command's group and tree, that only adoption finds.
    with pid_file(tmp_path) as pids:
        script = f"(setsid sh -c '{pids.sleeper()}' &); {pids.sleeper()}"

        with pytest.raises(TimeoutError):
            shell.run(["sh", "-c", script], timeout_s=1)

        assert len(pids.recorded()) == 2
        assert pids.alive() == []


def test_what_a_command_left_running_when_it_exited_is_killed(tmp_path: Path) -> None:
    with pid_file(tmp_path) as pids:
        started = f"(setsid sh -c '{pids.sleeper()}' > /dev/null 2>&1 &)"
        # It exits once the process it left has recorded itself.
        recorded = f"until [ -s {pids.path} ]; do sleep 0.01; done"

        report = shell.run(["sh", "-c", f"{started}; {recorded}; echo done"])

        assert report["stdout"] == "done\n"
        assert len(pids.recorded()) == 1
        assert pids.alive() == []


@pytest.mark.timeout(60)
def test_output_past_the_limit_stops_the_command_and_names_the_limit() -> None:
    with pytest.raises(shell.ResultTooLarge, match="limit is 100000 bytes"):
        shell.run(["yes"], max_output_bytes=100_000)


def test_output_is_not_kept_in_memory_past_the_limit() -> None:
    # 200 MB of output against a 1 MB limit, in a fresh interpreter. Its peak
    # is read as VmHWM, which exec resets: ru_maxrss would carry the peak of
    # the (large) pytest process it was forked from.
    code = (
        "import re\n"
        "from ventilator import shell\n"
        "try:\n"
        "    shell.run(['head', '-c', '200000000', '/dev/zero'], None, 1_000_000)\n"
        "except shell.ResultTooLarge:\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
    )

    completed = subprocess.run(python(code), capture_output=True, check=True)

    assert int(completed.stdout) < 100 * 1024, completed.stderr


def test_run_call_takes_the_output_limit_as_a_third_element() -> None:
    with pytest.raises(shell.ResultTooLarge, match="limit is 50000 bytes"):
        shell.run_call([["yes"], None, 50_000])
    with pytest.raises(ValueError, match="max_output_bytes must be a positive int"):
        shell.run_call([["true"], None, "many"])
    assert shell.run_call([["true"], None])["exit_code"] == 0

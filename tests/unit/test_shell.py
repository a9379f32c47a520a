"""Commands run as tasks (`ventilator exec`), run here for real."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import wait_until
from tests.leftovers import PidFile, pid_file
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


def background_holders(pids: PidFile, then: str) -> list[str]:
    """A command that leaves two sleepers holding its stdout, one of them out
    of its process group (setsid), and runs `then` once both have recorded
    themselves."""
    started = f"sh -c '{pids.sleeper()}' & setsid sh -c '{pids.sleeper()}' &"
    return ["sh", "-c", f"{started} {pids.until_recorded(2)}; {then}"]


@pytest.mark.timeout(60)
def test_line_ends_when_its_command_exits_though_what_it_left_holds_its_output(
    tmp_path: Path,
) -> None:
    # Before, the line waited for the sleepers' end (600 s) to see its pipes
    # close; a daemon held it for ever.
    with pid_file(tmp_path) as pids:
        report = shell.run(background_holders(pids, "echo started; exit 3"))

        assert report == {"exit_code": 3, "stdout": "started\n", "stderr": ""}
        assert len(pids.recorded()) == 2
        assert pids.alive() == []


@pytest.mark.timeout(60)
def test_line_run_off_the_main_thread_ends_though_a_daemon_holds_its_output(
    tmp_path: Path,
) -> None:
    # Off the main thread nothing adopts the setsid sleeper once the command
    # exits, so it cannot be found and keeps the pipe open: the line ends
    # anyway, with what the command printed, and its group is killed.
    with pid_file(tmp_path) as pids:
        reports: list[dict[str, Any]] = []
        command = background_holders(pids, "echo started")
        thread = threading.Thread(target=lambda: reports.append(shell.run(command)))

        thread.start()
        thread.join(30)

        assert reports == [{"exit_code": 0, "stdout": "started\n", "stderr": ""}]
        # SIGKILL is delivered when the sleeper next runs, which on a busy
        # machine can be after the line returned.
        wait_until(lambda: len(pids.alive()) == 1, 10, "the group's sleeper to die")


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

"""`ventilator exec` ends each line with everything its command started, and
keeps no more of its output than a result may carry; run as real processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.leftovers import pid_file

from .conftest import (
    BrokerProcess,
    Launcher,
    Processes,
    descendants,
    json_lines,
    log_of,
    run_cli,
    stop_process_ids,
    ventilator_argv,
    wait_for_workers,
    wait_until,
)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_stopped_exec_leaves_none_of_its_commands_running(
    processes: Processes, tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    with pid_file(tmp_path) as pids:
        # Each line's shell starts a second one in the background.
        script = f"sh -c '{pids.sleeper()}' & {pids.sleeper()}"
        command = processes.start(
            "exec",
            ventilator_argv("exec", "--workers", "2", "--", "sh", "-c", script),
            stdin=subprocess.PIPE,
        )
        command.stdin.write(b"1\n2\n")
        command.stdin.close()
        wait_until(lambda: len(pids.alive()) == 4, 30, "both lines' commands")
        embedded = descendants(command.pid)

        command.send_signal(signum)
        try:
            assert command.wait(20) == status, log_of(command)
            wait_until(lambda: not pids.alive(), 10, "the commands to go")
        finally:
            stop_process_ids(embedded)


def test_exec_timeout_ends_a_line_whose_setsid_process_holds_its_output(
    processes: Processes, tmp_path: Path
) -> None:
    with pid_file(tmp_path) as pids:
        script = f"setsid sh -c '{pids.sleeper()}' & {pids.sleeper()}"

        # Before, each line waited for its setsid process's sleep of 600 s.
        completed = run_cli(
            processes,
            *("exec", "--workers", "1", "--timeout-s", "1"),
            *("--", "sh", "-c", script),
            input_text="1\n2\n",
        )

        assert completed.returncode == 1, completed.stderr
        records = json_lines(completed.stdout)
        assert [r["error"]["type"] for r in records] == ["TimeoutError"] * 2
        assert "it and the processes it started were killed" in str(records)
        assert len(pids.recorded()) == 4
        assert pids.alive() == []


def test_exec_line_ends_when_its_command_exits_leaving_a_daemon_on_its_output(
    processes: Processes, tmp_path: Path
) -> None:
    with pid_file(tmp_path) as pids:
        started = f"sh -c '{pids.sleeper()}' & setsid sh -c '{pids.sleeper()}' &"
        script = f"{started} {pids.until_recorded(2)}; echo started $1"

        # Before, the line waited for its sleepers (600 s), however long.
        completed = run_cli(
            processes,
            *("exec", "--workers", "1", "--", "sh", "-c", script, "_", "{}"),
            input_text="7\n",
        )

        assert completed.returncode == 0, completed.stderr
        [record] = json_lines(completed.stdout)
        assert record["stdout"] == "started 7\n"
        assert len(pids.recorded()) == 2
        assert pids.alive() == []


def test_exec_output_past_the_brokers_limit_fails_its_line_naming_the_limit(
    processes: Processes, launch: Launcher
) -> None:
    broker = launch.broker("--max-payload-bytes", "100000")
    launch.worker(broker, "ventilator.shell")
    wait_for_workers(launch.client(broker), 1)

    # `yes` never ends: only the limit ends its line.
    completed = run_cli(
        processes,
        *("exec", "--connect", broker.frontend, "--", "sh", "-c", "yes"),
        input_text="1\n",
    )

    assert completed.returncode == 1, completed.stderr
    [record] = json_lines(completed.stdout)
    assert record["error"]["type"] == "ResultTooLarge"
    assert "the broker's limit is 100000 bytes" in record["error"]["message"]


def test_exec_with_connect_leaves_nothing_when_its_worker_leaves_at_once(
    processes: Processes, launch: Launcher, broker: BrokerProcess, tmp_path: Path
) -> None:
    worker = launch.worker(broker, "ventilator.shell")
    client = launch.client(broker)
    wait_for_workers(client, 1)
    with pid_file(tmp_path) as pids:
        script = f"sh -c '{pids.sleeper()}' & {pids.sleeper()}"
        client.submit("ventilator.shell:run_call", [["sh", "-c", script], None])
        wait_until(lambda: len(pids.alive()) == 2, 30, "the command to start")

        worker.process.send_signal(signal.SIGQUIT)

        assert worker.process.wait(20) == 0, log_of(worker.process)
        wait_until(lambda: not pids.alive(), 10, "the command to go")

"""Fixtures for end-to-end tests: real broker, worker and client processes.

Every process a test starts goes through `Processes`, which ends it by PID at
teardown: SIGTERM (twice, as an operator makes a worker leave at once), a
deadline, then SIGKILL; and the same for whatever children it left behind (an
embedded cluster's broker and worker, a worker's task processes). Every client
a test opens is closed. Waits are conditions polled under a deadline, never
bare sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

import ventilator

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = "tests.e2e.tasks"
MORE_TASKS = "tests.e2e.more_tasks"

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# A worker drains its held tasks on the first SIGTERM and leaves at once on the
# second; this long after the first, teardown sends the second.
SECOND_SIGNAL_AFTER_S = 1.0
CLI_TIMEOUT_S = 60.0
# Brokers and workers of the reliability tests beat this often, so that a dead
# worker is noticed within a second.
FAST_HEARTBEAT_S = 0.2

T = TypeVar("T")


class ClusterError(Exception):
    """The test's own cluster misbehaved: a process did not start or answer.

    Kept apart from AssertionError and TimeoutError so that an xfail test
    expecting those never passes because its cluster failed to come up.
    """


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Process `pid` stopped (SIGSTOP) for the block, as a long GC pause or a
    suspended laptop would stop it, and resumed (SIGCONT) whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str = "a condition",
    error: type[Exception] = AssertionError,
) -> T:
    """Poll `predicate` until it returns something truthy; return that.

    Raises:
        AssertionError (or `error`): `timeout_s` passed first; the message
            names `what`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment of child processes: `tests.e2e.tasks` importable."""
    env = dict(os.environ)
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), inherited) if p)
    return env


def ventilator_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ventilator", *args]


# --- processes by PID -------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of `pid` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), fields[19]


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A PID with its start time, so a reused PID is never taken for ours."""

    pid: int
    started: str

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.started and stat[0] != "Z"


def descendants(pid: int) -> list[ProcessId]:
    """The living descendants of `pid`, parents before their children."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                parents.setdefault(stat[1], []).append(int(entry.name))

    found: list[ProcessId] = []
    frontier = deque([pid])
    while frontier:
        for child in parents.get(frontier.popleft(), []):
            process_id = ProcessId.of(child)
            if process_id is not None:
                found.append(process_id)
                frontier.append(child)
    return found


def _signal(process_id: ProcessId, signum: int) -> None:
    if process_id.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process_id.pid, signum)


class Processes:
    """Starts child processes and ends every one of them, by PID, at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._started: list[subprocess.Popen[Any]] = []

    def start(
        self, name: str, argv: Sequence[str], **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` with its stderr in a log file named after `name`."""
        log_path = self._log_dir / f"{name}-{len(self._started)}.log"
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("cwd", REPO_ROOT)
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, stderr=log, env=child_env(), **popen)
        process.log_path = log_path  # type: ignore[attr-defined]
        self._started.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any]) -> None:
        """SIGTERM twice, wait, SIGKILL; then the same for children it left behind."""
        left_behind = descendants(process.pid) if process.poll() is None else []
        for wait_s in (SECOND_SIGNAL_AFTER_S, STOP_TIMEOUT_S - SECOND_SIGNAL_AFTER_S):
            if process.poll() is None:
                process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait_s)
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        stop_process_ids(left_behind)

    def stop_all(self) -> None:
        for process in reversed(self._started):
            self.stop(process)
        self._started.clear()


def stop_process_ids(process_ids: Sequence[ProcessId]) -> None:
    """Terminate processes we started indirectly; kill those that outstay a deadline."""
    for process_id in process_ids:
        _signal(process_id, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(p.alive() for p in process_ids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for process_id in process_ids:
        _signal(process_id, signal.SIGKILL)


def log_of(process: subprocess.Popen[Any]) -> str:
    """The stderr a process wrote so far, for assertion messages."""
    path: Path = process.log_path  # type: ignore[attr-defined]
    return path.read_text(errors="replace")[-4000:]


def json_records(process: subprocess.Popen[Any]) -> list[dict[str, Any]]:
    """Every record a process started with `--log-format json` logged so far."""
    path: Path = process.log_path  # type: ignore[attr-defined]
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def named_once_counted(
    process: subprocess.Popen[Any], named: str, counted: str, timeout_s: float
) -> list[dict[str, Any]]:
    """The records naming `named`, once the process has logged `counted`: the
    line where a rate limit counts the lines it held back."""

    def has_counted() -> bool:
        return any(counted in record["message"] for record in json_records(process))

    wait_until(has_counted, timeout_s, f"a line saying {counted!r}")
    return [r for r in json_records(process) if named in r["message"]]


# --- brokers, workers, clients ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerProcess:
    process: subprocess.Popen[bytes]
    frontend: str
    backend: str
    heartbeat_interval_s: float
    http: str | None = None  # the dashboard's URL, when started with --http

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True, slots=True)
class WorkerProcess:
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def entry(self, status: dict[str, Any]) -> dict[str, Any] | None:
        """This worker's row in a broker status; its id is host.pid.random."""
        rows = [w for w in status["workers"] if f".{self.pid}." in w["id"]]
        return rows[0] if rows else None


def read_json_line(process: subprocess.Popen[bytes], timeout_s: float) -> Any:
    """The next stdout line of a process, as JSON, read under a deadline.

    Reads a byte at a time, so nothing after the line is consumed.

    Raises:
        ClusterError: no whole line within `timeout_s`, or the process exited.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    received = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not received.endswith(b"\n"):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not selector.select(remaining_s):
                raise ClusterError(f"no line on stdout within {timeout_s:g}s")
            byte = os.read(fd, 1)
            if not byte:
                raise ClusterError(
                    f"exited with {process.wait()} before a line: {log_of(process)}"
                )
            received += byte
    return json.loads(received)


class Launcher:
    """Starts brokers, workers and clients for one test, and cleans them up."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self._clients: list[ventilator.Client] = []

    def broker(
        self,
        *extra: str,
        heartbeat_interval_s: float = 1.0,
        durability: str = "memory",
        journal: Path | None = None,
        frontend: str = "tcp://127.0.0.1:*",
        backend: str = "tcp://127.0.0.1:*",
    ) -> BrokerProcess:
        """Start a broker on loopback and return once it announced its endpoints."""
        argv = ventilator_argv(
            "broker",
            "--frontend",
            frontend,
            "--backend",
            backend,
            "--durability",
            durability,
            "--heartbeat-interval-s",
            str(heartbeat_interval_s),
            "--announce",
            *(["--journal", str(journal)] if journal else []),
            *extra,
        )
        process = self.processes.start("broker", argv, stdout=subprocess.PIPE)
        endpoints = read_json_line(process, START_TIMEOUT_S)
        return BrokerProcess(
            process,
            endpoints["frontend"],
            endpoints["backend"],
            heartbeat_interval_s,
            endpoints.get("http"),
        )

    def worker(
        self,
        broker: BrokerProcess,
        *modules: str,
        concurrency: int = 1,
        pool: str = "process",
        heartbeat_interval_s: float | None = None,
        allow_pickle: bool = False,
        extra: Sequence[str] = (),
    ) -> WorkerProcess:
        """Start a worker serving `modules` (default: the e2e tasks)."""
        interval_s = heartbeat_interval_s or broker.heartbeat_interval_s
        argv = ventilator_argv(
            "worker",
            *(modules or (TASKS,)),
            "--connect",
            broker.backend,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--heartbeat-interval-s",
            str(interval_s),
            *(["--allow-pickle"] if allow_pickle else []),
            *extra,
        )
        return WorkerProcess(self.processes.start("worker", argv))

    def client(self, broker: BrokerProcess | str, **options: Any) -> ventilator.Client:
        """A client of `broker`, closed at teardown.

        Unless told otherwise it beats twice per broker heartbeat interval,
        for a margin over the interval it adopts from the broker's WELCOME on
        a machine slowed by other work.
        """
        if isinstance(broker, BrokerProcess):
            options.setdefault("heartbeat_interval_s", broker.heartbeat_interval_s / 2)
            broker = broker.frontend
        client = ventilator.Client(broker, **options)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in reversed(self._clients):
            client.close()
        self._clients.clear()


def status_when(
    client: ventilator.Client,
    predicate: Callable[[dict[str, Any]], Any],
    timeout_s: float,
    what: str,
    error: type[Exception] = AssertionError,
) -> dict[str, Any]:
    """Poll the broker's status until `predicate` holds for it; return it.

    Raises:
        ClusterError: the broker did not answer at all.
        AssertionError (or `error`): it answered, but `predicate` never held.
    """

    def check() -> dict[str, Any] | None:
        try:
            status = client.status(timeout_s)
        except TimeoutError as exc:
            raise ClusterError(
                f"no status from {client.address} within {timeout_s:g}s"
            ) from exc
        return status if predicate(status) else None

    return wait_until(check, timeout_s, what, error)


def wait_for_workers(
    client: ventilator.Client, count: int, timeout_s: float = START_TIMEOUT_S
) -> dict[str, Any]:
    """Poll the broker until `count` workers registered; return that status."""
    return status_when(
        client,
        lambda status: len(status["workers"]) >= count,
        timeout_s,
        f"{count} registered workers",
        ClusterError,
    )


def run_cli(
    processes: Processes,
    *args: str,
    input_text: str = "",
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ventilator ARGS`` to completion under a deadline."""
    process = processes.start(
        "cli",
        ventilator_argv(*args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, _ = process.communicate(input_text, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        processes.stop(process)
        raise AssertionError(
            f"ventilator {' '.join(args)} ran past {timeout_s:g}s: {log_of(process)}"
        ) from None
    return subprocess.CompletedProcess(
        args, process.returncode, stdout, log_of(process)
    )


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = Processes(log_dir)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def launch(processes: Processes) -> Iterator[Launcher]:
    launcher = Launcher(processes)
    try:
        yield launcher
    finally:
        launcher.close_clients()


@pytest.fixture
def broker(launch: Launcher) -> BrokerProcess:
    """A broker with an in-memory journal and default heartbeats."""
    return launch.broker()


@pytest.fixture
def two_workers(launch: Launcher, broker: BrokerProcess) -> list[WorkerProcess]:
    """Two process-pool workers of the e2e tasks, registered with `broker`."""
    workers = [launch.worker(broker), launch.worker(broker)]
    wait_for_workers(launch.client(broker), 2)
    return workers


@pytest.fixture
def client(launch: Launcher, broker: BrokerProcess) -> ventilator.Client:
    return launch.client(broker)


def restartable_broker(tmp_path: Path, **extra: object) -> dict[str, Any]:
    """Options of a broker that a second one replaces on the same endpoints
    and journal (`Launcher.broker(**options)`)."""
    return {
        "frontend": f"tcp://127.0.0.1:{free_port()}",
        "backend": f"tcp://127.0.0.1:{free_port()}",
        "durability": "process",
        "journal": tmp_path / "journal.db",
        **extra,
    }


def stand_in_broker(
    context: zmq.Context[zmq.Socket[bytes]],
) -> tuple[zmq.Socket[bytes], str]:
    """A bare ROUTER bound where a broker's frontend would be, and its
    address: a test plays the broker's part, message by message."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    stand_in = context.socket(zmq.ROUTER)
    stand_in.bind(frontend)
    return stand_in, frontend


@pytest.fixture
def restartable(tmp_path: Path) -> dict[str, Any]:
    """Broker options for one restartable broker: fixed ports and a journal."""
    return restartable_broker(tmp_path)


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context for a test's raw sockets, closed with them at the end."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)

"""Fault injection with real processes: kill, freeze and restart, then count.

    python -m tests.fault_injection            # every scenario, full size
    python -m tests.fault_injection --scale 0.25 --only worker-killed

Each scenario starts a real broker and real workers on loopback, runs tasks
from a real client, injects a fault and reports what came back: tasks
submitted, results received, lost, duplicated, and how often each task ran
(every execution is logged by the task itself, see `tests.fault_tasks`). The
e2e tests run the same scenarios at a smaller scale and assert on the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ventilator
from ventilator.errors import PoisonTask, TaskTimeout

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 0.25
DEADLINE_S = 120.0


@dataclass
class Tally:
    """What one scenario saw."""

    scenario: str
    submitted: int
    received: int = 0
    duplicated: int = 0
    failed: int = 0
    executions: collections.Counter[int] = field(default_factory=collections.Counter)
    expected_failures: int = 0
    note: str = ""

    @property
    def lost(self) -> int:
        return self.submitted - self.received

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.failed == self.expected_failures
        )

    def row(self) -> dict[str, Any]:
        runs = list(self.executions.values()) or [0]
        return {
            "scenario": self.scenario,
            "submitted": self.submitted,
            "received": self.received,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "failed": self.failed,
            "runs_max": max(runs),
            "rerun_tasks": sum(1 for n in runs if n > 1),
            "ok": self.ok,
            "note": self.note,
        }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """A broker on fixed ports (so it can be restarted) and its workers."""

    def __init__(self, folder: Path, journal: bool = True) -> None:
        self.folder = folder
        self.frontend = f"tcp://127.0.0.1:{_free_port()}"
        self.backend = f"tcp://127.0.0.1:{_free_port()}"
        self.log = folder / "executions.log"
        self.journal = folder / "journal.db" if journal else None
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["VENTILATOR_FAULT_LOG"] = str(self.log)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])

    def _ventilator(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ventilator", "--log-level", "ERROR", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
        )

    def start_broker(self) -> None:
        storage = (
            ["--journal", str(self.journal)]
            if self.journal
            else ["--durability", "memory"]
        )
        self.broker = self._ventilator(
            "broker",
            "--frontend", self.frontend,
            "--backend", self.backend,
            "--heartbeat-interval-s", str(HEARTBEAT_S),
            *storage,
        )  # fmt: skip

    def start_worker(
        self, concurrency: int = 1, *extra: str
    ) -> subprocess.Popen[bytes]:
        worker = self._ventilator(
            "worker", "tests.fault_tasks",
            "--connect", self.backend,
            "--concurrency", str(concurrency),
            "--heartbeat-interval-s", str(HEARTBEAT_S),
            *extra,
        )  # fmt: skip
        self.workers.append(worker)
        return worker

    def client(self, **options: Any) -> ventilator.Client:
        return ventilator.Client(
            self.frontend, heartbeat_interval_s=HEARTBEAT_S, **options
        )

    def wait_for_workers(self, count: int, client: ventilator.Client) -> None:
        wait_until(lambda: len(client.status()["workers"]) >= count, "workers to join")

    def executions(self) -> collections.Counter[int]:
        if not self.log.exists():
            return collections.Counter()
        return collections.Counter(int(line) for line in self.log.read_text().split())

    def stop(self) -> None:
        for process in [*self.workers, self.broker]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(10)


@contextmanager
def cluster(journal: bool = True) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="ventilator-faults-") as folder:
        running = Cluster(Path(folder), journal)
        running.start_broker()
        try:
            yield running
        finally:
            running.stop()


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 30.0
) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _count(tally: Tally, futures: dict[int, Future[Any]]) -> None:
    """Wait for every future; results must be each task's own number."""
    for i, future in futures.items():
        try:
            value = future.result(timeout=DEADLINE_S)
        except Exception:
            tally.failed += 1
            tally.received += 1
            continue
        tally.received += 1
        if value != i:
            tally.duplicated += 1  # a result that is not this task's


def _submit_work(
    client: ventilator.Client, total: int, seconds: float
) -> dict[int, Future[Any]]:
    return {
        i: client.submit("tests.fault_tasks:work", i, seconds) for i in range(total)
    }


def _wait_for_a_third(futures: dict[int, Future[Any]]) -> None:
    def done() -> int:
        return sum(1 for f in futures.values() if f.done())

    wait_until(lambda: done() >= len(futures) // 3, "a third of the results")


# --- the scenarios ----------------------------------------------------------------


def worker_killed(scale: float = 1.0) -> Tally:
    """2,000 tasks of ~5 ms on 3 workers; SIGKILL one of them in the middle."""
    total = int(2000 * scale)
    tally = Tally("worker SIGKILLed", total)
    with cluster() as c:
        victims = [c.start_worker() for _ in range(3)]
        with c.client() as client:
            c.wait_for_workers(3, client)
            futures = _submit_work(client, total, seconds=0.005)
            _wait_for_a_third(futures)
            victims[0].kill()
            _count(tally, futures)
        tally.executions = c.executions()
    return tally


def broker_killed(scale: float = 1.0) -> Tally:
    """The same, but SIGKILL the broker in the middle and restart it on its journal."""
    total = int(2000 * scale)
    tally = Tally("broker SIGKILLed, restarted", total)
    with cluster() as c:
        for _ in range(3):
            c.start_worker()
        with c.client() as client:
            c.wait_for_workers(3, client)
            futures = _submit_work(client, total, seconds=0.005)
            _wait_for_a_third(futures)
            assert c.broker is not None
            c.broker.kill()
            c.broker.wait()
            c.start_broker()
            _count(tally, futures)
        tally.executions = c.executions()
    return tally


def client_frozen(scale: float = 1.0) -> Tally:
    """A client stops reading for 5 s (SIGSTOP, SIGCONT) while results flow."""
    total = int(1000 * scale)
    tally = Tally("client frozen 5 s", total)
    with cluster() as c:
        c.start_worker(2)
        script = ROOT / "tests" / "fault_client.py"
        report = c.folder / "client.json"
        client = subprocess.Popen(
            [sys.executable, str(script), c.frontend, str(total), str(report)],
            env=c.env,
        )
        wait_until(lambda: (c.folder / "client.json.started").exists(), "the client")
        client.send_signal(signal.SIGSTOP)
        time.sleep(5.0)  # the fault itself: a client that does not run for 5 s
        client.send_signal(signal.SIGCONT)
        client.wait(DEADLINE_S)
        outcome = json.loads(report.read_text())
        tally.received = outcome["received"]
        tally.duplicated = outcome["wrong"]
        tally.failed = outcome["failed"]
        tally.executions = c.executions()
    return tally


def client_returns(scale: float = 1.0) -> Tally:
    """A client exits after submitting 1,000 tasks; the same session comes back."""
    total = int(1000 * scale)
    tally = Tally("client exits, session resumes", total)
    with cluster() as c:
        with c.client() as first:
            session = first.session
            ids = {
                first.submit("tests.fault_tasks:work", i, 0.002).task_id: i
                for i in range(total)
            }
            # Leaving waits until the broker accepted (journalled) every task;
            # no worker runs yet, so no result can reach this first client.
        c.start_worker(2)
        with c.client(session=session) as second:
            seen: set[int] = set()
            for future in second.collect(count=total, timeout_s=30):
                if future.task_id in seen or future.result() != ids.get(future.task_id):
                    tally.duplicated += 1
                seen.add(future.task_id)
            tally.received = len(seen)
        tally.executions = c.executions()
    return tally


def poison_task(scale: float = 1.0) -> Tally:
    """One task kills its worker process every time, among 500 normal tasks."""
    total = int(500 * scale)
    tally = Tally("poison task among normal ones", total + 1, expected_failures=1)
    with cluster() as c:
        c.start_worker(2)
        with c.client() as client:
            c.wait_for_workers(1, client)
            futures = _submit_work(client, total, seconds=0.002)
            poison = client.submit("tests.fault_tasks:explode", -1)
            _count(tally, futures)
            error = poison.exception(timeout=DEADLINE_S)
            tally.received += 1
            tally.failed += 1
            if not isinstance(error, PoisonTask):
                tally.note = f"poison task ended with {error!r}"
                tally.failed += 1
        tally.executions = c.executions()
        tally.note = tally.note or f"poison ran {tally.executions[-1]} times"
    return tally


def worker_frozen(scale: float = 1.0) -> Tally:
    """A worker is frozen until declared dead, then resumed after its task reran."""
    tally = Tally("worker frozen, then resumed", 1)
    with cluster() as c:
        frozen = c.start_worker(1)
        with c.client() as client:
            c.wait_for_workers(1, client)
            future = client.submit("tests.fault_tasks:work", 7, 1.0)
            wait_until(lambda: c.executions()[7] >= 1, "the task to start")
            frozen.send_signal(signal.SIGSTOP)
            c.start_worker(1)
            wait_until(lambda: c.executions()[7] >= 2, "the task to run again")
            frozen.send_signal(signal.SIGCONT)
            _count(tally, {7: future})
            # The resumed worker's late result must not reach the client twice.
            late = client.submit("tests.fault_tasks:work", 8, 0.0)
            _count(tally, {8: late})
            tally.submitted += 1
        tally.executions = c.executions()
    return tally


def task_timeout(scale: float = 1.0) -> Tally:
    """A task runs past its timeout; the worker goes on serving."""
    tally = Tally("task past its timeout", 2, expected_failures=1)
    with cluster() as c:
        c.start_worker(1)
        with c.client() as client:
            c.wait_for_workers(1, client)
            slow = client.submit("tests.fault_tasks:linger", 1, 60.0, timeout_s=0.5)
            error = slow.exception(timeout=DEADLINE_S)
            tally.received += 1
            tally.failed += 1
            if not isinstance(error, TaskTimeout):
                tally.note = f"ended with {error!r}"
                tally.failed += 1
            _count(tally, {2: client.submit("tests.fault_tasks:work", 2, 0.0)})
        tally.executions = c.executions()
    return tally


SCENARIOS: dict[str, Callable[[float], Tally]] = {
    "worker-killed": worker_killed,
    "broker-killed": broker_killed,
    "client-frozen": client_frozen,
    "client-returns": client_returns,
    "poison-task": poison_task,
    "worker-frozen": worker_frozen,
    "task-timeout": task_timeout,
}


def main() -> None:
    parser = argparse.ArgumentParser(description="ventilator fault injection")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    for name in args.only:
        started = time.perf_counter()
        row = SCENARIOS[name](args.scale).row()
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        _print_row(row, header=len(rows) == 1)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


COLUMNS = {  # name: width
    "scenario": 32,
    "submitted": 10,
    "received": 9,
    "lost": 5,
    "duplicated": 11,
    "failed": 7,
    "runs_max": 9,
    "rerun_tasks": 12,
    "ok": 6,
    "seconds": 8,
    "note": 0,
}


def _print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print("".join(f"{name:<{width}}" for name, width in COLUMNS.items()))
    print("".join(f"{row[name]!s:<{width}}" for name, width in COLUMNS.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

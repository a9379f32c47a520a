"""Workload E: how one ventilator broker scales.

    python -m benchmarks.scale                      # E1 and E2, full size
    python -m benchmarks.scale --only E1 --tasks 200000

E1  `--tasks` tiny tasks (1,000,000) queued before any worker connects: the
    broker's peak memory (VmHWM) per queued task over its idle baseline, and the
    time 2 workers take to drain them. Measured once with one task per item
    (`map(chunksize=1)`) and once as map's batches of 256.
E2  `--peers-tasks` tiny tasks, one task each, through `--workers` simulated
    workers (200) and `--clients` clients (50) on one broker, next to the same
    tasks through 2 simulated workers and 1 client. Simulated workers are
    DEALER sockets in one process speaking ventilator's worker protocol and
    running `square` inline; clients are real `ventilator.Client`s, each in its
    own thread.

Both run with the journal on, as the broker ships. `benchmarks.compare` runs
them too (`--only E1 E2`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

import ventilator
from ventilator import protocol as p
from ventilator.serialization import pack_value, unpack_call

log = logging.getLogger(__name__)

SQUARE = "benchmarks.workloads:square"
STOP_GRACE_S = 10.0
DRAIN_TIMEOUT_S = 1200.0
SIM_CAPACITY = 32  # credit of each simulated worker, as a real worker's prefetch
HEARTBEAT_S = 1.0


# --- processes --------------------------------------------------------------------


@contextmanager
def broker(journal_dir: str, client_window: int) -> Iterator[tuple[int, str, str]]:
    """A broker with its journal in `journal_dir`; yields (pid, frontend, backend)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ventilator",
            "--log-level",
            "WARNING",
            "broker",
            "--frontend",
            "tcp://127.0.0.1:*",
            "--backend",
            "tcp://127.0.0.1:*",
            "--journal",
            str(Path(journal_dir) / "journal.db"),
            "--client-window",
            str(client_window),
            "--max-queued-tasks",
            str(max(2_000_000, client_window)),
            "--announce",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        endpoints = json.loads(process.stdout.readline())
        yield process.pid, endpoints["frontend"], endpoints["backend"]
    finally:
        _stop(process)


@contextmanager
def process(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """A helper process, stopped by its PID on exit."""
    started = subprocess.Popen([sys.executable, *argv])
    try:
        yield started
    finally:
        _stop(started)


def _stop(started: subprocess.Popen[bytes]) -> None:
    if started.poll() is None:
        started.terminate()
        try:
            started.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
    if started.stdout is not None:
        started.stdout.close()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def _wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- E1: a million queued tasks ---------------------------------------------------


def queued(tasks: int, chunksize: int) -> dict[str, float]:
    """Queue `tasks` items before any worker, then drain them with 2 workers."""
    # map keeps up to half its window ahead of what it has yielded.
    window = 2 * tasks + 2
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as folder,
        broker(folder, client_window=window) as (pid, frontend, backend),
        ventilator.Client(frontend, window=window, window_bytes=1 << 40) as client,
    ):
        baseline = rss_bytes(pid)
        expected_tasks = -(-tasks // chunksize)
        results: list[int] = []
        consumer = threading.Thread(
            target=lambda: results.extend(
                client.map(SQUARE, range(tasks), chunksize=chunksize)
            ),
            daemon=True,
        )
        started = time.perf_counter()
        consumer.start()
        _wait_for(
            lambda: client.status(60)["queue_counts"]["queued"] >= expected_tasks,
            DRAIN_TIMEOUT_S,
            "every task to be queued",
        )
        queued_s = time.perf_counter() - started
        peak = peak_rss_bytes(pid)

        drain_started = time.perf_counter()
        worker = ("-m", "ventilator", "worker", "benchmarks.workloads")
        with process(*worker, "--connect", backend, "--concurrency", "2"):
            consumer.join(DRAIN_TIMEOUT_S)
            drain_s = time.perf_counter() - drain_started
        if results != [i * i for i in range(tasks)]:
            raise RuntimeError("results are missing, doubled or out of order")

    return {
        "queue_s": queued_s,
        "broker_peak_mb": peak / 1e6,
        "bytes_per_item": (peak - baseline) / tasks,
        "drain_s": drain_s,
        "drain_items_per_s": tasks / drain_s,
    }


# --- E2: many workers and clients -------------------------------------------------


def peers(tasks: int, workers: int, clients: int) -> dict[str, float]:
    """`tasks` tiny tasks, one task each, from `clients` clients to `workers`
    simulated workers on one broker; returns tasks/s."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-") as folder,
        broker(folder, client_window=100_000) as (_, frontend, backend),
        process(
            "-m",
            "benchmarks.scale",
            "simulate-workers",
            backend,
            str(workers),
        ),
        ventilator.Client(frontend) as observer,
    ):
        _wait_for(
            # Counted, not listed: status lists at most STATUS_WORKERS.
            lambda: observer.status()["worker_counts"]["all"] >= workers,
            60,
            f"{workers} simulated workers",
        )
        per_client = tasks // clients
        sessions = [ventilator.Client(frontend) for _ in range(clients)]
        barrier = threading.Barrier(clients + 1)
        failures: list[BaseException] = []

        def run(client: ventilator.Client) -> None:
            barrier.wait()
            try:
                results = list(client.map(SQUARE, range(per_client), chunksize=1))
                if results != [i * i for i in range(per_client)]:
                    raise RuntimeError("results missing or out of order")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in sessions]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join(DRAIN_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        for client in sessions:
            client.close()
        if failures:
            raise failures[0]
    return {"tasks_per_s": per_client * clients / elapsed}


def simulate_workers(backend: str, count: int) -> None:
    """Run `count` workers on DEALER sockets in this one process, until killed.

    Each registers with SIM_CAPACITY credit, runs `square` inline and beats
    every HEARTBEAT_S. No pool, no children: what is measured is the broker.
    """
    context = zmq.Context()
    sockets = []
    poller = zmq.Poller()
    for index in range(count):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(backend)
        ready = p.Ready(f"sim-{os.getpid()}-{index}", [SQUARE], SIM_CAPACITY)
        sock.send_multipart(p.encode(ready))
        poller.register(sock, zmq.POLLIN)
        sockets.append(sock)

    next_beat = time.monotonic() + HEARTBEAT_S
    while True:
        for sock, _ in poller.poll(HEARTBEAT_S * 1000 / 2):
            _serve(sock)
        if time.monotonic() >= next_beat:
            beat = p.encode(p.Heartbeat())
            for sock in sockets:
                sock.send_multipart(beat)
            next_beat = time.monotonic() + HEARTBEAT_S


def _serve(sock: zmq.Socket[bytes]) -> None:
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        command = p.decode(frames, p.TO_WORKER)
        if not isinstance(command, p.Tasks):
            continue
        outcomes = []
        for task in command.tasks:
            args, _ = unpack_call(task.payload)
            outcomes.append(
                p.Outcome(
                    task.ticket, task.attempt, p.Status.OK, pack_value(args[0] ** 2)
                )
            )
        sock.send_multipart(p.encode(p.Done(outcomes)))


# --- the command ------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    if "E1" in args.only:
        log.info("E1: %d tasks queued, one task each", args.tasks)
        report["E1 one task each"] = queued(args.tasks, chunksize=1)
        log.info("E1: %d tasks queued, in batches of 256", args.tasks)
        report["E1 map batches"] = queued(args.tasks, chunksize=256)
    if "E2" in args.only:
        log.info("E2: 2 workers, 1 client")
        small = peers(args.peers_tasks, 2, 1)
        log.info("E2: %d workers, %d clients", args.workers, args.clients)
        large = peers(args.peers_tasks, args.workers, args.clients)
        report["E2 2 workers 1 client"] = small
        report[f"E2 {args.workers} workers {args.clients} clients"] = large
        report["E2 ratio"] = {
            "many_over_two": large["tasks_per_s"] / small["tasks_per_s"]
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    for name, figures in report.items():
        if name == "machine":
            continue
        for metric, value in figures.items():
            print(f"{name:<32}{metric:<22}{value:>14,.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate-workers"]:
        simulate_workers(argv[1], int(argv[2]))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["E1", "E2"])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--peers-tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--json", default="benchmarks/results/scale.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    report = run(args)
    print_report(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()

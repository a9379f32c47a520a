"""Benchmark ventilator against its peers, side by side, in one run.

    python -m benchmarks.compare                 # every workload, every system
    python -m benchmarks.compare --only A B --systems ventilator naive
    python -m benchmarks.compare --runs 3 --json benchmarks/results/latest.json

Each system runs with 2 worker processes on 127.0.0.1. Each figure is the
median of `--runs` runs, printed with its min and max. Workloads:

    A  20,000 tiny tasks (x*x) submitted at once: tasks/s until the last result.
    B  2,000 tasks one after another: p50 and p99 round trip.
    C  400 tasks of about 5 ms of pure-Python CPU: efficiency = ideal / actual.
    D  2,000 tasks each carrying 100 KiB of bytes: tasks/s and MB/s.

A system that is not installed is reported as such, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import naive_broker, peers, workloads

log = logging.getLogger(__name__)

WORKERS = 2
TINY_TASKS = 20_000
SEQUENTIAL_TASKS = 2_000
CPU_TASKS = 400
CPU_TASK_S = 0.005
BYTES_TASKS = 2_000
BYTES_SIZE = 100 * 1024

Result = dict[str, float]


# --- ventilator ------------------------------------------------------------------


@contextmanager
def _ventilator(journal: bool, prefetch: int | None) -> Iterator[Any]:
    import tempfile

    import ventilator

    with tempfile.TemporaryDirectory() as folder:
        options: dict[str, Any] = {"prefetch": prefetch}
        if journal:
            options["journal"] = str(Path(folder) / "journal.db")
        cluster = ventilator.local(WORKERS, ["benchmarks.workloads"], **options)
        with cluster as running, ventilator.Client(running.address) as client:
            client.submit("benchmarks.workloads:square", 1).result()
            yield client


def ventilator_system(
    journal: bool, prefetch: int | None
) -> dict[str, Callable[[], Result]]:
    def tiny() -> Result:
        with _ventilator(journal, prefetch) as client:
            started = time.perf_counter()
            results = list(client.map("benchmarks.workloads:square", range(TINY_TASKS)))
            elapsed = time.perf_counter() - started
        workloads.check_squares(results)
        return {"tasks_per_s": TINY_TASKS / elapsed}

    def sequential() -> Result:
        with _ventilator(journal, prefetch) as client:
            times = []
            for i in range(SEQUENTIAL_TASKS):
                started = time.perf_counter()
                client.submit("benchmarks.workloads:square", i).result()
                times.append(time.perf_counter() - started)
        return _latency(times)

    def cpu() -> Result:
        with _ventilator(journal, prefetch) as client:
            started = time.perf_counter()
            list(client.map("benchmarks.workloads:spin", [CPU_TASK_S] * CPU_TASKS))
            elapsed = time.perf_counter() - started
        return _efficiency(elapsed)

    def large() -> Result:
        blob = os.urandom(BYTES_SIZE)
        with _ventilator(journal, prefetch) as client:
            started = time.perf_counter()
            futures = [
                client.submit("benchmarks.workloads:length", blob)
                for _ in range(BYTES_TASKS)
            ]
            lengths = [f.result() for f in futures]
            elapsed = time.perf_counter() - started
        assert set(lengths) == {BYTES_SIZE}, "a payload arrived damaged"
        return _bytes_rate(elapsed)

    return {"A": tiny, "B": sequential, "C": cpu, "D": large}


# --- the naive credit broker, and ProcessPoolExecutor --------------------------------


def naive_system() -> dict[str, Callable[[], Result]]:
    return {
        "A": lambda: {
            "tasks_per_s": naive_broker.throughput_tiny(TINY_TASKS, WORKERS)[
                "tasks_per_s"
            ]
        },
        "B": lambda: naive_broker.latency_sequential(SEQUENTIAL_TASKS, WORKERS),
        "D": lambda: naive_broker.bytes_throughput(BYTES_TASKS, BYTES_SIZE, WORKERS),
    }


def process_pool_system() -> dict[str, Callable[[], Result]]:
    def tiny() -> Result:
        with ProcessPoolExecutor(WORKERS) as pool:
            pool.submit(workloads.square, 1).result()
            started = time.perf_counter()
            results = list(pool.map(workloads.square, range(TINY_TASKS), chunksize=1))
            elapsed = time.perf_counter() - started
        workloads.check_squares(results)
        return {"tasks_per_s": TINY_TASKS / elapsed}

    def sequential() -> Result:
        with ProcessPoolExecutor(WORKERS) as pool:
            pool.submit(workloads.square, 1).result()
            times = []
            for i in range(SEQUENTIAL_TASKS):
                started = time.perf_counter()
                pool.submit(workloads.square, i).result()
                times.append(time.perf_counter() - started)
        return _latency(times)

    def cpu() -> Result:
        with ProcessPoolExecutor(WORKERS) as pool:
            pool.submit(workloads.square, 1).result()
            started = time.perf_counter()
            list(pool.map(workloads.spin, [CPU_TASK_S] * CPU_TASKS))
            elapsed = time.perf_counter() - started
        return _efficiency(elapsed)

    def large() -> Result:
        blob = os.urandom(BYTES_SIZE)
        with ProcessPoolExecutor(WORKERS) as pool:
            pool.submit(workloads.square, 1).result()
            started = time.perf_counter()
            futures = [pool.submit(workloads.length, blob) for _ in range(BYTES_TASKS)]
            [f.result() for f in futures]
            elapsed = time.perf_counter() - started
        return _bytes_rate(elapsed)

    return {"A": tiny, "B": sequential, "C": cpu, "D": large}


# --- figures -----------------------------------------------------------------------


def _latency(times_s: list[float]) -> Result:
    ordered = sorted(times_s)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6,
    }


def _efficiency(elapsed_s: float) -> Result:
    ideal_s = CPU_TASKS * CPU_TASK_S / WORKERS
    return {"efficiency_pct": 100 * ideal_s / elapsed_s, "wall_s": elapsed_s}


def _bytes_rate(elapsed_s: float) -> Result:
    return {
        "tasks_per_s": BYTES_TASKS / elapsed_s,
        "mb_per_s": BYTES_TASKS * BYTES_SIZE / elapsed_s / 1e6,
    }


def _sizes() -> peers.Sizes:
    return peers.Sizes(
        workers=WORKERS,
        tiny_tasks=TINY_TASKS,
        sequential_tasks=SEQUENTIAL_TASKS,
        cpu_tasks=CPU_TASKS,
        cpu_task_s=CPU_TASK_S,
        bytes_tasks=BYTES_TASKS,
        bytes_size=BYTES_SIZE,
    )


def _scale_task_counts(scale: float) -> None:
    """Multiply every task count by `scale` (hidden --scale, for smoke runs only)."""
    global TINY_TASKS, SEQUENTIAL_TASKS, CPU_TASKS, BYTES_TASKS
    TINY_TASKS, SEQUENTIAL_TASKS, CPU_TASKS, BYTES_TASKS = (
        max(1, round(count * scale))
        for count in (TINY_TASKS, SEQUENTIAL_TASKS, CPU_TASKS, BYTES_TASKS)
    )


SYSTEMS: dict[str, Callable[[], dict[str, Callable[[], Result]]]] = {
    "ventilator": lambda: ventilator_system(journal=True, prefetch=None),
    "ventilator-memory": lambda: ventilator_system(journal=False, prefetch=None),
    "naive": naive_system,
    "processpool": process_pool_system,
    "dask": lambda: peers.dask_system(_sizes()),
    "celery": lambda: peers.celery_system(_sizes()),
    "ipyparallel": lambda: peers.ipyparallel_system(_sizes()),
    "ray": lambda: peers.ray_system(_sizes()),
}


def _measure(run: Callable[[], Result], runs: int) -> dict[str, dict[str, float]]:
    samples = [run() for _ in range(runs)]
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


def run(systems: list[str], only: list[str], runs: int) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "runs": runs}
    for name in systems:
        try:
            workloads_of = SYSTEMS[name]()
        except (ImportError, peers.Unavailable) as exc:
            report[name] = {"unavailable": str(exc)}
            continue
        report[name] = {}
        for workload in only:
            if workload not in workloads_of:
                report[name][workload] = {"unavailable": "not measured for this system"}
                continue
            log.info("running %s %s", name, workload)
            report[name][workload] = _measure(workloads_of[workload], runs)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'system':<20}{'workload':<10}{'metric':<16}{'median':>12}{'min':>12}{'max':>12}"
    )
    for system, by_workload in report.items():
        if not isinstance(by_workload, dict) or system == "machine":
            continue
        if "unavailable" in by_workload:
            print(f"{system:<20}{'-':<10}unavailable: {by_workload['unavailable']}")
            continue
        for workload, metrics in by_workload.items():
            if "unavailable" in metrics:
                continue
            for metric, figures in metrics.items():
                print(
                    f"{system:<20}{workload:<10}{metric:<16}"
                    f"{figures['median']:>12,.1f}{figures['min']:>12,.1f}"
                    f"{figures['max']:>12,.1f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--only", nargs="+", default=["A", "B", "C", "D"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/latest.json")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    _scale_task_counts(args.scale)
    report = run(args.systems, args.only, args.runs)
    report["scale"] = args.scale
    print_table(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()

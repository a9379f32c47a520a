"""Benchmark ventilator against its peers, side by side, in one run.

    python -m benchmarks.compare                 # every workload, every system
    python -m benchmarks.compare --only A B --systems ventilator naive
    python -m benchmarks.compare --runs 3 --json benchmarks/results/latest.json

Each system runs with 2 worker processes on 127.0.0.1. Each figure is the
median of `--runs` runs, printed with its min and max. Workloads:

    A  20,000 tiny tasks (x*x) submitted at once: tasks/s until the last result.
    A1 the same, one task per item, for a system whose map batches (ventilator).
    B  2,000 tasks one after another: p50 and p99 round trip.
    C  400 tasks of about 5 ms of pure-Python CPU: efficiency = ideal / actual.
    D  2,000 tasks each carrying 100 KiB of bytes: tasks/s and MB/s; beside it
       the raw write speed of the journal's disk for the same blobs ("disk").
    E  scale, ventilator only, measured once (see benchmarks.scale): a million
       tasks queued before any worker, and 200 workers with 50 clients.

A system that is not installed is reported as such, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import disk, scale, systems

log = logging.getLogger(__name__)

FULL_SIZES = systems.Sizes(
    workers=2,
    tiny_tasks=20_000,
    sequential_tasks=2_000,
    cpu_tasks=400,
    cpu_task_s=0.005,
    bytes_tasks=2_000,
    bytes_size=100 * 1024,
)

# The targets' ratios: (workload, metric) over (system, workload, metric);
# a system of None is the ventilator flavour itself.
RATIOS = {
    "A / naive A": ("A", "tasks_per_s", "naive", "A", "tasks_per_s"),
    "A1 / naive A": ("A1", "tasks_per_s", "naive", "A", "tasks_per_s"),
    "B p50 / naive p50": ("B", "p50_us", "naive", "B", "p50_us"),
    "B p99 / own p50": ("B", "p99_us", None, "B", "p50_us"),
    "D MB/s / naive": ("D", "mb_per_s", "naive", "D", "mb_per_s"),
}

SYSTEMS: dict[str, Callable[[systems.Sizes], systems.Workloads]] = {
    "ventilator": partial(systems.ventilator_system, journal=True),
    "ventilator-memory": partial(systems.ventilator_system, journal=False),
    "naive": systems.naive_system,
    "processpool": systems.process_pool_system,
    "dask": systems.dask_system,
    "celery": systems.celery_system,
    "ipyparallel": systems.ipyparallel_system,
    "ray": systems.ray_system,
}


def _summary(samples: list[systems.Result]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


def _measure(
    run: Callable[[], systems.Result], runs: int
) -> dict[str, dict[str, float]]:
    return _summary([run() for _ in range(runs)])


def run(
    names: list[str], only: list[str], runs: int, sizes: systems.Sizes
) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "runs": runs}
    if "D" in only:
        report["disk"] = _disk(sizes, runs)
    if "E" in only:
        report["E"] = _scale(sizes)

    workloads_by_system = {}
    for name in names:
        try:
            workloads_by_system[name] = SYSTEMS[name](sizes)
        except (ImportError, systems.Unavailable) as exc:
            report[name] = {"unavailable": str(exc)}
    samples = _interleaved_samples(workloads_by_system, only, runs)

    for name, workloads_of in workloads_by_system.items():
        report[name] = {
            workload: (
                _summary(samples[name, workload])
                if workload in workloads_of
                else {"unavailable": "not measured for this system"}
            )
            for workload in only
            if workload != "E"
        }
    report["ratios"] = _paired_ratios(samples)
    return report


def _disk(sizes: systems.Sizes, runs: int) -> dict[str, Any]:
    """D's yardsticks: the same blobs written to a file, to SQLite in WAL
    mode and through ventilator's journal alone."""
    blobs = partial(disk.file_write, sizes.bytes_tasks, sizes.bytes_size)
    rows = partial(disk.sqlite_wal_write, sizes.bytes_tasks, sizes.bytes_size)
    journal = partial(disk.journal_write, sizes.bytes_tasks, sizes.bytes_size)
    return {
        "D file": _measure(blobs, runs),
        "D sqlite_wal": _measure(rows, runs),
        "D journal": _measure(journal, runs),
    }


def _interleaved_samples(
    workloads_by_system: dict[str, systems.Workloads], only: list[str], runs: int
) -> dict[tuple[str, str], list[systems.Result]]:
    """Run each workload `runs` times on every system, one run of each system
    in turn, so that the n-th runs of two systems are minutes apart at most.

    A shared machine's speed drifts by a third over the half hour a full run
    takes; measured system after system, a ratio would compare one system's
    fast minutes with another's slow ones. Each turn starts with the next
    system, so none is always first after a pause."""
    samples: dict[tuple[str, str], list[systems.Result]] = defaultdict(list)
    names = list(workloads_by_system)
    for workload in only:
        measured = [n for n in names if workload in workloads_by_system[n]]
        for turn in range(runs):
            shift = turn % len(measured) if measured else 0
            for name in measured[shift:] + measured[:shift]:
                log.info("running %s %s, run %d of %d", name, workload, turn + 1, runs)
                samples[name, workload].append(workloads_by_system[name][workload]())
    return samples


def _paired_ratios(
    samples: dict[tuple[str, str], list[systems.Result]],
) -> dict[str, dict[str, float]]:
    """The targets' ratios, each run against the run of the other system
    beside it (or of the same run, for B's p99 over its p50)."""
    ratios = {}
    for flavour in ("ventilator", "ventilator-memory"):
        for label, (
            workload,
            metric,
            base_system,
            base_workload,
            base_metric,
        ) in RATIOS.items():
            base = base_system or flavour
            ours = samples.get((flavour, workload), [])
            theirs = samples.get((base, base_workload), [])
            paired = [
                mine[metric] / other[base_metric]
                for mine, other in zip(ours, theirs, strict=False)
            ]
            if paired:
                ratios[f"{flavour} {label}"] = {
                    "median": statistics.median(paired),
                    "min": min(paired),
                    "max": max(paired),
                }
    return ratios


def _scale(sizes: systems.Sizes) -> dict[str, Any]:
    log.info("running ventilator E (scale), once")
    factor = sizes.tiny_tasks / FULL_SIZES.tiny_tasks
    options = argparse.Namespace(
        only=["E1", "E2"],
        tasks=max(1000, round(1_000_000 * factor)),
        peers_tasks=max(1000, round(100_000 * factor)),
        workers=200,
        clients=50,
    )
    figures = scale.run(options)
    figures.pop("machine")
    return figures


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'system':<20}{'workload':<14}{'metric':<16}{'median':>12}{'min':>12}{'max':>12}"
    )
    for system, by_workload in report.items():
        if not isinstance(by_workload, dict) or system in ("machine", "E", "ratios"):
            continue
        if "unavailable" in by_workload:
            print(f"{system:<20}{'-':<14}unavailable: {by_workload['unavailable']}")
            continue
        for workload, metrics in by_workload.items():
            if "unavailable" in metrics:
                continue
            for metric, figures in metrics.items():
                print(
                    f"{system:<20}{workload:<14}{metric:<16}"
                    f"{figures['median']:>12,.1f}{figures['min']:>12,.1f}"
                    f"{figures['max']:>12,.1f}"
                )


def print_ratios(report: dict[str, Any]) -> None:
    """The targets' ratios, paired run by run, and D's journal against the
    disk's own yardstick (medians; the disk is measured before the systems)."""
    ratios = dict(report.get("ratios", {}))
    disk_wal = report.get("disk", {}).get("D sqlite_wal", {}).get("mb_per_s")
    ours = report.get("ventilator", {}).get("D", {}).get("mb_per_s")
    if disk_wal and ours:
        share = ours["median"] / disk_wal["median"]
        ratios["ventilator D MB/s / SQLite WAL"] = {"median": share}
    if not ratios:
        return
    print(f"\n{'ratio, run by run':<48}{'median':>10}{'min':>10}{'max':>10}")
    for label, figures in ratios.items():
        spread = ""
        if "min" in figures:
            spread = f"{figures['min']:>10.2f}{figures['max']:>10.2f}"
        print(f"{label:<48}{figures['median']:>10.2f}{spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument(
        "--only",
        nargs="+",
        default=["A", "A1", "B", "C", "D", "E"],
        choices=["A", "A1", "B", "C", "D", "E"],
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/latest.json")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    # --scale is hidden: smaller task counts, for smoke runs only.
    sizes = FULL_SIZES.scaled(args.scale)
    report = run(args.systems, args.only, args.runs, sizes)
    report["scale"] = args.scale
    print_table(report)
    print_ratios(report)
    if "E" in report:
        print("\nE (scale, ventilator with its journal, one run)")
        scale.print_report(report["E"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()

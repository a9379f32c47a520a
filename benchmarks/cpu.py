"""CPU time per task in each process: a figure that holds on a busy machine.

    python -m benchmarks.cpu                      # 20,000 tiny tasks through map
    python -m benchmarks.cpu --each               # ... one task per item
    python -m benchmarks.cpu --bytes 102400 --tasks 2000   # D's 100 KiB payloads
    python -m benchmarks.cpu --memory             # no journal
    python -m benchmarks.cpu --sequential --tasks 2000   # B: one round trip at a time

Wall-clock rates move with whatever else runs; the CPU seconds a process spent
per task move much less, so this is what to compare before and after a change.
It runs `local(2)` and reads the broker's and the worker's (with its task
processes') CPU time from /proc around the timed part, and this process's own
(the client) from getrusage.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import ventilator

FUNCTIONS = "benchmarks.workloads"


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and all its descendants, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


def snapshot(cluster: ventilator.LocalCluster) -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = {name: cpu_seconds(pid) for name, pid in cluster.pids.items()}
    return {**spent, "client": usage.ru_utime + usage.ru_stime}


def _round_trip(client: ventilator.Client, index: int) -> float:
    started = time.perf_counter()
    client.submit(f"{FUNCTIONS}:square", index).result()
    return time.perf_counter() - started


def run(tasks: int, each: bool, size: int, journal: bool, sequential: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as folder:
        path = str(Path(folder) / "journal.db") if journal else None
        with (
            ventilator.local(2, [FUNCTIONS], journal=path) as cluster,
            ventilator.Client(cluster.address) as client,
        ):
            list(client.map(f"{FUNCTIONS}:square", range(100)))
            before = snapshot(cluster)
            started = time.perf_counter()
            if sequential:
                round_trips = [_round_trip(client, i) for i in range(tasks)]
            elif size:
                blob = os.urandom(size)
                futures = [
                    client.submit(f"{FUNCTIONS}:length", blob) for _ in range(tasks)
                ]
                [future.result() for future in futures]
            else:
                chunksize = 1 if each else None
                list(
                    client.map(f"{FUNCTIONS}:square", range(tasks), chunksize=chunksize)
                )
            wall_s = time.perf_counter() - started
            after = snapshot(cluster)

    print(f"{tasks} tasks in {wall_s:.2f} s ({tasks / wall_s:,.0f}/s)")
    if sequential:
        round_trips.sort()
        p50, p99 = round_trips[tasks // 2], round_trips[int(tasks * 0.99)]
        print(f"  round trip p50 {p50 * 1e6:,.0f} µs, p99 {p99 * 1e6:,.0f} µs")
    for name in after:
        spent = after[name] - before[name]
        print(f"  {name:<8}{spent:8.2f} s CPU {spent / tasks * 1e6:10.1f} µs per task")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--each", action="store_true", help="one task per item")
    parser.add_argument("--bytes", type=int, default=0, help="payload per task")
    parser.add_argument("--memory", action="store_true", help="no journal")
    parser.add_argument(
        "--sequential", action="store_true", help="one task at a time, as B"
    )
    args = parser.parse_args()
    run(args.tasks, args.each, args.bytes, not args.memory, args.sequential)


if __name__ == "__main__":
    main()

"""CPU time per task in each process: a figure that holds on a busy machine.

    python -m benchmarks.cpu                      # 20,000 tiny tasks through map
    python -m benchmarks.cpu --each               # ... one task per item
    python -m benchmarks.cpu --bytes 102400 --tasks 2000   # D's 100 KiB payloads
    python -m benchmarks.cpu --memory             # no journal
    python -m benchmarks.cpu --sequential --tasks 2000   # B: one round trip at a time
    python -m benchmarks.cpu --bytes 102400 --tasks 10000 --memory --threads
                                  # D thread by thread, with the page faults of each
    python -m benchmarks.cpu --bytes 102400 --tasks 10000 --naive
                                  # the same for the naive broker of benchmarks.compare

Wall-clock rates move with whatever else runs; the CPU seconds a process spent
per task move much less, so this is what to compare before and after a change.
It runs `local(2)` and reads the broker's and the worker's (with its task
processes') CPU time from /proc around the timed part, and this process's own
(the client) from getrusage. With `--threads`, it reads every thread of every
process (libzmq's I/O threads, the client's own, pyzmq's) from /proc, with the
page faults each took: fresh pages cost more than the copies into them.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import msgpack

import ventilator

FUNCTIONS = "benchmarks.workloads"


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and all its descendants, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


# A thread: its process's part, its thread id, its name.
Thread = tuple[str, int, str]


def thread_counters(
    pid: int, part: str, descendants: str | None = None
) -> dict[Thread, tuple[int, float]]:
    """Page faults and CPU seconds of every thread of `pid`, and of its
    descendants' as the part named `descendants`, if named."""
    counters = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        tid = int(task.name)
        name = "main" if tid == pid else (task / "comm").read_text().strip()
        counters[(part, tid, name)] = (int(fields[7]), cpu_s)
    if descendants is not None:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            counters.update(thread_counters(int(child), descendants, descendants))
    return counters


def threads_snapshot(
    cluster: ventilator.LocalCluster,
) -> dict[Thread, tuple[int, float]]:
    counters = thread_counters(os.getpid(), "client")
    for part, pid in cluster.pids.items():
        counters.update(thread_counters(pid, part, descendants="task process"))
    return counters


def print_threads(
    before: dict[Thread, tuple[int, float]],
    after: dict[Thread, tuple[int, float]],
    tasks: int,
) -> None:
    print(f"  {'process':<14}{'thread':<20}{'µs CPU/task':>12}{'faults/task':>13}")
    for thread in sorted(after):
        faults_before, cpu_before = before.get(thread, (0, 0.0))
        faults, cpu_s = after[thread]
        spent_us = (cpu_s - cpu_before) / tasks * 1e6
        if spent_us >= 1:  # a thread that slept through the run says nothing
            part, tid, name = thread
            print(
                f"  {part:<14}{name + ' ' + str(tid):<20}{spent_us:12.1f}"
                f"{(faults - faults_before) / tasks:13.1f}"
            )


def snapshot(cluster: ventilator.LocalCluster) -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = {name: cpu_seconds(pid) for name, pid in cluster.pids.items()}
    return {**spent, "client": usage.ru_utime + usage.ru_stime}


def _round_trip(client: ventilator.Client, index: int) -> float:
    started = time.perf_counter()
    client.submit(f"{FUNCTIONS}:square", index).result()
    return time.perf_counter() - started


def run(
    tasks: int, each: bool, size: int, journal: bool, sequential: bool, threads: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as folder:
        path = str(Path(folder) / "journal.db") if journal else None
        with (
            ventilator.local(2, [FUNCTIONS], journal=path) as cluster,
            ventilator.Client(cluster.address) as client,
        ):
            list(client.map(f"{FUNCTIONS}:square", range(100)))
            before = snapshot(cluster)
            threads_before = threads_snapshot(cluster) if threads else {}
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
            threads_after = threads_snapshot(cluster) if threads else {}

    print(f"{tasks} tasks in {wall_s:.2f} s ({tasks / wall_s:,.0f}/s)")
    if sequential:
        round_trips.sort()
        p50, p99 = round_trips[tasks // 2], round_trips[int(tasks * 0.99)]
        print(f"  round trip p50 {p50 * 1e6:,.0f} µs, p99 {p99 * 1e6:,.0f} µs")
    for name in after:
        spent = after[name] - before[name]
        print(f"  {name:<8}{spent:8.2f} s CPU {spent / tasks * 1e6:10.1f} µs per task")
    if threads:
        print_threads(threads_before, threads_after, tasks)


def run_naive(tasks: int, size: int) -> None:
    """The naive broker's D (its own client, `CLIENT_WINDOW` tasks in flight),
    thread by thread; its broker and workers are this process's children."""
    from benchmarks import naive_broker

    blob = bytes(size)
    with (
        naive_broker.running_cluster(2) as address,
        naive_broker._client(address) as client,
    ):
        naive_broker._warm_up(client)
        before = thread_counters(os.getpid(), "client", descendants="naive")
        _, wall_s = naive_broker._run_pipelined(
            client, tasks, lambda _: msgpack.packb(("length", blob))
        )
        after = thread_counters(os.getpid(), "client", descendants="naive")
    print(f"{tasks} tasks in {wall_s:.2f} s ({tasks / wall_s:,.0f}/s)")
    print_threads(before, after, tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--each", action="store_true", help="one task per item")
    parser.add_argument("--bytes", type=int, default=0, help="payload per task")
    parser.add_argument("--memory", action="store_true", help="no journal")
    parser.add_argument(
        "--sequential", action="store_true", help="one task at a time, as B"
    )
    parser.add_argument(
        "--threads", action="store_true", help="CPU and page faults thread by thread"
    )
    parser.add_argument(
        "--naive", action="store_true", help="the naive broker's D instead (--bytes)"
    )
    args = parser.parse_args()
    if args.naive:
        run_naive(args.tasks, args.bytes or 100 * 1024)
        return
    run(
        args.tasks,
        args.each,
        args.bytes,
        not args.memory,
        args.sequential,
        args.threads,
    )


if __name__ == "__main__":
    main()

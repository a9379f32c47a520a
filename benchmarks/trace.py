"""Where one round trip of B spends its time, hop by hop, across processes.

    python -m benchmarks.trace [--round-trips 3000] [--journal] [--json FILE]

A profile shows one process; B's latency is made in the hand-offs between
four (client, broker, worker, task process). This runs B on an embedded
cluster with every process stamping the start and end of a few functions on
its path (`TRACED`) with CLOCK_MONOTONIC, which all processes share. Each
round trip is the stretch between two submits; the round trips whose events
came in the most common order give the median time between each event and
the next: the cost of each step and hop.

The stamps come from a `sitecustomize` module put on the processes' path for
the run, so the product carries no tracing code. Each stamp costs about a
microsecond, so the total runs a little above B's own p50.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# module:qualified name, on the path of one round trip.
TRACED = [
    "ventilator.client:Client.submit",
    "ventilator._client_io:ClientIO._receive",
    "ventilator._client_io:ClientIO._complete",
    "ventilator.broker:Broker._drain",
    "ventilator.broker:Broker._carry_out",
    "ventilator.broker:Broker._send_frames",
    "ventilator.journal:SqliteJournal.commit",
    "ventilator.worker:Worker._receive",
    "ventilator.worker:Worker._collect",
    "ventilator.worker:Worker._send",
    "ventilator.pool:ProcessPool._send",
    "ventilator._framing:_read_exactly",
    "ventilator._framing:frame",
]
ROLES = {
    "Client": "client",
    "ClientIO": "client",
    "Broker": "broker",
    "SqliteJournal": "broker",
    "Worker": "worker",
    "ProcessPool": "worker",
}
SOCKET_SIDES = {"46": "frontend", "42": "backend"}  # the broker's socket tags

# Loaded by every Python process of the run (it is on their PYTHONPATH): once
# ventilator is imported, wrap the TRACED functions; write the stamps at exit.
_HOOK = """
import atexit, builtins, functools, importlib, os, time

_folder = os.environ["VENTILATOR_TRACE_DIR"]
_stamps = []


def _write():
    with open(os.path.join(_folder, f"{os.getpid()}.txt"), "a") as out:
        out.writelines(f"{os.getpid()} {n} {t} {e}\\n" for n, t, e in _stamps)
    _stamps.clear()


def _wrap(spec):
    module, qualified = spec.split(":")
    owner = importlib.import_module(module)
    *path, name = qualified.split(".")
    for part in path:
        owner = getattr(owner, part)
    function = getattr(owner, name)

    @functools.wraps(function)
    def stamped(*args, **kwargs):
        label = qualified
        if qualified in ("Broker._drain", "Broker._send_frames"):
            label += ":" + bytes(args[1][:1]).hex()  # which socket
        _stamps.append((label, time.monotonic_ns(), "b"))
        try:
            return function(*args, **kwargs)
        finally:
            _stamps.append((label, time.monotonic_ns(), "e"))
            if len(_stamps) > 50_000:
                _write()

    setattr(owner, name, stamped)


_import = builtins.__import__


def _importing(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name.startswith("ventilator"):
        builtins.__import__ = _import
        for spec in os.environ["VENTILATOR_TRACE_FUNCTIONS"].split(","):
            _wrap(spec)
    return module


builtins.__import__ = _importing
atexit.register(_write)
"""


def run_round_trips(count: int, journal: bool) -> None:
    """In the traced process: B's loop on an embedded cluster."""
    import ventilator

    square = "benchmarks.workloads:square"
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as folder:
        path = str(Path(folder) / "journal.db") if journal else None
        with (
            ventilator.local(2, ["benchmarks.workloads"], journal=path) as cluster,
            ventilator.Client(cluster.address) as client,
        ):
            client.submit(square, 0).result(60)
            for i in range(count):
                client.submit(square, i).result(60)


def trace(
    count: int, journal: bool, functions: list[str]
) -> list[tuple[int, int, str, str]]:
    """Run B with `functions` traced; return every stamp as (time ns, pid,
    label, b|e)."""
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as folder:
        hook = Path(folder) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_HOOK)
        stamps = Path(folder) / "stamps"
        stamps.mkdir()
        # This process's path ('' is the working folder), behind the hook.
        path = os.pathsep.join([str(hook), *(p or os.getcwd() for p in sys.path)])
        environment = dict(
            os.environ,
            PYTHONPATH=path,
            VENTILATOR_TRACE_DIR=str(stamps),
            VENTILATOR_TRACE_FUNCTIONS=",".join(functions),
        )
        command = [sys.executable, "-m", "benchmarks.trace", "--run", str(count)]
        if journal:
            command.append("--journal")
        subprocess.run(command, env=environment, check=True)
        return _read_stamps(stamps)


def _read_stamps(folder: Path) -> list[tuple[int, int, str, str]]:
    stamps = []
    for file in folder.iterdir():
        for line in file.read_text().splitlines():
            pid, label, at, edge = line.split()
            stamps.append((int(at), int(pid), label, edge))
    stamps.sort()
    return stamps


def _name(label: str, edge: str, roles: dict[int, str], pid: int) -> str:
    function, _, tag = label.partition(":")
    side = f"({SOCKET_SIDES.get(tag, tag)})" if tag else ""
    return f"{roles[pid]} {function}{side} {'begins' if edge == 'b' else 'ends'}"


def steps(stamps: list[tuple[int, int, str, str]]) -> dict[str, object]:
    """The median time from each event of a round trip to the next."""
    roles: dict[int, str] = collections.defaultdict(lambda: "task process")
    for _, pid, label, _ in stamps:
        if pid not in roles and label.split(".")[0] in ROLES:
            roles[pid] = ROLES[label.split(".")[0]]
    starts = [
        i
        for i, (_, _, label, edge) in enumerate(stamps)
        if label == "Client.submit" and edge == "b"
    ]
    trips = [stamps[a:b] for a, b in itertools.pairwise(starts)]
    orders = collections.Counter(_order(trip) for trip in trips)
    usual, count = orders.most_common(1)[0]
    alike = [trip for trip in trips if _order(trip) == usual]
    rows = []
    for i in range(len(usual) - 1):
        gaps = [(trip[i + 1][0] - trip[i][0]) / 1000 for trip in alike]
        _, pid, label, edge = alike[0][i]
        _, next_pid, next_label, next_edge = alike[0][i + 1]
        rows.append(
            {
                "from": _name(label, edge, roles, pid),
                "to": _name(next_label, next_edge, roles, next_pid),
                "median_us": statistics.median(gaps),
            }
        )
    total = statistics.median((trip[-1][0] - trip[0][0]) / 1000 for trip in alike)
    return {
        "round_trips": len(trips),
        "in_usual_order": count,
        "steps": rows,
        "total_us": total,
    }


def _order(trip: list[tuple[int, int, str, str]]) -> tuple[tuple[int, str, str], ...]:
    """Which process stamped what, in order: a round trip's shape."""
    return tuple((pid, label, edge) for _, pid, label, edge in trip)


def print_steps(report: dict[str, object]) -> None:
    print(
        f"{report['in_usual_order']} of {report['round_trips']} round trips "
        "had their events in the usual order; median µs from each to the next:"
    )
    for row in report["steps"]:  # type: ignore[attr-defined]
        print(f"{row['median_us']:8,.0f}  {row['from']:48} -> {row['to']}")
    print(f"{report['total_us']:8,.0f}  in all, from a submit to its result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--journal", action="store_true", help="journal in a file")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="MODULE:NAME",
        help="more functions to stamp, e.g. ventilator.protocol:decode",
    )
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        run_round_trips(args.run, args.journal)
        return

    started = time.perf_counter()
    report = steps(trace(args.round_trips, args.journal, TRACED + args.also))
    print_steps(report)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()

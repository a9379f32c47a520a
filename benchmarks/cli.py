"""Lines per second through `ventilator map` and `exec`, as a user runs them.

    python -m benchmarks.cli                         # 100,000 lines through map
    python -m benchmarks.cli --lines 20000 --exec    # ... and exec of `true`
    python -m benchmarks.cli --runs 3 --json benchmarks/results/cli.json

Each run is the real command in its own process, on the embedded default (a
broker and 2 local workers, journal on as it ships), reading generated lines
from a file and writing its JSON records to another. Two rates are printed:
over the whole command (its cluster's start and stop included), and the one
the command reports itself, counted from its first line read. The output is
checked: one record per line, in input order.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FUNCTION = "benchmarks.workloads:square"
# What `ventilator map` prints last on stderr: "... in 1.23s (45,678 lines/s)".
SUMMARY = re.compile(r"in ([0-9.]+)s \(([0-9,]+) lines/s\)")


def run_once(kind: str, lines: int, folder: Path) -> dict[str, float]:
    """Run one command over `lines` generated lines; return its timings."""
    source, sink = folder / "input.txt", folder / "output.jsonl"
    source.write_text("".join(f"{i}\n" for i in range(lines)))
    options = ["--workers", "2", "--input", str(source), "--output", str(sink)]
    options.append("--no-progress")
    if kind == "map":
        command = ["map", FUNCTION, *options]
    else:
        command = ["exec", *options, "--", "true"]
    argv = [sys.executable, "-m", "ventilator", *command]

    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr[-2000:]}")
    _check_output(kind, sink, lines)
    own_s = _reported_seconds(completed.stderr)
    return {"wall_s": wall_s, "own_s": own_s}


def _check_output(kind: str, sink: Path, lines: int) -> None:
    with sink.open() as records:
        for index, line in enumerate(records):
            record = json.loads(line)
            expected = index * index if kind == "map" else None
            got = record.get("result") if kind == "map" else None
            if record["input"] not in (index, str(index)) or got != expected:
                raise AssertionError(f"record {index} is wrong: {line.strip()}")
    if index + 1 != lines:
        raise AssertionError(f"{lines} lines in, {index + 1} records out")


def _reported_seconds(stderr: str) -> float:
    found = SUMMARY.search(stderr)
    if found is None:
        raise RuntimeError(f"no summary line in the command's stderr: {stderr[-500:]}")
    return float(found.group(1))


def measure(kind: str, lines: int, runs: int) -> dict[str, Any]:
    """`runs` runs of one command; the median and range of each rate."""
    timings = []
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as folder:
        for _ in range(runs):
            timings.append(run_once(kind, lines, Path(folder)))
    wall = [lines / t["wall_s"] for t in timings]
    own = [lines / t["own_s"] for t in timings if t["own_s"] > 0]
    return {
        "command": kind,
        "lines": lines,
        "runs": timings,
        "lines_per_s_wall": _spread(wall),
        "lines_per_s_own": _spread(own),
    }


def _spread(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'command':<8}{'lines':>10}{'lines/s (whole run)':>26}"
    print(header + f"{'lines/s (own count)':>26}")
    for result in results:
        wall, own = result["lines_per_s_wall"], result["lines_per_s_own"]
        print(
            f"{result['command']:<8}{result['lines']:>10,}"
            f"{_cell(wall):>26}{_cell(own):>26}"
        )


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['median']:,.0f} ({spread['min']:,.0f}-{spread['max']:,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--exec", action="store_true", help="also run `ventilator exec -- true`"
    )
    parser.add_argument("--json", default="benchmarks/results/cli.json")
    args = parser.parse_args()

    results = [measure("map", args.lines, args.runs)]
    if args.exec:
        results.append(measure("exec", args.lines, args.runs))
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()

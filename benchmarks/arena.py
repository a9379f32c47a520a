"""What a client's writes into its shared-memory arena cost, fresh and warm.

    python -m benchmarks.arena [--puts 2000] [--bytes 102400] [--runs 5] [--json FILE]

A client writes each large payload into its arena (see `_shared.ArenaWriter`)
on its I/O thread, with at most its window of them in flight, as D does. The
first pass over a fresh arena also reserves its memory and maps its pages;
later passes reuse them. This prints the CPU of one write (`put`) in both,
median of `--runs` fresh arenas, in the arena's folder (/dev/shm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import deque

from ventilator._shared import SHM_ROOT, ArenaWriter

# D's payloads in flight: a client's default window_bytes over 100 KiB.
IN_FLIGHT = 320
ARENA_BYTES = 33 * 1024 * 1024


def passes(puts: int, size: int) -> tuple[float, float]:
    """CPU µs per put over a fresh arena's first `puts` writes, then over
    as many more."""
    payload = os.urandom(size)
    with tempfile.NamedTemporaryFile(dir=SHM_ROOT, prefix="bench-arena-") as file:
        file.truncate(ARENA_BYTES)
        writer = ArenaWriter(file.name)
        in_flight: deque[int] = deque()
        try:
            fresh = _timed_puts(writer, in_flight, range(puts), payload)
            warm = _timed_puts(writer, in_flight, range(puts, 2 * puts), payload)
        finally:
            writer.close()
    return fresh, warm


def _timed_puts(
    writer: ArenaWriter, in_flight: deque[int], keys: range, payload: bytes
) -> float:
    started = time.thread_time()
    for key in keys:
        if len(in_flight) >= IN_FLIGHT:
            writer.free(in_flight.popleft())
        if writer.put(key, payload) is None:
            raise RuntimeError("the arena is full: is /dev/shm?")
        in_flight.append(key)
    return (time.thread_time() - started) / len(keys) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=2000)
    parser.add_argument("--bytes", type=int, default=100 * 1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args()

    runs = [passes(options.puts, options.bytes) for _ in range(options.runs)]
    figures = {
        "fresh_us_per_put": statistics.median(fresh for fresh, _ in runs),
        "warm_us_per_put": statistics.median(warm for _, warm in runs),
    }
    print(f"{options.puts} puts of {options.bytes:,} bytes, median of {options.runs}:")
    print(f"  fresh arena  {figures['fresh_us_per_put']:6.1f} µs CPU per put")
    print(f"  warm arena   {figures['warm_us_per_put']:6.1f} µs CPU per put")
    if options.json:
        with open(options.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()

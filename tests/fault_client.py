"""A client in its own process, for the scenario that freezes it with SIGSTOP.

    python tests/fault_client.py FRONTEND COUNT REPORT_PATH

Submits COUNT tasks, touches REPORT_PATH.started, waits for every result and
writes {"received", "wrong", "failed"} to REPORT_PATH.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ventilator


def main(frontend: str, count: int, report: Path) -> None:
    received = wrong = failed = 0
    with ventilator.Client(frontend, heartbeat_interval_s=0.25) as client:
        futures = {
            i: client.submit("tests.fault_tasks:work", i, 0.002) for i in range(count)
        }
        Path(f"{report}.started").touch()
        for i, future in futures.items():
            try:
                value = future.result(timeout=120)
            except Exception:
                failed += 1
            else:
                wrong += value != i
            received += 1
    report.write_text(
        json.dumps({"received": received, "wrong": wrong, "failed": failed})
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))

"""Tasks that start processes of their own, for tests of what outlives a task."""

from __future__ import annotations

import subprocess


def run_program(argv: list[str]) -> int:
    """Run `argv` to its end; return its exit status."""
    return subprocess.run(argv, check=False).returncode

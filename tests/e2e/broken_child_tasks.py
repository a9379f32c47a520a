"""Task functions whose module imports in a worker but not in its task
processes while `BREAK_CHILDREN` is set: a deploy broken after the worker
started, as a child that replaces a dead one meets it."""

from __future__ import annotations

import os
import sys

BREAK_CHILDREN = "VENTILATOR_TEST_BREAK_CHILDREN"

if os.environ.get(BREAK_CHILDREN) and sys.argv[0].endswith("_child.py"):
    raise ImportError("this module does not import in task processes, on purpose")


def double(x: int) -> int:
    return 2 * x

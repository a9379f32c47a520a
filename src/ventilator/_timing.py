"""Time helpers shared by the I/O shells (the core takes time as an argument)."""

from __future__ import annotations

import math
import time


def poll_timeout_ms(wake_at: float) -> int:
    """Milliseconds from now until `wake_at` (monotonic), rounded up, never < 0.

    Rounding up matters: a poll of 0 ms while the deadline is 0.4 ms away would
    spin until it passes.
    """
    return max(0, math.ceil((wake_at - time.monotonic()) * 1000))

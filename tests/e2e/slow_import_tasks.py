"""Task functions in a module that takes a while to import, as a heavy
library does on a loaded machine."""

from __future__ import annotations

import time

IMPORT_S = 1.5

time.sleep(IMPORT_S)


def quick(x: int) -> int:
    """Return at once: any time it takes is the system's."""
    return x

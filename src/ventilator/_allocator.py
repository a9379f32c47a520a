"""Keep freed payload memory in the process rather than return it at each free.

A worker receives, forwards and frees a payload per task. With glibc's default
settings, freeing a 100 KiB block often shrinks the heap it came from, so the
next payload touches fresh pages: about seven page faults per 100 KiB task in
the worker, a sixth of its CPU per task. Raising the trim threshold keeps that
memory for the next payload; a fixed mmap threshold (setting the first turns
off glibc's adaptive one) keeps payloads of up to a few MiB in the heap too.

Only for processes that exist to run tasks (the worker CLI, the task
processes): an embedded `Worker` leaves its host's allocator alone.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Freed memory kept at the top of a heap before it goes back to the system.
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
# Blocks at least this large get their own mapping, returned when freed.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def keep_freed_memory() -> None:
    """Tune glibc's malloc for payload traffic; a no-op on other C libraries."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc (macOS, Windows): their allocators differ anyway
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for parameter, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    ):
        if mallopt(parameter, value) != 1:
            log.debug("mallopt(%d, %d) refused", parameter, value)

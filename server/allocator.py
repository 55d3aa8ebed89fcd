"""The C allocator setting a long-running server process needs (glibc).

glibc serves blocks of at least its mmap threshold (128 KiB) with mmap, and raises the
threshold to the size of any such block freed. Once a server has freed one big block, the
256 KiB buffer asyncio allocates for every socket read (Redis, Postgres), then shrinks to
the few bytes that arrived, comes from the heap: each leaves a hole that small objects
land in and no later 256 KiB read fits, so the heap creeps. Under steady load that was
about 400 bytes of RSS per task, for ever, with no live object growing (issue 10).
Pinning the threshold turns the adjustment off: those buffers are mapped and unmapped.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number (glibc ``malloc.h``)."""
MMAP_THRESHOLD = 128 * 1024
"""glibc's own initial threshold: below asyncio's 256 KiB receive buffers."""
ENV = "MALLOC_MMAP_THRESHOLD_"
"""glibc's own variable: an operator who set it has chosen, and is left alone."""


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix the mmap threshold for this process; True if the C library took it.

    Process-wide, so only entry points call it. A no-op (False) where the C library has no
    ``mallopt`` (macOS) or ignores it (musl), and when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if os.environ.get(ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    pinned = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("malloc mmap threshold %s at %d bytes", "pinned" if pinned else "not set", threshold)
    return pinned

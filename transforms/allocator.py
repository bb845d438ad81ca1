"""glibc's allocator in a long-running worker: large buffers are mapped and unmapped, never kept in the heap.

Why: glibc serves an allocation of at least its mmap threshold (128 KiB at start) with a mapping of its own and
returns it to the system when it is freed, but each such free raises the threshold (up to 32 MiB), so later large
buffers come from the heap instead; the heap keeps what is freed there and can seldom return it while smaller
chunks sit above it. A stream worker handles bursts of large buffers (``GetRecords`` responses, batches of
records): in 8-minute runs at 2,000 ev/s one burst left the heap 40-50 MB larger for good, 100-117 MB of its
~150 MB free, and the worker's resident memory rose by ~65 MiB with it. Setting the threshold explicitly turns
that adjustment off: with 256 KiB the heap stayed at 35-56 MB (13-20 MB free) and the worker at 282-312 MiB
instead of 314-414 (docs/benchmarks.md, stop 24).

The SDK worker has no option for this, so the core's ``DoFn.setup()`` calls :func:`map_large_buffers` (once per
process). glibc's own setting (``MALLOC_MMAP_THRESHOLD_`` in the environment) is left alone, and other C libraries
are not touched.
"""
from __future__ import annotations

import ctypes
import os
import threading

#: mallopt's parameter for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 256 * 1024

_lock = threading.Lock()
_asked = False


def map_large_buffers() -> bool:
    """Has glibc map, and unmap when freed, every allocation of :data:`LARGE_BUFFER_BYTES` or more; once per process.
    Whether it did now (not on another C library, not where the owner set ``MALLOC_MMAP_THRESHOLD_``)."""
    global _asked
    with _lock:
        if _asked:
            return False
        _asked = True
        if "MALLOC_MMAP_THRESHOLD_" in os.environ:
            return False
        try:
            libc = ctypes.CDLL(None)
            if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt's parameters are its own
                return False
            return libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(LARGE_BUFFER_BYTES)) == 1
        except (OSError, AttributeError):
            return False

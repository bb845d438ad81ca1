"""The cycle collector of a process that handles events in batches: fewer, larger collections.

Why: the core holds a batch of ~1,000 events (tens of thousands of dicts and lists) between its stages, and
CPython's default thresholds (a young collection every 700 net container allocations, an older one every 10 of
those) traverse those live survivors again and again: over 100,000 events in one process, the core and the lake's
chunking ran 1,300 collections taking 2.7-3.2 s of their 15-19 s of CPU, and 6 collections taking 0.2 s with the
thresholds below (docs/benchmarks.md, stop 22). Nearly all of this garbage is freed by reference counting the
moment it is dropped; the collector is only for reference cycles, which stay bounded with the rarer collections.

The SDK worker has no option for this, so the core's ``DoFn.setup()`` tunes its process (once, and only when
the thresholds are still CPython's defaults: a process tuned by its owner is left alone).

Tuning also has the process freeze its heap (``gc.freeze()``) when it exits, before the interpreter's own
collections: those walked what Beam, pyarrow and boto3 bring (~160,000 objects) several times, 0.7-0.9 s per SDK
worker process at the end of every batch run, one worker after the other (docs/benchmarks.md, stop 23). It is
done at exit, not at set-up: freezing at set-up would also keep any garbage cycle alive then, and measured no
faster during a run (stop 20).
"""
from __future__ import annotations

import atexit
import gc
import threading

CPYTHON_DEFAULT = (700, 10, 10)
BATCH_THRESHOLDS = (50_000, 20, 100)

_lock = threading.Lock()


def tune_for_batches() -> bool:
    """Sets :data:`BATCH_THRESHOLDS` when the process still has CPython's defaults, and then has it freeze its heap
    at exit; whether it did."""
    with _lock:
        if gc.get_threshold() != CPYTHON_DEFAULT:
            return False
        gc.set_threshold(*BATCH_THRESHOLDS)
        atexit.unregister(freeze_before_exit)  # once per process, however often an owner resets and tunes again
        atexit.register(freeze_before_exit)
        return True


def freeze_before_exit() -> None:
    """For a process whose work is done: its exit then frees what it holds without walking it for cycles first
    (0.6-0.9 s for one that imported Beam, pyarrow and boto3; module docstring). Exit handlers run before the
    interpreter's last collections."""
    gc.freeze()

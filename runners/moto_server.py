"""The moto server of the local stack, with Kinesis shards made safe for concurrent writers.

moto 5.2's ``Shard.put_record`` reads the last sequence number and then stores
the record under the next one, without a lock ("not safe for concurrency", its
own comment says). moto's server is threaded, so two PutRecords in flight on one
shard (the ingress's gunicorn threads, 8 demo clients) can draw the same
sequence number: one record overwrites the other, and both callers were told
their records were stored. Measured: 8 threads x 25 PutRecords of 100 records on
2 shards stored 19,895 of 20,000; ``make demo`` reported 189 accepted events
missing from the lake that the pipeline had never been able to read. A
``GetRecords`` iterating a shard while a put inserts into it can also fail with
a 500. Kinesis does neither, so this launcher serialises each shard's puts and
reads with one lock per shard and then runs ``moto.server`` unchanged::

    python -m runners.moto_server -H 127.0.0.1 -p PORT
"""
from __future__ import annotations

import functools
import sys
import threading


def make_shards_thread_safe() -> None:
    """Wraps moto's Kinesis ``Shard.put_record`` and ``Shard.get_records`` in a per-shard lock."""
    from moto.kinesis import models

    if getattr(models.Shard, "_eventlake_locked", False):
        return

    def shard_lock(shard) -> threading.RLock:
        lock = shard.__dict__.get("_eventlake_lock")
        if lock is None:  # dict.setdefault is atomic: two first callers end up with the same lock
            lock = shard.__dict__.setdefault("_eventlake_lock", threading.RLock())
        return lock

    def locked(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with shard_lock(self):
                return method(self, *args, **kwargs)

        return wrapper

    models.Shard.put_record = locked(models.Shard.put_record)
    models.Shard.get_records = locked(models.Shard.get_records)
    models.Shard._eventlake_locked = True


def main(argv: list[str]) -> int:
    make_shards_thread_safe()
    from moto.server import main as moto_main

    moto_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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
reads with one lock per shard.

moto's shards are also quadratic where Kinesis is not: every put finds the last
sequence number by listing all of the shard's keys, and every ``GetRecords``
walks the shard from its first record to the iterator's position. Measured on
this machine (2 shards, PutRecords of 500): 4,798 ev/s for the first 10,000
records, 892 ev/s after 90,000. A benchmark of a few minutes then measured the
emulator's age, not the ingress or the pipeline. This launcher answers the same
questions in time independent of the shard's length (``fast_shards``).

moto keeps every record it was sent as Python objects, and CPython's full
garbage collection walks all of them: a PutRecords caught behind one waited
130 ms after 100,000 records, and the pauses grow with the stream (p99 447 ms
in a bench's keep-up run), so the emulator's age showed up as the ingress's
tail latency. ``steady_garbage_collection`` moves objects that outlived a
collection out of the collector's reach (``gc.freeze``) every 2 s, so each
pass sees only the last seconds' objects.

moto's server finds each request's backend again, under a lock all its threads
share, by listing its own package folders and trying every backend's URL
patterns; ``route_by_remembered_host`` keeps the answer per host (PutRecords
loop +8 to +16 %, open-loop p50 -0.7 to -3.2 ms in four alternating pairs).
And moto writes each answer by walking botocore's description of the operation
field by field; ``direct_kinesis_answers`` writes the answers of the two calls
that carry every event, ``GetRecords`` and ``PutRecords``, as JSON directly
(the emulator's CPU per record read 70 -> 19 us, per record put 75 -> 38 us), and
``direct_dynamodb_answers`` those of ``BatchGetItem``, the user lookups (1,798 keys of 100 per call: 2.9 -> 0.42 s
without a projection, 4.1 -> 1.3-1.6 s with the pipeline's).
Then it runs ``moto.server`` unchanged::

    python -m runners.moto_server -H 127.0.0.1 -p PORT
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Optional


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


def fast_shards() -> None:
    """Replaces moto's scans of a shard's records with direct lookups; same answers.

    A shard's records sit in an ``OrderedDict`` keyed by sequence numbers that moto assigns as last + 1 (its
    resharding re-puts records, so they are renumbered too), so the first and last keys are the ends of the dict,
    and the records after a position are found by key. Should the keys ever not be consecutive, and for a
    ``Limit`` below 1 (which boto3 refuses to send), ``get_records`` falls back to moto's own scan, kept as
    ``Shard._eventlake_moto_get_records``. Must run before ``make_shards_thread_safe`` wraps the methods.
    """
    from moto.kinesis import models

    if getattr(models.Shard, "_eventlake_fast", False):
        return
    scan = models.Shard.get_records

    def get_min_sequence_number(self) -> int:
        return next(iter(self.records)) if self.records else 0

    def get_max_sequence_number(self) -> int:
        return next(reversed(self.records)) if self.records else 0

    def get_records(self, last_sequence_id, limit):
        records = self.records
        first, last = (next(iter(records)), next(reversed(records))) if records else (0, -1)
        consecutive = records and last - first + 1 == len(records)
        if not consecutive or (limit is not None and limit < 1):
            return scan(self, last_sequence_id, limit)
        after = int(last_sequence_id)
        start = max(after + 1, first)
        stop = last + 1 if limit is None else min(last + 1, start + limit)
        results = [records[number] for number in range(start, stop)]
        if not results:
            return [], after, 0
        return results, results[-1].sequence_number, int((records[last].created_at - results[-1].created_at) * 1000)

    models.Shard.get_min_sequence_number = get_min_sequence_number
    models.Shard.get_max_sequence_number = get_max_sequence_number
    models.Shard.get_records = get_records
    models.Shard._eventlake_moto_get_records = scan
    models.Shard._eventlake_fast = True


def route_by_remembered_host() -> None:
    """Remembers which backend serves each host instead of finding it again on every request; same answers.

    moto's server finds a request's backend under one lock shared by all its threads: it lists moto's ~150
    package folders (``os.listdir`` and an ``isdir`` each) to see whether the host names one, then tries the
    URL patterns of every backend in turn. At 5,000 ev/s through the ingress into the stream that was ~9 % of
    the emulator's CPU, every request waiting its turn at the lock. The patterns and the folders do not change
    while the server runs, so the answer for a host does not either.
    """
    from moto.moto_server import werkzeug_app

    dispatcher = werkzeug_app.DomainDispatcherApplication
    if getattr(dispatcher, "_eventlake_remembered", False):
        return
    find = dispatcher.get_backend_for_host

    def get_backend_for_host(self, host):
        remembered = self.__dict__.setdefault("_eventlake_backends", {})
        if host not in remembered:
            remembered[host] = find(self, host)
        return remembered[host]

    dispatcher.get_backend_for_host = get_backend_for_host
    dispatcher._eventlake_remembered = True


JSON_1_1 = "application/x-amz-json-1.1"
JSON_1_0 = "application/x-amz-json-1.0"  # DynamoDB's


def direct_kinesis_answers() -> None:
    """Writes ``GetRecords`` and ``PutRecords`` answers as JSON directly instead of through moto's serializer.

    moto builds every answer as Python objects and then walks botocore's description of the operation to write
    it, field by field: ~70 us of the emulator's CPU per record read and ~75 per record put (GetRecords also
    decodes each record's base64 only for the serializer to encode it again). At 5,000 ev/s through the ingress
    into the stream that was more than half a core, on a 2-core machine where real Kinesis would cost nothing.
    The answers are what moto's own serializer writes (``tests/test_moto_server.py`` compares them as a boto3
    client reads them); errors still go through moto.
    """
    import json

    from moto.kinesis import responses

    answer = responses.KinesisResponse
    if getattr(answer, "_eventlake_direct", False):
        return

    def get_records(self) -> str:
        self.response_headers["Content-Type"] = JSON_1_1  # as moto's serializer answers (werkzeug: text/html)
        next_iterator, records, behind = self.kinesis_backend.get_records(
            self._get_param("StreamARN"), self._get_param("ShardIterator"), self._get_param("Limit"))
        return json.dumps({
            "NextShardIterator": next_iterator,
            "Records": [{"Data": _text(record.data), "PartitionKey": record.partition_key,
                         "SequenceNumber": str(record.sequence_number),
                         "ApproximateArrivalTimestamp": _epoch_ms(record.created_at_datetime)} for record in records],
            "MillisBehindLatest": behind,
        })

    def put_records(self) -> str:
        self.response_headers["Content-Type"] = JSON_1_1
        return json.dumps(self.kinesis_backend.put_records(
            self._get_param("StreamARN"), self._get_param("StreamName"), self._get_param("Records")))

    answer._eventlake_moto_get_records = answer.get_records
    answer._eventlake_moto_put_records = answer.put_records
    answer.get_records = get_records
    answer.put_records = put_records
    answer._eventlake_direct = True


def direct_dynamodb_answers() -> None:
    """Writes ``BatchGetItem`` answers as JSON directly instead of through moto's serializer.

    The pipeline's user lookups are BatchGetItem calls of 100 keys. moto spent ~2.3 ms of CPU per key on them, 75 %
    of it walking botocore's description of the answer attribute by attribute; a 500,000-event backfill with two
    workers (each looks up its ~1,800 users once) gave moto ~7 s of CPU on a 2-core machine where real DynamoDB costs
    nothing. moto still finds, projects and sizes the items (``batch_get_item`` unchanged); only the writing of its
    answer is direct, in DynamoDB's JSON (``tests/test_moto_server.py`` compares both as a boto3 client reads them).
    Errors still go through moto.
    """
    import base64
    import json

    from moto.dynamodb import responses

    handler = responses.DynamoHandler
    if getattr(handler, "_eventlake_direct", False):
        return
    moto_own = handler.batch_get_item

    def as_json(value):
        if isinstance(value, bytes):  # B and BS values: raw bytes in moto's answer, base64 text on the wire
            return base64.b64encode(value).decode("ascii")
        raise TypeError(f"no JSON form for {type(value).__name__}")

    def batch_get_item(self) -> str:
        answer = moto_own(self).result
        for used in answer.get("ConsumedCapacity", ()):  # a double in DynamoDB's model: 10.0, not 10
            used["CapacityUnits"] = float(used["CapacityUnits"])
        self.response_headers["Content-Type"] = JSON_1_0
        return json.dumps(answer, default=as_json)

    handler._eventlake_moto_batch_get_item = moto_own
    handler._eventlake_direct_batch_get_item = batch_get_item
    handler.batch_get_item = batch_get_item
    handler._eventlake_direct = True


def _epoch_ms(moment) -> float:
    """A naive UTC datetime as epoch seconds truncated to milliseconds, as moto's serializer writes timestamps."""
    import calendar

    seconds = calendar.timegm(moment.timetuple())
    return seconds + (moment.microsecond // 1000) / 1000.0 if moment.microsecond else seconds


def _text(data) -> str:
    """A record's data as moto keeps it (base64, as text or bytes) as the base64 text of the answer."""
    return data.decode("ascii") if isinstance(data, bytes) else data


def steady_garbage_collection(interval_s: float = 2.0, stop: Optional[threading.Event] = None) -> threading.Thread:
    """Every ``interval_s`` until ``stop`` is set: a full collection, then ``gc.freeze()`` of what survived it.

    Records live until moto is stopped, so freezing them loses nothing; garbage cycles are collected first. What
    becomes a garbage cycle only after it was frozen is never collected: request-scoped objects caught in flight,
    small beside the records themselves.
    """
    import gc

    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, got {interval_s!r}")
    stop = stop or threading.Event()

    def every_interval() -> None:
        while not stop.wait(interval_s):
            gc.collect()
            gc.freeze()

    thread = threading.Thread(target=every_interval, name="eventlake-gc-freeze", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    fast_shards()
    steady_garbage_collection()
    make_shards_thread_safe()
    route_by_remembered_host()
    direct_kinesis_answers()
    direct_dynamodb_answers()
    from moto.server import main as moto_main

    moto_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

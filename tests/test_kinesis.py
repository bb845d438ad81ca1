"""Behaviour of the Kinesis source against moto Kinesis (a separate moto server process)."""
from __future__ import annotations

import os
import time

import apache_beam as beam
import pytest

from runners.metrics import counter_totals
from runners.profiles import PRISM, executed_runner, local_streaming_options
from tests.test_kinesis_support import (
    FaultyClientFactory,
    assert_exactly_once_in_order,
    decode,
    drain,
    envelope,
    fill_shards,
    kinesis_client,
    put_all,
    split_readers,
)
from transforms.kinesis import (
    KinesisSource,
    ReaderConfig,
    ReadFromKinesis,
    StartPosition,
    default_kinesis_client,
)
from transforms.records import RecordBatch
from transforms.kinesis_checkpoint import (
    AFTER,
    DONE,
    START,
    KinesisCheckpointCoder,
    KinesisCheckpointMark,
    ShardPosition,
)

pytestmark = pytest.mark.usefixtures("stack")


def _source(stack, start="trim_horizon", **config):
    config.setdefault("stop_when_idle_seconds", 1.0)
    return KinesisSource(stack.config.stream, StartPosition.parse(start), ReaderConfig(**config))


# -- configuration and checkpoint coding -------------------------------------


@pytest.mark.parametrize("bad", ["", "earliest", "at_timestamp=yesterday", "at_timestamp=2026-11-26T10:00:00"])
def test_start_position_rejects_unknown_values(bad):
    with pytest.raises(ValueError, match="start_position"):
        StartPosition.parse(bad)


def test_start_position_at_timestamp_is_epoch_ms():
    assert StartPosition.parse("at_timestamp=2026-11-26T10:00:00.250Z") == StartPosition("at_timestamp", 1795687200250)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"stop_when_idle_seconds": 0}, "stop_when_idle_seconds"),
        ({"poll_interval_seconds": 0.1}, "poll_interval_seconds"),
        ({"records_per_call": 10_001}, "records_per_call"),
        ({"max_bundle_seconds": 0}, "max_bundle_seconds"),
        ({"records_per_element": 0}, "records_per_element"),
        ({"records_per_element": 10_001}, "records_per_element"),
        ({"records_per_element": True}, "records_per_element"),
        ({"records_per_element": 500, "max_records_per_bundle": 499}, "max_records_per_bundle"),
    ],
)
def test_read_from_kinesis_validates_its_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ReadFromKinesis("events", **kwargs)


def test_checkpoint_coder_is_deterministic_json_and_round_trips():
    coder = KinesisCheckpointCoder()
    mark = KinesisCheckpointMark(
        [
            ShardPosition("shardId-000000000002", START, None, ("shardId-000000000000",)),
            ShardPosition("shardId-000000000000", DONE),
            ShardPosition("shardId-000000000001", AFTER, "49590338271490256608559692538361571095921575989136588898"),
        ]
    )
    encoded = coder.encode(mark)
    assert encoded == coder.encode(coder.decode(encoded))
    assert coder.decode(encoded) == mark
    assert coder.is_deterministic()
    assert encoded.startswith(b'{"shards":[["shardId-000000000000","done"')  # sorted, canonical JSON
    with pytest.raises(ValueError, match="version"):
        coder.decode(b'{"shards":[],"v":99}')


# -- reading -------------------------------------------------------------------


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_checkpoint_then_resume_reads_no_gap_and_no_duplicate(stack):
    client = kinesis_client()
    expected = fill_shards(client, stack.config.stream, 1500)
    coder = KinesisCheckpointCoder()
    read = []
    for sub in _source(stack).split(20):
        first = sub.create_reader(None, None)
        read += drain(first, limit=700)  # stop mid-shard
        mark = coder.decode(coder.encode(first.get_checkpoint_mark()))
        first.close()
        assert [p.kind for p in mark.positions] == [AFTER]
        resumed = sub.create_reader(None, mark)
        read += drain(resumed)
    assert_exactly_once_in_order([decode(r.data) for r in read], expected)


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_latest_skips_history_and_a_checkpoint_before_any_record_resumes_without_loss(stack):
    client = kinesis_client()
    stream = stack.config.stream
    put_all(client, stream, [{"Data": envelope("old", i), "PartitionKey": "old"} for i in range(100)])
    source = KinesisSource(stream, StartPosition.parse("latest"), ReaderConfig(stop_when_idle_seconds=1.0))
    coder = KinesisCheckpointCoder()
    readers = split_readers(source)
    marks = []
    for reader in readers:
        assert not reader.start()  # takes a LATEST iterator; nothing new yet
        marks.append(coder.decode(coder.encode(reader.get_checkpoint_mark())))
        reader.close()
    time.sleep(0.01)
    put_all(client, stream, [{"Data": envelope("new", i), "PartitionKey": "new"} for i in range(100)])
    read = []
    for sub, mark in zip(source.split(20), marks):
        read += drain(sub.create_reader(None, mark))
    assert_exactly_once_in_order([decode(r.data) for r in read], {"new": 100})


@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_event_time_is_received_at_else_arrival_time(stack):
    client = kinesis_client()
    put_all(
        client,
        stack.config.stream,
        [
            {"Data": envelope("k", 0, received_at_ms=1_700_000_000_123), "PartitionKey": "k"},
            {"Data": b"not json at all", "PartitionKey": "k"},
        ],
    )
    (reader,) = split_readers(_source(stack))
    assert reader.start()
    assert reader.get_current_timestamp().micros == 1_700_000_000_123_000
    assert reader.advance()
    arrival = reader.get_current_timestamp().micros / 1e6
    assert abs(arrival - time.time()) < 600  # ApproximateArrivalTimestamp: now, not 2023


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_batches_are_consecutive_records_of_one_shard_each_with_its_own_event_time(stack):
    client = kinesis_client()
    stream = stack.config.stream
    start_ms = 1_790_000_000_000
    puts, received = [], {}
    for index, shard in enumerate(client.list_shards(StreamName=stream)["Shards"]):
        hash_key = str(int(shard["HashKeyRange"]["StartingHashKey"]) + 1)
        for n in range(700):
            key = f"s{index}"
            # s0 rises and holds the watermark (the minimum over shards); s1, an hour ahead, falls record by
            # record, so its batches' earliest records are their last and none is behind the watermark.
            received[(key, n)] = start_ms + n * 3 if index == 0 else start_ms + 3_600_000 - n * 3
            puts.append({"Data": envelope(key, n, received_at_ms=received[(key, n)]), "PartitionKey": key,
                         "ExplicitHashKey": hash_key})
    put_all(client, stream, puts)
    # One reader owns both shards (no split), reading at most 250 records a call, emitting batches of up to 64.
    source = _source(stack, records_per_call=250, records_per_element=64)
    coder = KinesisCheckpointCoder()
    first = source.create_reader(None, None)
    stamped = drain(first, limit=9, stamped=True)
    mark = coder.decode(coder.encode(first.get_checkpoint_mark()))  # cut after the ninth batch
    first.close()
    stamped += drain(source.create_reader(None, mark), stamped=True)

    assert all(isinstance(batch, RecordBatch) for batch, _ in stamped)
    assert max(len(batch.records) for batch, _ in stamped) == 64
    read = []
    for batch, micros in stamped:
        assert 1 <= len(batch.records) <= 64 and len(batch.event_ms) == len(batch.records)
        assert len({record.shard_id for record in batch.records}) == 1
        sequence = [int(record.sequence_number) for record in batch.records]
        assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)
        for record, event_ms in batch.timestamped():
            assert event_ms == received[decode(record.data)]  # each record its own time, nothing clamped here
            read.append(decode(record.data))
        assert micros == min(batch.event_ms) * 1000  # the element's timestamp is its earliest record's
    assert_exactly_once_in_order(read, {"s0": 700, "s1": 700})
    assert any(micros != batch.event_ms[0] * 1000 for batch, micros in stamped)  # s1: the earliest is not the first


@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_the_client_reads_arrival_times_as_utc_datetimes(stack, monkeypatch):
    import datetime as dt

    client = default_kinesis_client(stack.endpoint, stack.config.region)
    put_all(client, stack.config.stream, [{"Data": b"not an envelope", "PartitionKey": "k"}])
    shard = client.list_shards(StreamName=stack.config.stream)["Shards"][0]["ShardId"]
    iterator = client.get_shard_iterator(StreamName=stack.config.stream, ShardId=shard,
                                         ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    monkeypatch.setenv("TZ", "JST-9")  # a POSIX zone (no tzdata needed): botocore's own parser would answer +09:00
    time.tzset()
    try:
        (record,) = client.get_records(ShardIterator=iterator)["Records"]
    finally:
        monkeypatch.undo()
        time.tzset()
    arrival = record["ApproximateArrivalTimestamp"]
    assert arrival.tzinfo is not None and arrival.utcoffset() == dt.timedelta(0)
    assert abs(arrival.timestamp() - time.time()) < 600


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_throttling_and_expired_iterators_lose_nothing(stack):
    client = kinesis_client()
    expected = fill_shards(client, stack.config.stream, 3000, keys_per_shard=20)
    factory = FaultyClientFactory(stack.config.stream, throttle_every=3, expire_every=4)
    source = KinesisSource(
        stack.config.stream,
        StartPosition.parse("trim_horizon"),
        ReaderConfig(stop_when_idle_seconds=1.0, records_per_call=250),
        client_factory=factory,
    )
    read = []
    for reader in split_readers(source):
        read += drain(reader)
    log = FaultyClientFactory.LOGS[stack.config.stream]
    assert log["throttled"] >= 5 and log["expired"] >= 3
    assert_exactly_once_in_order([decode(r.data) for r in read], expected)


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_getrecords_is_paced_per_shard(stack):
    client = kinesis_client()
    fill_shards(client, stack.config.stream, 400)
    calls: dict[int, list[float]] = {}

    class Recording:
        def __init__(self, real):
            self._real = real

        def get_records(self, **kwargs):
            calls.setdefault(id(self), []).append(time.monotonic())
            return self._real.get_records(**kwargs)

        def __getattr__(self, name):
            return getattr(self._real, name)

    from transforms.kinesis import default_kinesis_client

    source = KinesisSource(
        stack.config.stream,
        StartPosition.parse("trim_horizon"),
        ReaderConfig(stop_when_idle_seconds=1.0, records_per_call=50),
        client_factory=lambda e, r: Recording(default_kinesis_client(e, r)),
    )
    for reader in split_readers(source):  # one shard per reader, so one client per shard
        drain(reader)
    assert calls
    for times in calls.values():
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) >= 8 and min(gaps) >= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("stack", [{"shards": 4}], indirect=True)
def test_four_shards_of_20000_records_read_exactly_once_in_key_order_on_prism(stack, tmp_path):
    client = kinesis_client()
    expected = fill_shards(client, stack.config.stream, 20_000, keys_per_shard=100)
    out_dir = str(tmp_path)

    pipeline = beam.Pipeline(options=local_streaming_options())
    _ = (
        pipeline
        | "ReadKinesis" >> ReadFromKinesis(stack.config.stream, stop_when_idle_seconds=2.0)
        | "WriteShardLog" >> beam.ParDo(AppendPerShard(out_dir))
    )
    result = pipeline.run()
    result.wait_until_finish()
    assert executed_runner(result) == PRISM

    read = []
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
            read += [tuple(line.rsplit(" ", 1)) for line in handle.read().split("\n") if line]
    assert_exactly_once_in_order([(key, int(n)) for key, n in read], expected)
    totals = counter_totals(result)
    assert totals["kinesis.records_read"] == 80_000
    assert totals["kinesis.bytes_read"] > 80_000 * 50


class AppendPerShard(beam.DoFn):
    """Appends ``key n`` lines to one file per shard, in the order the source emits them."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def process(self, record):
        key, n = decode(record.data)
        with open(os.path.join(self.out_dir, record.shard_id), "a", encoding="utf-8") as handle:
            handle.write(f"{key} {n}\n")

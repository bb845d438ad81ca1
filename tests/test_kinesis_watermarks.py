"""Sibling watermarks: a reader never reports past what its siblings have committed (Prism workaround).

See ``transforms.kinesis_watermarks`` for why: Prism lets the last bundle to complete set the read stage's
watermark, so without this a fast reader's report made a slow reader's records late.
"""
from __future__ import annotations

import uuid

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

from tests.test_kinesis_clamp import FakeClock
from tests.test_kinesis_support import drain, envelope, kinesis_client, put_all
from transforms.kinesis import (
    KinesisReader,
    KinesisSource,
    ReaderConfig,
    StartPosition,
    runs_readers_in_one_process,
)
from transforms.kinesis_watermarks import SiblingGroup, aligned, publish, published


def _group(*members: str) -> SiblingGroup:
    return SiblingGroup(uuid.uuid4().hex, members)


def test_a_sibling_that_has_committed_nothing_holds_the_watermark_at_min():
    group = _group("a", "b")
    assert aligned(group, "a", Timestamp(100)) == MIN_TIMESTAMP
    publish(group, "b", Timestamp(40))
    assert aligned(group, "a", Timestamp(100)) == Timestamp(40)
    assert aligned(group, "a", Timestamp(30)) == Timestamp(30)  # its own is lower still


def test_a_member_is_held_by_its_siblings_only_and_publications_never_go_back():
    group = _group("a", "b", "c")
    publish(group, "a", Timestamp(10))  # its own old publication does not hold it back
    publish(group, "b", Timestamp(50))
    publish(group, "c", Timestamp(70))
    publish(group, "b", Timestamp(20))  # a late finalization of an older bundle
    assert aligned(group, "a", Timestamp(100)) == Timestamp(50)
    publish(group, "b", MAX_TIMESTAMP)  # b finished
    assert aligned(group, "a", Timestamp(100)) == Timestamp(70)
    assert published(group)["b"] == MAX_TIMESTAMP


def test_groups_of_different_runs_never_see_each_other():
    first, second = _group("a", "b"), _group("a", "b")
    publish(first, "b", Timestamp(90))
    assert aligned(second, "a", Timestamp(100)) == MIN_TIMESTAMP


@pytest.mark.parametrize("argv, expected", [
    ([], True),
    (["--runner=PrismRunner"], True),
    (["--runner=prism"], True),
    (["--runner=apache_beam.runners.portability.prism_runner.PrismRunner"], True),
    (["--runner=DirectRunner"], True),
    (["--runner=direct"], True),
    (["--runner=PrismRunner", "--environment_type=PROCESS"], False),
    (["--runner=FlinkRunner"], False),
    (["--runner=SparkRunner"], False),
])
def test_alignment_is_on_only_where_every_reader_shares_one_process(argv, expected):
    assert runs_readers_in_one_process(PipelineOptions(argv)) is expected


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_readers_report_what_the_sibling_committed_when_the_runner_finalized_its_bundle(stack):
    client = kinesis_client()
    shards = client.list_shards(StreamName=stack.config.stream)["Shards"]
    base = 1_795_000_000_000
    for index, shard in enumerate(shards):  # shard 0 at t..t+99 s, shard 1 at t+1000..t+1099 s
        put_all(client, stack.config.stream, [
            {"Data": envelope("k", n, received_at_ms=base + (index * 1000 + n) * 1000), "PartitionKey": "k",
             "ExplicitHashKey": str(int(shard["HashKeyRange"]["StartingHashKey"]) + 1)} for n in range(100)])
    source = KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"),
                           ReaderConfig(stop_when_idle_seconds=1.0, align_watermarks=True))
    slow, fast = [sub.create_reader(None, None) for sub in source.split(2)]
    assert slow.source.siblings == fast.source.siblings and slow.source.siblings is not None

    drain(fast, limit=100)
    own_fast = Timestamp(micros=(base + 1099_000) * 1000)
    assert fast._own_watermark() == own_fast
    assert fast.get_watermark() == MIN_TIMESTAMP  # the slow sibling has committed nothing
    drain(slow, limit=50)
    slow_mark = slow.get_checkpoint_mark()
    assert fast.get_watermark() == MIN_TIMESTAMP  # cut, but its bundle is not committed yet
    slow_mark.finalize_checkpoint()  # the runner committed the slow reader's bundle
    assert fast.get_watermark() == Timestamp(micros=(base + 49_000) * 1000)
    fast.get_checkpoint_mark().finalize_checkpoint()
    assert slow.get_watermark() == Timestamp(micros=(base + 49_000) * 1000)  # its own is the lower one

    drain(slow)  # to the end: a finished reader says MAX whatever its siblings do, so the runner ends it
    assert slow.get_watermark() == MAX_TIMESTAMP
    slow.get_checkpoint_mark().finalize_checkpoint()
    assert fast.get_watermark() == own_fast
    for reader in (slow, fast):
        reader.close()


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_without_alignment_a_split_has_no_siblings(stack):
    source = KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"), ReaderConfig())
    assert all(sub.siblings is None for sub in source.split(2))


def _aligned_readers(stack, clock, **config):
    source = KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"),
                           ReaderConfig(align_watermarks=True, **config))
    return [KinesisReader(sub, None, clock=clock) for sub in source.split(2)]


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_a_reader_that_turns_idle_at_a_deferral_cut_publishes_its_floor_not_max(stack):
    """The reader became idle-long-enough between the runner's watermark question (not MAX) and the cut. The cut's
    mark cannot say "finished", so a reader rebuilt from it (reader-cache miss) reads on: its siblings must keep
    waiting for it, i.e. see its floor, not MAX."""
    clock = FakeClock()
    first, second = _aligned_readers(stack, clock, stop_when_idle_seconds=5.0)
    assert first.start() is False and second.start() is False  # an empty stream
    assert first.get_watermark() < MAX_TIMESTAMP  # the runner asks: not finished yet
    clock.advance(6.0)  # ... and it turns idle long enough before the cut
    first.get_checkpoint_mark().finalize_checkpoint()
    assert published(first.source.siblings).get(first.source.member, MIN_TIMESTAMP) < MAX_TIMESTAMP
    assert first.advance() is False
    assert first.get_watermark() == MAX_TIMESTAMP  # the final, empty claim: now it may say MAX
    first.get_checkpoint_mark().finalize_checkpoint()
    assert published(first.source.siblings)[first.source.member] == MAX_TIMESTAMP
    for reader in (first, second):
        reader.close()


@pytest.mark.parametrize("stack", [{"shards": 2}], indirect=True)
def test_a_reader_finished_by_its_last_record_says_max_only_on_the_next_empty_claim(stack):
    """On a claim that returned a record the bundle may still cut a residual, and Prism takes a residual's
    watermark as the stage's: MAX there would make every other reader's records late."""
    clock = FakeClock()
    first, second = _aligned_readers(stack, clock)
    assert first.start() is False and second.start() is False
    first._has_current = True  # as if advance() had just returned the last record of its last shard
    first._finished = True  # ... and that shard was closed, drained and had no child to adopt
    assert first.get_watermark() < MAX_TIMESTAMP
    assert first.advance() is False
    assert first.get_watermark() == MAX_TIMESTAMP
    for reader in (first, second):
        reader.close()

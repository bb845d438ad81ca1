"""Regression: a straggler behind the reader's watermark is emitted at the watermark, never behind it.

Before the clamp, records posted while the reader was idle carried a ``received_at``
behind its ``now - idle_watermark_seconds`` watermark; the lake's GroupByKey saw
them late and dropped them (the demo lost 47% of its rows).
"""
from __future__ import annotations

from typing import Optional

import pytest
from apache_beam.metrics.execution import MetricsContainer
from apache_beam.metrics.metricbase import MetricName
from apache_beam.runners.worker import statesampler
from apache_beam.utils import counters

from tests.test_kinesis_support import envelope, kinesis_client, put_all
from transforms.envelope import utc_now_ms
from transforms.kinesis_checkpoint import KinesisCheckpointCoder
from transforms.records import RecordBatch
from transforms.kinesis import NAMESPACE, KinesisReader, KinesisSource, ReaderConfig, StartPosition


class FakeClock:
    """A monotonic clock the test moves by hand (the reader's idle and pacing decisions)."""

    def __init__(self, start: float = 1_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def metrics():
    """Collects the reader's counters as a runner's metrics container would."""
    container = MetricsContainer("ReadKinesis")
    sampler = statesampler.StateSampler("", counters.CounterFactory())
    statesampler.set_current_tracker(sampler)
    state = sampler.scoped_state("ReadKinesis", "process", metrics_container=container)
    sampler.start()
    try:
        with state:
            yield lambda name: container.get_counter(MetricName(NAMESPACE, name)).get_cumulative()
    finally:
        sampler.stop()
        statesampler.set_current_tracker(None)


def _idle_reader(stack, clock: FakeClock, records_per_element: int = 1) -> KinesisReader:
    """A started reader on an empty one-shard stream whose watermark has advanced while idle."""
    source = KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"),
                           ReaderConfig(idle_watermark_seconds=2.0, records_per_element=records_per_element))
    (sub,) = source.split(4)
    reader = KinesisReader(sub, None, clock=clock)
    assert reader.start() is False  # nothing on the stream yet
    clock.advance(3.0)  # longer than idle_watermark_seconds, and a poll is due
    assert reader.advance() is False
    return reader


def _read(reader: KinesisReader, clock: FakeClock, expected: int, sizes: Optional[list] = None) -> list[tuple[str, int]]:
    """(data, emitted timestamp in ms) of ``expected`` records; each poll is made due by the clock.

    A record of a ``RecordBatch`` is emitted at its own time, which is never before its batch element's;
    ``sizes`` collects how many records each element held."""
    out = []
    for _ in range(50):  # bounded: a few polls suffice
        clock.advance(0.5)
        while reader.advance():
            current, element_ms = reader.get_current(), reader.get_current_timestamp().micros // 1000
            if sizes is not None:
                sizes.append(len(current.records) if isinstance(current, RecordBatch) else 1)
            if isinstance(current, RecordBatch):
                assert element_ms == min(current.event_ms)
                out += [(record.data, event_ms) for record, event_ms in current.timestamped()]
            else:
                out.append((current.data, element_ms))
        if len(out) >= expected:
            return out
    raise AssertionError(f"read {len(out)} of {expected} records")


@pytest.mark.parametrize("records_per_element", [1, 4])
@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_records_behind_the_idle_watermark_are_emitted_at_the_watermark(stack, metrics, records_per_element):
    clock = FakeClock()
    reader = _idle_reader(stack, clock, records_per_element)
    watermark_ms = reader.get_watermark().micros // 1000
    assert abs(watermark_ms - (utc_now_ms() - 2000)) < 60_000  # the idle advance: wall now - 2 s

    stragglers = [envelope("late", n, received_at_ms=watermark_ms - 60_000 + n) for n in range(5)]
    fresh = envelope("fresh", 0, received_at_ms=watermark_ms + 120_000)
    put_all(kinesis_client(), stack.config.stream,
            [{"Data": data, "PartitionKey": "k"} for data in [*stragglers, fresh]])

    sizes = []
    read = _read(reader, clock, 6, sizes)
    assert max(sizes) == records_per_element  # batches when asked for (the 6 records came in one GetRecords call)
    assert [data for data, _ in read] == [*stragglers, fresh]  # nothing dropped, order kept
    for _, emitted_ms in read[:5]:
        assert emitted_ms >= watermark_ms  # never behind what the runner was already told
        assert emitted_ms == watermark_ms
    assert read[5][1] == watermark_ms + 120_000  # on-time records keep their event time
    assert metrics("kinesis.timestamps_clamped_to_watermark") == 5
    assert metrics("kinesis.records_read") == 6
    reader.close()


@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_the_watermark_never_regresses_after_a_straggler(stack, metrics):
    clock = FakeClock()
    reader = _idle_reader(stack, clock)
    before = reader.get_watermark()
    put_all(kinesis_client(), stack.config.stream,
            [{"Data": envelope("late", 0, received_at_ms=before.micros // 1000 - 300_000), "PartitionKey": "k"}])
    _read(reader, clock, 1)
    assert reader.get_watermark() >= before
    assert metrics("kinesis.timestamps_clamped_to_watermark") == 1
    reader.close()


@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_a_reader_that_never_reported_a_watermark_clamps_nothing(stack, metrics):
    put_all(kinesis_client(), stack.config.stream,
            [{"Data": envelope("old", n, received_at_ms=1_700_000_000_000 + n), "PartitionKey": "k"}
             for n in range(3)])
    clock = FakeClock()
    source = KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"), ReaderConfig())
    (sub,) = source.split(4)
    reader = KinesisReader(sub, None, clock=clock)
    assert reader.start()
    read = [(reader.get_current().data, reader.get_current_timestamp().micros // 1000)]
    read += _read(reader, clock, 2)
    assert [ts for _, ts in read] == [1_700_000_000_000 + n for n in range(3)]  # history keeps event time
    assert metrics("kinesis.timestamps_clamped_to_watermark") == 0
    reader.close()


@pytest.mark.parametrize("stack", [{"shards": 1}], indirect=True)
def test_a_reader_resumed_from_a_checkpoint_still_clamps_to_the_watermark_already_reported(stack, metrics):
    """The runner keeps readers between bundles only per DoFn instance; on a miss it resumes from the mark.

    The resumed reader must not emit behind the watermark its predecessor reported:
    the runner's watermark estimator already holds it, and the lake would drop the record.
    """
    clock = FakeClock()
    first = _idle_reader(stack, clock)
    reported = first.get_watermark()
    mark = first.get_checkpoint_mark()
    first.close()
    mark = KinesisCheckpointCoder().decode(KinesisCheckpointCoder().encode(mark))  # as the runner stores it

    put_all(kinesis_client(), stack.config.stream,
            [{"Data": envelope("late", 0, received_at_ms=reported.micros // 1000 - 60_000), "PartitionKey": "k"}])
    resumed = KinesisReader(first.source, mark, clock=clock)
    if resumed.start():
        read = [(resumed.get_current().data, resumed.get_current_timestamp().micros // 1000)]
    else:
        read = _read(resumed, clock, 1)
    # The mark brings the watermark up to date when it is cut (the idle advance follows the wall clock), so it
    # may be a millisecond past the one read just before: the record is emitted at the mark's, never behind.
    assert mark.watermark_ms >= reported.micros // 1000
    assert read[0][1] == mark.watermark_ms
    assert metrics("kinesis.timestamps_clamped_to_watermark") == 1
    resumed.close()

"""ReadBackfillFiles: every non-blank line of every matched file, plain or gzip, once, pointing at its line,
in RecordBatches of consecutive lines of one file."""
from __future__ import annotations

import gzip

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from runners.metrics import counter_totals
from transforms.backfill import BACKFILL_STREAM, ReadBackfillFiles
from transforms.envelope import parse_rfc3339_ms
from transforms.records import RecordBatch


def envelope_line(n: int) -> bytes:
    return (b'{"event_id":"%08d","event_type":"workout_started","received_at":"2026-11-02T10:%02d:%02d.000Z"}'
            % (n, n // 60 % 60, n % 60))


class _Describe(beam.DoFn):
    """A batch -> its lines, each with its own event time; checks the batch is one file's and stamped with its
    earliest event time."""

    def process(self, batch, timestamp=beam.DoFn.TimestampParam):
        assert isinstance(batch, RecordBatch) and len(batch.records) == len(batch.event_ms) > 0
        assert len({record.shard_id for record in batch.records}) == 1
        assert timestamp.micros // 1000 == min(batch.event_ms)
        for record, event_ms in batch.timestamped():
            yield (record.stream, record.shard_id.rsplit("/", 1)[-1], int(record.sequence_number),
                   bytes(record.data), event_ms)


def _lines(batch: RecordBatch):
    return [bytes(record.data) for record in batch.records]


def test_plain_and_gzip_files_give_every_line_once_with_its_line_number_and_event_time(tmp_path):
    expected = []
    for index in range(5):
        lines = [envelope_line(index * 100 + n) for n in range(40)]
        body = b"\n".join(lines[:20]) + b"\n\n  \n" + b"\r\n".join(lines[20:]) + b"\n"
        name = f"part-{index}.jsonl" + (".gz" if index % 2 else "")
        (tmp_path / name).write_bytes(gzip.compress(body) if index % 2 else body)
        numbers = list(range(1, 21)) + list(range(23, 43))
        for line, number in zip(lines, numbers):
            received = parse_rfc3339_ms(line.split(b'"received_at":"')[1].split(b'"')[0].decode())
            expected.append((BACKFILL_STREAM, name, number, line, received))
    (tmp_path / "other.txt").write_bytes(envelope_line(999))

    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    described = (pipeline | ReadBackfillFiles(str(tmp_path / "part-*")) | beam.ParDo(_Describe()))
    assert_that(described, equal_to(expected))
    result = pipeline.run()
    result.wait_until_finish()
    assert counter_totals(result)["backfill.lines_read"] == 200


def test_a_line_without_received_at_is_still_read(tmp_path):
    (tmp_path / "part-0.jsonl").write_bytes(b"not json at all\n" + envelope_line(1) + b"\n")
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    data = pipeline | ReadBackfillFiles(str(tmp_path / "part-*")) | beam.FlatMap(_lines)
    assert_that(data, equal_to([b"not json at all", envelope_line(1)]))
    pipeline.run().wait_until_finish()


def test_gzip_and_plain_files_on_s3_are_read(stack, monkeypatch):
    """``--input=s3://...`` as the README runs it: Beam's S3 filesystem, endpoint and keys from ``AWS_*``."""
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    s3 = stack.client("s3")
    lines = [envelope_line(n) for n in range(50)]
    s3.put_object(Bucket=stack.config.bucket, Key="archive/part-0.jsonl.gz",
                  Body=gzip.compress(b"\n".join(lines) + b"\n"))
    s3.put_object(Bucket=stack.config.bucket, Key="archive/part-1.jsonl", Body=b"\r\n".join(lines[:5]))
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    data = (pipeline | ReadBackfillFiles(f"s3://{stack.config.bucket}/archive/part-*")
            | beam.FlatMap(_lines))
    assert_that(data, equal_to(lines + lines[:5]))
    pipeline.run().wait_until_finish()


def test_batches_hold_at_most_batch_lines_consecutive_lines_of_one_file(tmp_path):
    for index in range(2):
        (tmp_path / f"part-{index}.jsonl").write_bytes(
            b"\n".join(envelope_line(index * 100 + n) for n in range(23)) + b"\n")
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    shapes = (pipeline | ReadBackfillFiles(str(tmp_path / "part-*"), batch_lines=10)
              | beam.Map(lambda batch: (batch.records[0].shard_id.rsplit("/", 1)[-1],
                                        [int(record.sequence_number) for record in batch.records])))
    expected = [(f"part-{index}.jsonl", list(range(first, min(first + 10, 24))))
                for index in range(2) for first in (1, 11, 21)]
    assert_that(shapes, equal_to(expected))
    result = pipeline.run()
    result.wait_until_finish()
    assert counter_totals(result)["backfill.lines_read"] == 46


@pytest.mark.parametrize("batch_lines", [0, -1, 1.5, True, None])
def test_batch_lines_must_be_a_positive_integer(batch_lines):
    with pytest.raises(ValueError, match="batch_lines"):
        ReadBackfillFiles("/tmp/x-*", batch_lines=batch_lines)

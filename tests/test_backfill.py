"""ReadBackfillFiles: every non-blank line of every matched file, plain or gzip, once, pointing at its line."""
from __future__ import annotations

import gzip

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from runners.metrics import counter_totals
from transforms.backfill import BACKFILL_STREAM, ReadBackfillFiles
from transforms.envelope import parse_rfc3339_ms


def envelope_line(n: int) -> bytes:
    return (b'{"event_id":"%08d","event_type":"workout_started","received_at":"2026-11-02T10:%02d:%02d.000Z"}'
            % (n, n // 60 % 60, n % 60))


class _Describe(beam.DoFn):
    def process(self, record, timestamp=beam.DoFn.TimestampParam):
        yield (record.stream, record.shard_id.rsplit("/", 1)[-1], int(record.sequence_number),
               bytes(record.data), timestamp.micros // 1000)


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
    data = pipeline | ReadBackfillFiles(str(tmp_path / "part-*")) | beam.Map(lambda r: bytes(r.data))
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
            | beam.Map(lambda r: bytes(r.data)))
    assert_that(data, equal_to(lines + lines[:5]))
    pipeline.run().wait_until_finish()

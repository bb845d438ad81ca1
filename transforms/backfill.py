"""Backfill source: JSON Lines files of envelopes, as the ingress writes them.

Each line becomes a :class:`~transforms.records.SourceRecord` whose ``stream`` is
``backfill``, ``shard_id`` the file and ``sequence_number`` the line number, so a
dead letter from a backfill points at its exact line. Gzip files (``.gz``) are
read transparently. The element timestamp is the line's ``received_at`` (event
time); lines without one get the time of reading and are dead-lettered by the
parse stage if they are not valid envelopes.

The files, not the lines, are spread over the workers: each worker then reads
and processes whole files with no shuffle between reading and processing, which
measured 19 % less wall time than reshuffling every record (docs/benchmarks.md).
The parallelism of a backfill is therefore the number of input files (archives
such as Firehose's hold many); split one huge file before backfilling it.
"""
from __future__ import annotations

import gzip

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms.envelope import received_at_of, utc_now_ms
from transforms.records import SourceRecord

BACKFILL_STREAM = "backfill"


class _ReadLines(beam.DoFn):
    """Reads one matched file line by line (bounded memory), keeping line numbers."""

    def __init__(self):
        self.lines_read = beam.metrics.Metrics.counter("eventlake", "backfill.lines_read")

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        fallback_ms = utc_now_ms()
        with readable.open(compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            # Python's gzip reader over the raw stream, not Beam's CompressedFile: its readline is
            # pure Python and took twice as long per line (bounded memory either way).
            handle = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            for line_no, line in enumerate(handle, start=1):
                data = line.rstrip(b"\r\n")
                if not data.strip():
                    continue
                self.lines_read.inc()
                record = SourceRecord(data, BACKFILL_STREAM, path, str(line_no))
                event_ms = received_at_of(data) or fallback_ms
                yield TimestampedValue(record, Timestamp(micros=event_ms * 1000))


class ReadBackfillFiles(beam.PTransform):
    """Reads every file matching ``pattern`` (a glob, local or ``s3://``)."""

    def __init__(self, pattern: str):
        super().__init__()
        if not pattern:
            raise ValueError("backfill needs --input: a glob of JSON Lines files")
        self._pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchInput" >> fileio.MatchFiles(self._pattern)
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenInput" >> fileio.ReadMatches()
            | "ReadLines" >> beam.ParDo(_ReadLines())
        )

"""The raw record that enters the processing core, whatever its source.

Kinesis records, backfill lines and re-driven payloads all become a
``SourceRecord``: the original bytes plus where they came from, which is what a
dead letter needs to point back at its origin.

A source may hand records to the core one element each or as a
:class:`RecordBatch` (the backfill reader does, and the Kinesis reader when
asked, as the events pipeline does): a Beam element costs its
dispatch, windowed value and hand-over between fused DoFns, which measured
more than a tenth of a backfill's CPU when every line was one element
(docs/benchmarks.md). The core then emits the rows of a batch as one
:class:`RowBatch`. Each record and row of a batch keeps its own event time, so
windowing downstream is the same as element by element.
"""
from __future__ import annotations

from typing import NamedTuple


class SourceRecord(NamedTuple):
    data: bytes
    stream: str  # Kinesis stream name, or the backfill file
    shard_id: str  # shard id, or "" for files
    sequence_number: str  # Kinesis sequence number, or the line number of a file
    partition_key: str = ""

    def source(self) -> dict:
        """The ``source`` object of a dead-letter record."""
        return {
            "stream": self.stream,
            "shard_id": self.shard_id,
            "sequence_number": self.sequence_number,
        }


class RecordBatch(NamedTuple):
    """Records read together (consecutive lines of one file, or of one shard), each with its own event time (epoch ms).

    The batch element's timestamp is the earliest of them.
    """

    records: tuple  # of SourceRecord
    event_ms: tuple  # of int, one per record

    def timestamped(self):
        """``(record, event_ms)`` pairs, in order."""
        return zip(self.records, self.event_ms)


class RowBatch(NamedTuple):
    """Lake rows emitted together (by one call of the core's DoFn), each with its element timestamp (epoch micros).

    Mostly the rows of one :class:`RecordBatch`, plus rows of earlier batches whose user lookup answered meanwhile;
    all share one window and pane, and the batch element's timestamp is the earliest of them.
    """

    rows: tuple  # of dict
    micros: tuple  # of int, one per row

    def timestamped(self):
        """``(row, micros)`` pairs, in order."""
        return zip(self.rows, self.micros)

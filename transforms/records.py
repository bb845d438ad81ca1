"""The raw record that enters the processing core, whatever its source.

Kinesis records, backfill lines and re-driven payloads all become a
``SourceRecord``: the original bytes plus where they came from, which is what a
dead letter needs to point back at its origin.
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

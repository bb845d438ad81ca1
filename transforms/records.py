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

Batches have a coder of their own (:class:`BatchCoder`, registered for both
types): it encodes them as Beam's default coder does, but estimates their size
from 32 of their members. Beam estimates the size of sampled output elements
(for its byte-count metrics) by encoding them whole: the first ten of a
PCollection in a worker, fewer and fewer after, and every output of a read
resume. A batch of 1,000 lake rows took ~4 ms to pickle; a profile of a
500,000-event backfill found 0.84 s of each worker's ~32 s there
(docs/benchmarks.md). The estimate takes ~0.14 ms and is within ~6 % of it.
"""
from __future__ import annotations

from typing import NamedTuple

from apache_beam.coders import coder_impl, coders, typecoders


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


#: Members whose encoded size stands in for a batch's: evenly spaced, first and last included.
SIZE_SAMPLE = 32


class _BatchCoderImpl(coder_impl.StreamCoderImpl):
    """Encodes as the default coder does; estimates a batch's size from ``SIZE_SAMPLE`` of its members encoded
    as one batch, and every other one of them as another: the difference is what each further member adds."""

    def __init__(self):
        self._default = coders.FastPrimitivesCoder().get_impl()

    def encode_to_stream(self, value, stream, nested):
        self._default.encode_to_stream(value, stream, nested)

    def decode_from_stream(self, stream, nested):
        return self._default.decode_from_stream(stream, nested)

    def estimate_size(self, value, nested=False):
        if not isinstance(value, (RecordBatch, RowBatch)) or len(value[0]) <= SIZE_SAMPLE:
            return self._default.estimate_size(value, nested)
        members, times = value
        step = (len(members) - 1) / (SIZE_SAMPLE - 1)
        picked = [round(i * step) for i in range(SIZE_SAMPLE)]
        whole = self._sized(value, picked, nested)
        half = self._sized(value, picked[::2], nested)
        # What a batch encodes once (its type, the keys and names its members share) is in both; each further
        # member adds the mean of what the other half of the sample added to the first.
        per_member = (whole - half) / (SIZE_SAMPLE - len(picked[::2]))
        return whole + round(per_member * (len(members) - SIZE_SAMPLE))

    def _sized(self, batch, picked: list, nested: bool) -> int:
        members, times = batch
        return self._default.estimate_size(
            type(batch)(tuple(members[i] for i in picked), tuple(times[i] for i in picked)), nested)

    def get_estimated_size_and_observables(self, value, nested=False):
        return self.estimate_size(value, nested), []


class BatchCoder(coders.FastCoder):
    """The coder of :class:`RecordBatch` or :class:`RowBatch` elements (see the module docstring).

    The bytes are those of Beam's default coder (``FastPrimitivesCoder``), so a
    batch encoded by either decodes with the other; only the size estimate differs.
    """

    def __init__(self, batch_type: type = RecordBatch):
        if batch_type not in (RecordBatch, RowBatch):
            raise ValueError(f"batch_type must be RecordBatch or RowBatch, got {batch_type!r}")
        self._batch_type = batch_type

    @classmethod
    def from_type_hint(cls, typehint, registry):
        return cls(typehint)

    def _create_impl(self):
        return _BatchCoderImpl()

    def is_deterministic(self) -> bool:
        return False

    def as_deterministic_coder(self, step_label, error_message=None):
        """As the default coder's (a batch used as a key is encoded the way Beam's deterministic coder does)."""
        return coders.FastPrimitivesCoder().as_deterministic_coder(step_label, error_message)

    def to_type_hint(self):
        return self._batch_type

    def __eq__(self, other):
        return type(self) is type(other) and self._batch_type is other._batch_type

    def __hash__(self):
        return hash((type(self), self._batch_type))


typecoders.registry.register_coder(RecordBatch, BatchCoder)
typecoders.registry.register_coder(RowBatch, BatchCoder)

"""Batches of records and rows, and their coder: same bytes as Beam's default, a size estimate from a sample."""
import random

import apache_beam as beam
import pytest
from apache_beam.coders import coders, typecoders
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.records import SIZE_SAMPLE, BatchCoder, RecordBatch, RowBatch, SourceRecord

DEFAULT = coders.FastPrimitivesCoder().get_impl()


def _records(count: int, seed: int = 11, sizes: tuple = (50, 3000)) -> RecordBatch:
    rng = random.Random(seed)
    records = tuple(SourceRecord(b"x" * rng.randint(*sizes), "events", "shardId-000000000001", str(n))
                    for n in range(count))
    return RecordBatch(records, tuple(1_796_000_000_000 + n for n in range(count)))


def _rows(count: int, seed: int = 12) -> RowBatch:
    rng = random.Random(seed)
    rows = tuple({"event_id": f"{rng.getrandbits(128):032x}", "user_id": f"user-{rng.randint(0, 99999):06d}",
                  "received_at": 1_796_000_000_000 + n, "event_time": None,
                  "properties": {"path": "/p/" * rng.randint(1, 20), "duration_ms": rng.randint(0, 5000)},
                  "context": {"ip": "203.0.113.0", "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "locale": "en-GB"},
                  "user": {"profile": {"city": "c" * rng.randint(0, 30), "height_cm": 180}, "plan": "free"},
                  "user_found": True, "schema_version": "1", "pipeline_version": "0.1.0"}
                 for n in range(count))
    return RowBatch(rows, tuple(1_796_000_000_000_000 + n for n in range(count)))


class _Counted:
    """A member that counts how often it is pickled."""

    pickled = 0

    def __init__(self, size: int):
        self.payload = b"y" * size

    def __reduce__(self):
        type(self).pickled += 1
        return _Counted, (len(self.payload),)


def test_both_batch_types_have_the_batch_coder():
    assert isinstance(typecoders.registry.get_coder(RecordBatch), BatchCoder)
    assert isinstance(typecoders.registry.get_coder(RowBatch), BatchCoder)


@pytest.mark.parametrize("batch", [_records(1000), _rows(1000), _records(3), _rows(0)])
def test_a_batch_is_encoded_as_the_default_coder_encodes_it(batch):
    impl = BatchCoder().get_impl()
    encoded = impl.encode(batch)
    assert encoded == DEFAULT.encode(batch)
    assert impl.decode(encoded) == batch
    assert DEFAULT.decode(encoded) == batch


@pytest.mark.parametrize("batch", [_rows(1000), _rows(37, seed=4), _records(1000, sizes=(400, 600))])
def test_the_size_estimate_of_a_batch_of_similar_members_is_close_to_its_encoded_size(batch):
    real = len(DEFAULT.encode(batch))
    estimate = BatchCoder().get_impl().estimate_size(batch)
    assert abs(estimate - real) / real < 0.05, (estimate, real)


@pytest.mark.parametrize("make", [_records, _rows])
def test_the_size_estimates_of_batches_of_members_of_any_size_add_up_to_their_encoded_size(make):
    """One estimate comes from a sample and may miss (Beam samples elements for the same reason): 32 of 1,000
    records of 50 to 3,000 bytes; 40 of them are within a few percent of the truth."""
    batches = [make(1000, seed=seed) for seed in range(40)]
    real = sum(len(DEFAULT.encode(batch)) for batch in batches)
    estimate = sum(BatchCoder().get_impl().estimate_size(batch) for batch in batches)
    assert abs(estimate - real) / real < 0.05, (estimate, real)


@pytest.mark.parametrize("value", [_records(SIZE_SAMPLE), _rows(1), {"event_id": "e"}, b"bytes", None])
def test_small_batches_and_other_values_are_sized_exactly(value):
    assert BatchCoder().get_impl().estimate_size(value) == DEFAULT.estimate_size(value)


def test_estimating_a_batch_encodes_only_a_sample_of_its_members():
    batch = RecordBatch(tuple(_Counted(100 + n % 7) for n in range(1000)), tuple(range(1000)))
    _Counted.pickled = 0
    estimate = BatchCoder().get_impl().estimate_size(batch)
    assert _Counted.pickled == SIZE_SAMPLE + SIZE_SAMPLE // 2  # the sample, and every other member of it again
    _Counted.pickled = 0
    real = DEFAULT.estimate_size(batch)
    assert _Counted.pickled == 1000
    assert abs(estimate - real) / real < 0.1


def test_batches_cross_a_stage_boundary_intact():
    """Each batch type in a collection of its own, as the pipeline's sources make them: Beam infers the type and
    encodes with the batch coder across the Reshuffle."""
    records, rows = _records(1200, seed=5), _rows(900, seed=6)
    with TestPipeline("FnApiRunner") as p:
        crossed = []
        for name, batch in (("Records", records), ("Rows", rows)):
            created = p | f"Create{name}" >> beam.Create([batch])
            assert created.element_type is type(batch)
            crossed.append(created | f"Reshuffle{name}" >> beam.Reshuffle()
                           | f"Describe{name}" >> beam.Map(
                               lambda b: (type(b).__name__, len(b[0]), b[0][-1], b[1][0])))
        assert_that(crossed | beam.Flatten(), equal_to([("RecordBatch", 1200, records[0][-1], records[1][0]),
                                                         ("RowBatch", 900, rows[0][-1], rows[1][0])]))


def test_nested_batches_are_encoded_as_the_default_coder_encodes_them():
    impl = BatchCoder(RowBatch).get_impl()
    for batch in (_records(50), _rows(50)):
        assert impl.encode_nested(batch) == DEFAULT.encode_nested(batch)
        assert impl.decode_nested(impl.encode_nested(batch)) == batch
        assert impl.estimate_size(batch, nested=True) > impl.estimate_size(batch)


def test_each_batch_type_keeps_its_type_hint_and_a_deterministic_coder_is_the_default_ones():
    assert typecoders.registry.get_coder(RecordBatch).to_type_hint() is RecordBatch
    assert typecoders.registry.get_coder(RowBatch).to_type_hint() is RowBatch
    assert BatchCoder(RecordBatch) != BatchCoder(RowBatch)
    assert BatchCoder(RowBatch) == typecoders.registry.get_coder(RowBatch)
    deterministic = BatchCoder(RowBatch).as_deterministic_coder("GroupByBatch")
    assert deterministic.is_deterministic()
    batch = _records(3)
    assert deterministic.decode(deterministic.encode(batch)) == batch
    with pytest.raises(ValueError, match="batch_type"):
        BatchCoder(dict)


def test_the_pipeline_gives_batches_the_batch_coder_and_dead_letters_the_default():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.events import build_pipeline
    from pipelines.options import EventsOptions

    for mode in (["--mode=backfill", "--input=/nonexistent/*.jsonl"], ["--input_stream=events"]):
        options = PipelineOptions([*mode, "--users_table=users", "--output=/tmp/lake", "--dead_letter=/tmp/dl"])
        p = beam.Pipeline(options=options)
        build_pipeline(p, options.view_as(EventsOptions))
        proto, context = p.to_runner_api(return_context=True)
        coder_of = {pc.unique_name: context.coders.get_by_id(pc.coder_id)
                    for pc in proto.components.pcollections.values()}
        source = next(c for name, c in coder_of.items() if name.endswith(("ReadLines.None", "ReadUnbounded.None")))
        rows = next(c for name, c in coder_of.items() if name.endswith("ParDo(ProcessRecordsFn).None"))
        letters = next(c for name, c in coder_of.items() if name.endswith("ParDo(ProcessRecordsFn).dead_letters"))
        assert isinstance(source, BatchCoder), mode
        assert isinstance(rows, BatchCoder) and rows.to_type_hint() is RowBatch, mode
        assert source.to_type_hint() is RecordBatch, mode
        assert isinstance(letters, coders.FastPrimitivesCoder), mode


def test_single_records_keep_the_default_coder():
    from transforms.core import ProcessEvents

    with_batches = beam.Pipeline()
    records = with_batches | beam.Create([SourceRecord(b"{}", "s", "shard", "1")])
    rows, _ = records | ProcessEvents("schemas", "users")
    assert rows.element_type is not RowBatch

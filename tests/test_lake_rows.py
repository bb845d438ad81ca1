"""rows_to_table: what fits the lake schema becomes Arrow, what does not is rejected (never dropped)."""
from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.parquet_rows import check_row, rows_to_table

TS = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),
    pa.field("received_at", TS),
    pa.field("properties", pa.struct([
        pa.field("n", pa.int64()),
        pa.field("items", pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("at", TS)]))),
    ])),
    pa.field("context", pa.struct([pa.field("extra", pa.map_(pa.string(), pa.string()))])),
])


def row(i: int, **changes) -> dict:
    base = {"event_type": "t", "event_id": f"e{i}", "received_at": 1_800_000_000_000 + i,
            "properties": {"n": i, "items": [{"name": "a", "at": 1_800_000_000_000}]},
            "context": {"extra": {"k": "v"}}}
    return {**base, **changes}


def test_fitting_rows_convert_with_partition_columns_left_out():
    table, rejected = rows_to_table([row(i) for i in range(3)], SCHEMA)
    assert rejected == [] and table.num_rows == 3
    assert table.schema == SCHEMA  # event_type (a partition column) is not a file column


def test_undeclared_nested_keys_are_rejected_naming_only_declared_parents():
    bad_struct = row(1, properties={"n": 1, "someone@example.com": 2})
    bad_list_item = row(2, properties={"n": 2, "items": [{"name": "a", "secret": "x"}]})
    table, rejected = rows_to_table([row(0), bad_struct, bad_list_item], SCHEMA)
    assert table.column("event_id").to_pylist() == ["e0"]
    assert [(r.row["event_id"], r.column, r.problem) for r in rejected] == [
        ("e1", "properties", "undeclared_field"), ("e2", "properties.items.[]", "undeclared_field")]
    assert all("example" not in r.column and "secret" not in r.column for r in rejected)


def test_map_keys_are_data_not_undeclared_fields():
    table, rejected = rows_to_table([row(0, context={"extra": {"anything": "goes"}})], SCHEMA)
    assert rejected == [] and table.num_rows == 1


def test_values_of_the_wrong_type_are_found_among_many():
    rows = [row(i) for i in range(1000)]
    rows[3] = row(3, received_at="yesterday")
    rows[700] = row(700, properties={"n": "seven hundred"})
    rows[999] = "not a row"
    table, rejected = rows_to_table(rows, SCHEMA)
    assert table.num_rows == 997
    assert sorted((r.column, r.problem) for r in rejected) == [
        ("", "not_a_row"), ("properties", "type_mismatch"), ("received_at", "type_mismatch")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.text(max_size=5),
                          st.none(), st.floats(allow_nan=False)), max_size=30))
def test_every_row_is_either_converted_or_rejected(values):
    rows = [row(i, properties={"n": value}) for i, value in enumerate(values)]
    table, rejected = rows_to_table(rows, SCHEMA)
    assert table.num_rows + len(rejected) == len(rows)
    kept = set(table.column("event_id").to_pylist())
    for i, value in enumerate(values):
        fits = value is None or (isinstance(value, int) and not isinstance(value, bool))
        assert (f"e{i}" in kept) == fits or isinstance(value, float)  # arrow may accept integral floats
        assert (check_row(rows[i], SCHEMA) is None) == (f"e{i}" in kept)


def test_a_row_with_keys_other_than_text_is_rejected_and_the_rows_after_it_keep_their_values():
    """Arrow takes str or bytes keys for a whole batch from its first row: a bytes-keyed row first would have
    turned every later row's values into nulls."""
    odd = {b"event_id": "e0", "received_at": 1_800_000_000_000}
    table, rejected = rows_to_table([odd, row(1), row(2)], SCHEMA)
    assert table.column("event_id").to_pylist() == ["e1", "e2"]
    assert table.column("properties").to_pylist()[0]["n"] == 1
    assert [(r.row, r.column, r.problem) for r in rejected] == [(odd, "", "not_a_row")]


def test_rejections_of_different_depths_name_the_outer_struct():
    """The set comparison finds a struct's own undeclared key before walking into its fields."""
    both = row(0, properties={"n": 1, "items": [{"name": "a", "secret": "x"}], "other": 2})
    _, rejected = rows_to_table([both], SCHEMA)
    assert [(r.column, r.problem) for r in rejected] == [("properties", "undeclared_field")]

"""The schema registry: loading and checking, validation, coercion, lake types."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from runners.loadgen import EventMix
from transforms.schemas import (
    TIMESTAMP, SchemaRegistry, SchemaViolation, UnknownEventType, default_schema_dir, pii_paths,
)

SCHEMAS = default_schema_dir()
REGISTRY = SchemaRegistry.load(SCHEMAS)
SLOW_REGISTRY = SchemaRegistry.load(SCHEMAS, engine="jsonschema")
SPEC_COLUMNS = ["event_id", "user_id", "anonymous_id", "event_time", "received_at", "processed_at", "properties",
                "context", "user", "user_found", "schema_version", "pipeline_version"]
WORKOUT = {"workout_id": "w1", "workout_type": "strength", "duration_s": 1800,
           "started_at": "2026-03-01T10:00:00Z", "calories_kcal": 310,
           "exercises": [{"name": "squat", "sets": 3, "reps": 10, "weight_kg": 60}]}


def test_the_project_schemas_load():
    assert set(REGISTRY.event_types()) >= {"app_opened", "screen_viewed", "workout_started", "workout_completed",
                                           "training_plan_started", "subscription_purchased"}
    assert REGISTRY.schema_version("workout_completed") == "1"
    assert REGISTRY.properties_schema("workout_completed")["properties"]["exercises"]["type"] == "array"
    assert "profile" in REGISTRY.user_schema["properties"]


def test_validate_coerces_to_lake_types():
    out = REGISTRY.validate("workout_completed", {**WORKOUT, "duration_s": 1800.0})
    assert out["duration_s"] == 1800 and type(out["duration_s"]) is int
    assert out["calories_kcal"] == 310.0 and type(out["calories_kcal"]) is float
    assert out["started_at"] == 1772359200000
    assert out["exercises"] == [{"name": "squat", "sets": 3, "reps": 10, "weight_kg": 60.0}]


@pytest.mark.parametrize("change, path, keyword", [
    ({"duration_s": "1800"}, "properties.duration_s", "type"),
    ({"duration_s": True}, "properties.duration_s", "type"),
    ({"duration_s": 2**63}, "properties.duration_s", "int64"),
    ({"workout_type": "sleeping"}, "properties.workout_type", "enum"),
    ({"started_at": "2026-03-01 10:00"}, "properties.started_at", "format"),
    ({"exercises": [{"name": "squat"}, {"name": "row", "reps": -1}]}, "properties.exercises[1].reps", "minimum"),
    ({"exercises": [{"sets": 3}]}, "properties.exercises[0]", "required"),
    ({"secret_field": "jane@example.com"}, "properties", "additionalProperties"),
    ({"note": None}, "properties.note", "type"),
])
def test_violations_name_path_and_keyword_only(change, path, keyword):
    for registry in (REGISTRY, SLOW_REGISTRY):
        with pytest.raises(SchemaViolation) as info:
            registry.validate("workout_completed", {**WORKOUT, **change})
        assert (info.value.path, info.value.keyword) == (path, keyword)
        assert "jane" not in str(info.value) and "sleeping" not in str(info.value)


def test_unknown_event_type():
    with pytest.raises(UnknownEventType) as info:
        REGISTRY.validate("jane_doe", {})
    assert info.value.reason == "unknown_event_type" and "jane" not in str(info.value)


def test_context_keeps_undeclared_keys_as_strings_in_extra():
    out = REGISTRY.validate_context({"ip": "203.0.113.9", "screen_width": 1080, "campaign": "spring",
                                     "ab": {"variant": 2}, "flag": True})
    assert out == {"ip": "203.0.113.9", "screen_width": 1080,
                   "extra": {"campaign": "spring", "ab": '{"variant":2}', "flag": "true"}}
    assert REGISTRY.validate_context({"locale": "de-DE"}) == {"locale": "de-DE"}
    with pytest.raises(SchemaViolation, match=r"context.screen_width fails 'type'"):
        REGISTRY.validate_context({"screen_width": "wide"})


def test_lake_schema_follows_the_spec_columns_and_x_pii():
    schema = REGISTRY.lake_schema("workout_completed")
    assert schema.names == SPEC_COLUMNS
    for column in ("event_time", "received_at", "processed_at"):
        assert schema.field(column).type == TIMESTAMP
    props = schema.field("properties").type
    assert props.field("duration_s").type == pa.int64()
    assert props.field("calories_kcal").type == pa.float64()
    assert props.field("started_at").type == TIMESTAMP
    assert props.field("exercises").type == pa.list_(pa.struct([
        ("name", pa.string()), ("sets", pa.int64()), ("reps", pa.int64()), ("weight_kg", pa.float64()),
        ("duration_s", pa.int64())]))
    user = schema.field("user").type
    assert user.get_field_index("full_name") == -1  # x-pii drop
    assert user.field("subscription").type.field("since").type == TIMESTAMP
    assert user.field("devices").type == pa.list_(pa.string())
    context = schema.field("context").type
    assert context.field("extra").type == pa.map_(pa.string(), pa.string())
    assert context.field("ip").type == pa.string()


def test_pseudonymized_non_strings_become_strings():
    docs = {name: json.load(open(f"{SCHEMAS}/{name}")) for name in ("_user.json", "app_opened.json")}
    docs["app_opened.json"]["properties"]["launch_ms"]["x-pii"] = "pseudonymize"
    schema = SchemaRegistry.from_documents(docs).lake_schema("app_opened")
    assert schema.field("properties").type.field("launch_ms").type == pa.string()


def test_pii_paths_list_every_marked_field():
    assert sorted(pii_paths(REGISTRY.user_schema)) == [
        (("devices", "[]"), "pseudonymize"), (("email",), "pseudonymize"), (("full_name",), "drop")]


def test_validated_rows_write_to_parquet(tmp_path):
    mix = EventMix(SCHEMAS, seed=3)
    rows_by_type = {}
    for _ in range(300):
        event = mix.valid(received_at_ms=1772359200000)
        rows_by_type.setdefault(event["event_type"], []).append({
            "event_id": event["event_id"], "user_id": event.get("user_id"),
            "anonymous_id": event.get("anonymous_id"), "event_time": None, "received_at": 1772359200000,
            "processed_at": 1772359200001,
            "properties": REGISTRY.validate(event["event_type"], event["properties"]),
            "context": REGISTRY.validate_context({**event["context"], "campaign": "x"}),
            "user": None, "user_found": False, "schema_version": "1", "pipeline_version": "t"})
    for event_type, rows in rows_by_type.items():
        schema = REGISTRY.lake_schema(event_type)
        path = tmp_path / f"{event_type}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        assert pq.read_table(path).num_rows == len(rows)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["workout_completed.json"].pop("additionalProperties"), "workout_completed.json: objects must"),
    (lambda d: d["workout_completed.json"]["properties"]["exercises"]["items"].pop("additionalProperties"),
     "workout_completed.json.exercises[]"),
    (lambda d: d["app_opened.json"].update(version="1"), "app_opened.json: top-level 'version'"),
    (lambda d: d["app_opened.json"]["properties"]["source"].update(type="uuid"), "app_opened.json.source: 'type'"),
    (lambda d: d["app_opened.json"]["properties"]["source"].update(oneOf=[]), "unsupported keyword"),
    (lambda d: d["app_opened.json"]["properties"]["source"].update({"x-pii": "hash"}), "x-pii must be one of"),
    (lambda d: d["app_opened.json"]["properties"]["source"].update(format="email"), "only format 'date-time'"),
    (lambda d: d["app_opened.json"].update(required=["nope"]), "'required' must list"),
    (lambda d: d["_context.json"]["properties"].update(extra={"type": "string"}), "reserved"),
    (lambda d: d.pop("_user.json"), "no _user.json"),
    (lambda d: d.update({"Bad-Name.json": d["app_opened.json"]}), "Bad-Name.json"),
])
def test_bad_schemas_are_refused_naming_the_file(mutate, fragment):
    docs = {name: json.load(open(f"{SCHEMAS}/{name}")) for name in
            ("_user.json", "_context.json", "app_opened.json", "workout_completed.json")}
    mutate(docs)
    with pytest.raises(ValueError) as info:
        SchemaRegistry.from_documents(docs)
    assert fragment in str(info.value)


def test_invalid_json_file_is_named(tmp_path):
    shutil.copytree(SCHEMAS, tmp_path / "s")
    (tmp_path / "s" / "screen_viewed.json").write_text('{"type": ')
    with pytest.raises(ValueError, match="screen_viewed.json: not valid JSON"):
        SchemaRegistry.load(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="does not exist"):
        SchemaRegistry.load(str(tmp_path / "missing"))


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "sets", "reps", "weight_kg", "duration_s", "x"]), inner, max_size=4), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: _json_values() for name in
                                           ["workout_id", "workout_type", "duration_s", "started_at",
                                            "calories_kcal", "exercises", "note", "extra"]}))
def test_both_engines_agree(properties):
    """fastjsonschema (the fast path) and jsonschema accept exactly the same instances."""
    def outcome(registry):
        try:
            return registry.validate("workout_completed", properties)
        except SchemaViolation as exc:
            return exc.path, exc.keyword
    assert outcome(REGISTRY) == outcome(SLOW_REGISTRY)

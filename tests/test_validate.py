"""ValidateEvents: schema checks, coercion, schema_version, context.extra, dead letters."""
from __future__ import annotations

import shutil

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.records import SourceRecord
from transforms.schemas import default_schema_dir
from transforms.validate import ValidateEvents

SCHEMAS = default_schema_dir()


def element(seq: int, event_type: str, properties: dict, context: dict | None = None):
    event = {"event_type": event_type, "event_id": f"e{seq}", "user_id": "u1", "anonymous_id": None,
             "event_time": None, "received_at": 1772359200000, "properties": properties, "context": context or {}}
    return SourceRecord(b"{}", "events", "shard-0", str(seq)), event


def test_valid_events_are_coerced_and_versioned():
    elements = [
        element(1, "subscription_purchased", {"plan": "premium", "period": "yearly", "price": 60, "currency": "EUR"},
                {"ip": "203.0.113.9", "campaign": "spring", "screen_width": 1170.0}),
        element(2, "workout_started", {"workout_id": "w", "workout_type": "yoga", "started_at": "2026-03-01T11:00:00+01:00"}),
    ]
    p = TestPipeline()
    events, dead = p | beam.Create(elements) | "ValidateEvents" >> ValidateEvents(SCHEMAS)
    assert_that(events | beam.Map(lambda e: (e[0].sequence_number, e[1]["properties"], e[1]["context"], e[1]["schema_version"])),
                equal_to([
                    ("1", {"plan": "premium", "period": "yearly", "price": 60.0, "currency": "EUR"},
                     {"ip": "203.0.113.9", "screen_width": 1170, "extra": {"campaign": "spring"}}, "1"),
                    ("2", {"workout_id": "w", "workout_type": "yoga", "started_at": 1772359200000}, {}, "1"),
                ]), label="Events")
    assert_that(dead, equal_to([]), label="NoDeadLetters")
    p.run().wait_until_finish()


def test_failures_become_validate_dead_letters():
    elements = [
        element(1, "legacy_ping", {}),
        element(2, "subscription_purchased", {"plan": "premium", "period": "yearly", "price": "60", "currency": "EUR"}),
        element(3, "screen_viewed", {"screen_name": "home", "__unexpected__": {"nested": [1, 2, 3]}}),
        element(4, "screen_viewed", {"screen_name": "home"}, {"network": "5g"}),
    ]
    p = TestPipeline()
    events, dead = p | beam.Create(elements) | "ValidateEvents" >> ValidateEvents(SCHEMAS)
    assert_that(events, equal_to([]), label="NoEvents")
    assert_that(dead | beam.Map(lambda d: (d["source"]["sequence_number"], d["failure"]["stage"], d["failure"]["reason"],
                                           d["failure"]["message"], d["failure"]["retryable"])),
                equal_to([
                    ("1", "validate", "unknown_event_type", "no schema is registered for the event type", False),
                    ("2", "validate", "schema_violation", "properties.price fails 'type'", False),
                    ("3", "validate", "schema_violation", "properties fails 'additionalProperties'", False),
                    ("4", "validate", "schema_violation", "context.network fails 'enum'", False),
                ]), label="DeadLetters")
    p.run().wait_until_finish()


def test_a_bad_schema_directory_fails_when_the_pipeline_is_built(tmp_path):
    shutil.copytree(SCHEMAS, tmp_path / "s")
    (tmp_path / "s" / "app_opened.json").write_text("[")
    p = TestPipeline()
    with pytest.raises(ValueError, match="app_opened.json"):
        _ = p | beam.Create([element(1, "app_opened", {})]) | "ValidateEvents" >> ValidateEvents(str(tmp_path / "s"))


def test_config_is_checked():
    with pytest.raises(ValueError, match="schema_dir"):
        ValidateEvents(None)

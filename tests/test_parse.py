"""ParseEvents: raw records become events of docs/CONTRACTS.md, or parse dead letters."""
from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from transforms.envelope import Limits, to_wire
from transforms.parse import ParseEvents, ParseFailure, decode, to_event
from transforms.records import SourceRecord

RECEIVED = "2026-03-01T10:00:00.250Z"
RECEIVED_MS = 1772359200250


def record(data: bytes, seq: int = 1) -> SourceRecord:
    return SourceRecord(data, "events", "shardId-000000000000", str(seq), "u1")


def envelope(**overrides) -> dict:
    event = {
        "event_type": "screen_viewed",
        "event_id": "e-1",
        "user_id": "u1",
        "timestamp": "2026-03-01T09:59:59.000+00:00",
        "received_at": RECEIVED,
        "properties": {"screen_name": "home"},
        "context": {"ip": "203.0.113.9"},
    }
    event.update(overrides)
    return {key: value for key, value in event.items() if value is not None}


def test_a_valid_record_becomes_the_contract_event():
    event = to_event(record(to_wire(envelope())), element_ms=0)
    assert event == {
        "event_type": "screen_viewed",
        "event_id": "e-1",
        "user_id": "u1",
        "anonymous_id": None,
        "event_time": RECEIVED_MS - 1250,
        "received_at": RECEIVED_MS,
        "properties": {"screen_name": "home"},
        "context": {"ip": "203.0.113.9"},
    }


def test_optional_parts_default_and_invalid_client_time_is_null():
    event = to_event(record(to_wire(envelope(properties=None, context=None, timestamp="yesterday"))), 0)
    assert (event["properties"], event["context"], event["event_time"]) == ({}, {}, None)


def test_missing_received_at_falls_back_to_the_element_timestamp():
    event = to_event(record(to_wire(envelope(received_at=None))), element_ms=1_700_000_000_123)
    assert event["received_at"] == 1_700_000_000_123


def test_missing_received_at_and_no_element_time_uses_processing_time():
    event = to_event(record(to_wire(envelope(received_at=None))), element_ms=-(2**62))
    assert event["received_at"] > 1_700_000_000_000


def test_missing_event_id_is_derived_from_the_bytes_deterministically():
    data = to_wire(envelope(event_id=None))
    first, again = to_event(record(data, 1), 0), to_event(record(data, 2), 0)
    other = to_event(record(to_wire(envelope(event_id=None, user_id="u2")), 1), 0)
    assert first["event_id"] == again["event_id"] != other["event_id"]


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"event_type": "screen_viewed", "user_id": "\xed\xa0\x80"}', "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"event_type":"a","user_id":"u","properties":{"x":NaN}}', "invalid_json"),
    (b"[" * 5000 + b"]" * 5000, "invalid_json"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json"),
    (b"[1, 2]", "invalid_envelope"),
    (b'{"event_type": "screen_viewed"}', "invalid_envelope"),
    (b'{"event_type": "Bad Type", "user_id": "u"}', "invalid_envelope"),
    (b'{"event_type": "a", "user_id": 5}', "invalid_envelope"),
    (b'{"event_type": "a", "user_id": "u", "colour": "red"}', "invalid_envelope"),
    (b'{"event_type": "a", "user_id": "u", "properties": ' + b'{"a":' * 40 + b"1" + b"}" * 41, "too_deep"),
])
def test_bad_records_fail_with_their_reason(data, reason):
    with pytest.raises(Exception) as info:
        to_event(record(data), 0)
    assert info.value.reason == reason


def test_records_over_the_event_limit_are_too_large_before_decoding():
    data = to_wire(envelope(properties={"screen_name": "x" * 1_000_000}))
    with pytest.raises(ParseFailure) as info:
        decode(data)
    assert info.value.reason == "too_large"
    assert decode(data, Limits(max_event_bytes=2_000_000))["properties"]["screen_name"].startswith("x")


def test_messages_never_hold_values():
    secret = "jane.doe@example.com"
    bad = [
        b'{"event_type": "a", "user_id": "' + secret.encode() + b'", "colour": "' + secret.encode() + b'"}',
        b'{"event_type": "' + secret.encode() + b'", "user_id": "u"}',
        secret.encode() + b"\xff",
        b'{"user_id": "' + secret.encode() + b'" ',
    ]
    for data in bad:
        with pytest.raises(Exception) as info:
            to_event(record(data), 0)
        assert secret not in str(info.value) and "jane" not in str(info.value)


def test_parse_events_splits_events_and_dead_letters():
    good = record(to_wire(envelope()), 1)
    bad = record(b"{oops", 2)
    p = TestPipeline()
    events, dead = p | beam.Create([good, bad]) | "ParseEvents" >> ParseEvents()
    assert_that(events | beam.Map(lambda e: (e[0].sequence_number, e[1]["event_id"])), equal_to([("1", "e-1")]),
                label="Events")
    assert_that(dead | beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"], d["source"]["sequence_number"],
                                           d["payload"], d["failure"]["retryable"])),
                equal_to([("parse", "invalid_json", "2", "{oops", False)]), label="DeadLetters")
    p.run().wait_until_finish()


def test_parse_events_moves_an_unstamped_record_to_its_received_at():
    data = record(to_wire(envelope()))
    p = TestPipeline()
    events, _ = (p | beam.Create([data]) | beam.Map(lambda r: TimestampedValue(r, 0))
                 | "ParseEvents" >> ParseEvents())
    stamped = events | beam.Map(lambda e, ts=beam.DoFn.TimestampParam: int(ts.micros // 1000))
    assert_that(stamped, equal_to([RECEIVED_MS]))
    p.run().wait_until_finish()


def test_parse_events_refuses_bad_limits():
    with pytest.raises(ValueError, match="limits"):
        ParseEvents(limits={"max_event_bytes": 10})


def test_decoded_dead_letter_payload_round_trips_binary():
    p = TestPipeline()
    _, dead = p | beam.Create([record(b"\xff\x00abc")]) | "ParseEvents" >> ParseEvents()
    assert_that(dead | beam.Map(lambda d: (d["payload_encoding"], json.dumps(d["failure"]["reason"]))),
                equal_to([("base64", '"invalid_utf8"')]))
    p.run().wait_until_finish()


def test_escaped_lone_surrogates_are_refused_but_escaped_pairs_pass():
    lone = b'{"event_type": "a", "user_id": "u", "properties": {"x": "\\ud800"}}'
    pair = b'{"event_type": "a", "user_id": "u", "properties": {"x": "\\ud83d\\ude00"}}'
    with pytest.raises(ParseFailure) as info:
        decode(lone)
    assert info.value.reason == "invalid_utf8"
    assert decode(pair)["properties"]["x"] == "\U0001F600"

"""The processing core: poison pills and conservation (records in = rows + dead letters)."""
from __future__ import annotations

import collections
import json
import random

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from runners.loadgen import EventMix
from transforms.core import ProcessEvents
from transforms.envelope import format_rfc3339_ms, stamp, to_wire, validate_event
from transforms.parse import ParseEvents
from transforms.records import RecordBatch, RowBatch, SourceRecord
from transforms.schemas import default_schema_dir
from transforms.validate import ValidateEvents

SCHEMAS = default_schema_dir()
RECEIVED_MS = 1_772_359_200_000


def valid_envelopes(count: int, seed: int = 11) -> list[dict]:
    """Stamped envelopes (as the ingress writes them) drawn from the project's schemas."""
    mix = EventMix(SCHEMAS, seed=seed)
    out = []
    for index in range(count):
        event = validate_event(mix.valid(received_at_ms=RECEIVED_MS + index))
        out.append(stamp(event, received_at=format_rfc3339_ms(RECEIVED_MS + index), caller_ip=None))
    return out


def poison_pills() -> list[tuple[bytes, str, str]]:
    """100 records that must become dead letters: (bytes, stage, reason)."""
    base = valid_envelopes(1, seed=99)[0]
    ok = {"event_type": "workout_completed", "user_id": "u-1", "received_at": format_rfc3339_ms(RECEIVED_MS),
          "properties": {"workout_id": "w", "workout_type": "yoga", "duration_s": 60}}
    pills = []

    def add(n, make, stage, reason):
        pills.extend((make(i), stage, reason) for i in range(n))

    add(12, lambda i: to_wire(base)[: 20 + i], "parse", "invalid_json")
    add(10, lambda i: b"\xff\xfe" + to_wire({**ok, "event_id": f"utf{i}"}), "parse", "invalid_utf8")
    add(3, lambda i: b"[" * 5000 + b"]" * 5000, "parse", "invalid_json")
    add(3, lambda i: to_wire({**ok, "properties": {"note": "x" * 1_000_000}}), "parse", "too_large")
    add(5, lambda i: to_wire({**ok, "properties": {"a": 1}} | {"properties": json.loads(
        '{"a":' * 40 + "1" + "}" * 40)}), "parse", "too_deep")
    add(10, lambda i: to_wire({k: v for k, v in ok.items() if k != "user_id"}), "parse", "invalid_envelope")
    add(5, lambda i: to_wire({**ok, "user_id": i}), "parse", "invalid_envelope")
    add(12, lambda i: to_wire({**ok, "event_type": f"legacy_ping_{i}"}), "validate", "unknown_event_type")
    add(10, lambda i: to_wire({**ok, "properties": {**ok["properties"], "duration_s": "sixty"}}),
        "validate", "schema_violation")
    add(10, lambda i: to_wire({**ok, "properties": {**ok["properties"], "exercises": [{"name": "squat", "reps": 1.5}]}}),
        "validate", "schema_violation")
    add(10, lambda i: to_wire({**ok, "properties": {"workout_id": "w", "workout_type": "yoga"}}),
        "validate", "schema_violation")
    add(5, lambda i: to_wire({**ok, "properties": {**ok["properties"], "started_at": "last tuesday"}}),
        "validate", "schema_violation")
    add(5, lambda i: to_wire({**ok, "context": {"screen_width": "wide"}}), "validate", "schema_violation")
    assert len(pills) == 100
    return pills


def counters(result) -> dict[str, int]:
    metrics = result.metrics().query(MetricsFilter().with_namespace("eventlake"))["counters"]
    totals = collections.Counter()
    for metric in metrics:
        totals[metric.key.metric.name] += metric.committed
    return dict(totals)


def source_records(payloads: list[bytes]) -> list[SourceRecord]:
    records = [SourceRecord(data, "events", "shardId-000000000000", str(i), "k") for i, data in enumerate(payloads)]
    random.Random(5).shuffle(records)
    return records


def test_poison_pills_through_parse_and_validate():
    good = [to_wire(e) for e in valid_envelopes(1000)]
    pills = poison_pills()
    p = TestPipeline()
    records = p | beam.Create(source_records(good + [data for data, _, _ in pills]))
    parsed, parse_dead = records | "ParseEvents" >> ParseEvents()
    events, validate_dead = parsed | "ValidateEvents" >> ValidateEvents(SCHEMAS)
    dead = (parse_dead, validate_dead) | beam.Flatten()
    assert_that(events | beam.combiners.Count.Globally(), equal_to([1000]), label="ThousandEvents")
    assert_that(events | beam.Map(lambda e: set(e[1]) >= {"schema_version", "received_at", "event_time"}),
                equal_to([True] * 1000), label="EventsAreValidated")
    expected = collections.Counter((stage, reason) for _, stage, reason in pills)
    assert_that(dead | beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"]))
                | beam.combiners.Count.PerElement(),
                equal_to(list(expected.items())), label="DeadLettersByReason")
    result = p.run()
    result.wait_until_finish()
    counts = counters(result)
    assert counts["parse.received"] == 1100
    assert counts["parse.received"] == counts["parse.succeeded"] + counts["parse.dead_lettered"]
    assert counts["validate.received"] == counts["parse.succeeded"]
    assert counts["validate.received"] == counts["validate.succeeded"] + counts["validate.dead_lettered"]
    assert counts["validate.succeeded"] == 1000
    assert counts["parse.dead_lettered"] + counts["validate.dead_lettered"] == 100


def test_dead_letter_messages_hold_no_personal_data():
    email = "jane.doe@example.com"
    ok = {"event_type": "workout_completed", "user_id": email, "received_at": format_rfc3339_ms(RECEIVED_MS)}
    payloads = [
        to_wire({**ok, "properties": {"workout_id": email, "workout_type": email, "duration_s": 1}}),
        to_wire({**ok, "properties": {"workout_id": "w", "workout_type": "yoga", "duration_s": email}}),
        to_wire({**ok, "properties": {"workout_id": "w", "workout_type": "yoga", "duration_s": 1, email: 1}}),
        to_wire({**ok, "context": {"ip": 5, "locale": email}}),
        to_wire({**ok, "event_type": "jane_doe", "properties": {}}),
        to_wire({**ok, email: email}),
        to_wire(ok)[:-3] + email.encode(),
    ]
    p = TestPipeline()
    parsed, parse_dead = p | beam.Create(source_records(payloads)) | "ParseEvents" >> ParseEvents()
    _, validate_dead = parsed | "ValidateEvents" >> ValidateEvents(SCHEMAS)
    messages = (parse_dead, validate_dead) | beam.Flatten() | beam.Map(lambda d: d["failure"]["message"])
    assert_that(messages | beam.Map(lambda m: "jane" in m or "example" in m), equal_to([False] * len(payloads)))
    p.run().wait_until_finish()


def test_process_events_validates_its_configuration():
    with pytest.raises(ValueError, match="schema_dir"):
        ProcessEvents("", "users")
    with pytest.raises(ValueError, match="users_table"):
        ProcessEvents(SCHEMAS, "")
    with pytest.raises(ValueError, match="batch_size"):
        ProcessEvents(SCHEMAS, "users", enrich_options={"batch_size": 0})
    with pytest.raises(ValueError, match="pseudonymization_secret"):
        ProcessEvents(SCHEMAS, "users", pseudonymization_secret=" ")
    with pytest.raises(ValueError, match="pipeline_version"):
        ProcessEvents(SCHEMAS, "users", pipeline_version="")


def test_process_events_full_chain_conserves_every_record(stack, monkeypatch):
    """1,000 valid + 100 poison records through parse, validate, enrich (moto DynamoDB) and mask."""
    pytest.importorskip("transforms.mask", reason="MaskPersonalData has not landed yet")
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "k1=test-secret-not-real")
    stack.seed_users(EventMix(SCHEMAS, seed=11).users())
    good = [to_wire(e) for e in valid_envelopes(1000)]
    pills = poison_pills()
    p = TestPipeline()
    rows, dead = (p | beam.Create(source_records(good + [data for data, _, _ in pills]))
                  | "ProcessEvents" >> ProcessEvents(SCHEMAS, stack.config.users_table, endpoint_url=stack.endpoint,
                                                     region_name=stack.config.region, pipeline_version="test-1"))
    assert_that(rows | beam.combiners.Count.Globally(), equal_to([1000]), label="ThousandRows")
    assert_that(rows | beam.Map(lambda r: (r["pipeline_version"], r["processed_at"] >= r["received_at"],
                                           "user_found" in r, "schema_version" in r))
                | beam.Distinct(), equal_to([("test-1", True, True, True)]), label="RowsAreStamped")
    expected = collections.Counter((stage, reason) for _, stage, reason in pills)
    assert_that(dead | beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"]))
                | beam.combiners.Count.PerElement(), equal_to(list(expected.items())), label="DeadLettersByReason")
    result = p.run()
    result.wait_until_finish()
    counts = collections.Counter(counters(result))  # a counter never incremented is not reported
    for stage in ("parse", "validate", "enrich", "mask", "core"):
        assert counts[f"{stage}.received"] == counts[f"{stage}.succeeded"] + counts[f"{stage}.dead_lettered"], stage
    assert counts["validate.received"] == counts["parse.succeeded"]
    assert counts["enrich.received"] == counts["validate.succeeded"]
    assert counts["mask.received"] == counts["enrich.succeeded"]
    assert counts["core.received"] == 1100 and counts["core.succeeded"] == 1000 and counts["core.dead_lettered"] == 100


class _Outputs(beam.DoFn):
    """Rows (single or in RowBatches) and dead letters -> comparable tuples with each one's own timestamp."""

    def __init__(self, kind: str):
        self.kind = kind

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        if isinstance(element, RowBatch):
            assert self.kind == "row" and timestamp.micros == min(element.micros)
            pairs = list(element.timestamped())
            yield ("row-batch", len(pairs) > 0)
        else:
            pairs = [(element, timestamp.micros)]
        for item, micros in pairs:
            if self.kind == "row":
                yield ("row", item["event_id"], item["user_found"], micros)
            else:
                yield ("dead", item["source"]["sequence_number"], item["failure"]["reason"], micros)


_COLLECTED: dict = {}


def _collect(item, key):
    _COLLECTED[key].append(item)


def test_record_batches_give_the_same_rows_and_dead_letters_each_in_its_own_time(stack, monkeypatch):
    """The same 300 valid and 100 poison records, one per element and in RecordBatches of 37 (what the backfill
    reader makes): the same rows (in RowBatches) and dead letters, each stamped with its own record's time,
    not the batch's; lookups answered after their batch (batch_size 7) still leave in RowBatches."""
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "k1=test-secret-not-real")
    stack.seed_users(EventMix(SCHEMAS, seed=11).users())
    records = source_records([to_wire(e) for e in valid_envelopes(300)] + [data for data, _, _ in poison_pills()])
    event_ms = [RECEIVED_MS + 1000 * (index % 50) for index in range(len(records))]
    options = dict(endpoint_url=stack.endpoint, region_name=stack.config.region, enrich_options={"batch_size": 7})

    def run(batched: bool) -> list:
        p = _local_pipeline()
        if batched:
            batches = [RecordBatch(tuple(records[i:i + 37]), tuple(event_ms[i:i + 37]))
                       for i in range(0, len(records), 37)]
            elements = (p | beam.Create(batches)
                        | beam.Map(lambda b: beam.window.TimestampedValue(b, min(b.event_ms) / 1000)))
        else:
            elements = (p | beam.Create(list(zip(records, event_ms)))
                        | beam.Map(lambda pair: beam.window.TimestampedValue(pair[0], pair[1] / 1000)))
        rows, dead = elements | ProcessEvents(SCHEMAS, stack.config.users_table, **options)
        seen = ((rows | "Rows" >> beam.ParDo(_Outputs("row")), dead | "Dead" >> beam.ParDo(_Outputs("dead")))
                | beam.Flatten())
        _COLLECTED[batched] = []
        seen | beam.Map(_collect, batched)  # FnApiRunner in this process: the module's list is filled
        p.run().wait_until_finish()
        return _COLLECTED.pop(batched)

    single, batched = run(False), run(True)
    assert single and not [item for item in single if item[0] == "row-batch"]
    assert ("row-batch", True) in batched
    by_record = dict(zip((r.sequence_number for r in records), event_ms))
    expected_rows = sorted(item for item in single if item[0] == "row")
    expected_dead = sorted(item for item in single if item[0] == "dead")
    assert len(expected_rows) == 300 and len(expected_dead) == 100
    assert all(item[3] == by_record[item[1]] * 1000 for item in expected_dead)
    assert sorted(item for item in batched if item[0] == "row") == expected_rows
    assert sorted(item for item in batched if item[0] == "dead") == expected_dead


class _RowTime(beam.DoFn):
    def process(self, row, timestamp=beam.DoFn.TimestampParam):
        yield row["event_id"], timestamp.micros // 1000 == row["received_at"]


def _local_pipeline() -> beam.Pipeline:
    """FnApiRunner in this process, so that a monkeypatch reaches the DoFns."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


def test_rows_leave_in_their_event_time_even_after_waiting_for_a_lookup(stack, monkeypatch):
    """Every row (all wait for a batched lookup: the cache starts cold) carries its received_at as timestamp, also a
    line without received_at, whose element timestamp moves forward to the time it was read."""
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "k1=test-secret-not-real")
    stack.seed_users(EventMix(SCHEMAS, seed=11).users())
    envelopes = valid_envelopes(200)
    bare = {k: v for k, v in envelopes[0].items() if k != "received_at"} | {"event_id": "no-received-at"}
    p = _local_pipeline()
    rows, _ = (p | beam.Create(source_records([to_wire(e) for e in envelopes] + [to_wire(bare)]))
               | ProcessEvents(SCHEMAS, stack.config.users_table, endpoint_url=stack.endpoint,
                               region_name=stack.config.region, enrich_options={"batch_size": 7}))
    assert_that(rows | beam.ParDo(_RowTime()) | beam.Map(lambda pair: pair[1]) | beam.combiners.Count.PerElement(),
                equal_to([(True, 201)]))
    p.run().wait_until_finish()


def test_an_enrichment_outage_dead_letters_users_events_as_retryable(stack, monkeypatch):
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "k1=test-secret-not-real")
    envelopes = valid_envelopes(120)
    with_user = sum(1 for e in envelopes if e.get("user_id"))
    assert 0 < with_user < 120
    p = _local_pipeline()
    rows, dead = (p | beam.Create(source_records([to_wire(e) for e in envelopes]))
                  | ProcessEvents(SCHEMAS, "no-such-table", endpoint_url=stack.endpoint,
                                  region_name=stack.config.region,
                                  enrich_options={"batch_size": 10, "cache_ttl_seconds": 0, "miss_ttl_seconds": 0}))
    assert_that(rows | beam.Map(lambda r: (r["user_found"], r["user_id"] is None)) | beam.Distinct(),
                equal_to([(False, True)]), label="OnlyAnonymousRows")
    assert_that(dead | beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"], d["failure"]["retryable"]))
                | beam.combiners.Count.PerElement(),
                equal_to([(("enrich", "enrichment_unavailable", True), with_user)]), label="RetryableLetters")
    result = p.run()
    result.wait_until_finish()
    counts = collections.Counter(counters(result))
    assert counts["core.received"] == 120 and counts["core.dead_lettered"] == with_user
    assert counts["enrich.dead_lettered"] == with_user and counts["core.succeeded"] == 120 - with_user
    # an event whose user could not be looked up never reaches masking
    assert counts["mask.received"] == counts["mask.succeeded"] == 120 - with_user and counts["mask.dead_lettered"] == 0


def test_a_masking_failure_is_a_dead_letter_without_the_value(stack, monkeypatch):
    from transforms.mask import PersonalDataMasker

    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "k1=test-secret-not-real")
    stack.seed_users(EventMix(SCHEMAS, seed=11).users())
    envelopes = valid_envelopes(60)
    failing_type = envelopes[0]["event_type"]
    original = PersonalDataMasker.mask

    def mask(self, event):
        if event["event_type"] == failing_type:
            raise ValueError(f"cannot mask {event['user_id']} jane.doe@example.com")
        return original(self, event)

    monkeypatch.setattr(PersonalDataMasker, "mask", mask)
    expected = sum(1 for e in envelopes if e["event_type"] == failing_type)
    p = _local_pipeline()
    rows, dead = (p | beam.Create(source_records([to_wire(e) for e in envelopes]))
                  | ProcessEvents(SCHEMAS, stack.config.users_table, endpoint_url=stack.endpoint,
                                  region_name=stack.config.region))
    assert_that(rows | beam.combiners.Count.Globally(), equal_to([60 - expected]), label="OtherRows")
    assert_that(dead | beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"], d["failure"]["message"]))
                | beam.Distinct(), equal_to([("mask", "masking_failed", "masking failed (ValueError)")]),
                label="MaskLetters")
    result = p.run()
    result.wait_until_finish()
    counts = collections.Counter(counters(result))
    assert counts["mask.received"] == 60 and counts["mask.dead_lettered"] == expected
    assert counts["mask.succeeded"] == counts["core.succeeded"] == 60 - expected
    assert counts["core.received"] == 60 and counts["core.dead_lettered"] == expected

"""Re-drive end to end: an enrichment outage dead-letters events; after the fix they all reach the lake enriched."""
from __future__ import annotations

import collections
import io
import json
import os

import pyarrow.dataset as ds
import pytest

from pipelines import events, redrive
from runners.loadgen import EventMix
from runners.local import wait_until
from transforms.dead_letter_sinks import read_queue_records
from transforms.envelope import format_rfc3339_ms, stamp, to_wire, utc_now_ms, validate_event
from transforms.schemas import default_schema_dir

SCHEMAS = default_schema_dir()


def known_user_events(mix: EventMix, count: int) -> list[dict]:
    """Stamped envelopes of users that exist once the table is restored."""
    out, now = [], utc_now_ms()
    while len(out) < count:
        event = mix.valid(received_at_ms=now)
        if "user_id" in event:
            out.append(stamp(validate_event(event), received_at=format_rfc3339_ms(now + len(out)),
                             caller_ip=None))
    return out


@pytest.mark.slow
def test_an_enrichment_outage_is_redriven_into_the_lake_enriched(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "t1=test-secret-of-enough-bytes")
    mix = EventMix(SCHEMAS, users=40, seed=3)
    envelopes = known_user_events(mix, 120)
    ids = {e["event_id"] for e in envelopes}
    backfill = tmp_path / "events.jsonl"
    backfill.write_bytes(b"".join(to_wire(e) + b"\n" for e in envelopes))
    lake = str(tmp_path / "lake")
    common = [f"--users_table={stack.config.users_table}", f"--output={lake}", f"--dead_letter={stack.queue_url}",
              f"--schema_dir={SCHEMAS}", "--window_seconds=5", "--skip_preflight"]

    # 1. the users table is gone: every event is dead-lettered as a retryable enrichment outage
    dynamodb = stack.client("dynamodb")
    dynamodb.delete_table(TableName=stack.config.users_table)
    summary = events.run(["--mode=backfill", f"--input={backfill}",
                          "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", *common])
    assert summary["read"] == 120 and summary["rows_written"] == 0 and summary["dead_letters"] == 120

    report = redrive.run([f"--dead_letter={stack.queue_url}", "--summary"], out=io.StringIO())
    assert [(g["stage"], g["reason"], g["count"], g["redrivable"]) for g in report["groups"]] == [
        ("enrich", "enrichment_unavailable", 120, 120)]

    # 2. restore the table, seed the users, re-drive onto the stream
    dynamodb.create_table(TableName=stack.config.users_table,
                          KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"}],
                          AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"}],
                          BillingMode="PAY_PER_REQUEST")
    wait_until(lambda: dynamodb.describe_table(TableName=stack.config.users_table)["Table"]["TableStatus"]
               == "ACTIVE", timeout=30, what="the restored table")
    stack.seed_users(mix.users(known_share=1.0))
    report = redrive.run([f"--dead_letter={stack.queue_url}", f"--stream={stack.config.stream}"],
                         out=io.StringIO())
    assert report["redriven"] == 120 and report["deleted"] == 120 and report["failed"] == 0

    # 3. the streaming pipeline reads the stream: every event lands in the lake, enriched
    summary = events.run(["--mode=stream", f"--input_stream={stack.config.stream}",
                          "--stop_when_idle_seconds=3", *common])
    assert summary["conserved"] and summary["read"] == 120 and summary["dead_letters"] == 0

    table = ds.dataset(os.path.join(lake, "events"), format="parquet", partitioning="hive").to_table(
        columns=["event_id", "user_found"])
    found = collections.Counter(zip(table.column("event_id").to_pylist(), table.column("user_found").to_pylist()))
    assert {event_id for event_id, _ in found} == ids
    assert all(user_found for _, user_found in found) and sum(found.values()) == 120
    assert list(read_queue_records(stack.queue_url, sqs=stack.client("sqs"), s3=stack.client("s3"),
                                   visibility_timeout=1, empty_polls=1)) == []

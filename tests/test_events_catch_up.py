"""Catching up a backlog: a stream filled before the pipeline starts, across 4 uneven shards, loses nothing.

The events were accepted over ten minutes and the pipeline starts afterwards (a restart after downtime, or the
first run over a filled stream). One shard holds 24,000 of them, the three others 500 each, all spread over the
same ten minutes, so the small shards' readers reach the end of those ten minutes long before the big one.

On Prism that used to lose most of the big shard: Prism sets the read stage's watermark from the bundle that
completed last, so a small reader's report moved it past records the big reader had not yet delivered, and the
lake's GroupByKey dropped them as late (2,904 of 25,500 rows written). ``transforms.kinesis_watermarks`` holds
each reader to what its siblings have committed. Uneven shards are the rule in production (hot partition keys).
"""
from __future__ import annotations

import collections
import glob
import json
import os

import pyarrow.dataset as ds
import pytest

from pipelines import events
from runners.loadgen import EventMix
from transforms.envelope import format_rfc3339_ms, stamp, to_wire, utc_now_ms, validate_event
from transforms.schemas import default_schema_dir

SCHEMAS = default_schema_dir()
PER_SHARD = (24_000, 500, 500, 500)
INVALID_EVERY = 50  # one in fifty records names an unknown event type


def fill(stack, mix: EventMix) -> tuple[set, int]:
    """Puts PER_SHARD records on the four shards, each shard's spread over the past ten minutes."""
    kinesis = stack.client("kinesis")
    shards = sorted(kinesis.list_shards(StreamName=stack.config.stream)["Shards"], key=lambda s: s["ShardId"])
    assert len(shards) == len(PER_SHARD)
    start = utc_now_ms() - 600_000
    valid, invalid = set(), 0
    for shard, count in zip(shards, PER_SHARD):
        hash_key = str(int(shard["HashKeyRange"]["StartingHashKey"]) + 1)
        records = []
        for n in range(count):
            reason, event = mix.next()
            while reason is not None:
                reason, event = mix.next()
            event = stamp(validate_event(event), received_at=format_rfc3339_ms(start + n * 600_000 // count),
                           caller_ip=None)
            if n % INVALID_EVERY == 0:  # stamped like the rest (an invalid record keeps the shard's event time)
                invalid += 1
                data = to_wire({**event, "event_type": "no_such_event_type"})
            else:
                valid.add(event["event_id"])
                data = to_wire(event)
            records.append({"Data": data, "PartitionKey": f"key-{n % 97}", "ExplicitHashKey": hash_key})
            if len(records) == 500 or n == count - 1:
                response = kinesis.put_records(StreamName=stack.config.stream, Records=records)
                assert response.get("FailedRecordCount", 0) == 0
                records = []
    return valid, invalid


@pytest.mark.slow
@pytest.mark.parametrize("stack", [{"shards": 4}], indirect=True)
def test_a_backlog_on_uneven_shards_is_written_whole(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "t1=test-secret-of-enough-bytes")
    mix = EventMix(SCHEMAS, users=300, seed=11)
    stack.seed_users(mix.users())
    valid, invalid = fill(stack, mix)
    lake, dead = str(tmp_path / "lake"), str(tmp_path / "dead")

    summary = events.run([
        "--mode=stream", f"--input_stream={stack.config.stream}", f"--users_table={stack.config.users_table}",
        f"--output={lake}", f"--dead_letter={dead}", f"--schema_dir={SCHEMAS}", "--window_seconds=60",
        "--stop_when_idle_seconds=5",
    ])

    rows = ds.dataset(os.path.join(lake, "events"), format="parquet", partitioning="hive").to_table(
        columns=["event_id"]).column("event_id").to_pylist()
    letters = [json.loads(line) for path in glob.glob(os.path.join(dead, "**", "*"), recursive=True)
               if os.path.isfile(path) for line in open(path, encoding="utf-8")]
    assert summary["read"] == sum(PER_SHARD)
    assert len(valid - set(rows)) == 0, f"{len(valid - set(rows))} of {len(valid)} valid events missing from the lake"
    assert len(rows) == len(valid)
    assert len(letters) == invalid
    assert collections.Counter(l["failure"]["stage"] for l in letters).keys() <= {"parse", "validate"}
    assert summary["conserved"]

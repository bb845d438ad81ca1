"""End to end on the local stack: ingress -> Kinesis -> pipelines.events on Prism -> lake + dead letters.

One streaming run (module fixture) is checked from every side by reading its
outputs back; the backfill of the very records it read must give the same rows.
"""
from __future__ import annotations

import collections
import gzip
import json
import os

import pytest

from ingress import create_app
from pipelines import compact
from runners.local import LocalStack, StackConfig, wait_until
from runners.profiles import PRISM
from tests.test_events_support import (
    KNOWN_USERS,
    PLANTED_EMAILS,
    PLANTED_IPS,
    WRITE_KEY,
    assert_no_planted_personal_data,
    check_masked_and_enriched,
    comparable,
    dead_letter_reasons,
    expected_partition,
    invalid_events,
    local_parquet_files,
    partition_of,
    pipeline_env,
    post,
    read_local_lake,
    run_pipeline,
    valid_events,
    PipelineRun,
)
from transforms.dead_letter_sinks import read_queue_records
from transforms.envelope import format_rfc3339_ms, utc_now_ms

FN_API = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"

pytestmark = pytest.mark.slow

STRAGGLER_AGE_MS = 45_000  # far behind the reader's idle watermark (now - 2 s)


@pytest.fixture(scope="module")
def e2e_stack(moto_server):
    config = StackConfig(stream="e2e-events", shards=2, users_table="e2e-users",
                         dead_letter_queue="e2e-dlq", bucket="e2e-lake")
    local = LocalStack(config, server=moto_server).start()
    local.seed_users(KNOWN_USERS.values())
    with pytest.MonkeyPatch.context() as patch:
        for key, value in local.env().items():
            patch.setenv(key, value)
        yield local


def _stream_records(stack) -> list[bytes]:
    """Every record on the stream, from the start of each shard (what a backfill archive holds)."""
    kinesis = stack.client("kinesis")
    out = []
    for shard in kinesis.list_shards(StreamName=stack.config.stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stack.config.stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for _ in range(100):  # bounded: a few pages per shard
            page = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out += [r["Data"] for r in page["Records"]]
            iterator = page.get("NextShardIterator")
            if not page["Records"] and not page.get("MillisBehindLatest"):
                break
    return out


@pytest.fixture(scope="module")
def stream_run(e2e_stack, tmp_path_factory):
    """Posts the crafted events, then stragglers straight onto the stream after the first window closed."""
    stack = e2e_stack
    root = tmp_path_factory.mktemp("e2e")
    lake = str(root / "lake")
    run = PipelineRun([
        "--mode=stream", f"--input_stream={stack.config.stream}", f"--users_table={stack.config.users_table}",
        f"--output={lake}", f"--dead_letter={stack.queue_url}",
        f"--dead_letter_overflow=s3://{stack.config.bucket}/overflow",
        # The idle advance (opt-in) closes the first windows while the stream is idle, so the stragglers
        # below arrive behind the watermark: they must be clamped to it, not dropped.
        "--window_seconds=2", "--stop_when_idle_seconds=12", "--idle_watermark_seconds=2",
    ], env=pipeline_env(stack.env()), log_dir=str(root / "logs"))
    try:
        app = create_app({"EVENTLAKE_STREAM": stack.config.stream, "EVENTLAKE_WRITE_KEYS": WRITE_KEY})
        valid = valid_events("e2e")
        invalid = invalid_events("e2e")
        with app.test_client() as client:
            post(client, valid[:12] + [event for _, event in invalid])
            post(client, valid[12:])

        # The first windows close while the stream is idle: the reader's watermark is now ~ wall time - 2 s.
        wait_until(lambda: local_parquet_files(lake) or run.proc.poll() is not None, timeout=180,
                   what="the first lake files")
        assert run.proc.poll() is None, "the pipeline ended before the stragglers were sent"
        received_at = utc_now_ms() - STRAGGLER_AGE_MS
        stragglers = [{"event_id": f"e2e-late-{i}", "event_type": "app_opened", "user_id": "e2e-known-0",
                       "properties": {"cold_start": False}, "context": {"ip": PLANTED_IPS[0]},
                       "received_at": format_rfc3339_ms(received_at + i)} for i in range(5)]
        stack.client("kinesis").put_records(StreamName=stack.config.stream, Records=[
            {"Data": json.dumps(e).encode(), "PartitionKey": e["user_id"]} for e in stragglers])

        code = run.wait(timeout=300)
    finally:
        run.stop()
    dead = list(read_queue_records(stack.queue_url, sqs=stack.client("sqs"), s3=stack.client("s3")))
    return {
        "code": code, "run": run, "lake": lake, "root": root, "valid": valid, "invalid": invalid,
        "stragglers": stragglers, "rows": read_local_lake(lake), "dead": dead,
        "records": _stream_records(stack),
    }


def test_the_run_exits_0_on_prism_and_prints_a_conserved_summary(stream_run):
    assert stream_run["code"] == 0, stream_run["run"].stderr()[-3000:]
    summary = stream_run["run"].summary()
    sent = len(stream_run["valid"]) + len(stream_run["invalid"]) + len(stream_run["stragglers"])
    assert summary["runner"] == PRISM
    assert summary["conserved"] is True
    assert summary["read"] == sent
    assert summary["rows_written"] == len(stream_run["valid"]) + len(stream_run["stragglers"])
    assert summary["dead_letters"] == len(stream_run["invalid"])


def test_rows_per_event_type_and_partition_equal_what_was_sent(stream_run):
    rows = stream_run["rows"]
    sent = stream_run["valid"] + stream_run["stragglers"]
    assert sorted(r["event_id"] for r in rows) == sorted(e["event_id"] for e in sent)  # each once
    by_type = collections.Counter(r["event_type"] for r in rows)
    assert by_type == collections.Counter(e["event_type"] for e in sent)
    for row in rows:
        assert partition_of(row) == expected_partition(row)  # the Hive path is the day of received_at (UTC)


def test_stragglers_behind_the_idle_watermark_all_land_with_their_received_at(stream_run):
    late = {e["event_id"]: e for e in stream_run["stragglers"]}
    rows = [r for r in stream_run["rows"] if r["event_id"] in late]
    assert len(rows) == len(late)
    for row in rows:
        assert format_rfc3339_ms(int(row["received_at"].timestamp() * 1000)) == late[row["event_id"]]["received_at"]


def test_personal_data_is_masked_and_users_are_joined(stream_run):
    rows = stream_run["rows"]
    check_masked_and_enriched(rows)
    found = {r["user_id"] for r in rows if r["user_found"]}
    assert found == set(KNOWN_USERS)
    assert any(r["anonymous_id"] and not r["user_found"] for r in rows)
    assert any(r["user_id"] and r["user_id"].startswith("e2e-unknown") and not r["user_found"] for r in rows)


def test_no_planted_value_is_anywhere_in_the_lake_files(stream_run):
    blobs = []
    for path in local_parquet_files(stream_run["lake"]):
        with open(path, "rb") as handle:
            blobs.append(handle.read())
    assert blobs
    assert_no_planted_personal_data(blobs, stream_run["rows"])


def test_dead_letters_by_reason_equal_the_invalid_events_sent(stream_run):
    dead = stream_run["dead"]
    assert dead_letter_reasons(dead) == {e["event_id"]: reason for reason, e in stream_run["invalid"]}
    for record in dead:
        assert record["schema"] == "eventlake/dead_letter/1"
        assert record["failure"]["stage"] == "validate" and record["failure"]["retryable"] is False
        assert record["source"]["stream"] == "e2e-events" and record["source"]["sequence_number"]
        # The payload is the original record (SPEC: re-drivable); nothing else may carry a planted value.
        rest = json.dumps({k: v for k, v in record.items() if k != "payload"})
        for needle in (*PLANTED_EMAILS, *PLANTED_IPS):
            assert needle not in rest


def _write_archive(records: list[bytes], folder) -> None:
    """The stream's records as JSON Lines: half gzip, half plain (as an archive of the ingress output)."""
    os.makedirs(folder, exist_ok=True)
    half = len(records) // 2
    with gzip.open(os.path.join(folder, "part-0.jsonl.gz"), "wb") as handle:
        handle.write(b"".join(r + b"\n" for r in records[:half]))
    with open(os.path.join(folder, "part-1.jsonl"), "wb") as handle:
        handle.write(b"".join(r + b"\n" for r in records[half:]))


def _backfill(stream_run, e2e_stack, output: str, name: str):
    archive = stream_run["root"] / "archive"
    if not archive.exists():
        _write_archive(stream_run["records"], archive)
    return run_pipeline([
        "--mode=backfill", f"--input={archive}/part-*", f"--users_table={e2e_stack.config.users_table}",
        f"--output={output}", f"--dead_letter={stream_run['root'] / (name + '_dead')}", "--window_seconds=2",
    ], env=pipeline_env(e2e_stack.env()), log_dir=str(stream_run["root"] / name))


def test_backfill_of_the_same_records_gives_the_same_rows_and_a_rerun_compacts_to_them(stream_run, e2e_stack):
    assert len(stream_run["records"]) == stream_run["run"].summary()["read"]
    output = str(stream_run["root"] / "backfill_lake")
    code, run = _backfill(stream_run, e2e_stack, output, "backfill1")
    assert code == 0, run.stderr()[-3000:]
    summary = run.summary()
    assert summary["conserved"] and summary["read"] == len(stream_run["records"])

    stream_rows = {r["event_id"]: comparable(r) for r in stream_run["rows"]}
    backfill_rows = read_local_lake(output)
    assert len(backfill_rows) == len(stream_rows)
    assert {r["event_id"]: comparable(r) for r in backfill_rows} == stream_rows
    dead = [json.loads(line) for path in (stream_run["root"] / "backfill1_dead").rglob("*") if path.is_file()
            for line in path.read_text().splitlines() if line.strip()]
    assert dead_letter_reasons(dead) == {e["event_id"]: reason for reason, e in stream_run["invalid"]}

    files = set(local_parquet_files(output))
    code, rerun = _backfill(stream_run, e2e_stack, output, "backfill2")
    assert code == 0, rerun.stderr()[-3000:]
    # Content-named files overwrite themselves; where the runner split the input otherwise, the same rows land in
    # files of other names (README, "At least once"): nothing else, and compaction leaves each event once.
    assert files <= set(local_parquet_files(output))
    rerun_rows = read_local_lake(output)
    assert {r["event_id"] for r in rerun_rows} == set(stream_rows)
    assert not os.listdir(os.path.join(output, "_temporary"))  # both runs removed their staging
    summary = compact.run([FN_API, f"--output={output}", "--older_than=2100-01-01"])
    assert summary.get("compaction.duplicates_dropped", 0) == len(rerun_rows) - len(stream_rows), summary
    assert {r["event_id"]: comparable(r) for r in read_local_lake(output)} == stream_rows
    assert len(read_local_lake(output)) == len(stream_rows)

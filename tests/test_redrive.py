"""Re-drive against real services on loopback: SQS (with S3 overflow), JSON Lines folders, Kinesis."""
from __future__ import annotations

import datetime as dt
import io
import json
import os

import pytest

from pipelines import redrive
from runners.local import wait_until
from transforms.dead_letter import dead_letter, to_json
from transforms.dead_letter_sinks import SqsDeadLetterWriter, read_queue_records
from transforms.dead_letter_store import JsonLinesDeadLetters
from transforms.object_store import ObjectStore
from transforms.records import SourceRecord

DAY = dt.datetime(2026, 11, 26, tzinfo=dt.timezone.utc)


def envelope(index: int, **extra) -> bytes:
    event = {"event_type": "app_opened", "event_id": f"ev-{index}", "user_id": f"u-{index % 7}",
             "received_at": "2026-11-26T10:00:00.000Z", "properties": {}, **extra}
    return json.dumps(event, separators=(",", ":")).encode()


def letters(retryable: int, poison: int = 0, *, big: int = 0) -> list[dict]:
    """``retryable`` enrichment outages (``big`` of them with a large payload), plus ``poison`` invalid_json."""
    out = []
    for i in range(retryable):
        data = envelope(i, properties={"pad": "x" * 3000} if i < big else {})
        out.append(dead_letter("enrich", "enrichment_unavailable", "users table unavailable", retryable=True,
                               record=SourceRecord(data, "events", "shardId-0", str(1000 + i)),
                               failed_at=DAY + dt.timedelta(minutes=i)))
    for i in range(poison):
        out.append(dead_letter("parse", "invalid_json", "not JSON", retryable=False,
                               record=SourceRecord(b'{"event_type": "app_op', "events", "shardId-1", str(i)),
                               failed_at=DAY + dt.timedelta(hours=1, minutes=i)))
    return out


def fill_queue(stack, records, *, max_message_bytes=262_144):
    writer = SqsDeadLetterWriter(stack.client("sqs"), stack.queue_url,
                                 overflow=f"s3://{stack.config.bucket}/overflow",
                                 overflow_store=ObjectStore(client=stack.client("s3")),
                                 max_message_bytes=max_message_bytes)
    writer.send(records)
    return writer


def queue_records(stack) -> list[dict]:
    return list(read_queue_records(stack.queue_url, sqs=stack.client("sqs"), s3=stack.client("s3"),
                                   visibility_timeout=1, empty_polls=1))


def stream_records(stack) -> list[dict]:
    """Every record on the stream: ``{"data": bytes, "key": partition key}``."""
    kinesis = stack.client("kinesis")
    out = []
    for shard in kinesis.list_shards(StreamName=stack.config.stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stack.config.stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for _ in range(100):  # bounded: stops at the first empty read once behind is 0
            response = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out.extend({"data": r["Data"], "key": r["PartitionKey"]} for r in response["Records"])
            iterator = response.get("NextShardIterator")
            if not response["Records"] and response.get("MillisBehindLatest", 0) == 0:
                break
    return out


def overflow_objects(stack) -> list[str]:
    listing = stack.client("s3").list_objects_v2(Bucket=stack.config.bucket, Prefix="overflow/")
    return [item["Key"] for item in listing.get("Contents", [])]


def run(stack, *args, **kwargs) -> dict:
    out = io.StringIO()
    report = redrive.run([*args], kinesis=kwargs.pop("kinesis", stack.client("kinesis")), sqs=stack.client("sqs"),
                         s3=stack.client("s3"), out=out, **kwargs)
    report["printed"] = out.getvalue()
    return report


# -- summary and dry run -----------------------------------------------------------------------


def test_summary_counts_by_stage_and_reason_and_changes_nothing(stack):
    fill_queue(stack, letters(6, 3, big=2), max_message_bytes=2048)
    assert len(overflow_objects(stack)) == 2

    report = run(stack, f"--dead_letter={stack.queue_url}", "--summary")

    groups = {(g["stage"], g["reason"]): g for g in report["groups"]}
    assert groups[("enrich", "enrichment_unavailable")] == {
        "stage": "enrich", "reason": "enrichment_unavailable", "count": 6, "redrivable": 6,
        "oldest_failed_at": "2026-11-26T00:00:00.000Z", "newest_failed_at": "2026-11-26T00:05:00.000Z"}
    assert groups[("parse", "invalid_json")]["count"] == 3
    assert groups[("parse", "invalid_json")]["redrivable"] == 0
    assert report["skipped_not_redrivable"] == 3 and report["would_redrive"] == 6
    assert "not retryable and were skipped" in report["printed"]
    assert "enrich/enrichment_unavailable" in report["printed"]
    # nothing changed: every message is visible again, the overflow objects are there, the stream is empty
    assert len(queue_records(stack)) == 9
    assert len(overflow_objects(stack)) == 2
    assert stream_records(stack) == []


def test_dry_run_lists_positions_never_payloads(stack):
    fill_queue(stack, letters(3, 1))
    report = run(stack, f"--dead_letter={stack.queue_url}", "--dry_run")
    assert report["would_redrive"] == 3 and report["redriven"] == 0
    assert report["printed"].count("would re-drive enrich/enrichment_unavailable") == 3
    assert "sequence=1002" in report["printed"]
    assert "u-1" not in report["printed"] and "ev-1" not in report["printed"]
    assert len(queue_records(stack)) == 4


# -- execute -----------------------------------------------------------------------------------


def test_execute_redrives_retryable_letters_and_deletes_them_with_their_overflow(stack):
    originals = letters(8, 2, big=3)
    fill_queue(stack, originals, max_message_bytes=2048)

    report = run(stack, f"--dead_letter={stack.queue_url}", "--execute", f"--stream={stack.config.stream}")

    assert (report["redriven"], report["deleted"], report["failed"], report["skipped_not_redrivable"]) == (8, 8, 0, 2)
    on_stream = stream_records(stack)
    assert sorted(r["data"] for r in on_stream) == sorted(envelope(i, properties={"pad": "x" * 3000} if i < 3 else {})
                                                          for i in range(8))
    assert all(r["key"] == json.loads(r["data"])["user_id"] for r in on_stream)
    left = queue_records(stack)
    assert [(r["failure"]["reason"]) for r in left] == ["invalid_json", "invalid_json"]
    assert overflow_objects(stack) == []


def test_a_non_retryable_reason_named_explicitly_is_redriven_with_a_hash_key(stack):
    fill_queue(stack, letters(2, 2))
    report = run(stack, f"--dead_letter={stack.queue_url}", "--execute", "--reason=invalid_json")
    assert report["redriven"] == 2 and report["selected"] == 2
    on_stream = stream_records(stack)
    assert [r["data"] for r in on_stream] == [b'{"event_type": "app_op'] * 2
    assert all(r["key"].startswith("redrive-") for r in on_stream)
    assert sorted(r["failure"]["reason"] for r in queue_records(stack)) == ["enrichment_unavailable"] * 2


def test_since_until_and_limit_select(stack):
    fill_queue(stack, letters(10))
    report = run(stack, f"--dead_letter={stack.queue_url}", "--execute",
                 "--since=2026-11-26T00:02:00Z", "--until=2026-11-26T00:08:00Z", "--limit=4")
    assert report["redriven"] == 4
    left = queue_records(stack)
    assert len(left) == 6
    redriven = {json.loads(r["data"])["event_id"] for r in stream_records(stack)}
    assert len(redriven) == 4 and redriven <= {f"ev-{i}" for i in range(2, 8)}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="--since"):
        redrive.run(["--dead_letter=/tmp/x", "--since=yesterday"])
    with pytest.raises(ValueError, match="limit"):
        redrive.run(["--dead_letter=/tmp/x", "--limit=0"])
    with pytest.raises(SystemExit):
        redrive.run(["--dead_letter=/tmp/x", "--execute", "--dry_run"])


# -- JSON Lines folders ------------------------------------------------------------------------


def write_jsonl(store: ObjectStore, prefix: str, records: list[dict], per_file: int = 4) -> None:
    for start in range(0, len(records), per_file):
        lines = "".join(to_json(r) + "\n" for r in records[start:start + per_file])
        store.put_bytes(lines.encode(), f"{prefix}/date=2026-11-26/part-{start:04d}.jsonl")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_json_lines_folders_are_rewritten_without_the_redriven_lines(stack, tmp_path, where):
    store = ObjectStore(client=stack.client("s3"))
    prefix = str(tmp_path / "dead") if where == "local" else f"s3://{stack.config.bucket}/dead"
    records = letters(6, 3)
    records = [records[i] for i in (0, 6, 1, 2, 7, 3, 4, 8, 5)]  # poison mixed into the files
    write_jsonl(store, prefix, records)

    report = run(stack, f"--dead_letter={prefix}", "--execute")

    assert report["redriven"] == 6 and report["deleted"] == 6
    assert sorted(r["data"] for r in stream_records(stack)) == sorted(envelope(i) for i in range(6))
    remaining = JsonLinesDeadLetters(prefix, s3=stack.client("s3"))
    assert [l.failure["reason"] for l in remaining.scan()] == ["invalid_json"] * 3
    assert len(remaining.files()) == 2  # the file that held only re-driven lines is gone


# -- failures and crashes ----------------------------------------------------------------------


class Crash(Exception):
    """Stands for the process being killed."""


class CrashingKinesis:
    """The real client; the process "dies" right after Kinesis acknowledged the ``crash_after``-th call."""

    def __init__(self, client, crash_after: int):
        self.client = client
        self.calls = 0
        self.crash_after = crash_after

    def put_records(self, **kwargs):
        response = self.client.put_records(**kwargs)
        self.calls += 1
        if self.calls == self.crash_after:
            raise Crash()
        return response


@pytest.mark.parametrize("where", [pytest.param("queue", marks=pytest.mark.slow), "files"])
def test_a_redrive_killed_after_kinesis_acknowledged_loses_nothing_when_run_again(stack, tmp_path, where):
    records = letters(300, big=5)
    if where == "queue":
        fill_queue(stack, records, max_message_bytes=2048)
        target = stack.queue_url
    else:
        target = str(tmp_path / "dead")
        write_jsonl(ObjectStore(), target, records, per_file=40)
    crashing = CrashingKinesis(stack.client("kinesis"), crash_after=2)

    with pytest.raises(Crash):
        run(stack, f"--dead_letter={target}", "--execute", "--batch_records=100", "--visibility_timeout=10",
            kinesis=crashing)
    assert len(stream_records(stack)) == 200  # two batches acknowledged, the second's letters not deleted
    if where == "queue":  # the killed run's messages come back after their visibility timeout
        sqs = stack.client("sqs")
        wait_until(lambda: int(sqs.get_queue_attributes(
            QueueUrl=stack.queue_url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"]) == 200, timeout=60, interval=0.5, what="the held messages")

    report = run(stack, f"--dead_letter={target}", "--execute", "--batch_records=100")

    ids = [json.loads(r["data"])["event_id"] for r in stream_records(stack)]
    assert set(ids) == {f"ev-{i}" for i in range(300)}  # nothing lost
    assert len(ids) - len(set(ids)) <= 100  # at worst the batch whose deletes the crash prevented, twice
    assert report["failed"] == 0
    if where == "queue":
        assert queue_records(stack) == [] and overflow_objects(stack) == []
    else:
        assert list(JsonLinesDeadLetters(target).scan()) == []


class RefusingKinesis:
    """Forces what moto never does: entries refused with ProvisionedThroughputExceeded."""

    def __init__(self, client, refuse_first: int, always_refuse_key: str = ""):
        self.client = client
        self.refuse_first = refuse_first
        self.always_refuse_key = always_refuse_key
        self.calls = 0

    def put_records(self, StreamName, Records):
        self.calls += 1
        refused = [i < self.refuse_first and self.calls == 1 or r["PartitionKey"] == self.always_refuse_key
                   for i, r in enumerate(Records)]
        accepted = [r for r, no in zip(Records, refused) if not no]
        answers = iter(self.client.put_records(StreamName=StreamName, Records=accepted)["Records"] if accepted else [])
        return {"Records": [{"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"}
                            if no else next(answers) for no in refused]}


def test_refused_entries_are_retried_and_what_never_goes_stays_dead_lettered(stack):
    fill_queue(stack, letters(14))
    refusing = RefusingKinesis(stack.client("kinesis"), refuse_first=5, always_refuse_key="u-3")

    report = run(stack, f"--dead_letter={stack.queue_url}", "--execute", kinesis=refusing, sleep=lambda s: None)

    assert refusing.calls > 1
    stuck = {f"ev-{i}" for i in range(14) if i % 7 == 3}
    assert report["failed"] == len(stuck) and report["redriven"] == 14 - len(stuck)
    assert {json.loads(r["data"])["event_id"] for r in stream_records(stack)} == {f"ev-{i}" for i in range(14)} - stuck
    left = queue_records(stack)
    assert {json.loads(r["payload"])["event_id"] for r in left} == stuck


def test_no_payload_value_reaches_the_log(stack, caplog):
    fill_queue(stack, letters(5, 2))
    caplog.set_level("DEBUG", logger="eventlake")
    report = run(stack, f"--dead_letter={stack.queue_url}", "--execute")
    assert report["redriven"] == 5
    text = caplog.text + report["printed"]
    assert "u-1" not in text and "ev-" not in text and "app_op" not in text


# -- the command as SPEC.md gives it -----------------------------------------------------------


def test_a_plain_run_redrives_to_the_stream_each_letter_was_read_from(stack, monkeypatch):
    """``python -m pipelines.redrive --dead_letter=URI``: no --execute, no --stream, no EVENTLAKE_STREAM."""
    monkeypatch.delenv("EVENTLAKE_STREAM", raising=False)
    records = [dead_letter("enrich", "enrichment_unavailable", "users table unavailable", retryable=True,
                           record=SourceRecord(envelope(i), stack.config.stream, "shardId-0", str(i)),
                           failed_at=DAY) for i in range(5)]
    fill_queue(stack, records)

    report = run(stack, f"--dead_letter={stack.queue_url}")

    assert report["action"] == "execute"
    assert (report["redriven"], report["deleted"], report["no_stream"]) == (5, 5, 0)
    assert sorted(r["data"] for r in stream_records(stack)) == sorted(envelope(i) for i in range(5))
    assert queue_records(stack) == []


def test_backfill_letters_without_a_stream_stay_and_are_counted(stack, tmp_path, monkeypatch):
    monkeypatch.delenv("EVENTLAKE_STREAM", raising=False)
    records = [dead_letter("enrich", "enrichment_unavailable", "users table unavailable", retryable=True,
                           record=SourceRecord(envelope(i), "backfill", "/archive/part-0.jsonl", str(i + 1)),
                           failed_at=DAY) for i in range(3)]
    prefix = str(tmp_path / "dead")
    write_jsonl(ObjectStore(), prefix, records)

    report = run(stack, f"--dead_letter={prefix}")
    assert (report["redriven"], report["no_stream"]) == (0, 3)
    assert "--stream" in report["printed"]
    assert redrive.main([f"--dead_letter={prefix}", "--summary"]) == 1
    assert len(list(JsonLinesDeadLetters(prefix).scan())) == 3

    report = run(stack, f"--dead_letter={prefix}", f"--stream={stack.config.stream}")
    assert (report["redriven"], report["deleted"], report["no_stream"]) == (3, 3, 0)
    assert list(JsonLinesDeadLetters(prefix).scan()) == []

"""WriteDeadLetters against moto's SQS and S3 over the wire, and JSON Lines on a local path."""
from __future__ import annotations

import glob
import hashlib
import json
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.transforms.window import TimestampedValue

from runners.local import wait_until
from runners.metrics import counter_totals
from transforms.dead_letter import dead_letter
from transforms.dead_letter_sinks import (
    POINTER_SCHEMA,
    DeadLetterDeliveryError,
    SqsDeadLetterWriter,
    WriteDeadLetters,
    is_queue_uri,
)
from transforms.object_store import ObjectStore
from transforms.records import SourceRecord

BASE_S = 1_800_000_000  # 2027-01-15T08:00:00Z, a window boundary for 60 s windows


def record(index: int, payload: bytes = None, reason: str = "schema_violation") -> dict:
    data = payload if payload is not None else json.dumps({"event_id": f"e{index}", "n": index}).encode()
    return dead_letter("validate", reason, "properties.n fails 'type'", retryable=False,
                       record=SourceRecord(data, "events", "shardId-000", str(index)))


def receive_all(sqs, queue_url: str, expected: int) -> list[dict]:
    messages: dict[str, dict] = {}

    def drained():
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           MessageAttributeNames=["All"]).get("Messages", []):
            messages[message["MessageId"]] = message
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return len(messages) >= expected

    wait_until(drained, timeout=30, interval=0, what=f"{expected} SQS messages")
    return list(messages.values())


def run_pipeline(records_with_time, sink: WriteDeadLetters):
    p = TestPipeline()
    _ = (
        p
        | "Create" >> beam.Create(records_with_time)
        | "Stamp" >> beam.Map(lambda pair: TimestampedValue(pair[0], pair[1]))
        | "Sink" >> sink
    )
    result = p.run()
    result.wait_until_finish()
    return counter_totals(result)


class ClientThatFails:
    """The real SQS client, except that the first ``failures`` calls report some entries failed."""

    def __init__(self, client, *, failures: int, fail_ids=("0", "3", "9"), code="InternalError"):
        self.client = client
        self.failures = failures
        self.fail_ids = set(fail_ids)
        self.code = code
        self.calls: list[list[str]] = []

    def send_message_batch(self, QueueUrl, Entries):
        self.calls.append([entry["Id"] for entry in Entries])
        if self.failures > 0:
            self.failures -= 1
            kept = [entry for entry in Entries if entry["Id"] not in self.fail_ids]
            response = self.client.send_message_batch(QueueUrl=QueueUrl, Entries=kept) if kept else {}
            failed = [{"Id": entry["Id"], "SenderFault": False, "Code": self.code, "Message": "forced"}
                      for entry in Entries if entry["Id"] in self.fail_ids]
            return {"Successful": response.get("Successful", []), "Failed": failed}
        return self.client.send_message_batch(QueueUrl=QueueUrl, Entries=Entries)


# -- choosing the sink ----------------------------------------------------------------------------

@pytest.mark.parametrize("uri, queue", [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012/eventlake-dlq", True),
    ("http://127.0.0.1:5000/123456789012/dlq-1", True),
    ("sqs://eventlake-dlq", True),
    ("s3://bucket/dead_letters", False),
    ("./dead_letters", False),
    ("/tmp/dead", False),
])
def test_the_uri_chooses_the_sink(uri, queue):
    assert is_queue_uri(uri) is queue


@pytest.mark.parametrize("kwargs", [
    {"uri": ""},
    {"uri": "ftp://host/x"},
    {"uri": "./dl", "window_seconds": 0},
    {"uri": "./dl", "overflow": "/local/path"},
])
def test_bad_configuration_is_refused_naming_the_value(kwargs):
    with pytest.raises(ValueError):
        WriteDeadLetters(**kwargs)


# -- SQS --------------------------------------------------------------------------------------------

def test_sqs_sink_sends_one_message_per_record(stack):
    records = [(record(i), BASE_S + i) for i in range(25)]
    totals = run_pipeline(records, WriteDeadLetters(stack.queue_url))
    messages = receive_all(stack.client("sqs"), stack.queue_url, 25)
    assert len(messages) == 25
    assert sorted(json.loads(m["Body"])["source"]["sequence_number"] for m in messages) == sorted(
        str(i) for i in range(25))
    assert {m["MessageAttributes"]["reason"]["StringValue"] for m in messages} == {"schema_violation"}
    assert totals["dead_letters.written"] == 25


def test_sqs_writer_batches_by_ten_and_by_bytes(stack):
    sqs = stack.client("sqs")
    counting = ClientThatFails(sqs, failures=0)
    writer = SqsDeadLetterWriter(counting, stack.queue_url)
    assert writer.send([record(i) for i in range(25)]) == 25
    assert [len(call) for call in counting.calls] == [10, 10, 5]

    counting.calls.clear()
    big = [record(i, payload=b"x" * 100_000) for i in range(5)]  # ~100 KiB each: two fit in 256 KiB
    assert writer.send(big) == 5
    assert [len(call) for call in counting.calls] == [2, 2, 1]
    assert len(receive_all(sqs, stack.queue_url, 30)) == 30


def test_oversized_record_goes_to_s3_with_a_pointer(stack):
    overflow = f"s3://{stack.config.bucket}/dlq-overflow"
    huge = record(1, payload=("é" * 200_000).encode("utf-8"))  # 400 KB of UTF-8
    totals = run_pipeline([(huge, BASE_S), (record(2), BASE_S)],
                          WriteDeadLetters(stack.queue_url, overflow=overflow))
    messages = receive_all(stack.client("sqs"), stack.queue_url, 2)
    bodies = [json.loads(m["Body"]) for m in messages]
    pointers = [b for b in bodies if b.get("schema") == POINTER_SCHEMA]
    assert len(pointers) == 1 and len(bodies) == 2
    pointer = pointers[0]
    assert pointer["location"].startswith(overflow + "/")
    assert pointer["failure"]["reason"] == "schema_violation"
    assert pointer["source"]["sequence_number"] == "1"
    stored = ObjectStore(client=stack.client("s3")).get_bytes(pointer["location"])
    assert hashlib.sha256(stored).hexdigest() == pointer["sha256"]
    assert len(stored) == pointer["bytes"]
    assert json.loads(stored) == huge
    assert totals["dead_letters.written"] == 2
    assert totals["dead_letters.overflowed"] == 1


def test_oversized_record_without_overflow_fails_loudly(stack, monkeypatch):
    monkeypatch.delenv("EVENTLAKE_BUCKET", raising=False)
    monkeypatch.delenv("EVENTLAKE_DEAD_LETTER_OVERFLOW", raising=False)
    writer = SqsDeadLetterWriter(stack.client("sqs"), stack.queue_url)
    with pytest.raises(DeadLetterDeliveryError, match="no overflow location"):
        writer.send([record(1, payload=b"y" * 300_000)])


def test_failed_entries_are_retried_until_accepted(stack):
    sqs = stack.client("sqs")
    flaky = ClientThatFails(sqs, failures=2)
    waits = []
    writer = SqsDeadLetterWriter(flaky, stack.queue_url, sleep=waits.append, backoff_seconds=0.1)
    assert writer.send([record(i) for i in range(10)]) == 10
    assert flaky.calls[1] == ["0", "3", "9"] and flaky.calls[2] == ["0", "3", "9"]
    assert waits == [0.1, 0.2]  # exponential backoff between attempts
    messages = receive_all(sqs, stack.queue_url, 10)
    assert sorted(json.loads(m["Body"])["source"]["sequence_number"] for m in messages) == sorted(
        str(i) for i in range(10))
    assert writer.retried_entries == 6


def test_entries_failing_every_attempt_raise_without_personal_data(stack):
    flaky = ClientThatFails(stack.client("sqs"), failures=100)
    secret = b'{"email":"someone@example.com"}'
    writer = SqsDeadLetterWriter(flaky, stack.queue_url, sleep=lambda s: None, max_attempts=3)
    with pytest.raises(DeadLetterDeliveryError) as info:
        writer.send([record(i, payload=secret) for i in range(5)])
    assert "InternalError" in str(info.value)
    assert "example.com" not in str(info.value)
    assert len(flaky.calls) == 3


def test_sqs_sink_resolves_a_queue_name(stack):
    totals = run_pipeline([(record(i), BASE_S) for i in range(3)],
                          WriteDeadLetters(f"sqs://{stack.config.dead_letter_queue}"))
    assert len(receive_all(stack.client("sqs"), stack.queue_url, 3)) == 3
    assert totals["dead_letters.written"] == 3


# -- JSON Lines ---------------------------------------------------------------------------------------

def test_json_lines_sink_writes_every_record_in_window_files(tmp_path):
    records = [(record(i), BASE_S + i * 10) for i in range(12)]  # 120 s: two 60 s windows
    out = str(tmp_path / "dead")
    totals = run_pipeline(records, WriteDeadLetters(out, window_seconds=60))
    files = sorted(glob.glob(os.path.join(out, "date=*", "*.jsonl")))
    starts = {os.path.basename(f).split("-")[0] for f in files}
    assert starts == {"20270115T080000Z", "20270115T080100Z"}
    lines = [json.loads(line) for f in files for line in open(f, encoding="utf-8")]
    assert sorted(lines, key=lambda r: int(r["source"]["sequence_number"])) == [r for r, _ in records]
    assert totals["dead_letters.written"] == 12
    assert not glob.glob(os.path.join(out, "**", ".*"), recursive=True)  # no staging leftovers


def test_json_lines_sink_on_s3(stack):
    records = [(record(i), BASE_S + i) for i in range(7)]
    prefix = f"s3://{stack.config.bucket}/dead_letters"
    totals = run_pipeline(records, WriteDeadLetters(prefix))
    s3 = stack.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.config.bucket, Prefix="dead_letters/")["Contents"]]
    assert all(k.startswith("dead_letters/date=2027-01-15/") and k.endswith(".jsonl") for k in keys)
    lines = [json.loads(line) for k in keys
             for line in s3.get_object(Bucket=stack.config.bucket, Key=k)["Body"].read().decode().splitlines()]
    assert sorted(lines, key=lambda r: int(r["source"]["sequence_number"])) == [r for r, _ in records]
    assert totals["dead_letters.written"] == 7


def test_read_queue_records_resolves_pointers(stack):
    overflow = f"s3://{stack.config.bucket}/dlq-overflow"
    writer = SqsDeadLetterWriter(stack.client("sqs"), stack.queue_url, overflow=overflow,
                                 overflow_store=ObjectStore(client=stack.client("s3")))
    records = [record(i) for i in range(12)] + [record(99, payload=b"z" * 300_000)]
    writer.send(records)
    from transforms.dead_letter_sinks import read_queue_records

    drained = list(read_queue_records(stack.queue_url, sqs=stack.client("sqs"), s3=stack.client("s3"),
                                      delete=True))
    key = lambda r: int(r["source"]["sequence_number"])  # noqa: E731
    assert sorted(drained, key=key) == sorted(records, key=key)
    assert writer.overflowed == 1
    assert stack.client("sqs").receive_message(QueueUrl=stack.queue_url).get("Messages", []) == []

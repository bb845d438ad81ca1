"""Helpers for the Kinesis source tests: producing keyed records, draining readers, faults."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from typing import Optional

import boto3
from botocore.exceptions import ClientError

from transforms.envelope import format_rfc3339_ms, utc_now_ms
from transforms.kinesis import KinesisReader, KinesisSource
from transforms.kinesis_shards import list_shards

MAX_TS_MICROS = 2**62  # anything above is MAX_TIMESTAMP


def envelope(key: str, n: int, received_at_ms: Optional[int] = None) -> bytes:
    """A minimal envelope; ``properties.n`` is the per-key sequence number."""
    return json.dumps(
        {
            "event_type": "test_event",
            "event_id": f"{key}-{n}",
            "user_id": key,
            "received_at": format_rfc3339_ms(received_at_ms if received_at_ms is not None else utc_now_ms()),
            "properties": {"n": n},
        },
        separators=(",", ":"),
    ).encode()


def decode(data: bytes) -> tuple[str, int]:
    doc = json.loads(data)
    return doc["user_id"], doc["properties"]["n"]


def put_all(client, stream: str, records: list[dict]) -> None:
    """PutRecords in batches of 500, retrying failed entries (bounded)."""
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        for _ in range(20):
            response = client.put_records(StreamName=stream, Records=batch)
            if not response.get("FailedRecordCount"):
                break
            batch = [r for r, e in zip(batch, response["Records"]) if "ErrorCode" in e]
        else:
            raise AssertionError("PutRecords kept failing")


def fill_shards(client, stream: str, per_shard: int, keys_per_shard: int = 50) -> dict[str, int]:
    """Puts ``per_shard`` records on every open shard (explicit hash keys); returns key -> count."""
    counts: dict[str, int] = defaultdict(int)
    records = []
    shards = client.list_shards(StreamName=stream)["Shards"]
    for index, shard in enumerate(shards):
        hash_key = str(int(shard["HashKeyRange"]["StartingHashKey"]) + 1)
        for i in range(per_shard):
            key = f"s{index}k{i % keys_per_shard}"
            records.append(
                {"Data": envelope(key, counts[key]), "PartitionKey": key, "ExplicitHashKey": hash_key}
            )
            counts[key] += 1
    put_all(client, stream, records)
    return dict(counts)


def assert_exactly_once_in_order(read: list[tuple[str, int]], expected: dict[str, int]) -> None:
    """Every (key, n) for n < expected[key] read once, and per key in increasing n."""
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, n in read:
        per_key[key].append(n)
    assert set(per_key) == set(expected), "keys differ"
    for key, ns in per_key.items():
        assert len(ns) == len(set(ns)), f"{key}: {len(ns) - len(set(ns))} duplicates"
        assert sorted(ns) == list(range(expected[key])), f"{key}: {expected[key] - len(set(ns))} missing"
        assert ns == sorted(ns), f"{key}: out of order"


def drain(reader: KinesisReader, *, limit: Optional[int] = None, timeout: float = 120.0, stamped: bool = False) -> list:
    """Drives a started reader until MAX watermark (or ``limit`` elements); bounded by ``timeout``.

    ``stamped``: ``(element, timestamp micros)`` pairs instead of elements."""
    out = []
    deadline = time.monotonic() + timeout
    has = reader.start() if not getattr(reader, "_started_by_test", False) else reader.advance()
    reader._started_by_test = True
    while time.monotonic() < deadline:
        if has:
            current = reader.get_current()
            out.append((current, reader.get_current_timestamp().micros) if stamped else current)
            if limit is not None and len(out) >= limit:
                return out
        elif reader.get_watermark().micros >= MAX_TS_MICROS:
            return out
        else:
            time.sleep(0.02)  # the runner's poll delay between bundles
        has = reader.advance()
    raise TimeoutError(f"reader did not finish within {timeout}s ({len(out)} records)")


def split_readers(source: KinesisSource) -> list[KinesisReader]:
    return [sub.create_reader(None, None) for sub in source.split(20)]


class Producer(threading.Thread):
    """Puts envelopes for ``keys`` round robin, ``rate`` records per second, until stopped."""

    def __init__(self, client, stream: str, keys: list[str], *, batch: int = 50, interval: float = 0.1):
        super().__init__(daemon=True)
        self.client, self.stream, self.keys = client, stream, keys
        self.batch, self.interval = batch, interval
        self.counts: dict[str, int] = defaultdict(int)
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stopped.is_set():
                records = []
                for _ in range(self.batch):
                    key = self.keys[i % len(self.keys)]
                    records.append({"Data": envelope(key, self.counts[key]), "PartitionKey": key})
                    self.counts[key] += 1
                    i += 1
                put_all(self.client, self.stream, records)
                self.stopped.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join(timeout=30)
        assert self.error is None, f"producer failed: {type(self.error).__name__}"
        return dict(self.counts)


def kinesis_client():
    return boto3.client(
        "kinesis",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def wait_for_active(client, stream: str) -> bool:
    return client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"


def open_shards(client, stream: str) -> list:
    return [s for s in list_shards(client, stream) if not s.closed]


class FaultyKinesis:
    """Wraps the real client: every ``throttle_every``-th GetRecords is throttled, and
    every ``expire_every``-th is refused as an expired iterator (before reaching moto)."""

    def __init__(self, real, *, throttle_every: int, expire_every: int, log: dict):
        self._real, self._log = real, log
        self._throttle_every, self._expire_every = throttle_every, expire_every

    def get_records(self, **kwargs):
        self._log["calls"] = self._log.get("calls", 0) + 1
        calls = self._log["calls"]
        if calls % self._throttle_every == 0:
            self._log["throttled"] = self._log.get("throttled", 0) + 1
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "Rate exceeded"}},
                "GetRecords",
            )
        if calls % self._expire_every == 0:
            self._log["expired"] = self._log.get("expired", 0) + 1
            raise ClientError(
                {"Error": {"Code": "ExpiredIteratorException", "Message": "Iterator expired"}}, "GetRecords"
            )
        return self._real.get_records(**kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


class FaultyClientFactory:
    """A picklable ``client_factory`` giving :class:`FaultyKinesis` clients that share one log."""

    LOGS: dict[str, dict] = {}

    def __init__(self, name: str, *, throttle_every: int = 3, expire_every: int = 5):
        self.name, self.throttle_every, self.expire_every = name, throttle_every, expire_every
        FaultyClientFactory.LOGS.setdefault(name, {})

    def __call__(self, endpoint_url=None, region=None):
        from transforms.kinesis import default_kinesis_client

        return FaultyKinesis(
            default_kinesis_client(endpoint_url, region),
            throttle_every=self.throttle_every,
            expire_every=self.expire_every,
            log=FaultyClientFactory.LOGS[self.name],
        )

"""Helpers for the ingress tests: an app on the test's moto stack, reading the stream back,
and a fault-injecting wrapper around the real Kinesis client."""
from __future__ import annotations

import json
import threading
from typing import Optional

import pytest
from botocore.exceptions import ClientError

from ingress import create_app
from ingress.publisher import KinesisPublisher

WRITE_KEY = "wk_test_0123456789abcdef"
AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}


def event(n: int = 0, **fields) -> dict:
    base = {"event_type": "page_view", "event_id": f"ev-{n}", "user_id": f"user-{n % 7}",
            "properties": {"path": f"/p/{n}"}}
    base.update(fields)
    return base


def read_stream(kinesis, stream: str) -> list[dict]:
    """Every record on every shard, from the start (bounded)."""
    records = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for _ in range(1000):
            page = kinesis.get_records(ShardIterator=iterator, Limit=10000)
            records.extend(page["Records"])
            iterator = page.get("NextShardIterator")
            if not page["Records"] or not iterator:
                break
    return records


def decoded(records: list[dict]) -> list[dict]:
    return [json.loads(r["Data"]) for r in records]


def metric_value(app, name: str, **labels) -> float:
    registry = app.extensions["eventlake"].metrics.registry
    return registry.get_sample_value(name, labels or None) or 0.0


def throttled_error() -> ClientError:
    return ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "Rate exceeded"},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutRecords")


class FaultyKinesis:
    """The real (moto) client, except that ``put_records`` can misbehave as Kinesis does.

    - ``throttle_calls``: that many calls fail whole with ProvisionedThroughputExceededException;
    - ``fail_first_attempts``: each entry whose data matches ``select`` is reported failed (not sent)
      on its first that-many attempts, then goes through;
    - ``gate``: an Event the first call waits on (to let requests pile up).
    Entries not failed are forwarded to moto; results come back in order, like PutRecords.
    """

    def __init__(self, real, *, throttle_calls: int = 0, fail_first_attempts: int = 0,
                 select=lambda data: True, gate: threading.Event | None = None):
        self._real = real
        self.throttle_calls = throttle_calls
        self.fail_first_attempts = fail_first_attempts
        self.select = select
        self.gate = gate
        self.calls = 0
        self.records_per_call: list[int] = []
        self.failed_entries = 0
        self._seen: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._real, name)

    def put_records(self, *, StreamName, Records):
        with self._lock:
            self.calls += 1
            first = self.calls == 1
            self.records_per_call.append(len(Records))
            if self.throttle_calls > 0:
                self.throttle_calls -= 1
                raise throttled_error()
        if first and self.gate is not None:
            assert self.gate.wait(30), "the gate was never opened"
        fail = []
        with self._lock:
            for entry in Records:
                data = entry["Data"]
                attempts = self._seen.get(data, 0)
                self._seen[data] = attempts + 1
                fail.append(self.select(data) and attempts < self.fail_first_attempts)
            self.failed_entries += sum(fail)
        forward = [entry for entry, bad in zip(Records, fail) if not bad]
        real_results = iter(self._real.put_records(StreamName=StreamName, Records=forward)["Records"]
                            if forward else [])
        results = [{"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded"}
                   if bad else next(real_results) for bad in fail]
        return {"FailedRecordCount": sum(fail), "Records": results}


@pytest.fixture
def ingress_env(stack, monkeypatch):
    monkeypatch.setenv("EVENTLAKE_WRITE_KEYS", f"another-key,{WRITE_KEY}")
    monkeypatch.setenv("EVENTLAKE_PUBLISH_TIMEOUT_SECONDS", "5")
    return stack


def make_app(stack, client=None, *, senders: int = 4, max_attempts: int = 5, timeout_s: float = 5.0,
             hold_s: Optional[float] = None, **env):
    """The app on the stack's stream; ``client`` replaces the Kinesis client (a wrapper of the real one).
    ``hold_s``: the publisher's own default unless given."""
    publisher = None
    if client is not None:
        held = {} if hold_s is None else {"hold_s": hold_s}
        publisher = KinesisPublisher(stack.config.stream, client_factory=lambda: client, senders=senders,
                                     max_attempts=max_attempts, timeout_s=timeout_s, backoff_base_s=0.01,
                                     backoff_cap_s=0.1, **held)
    return create_app(dict(env), publisher=publisher)


@pytest.fixture
def app(ingress_env):
    return make_app(ingress_env)


@pytest.fixture
def client(app):
    return app.test_client()

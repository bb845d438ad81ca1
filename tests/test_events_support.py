"""Helpers for the end-to-end tests of ``pipelines.events``: the events we send, the runs, the read-back.

The events are crafted so that every outcome is known in advance: known,
unknown and anonymous users; planted e-mail and IP addresses in free text,
context and user attributes; invalid events with their expected dead-letter
reason. The pipeline runs as ``python -m pipelines.events`` in a subprocess,
exactly as an operator starts it.
"""
from __future__ import annotations

import collections
import datetime as dt
import glob
import io
import json
import os
import subprocess
import sys
from typing import Optional

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from transforms.dead_letter import decode_payload

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITE_KEY = "e2e-write-key"
KEY_ID = "e2e1"
PSEUDONYMIZATION_KEYS = f"{KEY_ID}=e2e-secret-0123456789abcdef"
PLANTED_EMAILS = ("planted.runner@example.org", "coach.anna@example.org", "known.user@example.org")
PLANTED_IPS = ("198.51.100.77", "203.0.113.219")
GOAL = "endurance"
UTC = dt.timezone.utc

KNOWN_USERS = {
    f"e2e-known-{i}": {
        "user_id": f"e2e-known-{i}",
        "email": PLANTED_EMAILS[2],
        "full_name": "Planted Fullname",
        "profile": {"country": "CH", "city": "Bern", "height_cm": 170 + i},
        "subscription": {"plan": "premium", "status": "active"},
        "devices": [f"device-{i}"],
    }
    for i in range(4)
}


def _context(i: int) -> dict:
    return {"ip": f"{PLANTED_IPS[i % 2]}", "user_agent": "FitApp/5.3 (Android 15)", "locale": "de-CH",
            "app_version": "5.3.0"}


def valid_events(prefix: str) -> list[dict]:
    """Valid envelopes of four types, for known, unknown and anonymous users, with planted personal data."""
    events = []
    for i in range(24):
        who = i % 3
        identity = ({"user_id": f"e2e-known-{i % len(KNOWN_USERS)}"} if who == 0
                    else {"user_id": f"e2e-unknown-{i}"} if who == 1
                    else {"anonymous_id": f"e2e-anon-{i}"})
        kind = i % 4
        if kind == 0:
            event = {"event_type": "workout_completed", "properties": {
                "workout_id": f"w{i}", "workout_type": "running", "duration_s": 1800 + i,
                "note": f"felt strong, write to {PLANTED_EMAILS[0]}", "device_id": f"dev-{i}",
                "exercises": [{"name": f"intervals from {PLANTED_IPS[0]}", "sets": 3}]}}
        elif kind == 1:
            event = {"event_type": "training_plan_started", "properties": {
                "plan_id": f"p{i}", "goal": GOAL, "weeks": 8, "coach_email": PLANTED_EMAILS[1]}}
        elif kind == 2:
            event = {"event_type": "screen_viewed", "properties": {"screen_name": f"home {PLANTED_EMAILS[0]}"}}
        else:
            event = {"event_type": "app_opened", "properties": {"cold_start": True}}
        events.append({"event_id": f"{prefix}-ok-{i:03d}", **identity, **event, "context": _context(i)})
    return events


def invalid_events(prefix: str) -> dict[str, str]:
    """event_id -> expected reason, and the events themselves, for events the ingress accepts."""
    out = []
    for i in range(3):
        out.append(("unknown_event_type", {"event_id": f"{prefix}-bad-type-{i}", "event_type": "legacy_ping",
                                           "user_id": "e2e-known-0", "properties": {}, "context": _context(i)}))
        out.append(("schema_violation", {"event_id": f"{prefix}-bad-props-{i}", "event_type": "workout_completed",
                                         "user_id": "e2e-known-1", "properties": {"duration_s": "long"},
                                         "context": _context(i)}))
    return out


def post(client, events: list[dict]) -> dict:
    """Posts a batch through the ingress app; every event must be accepted."""
    resp = client.post("/v1/events", json={"events": events}, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["accepted"] == len(events), resp.get_json()
    return resp.get_json()


def pipeline_env(stack_env: dict) -> dict:
    return {**os.environ, **stack_env, "EVENTLAKE_PSEUDONYMIZATION_KEYS": PSEUDONYMIZATION_KEYS,
            "PYTHONPATH": PROJECT_ROOT}


class PipelineRun:
    """``python -m pipelines.events`` as a subprocess; stdout (the run summary) and stderr kept in files."""

    def __init__(self, args: list[str], *, env: dict, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.stdout_path = os.path.join(log_dir, "stdout.txt")
        self.stderr_path = os.path.join(log_dir, "stderr.txt")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.events", *args], env=env, cwd=PROJECT_ROOT,
                                     stdout=self._out, stderr=self._err, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=20)
        self._out.close()
        self._err.close()

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def summary(self) -> dict:
        """The ``{"eventlake_run": ...}`` line the pipeline prints at the end."""
        for line in reversed(self.stdout().splitlines()):
            if line.startswith('{"eventlake_run"'):
                return json.loads(line)["eventlake_run"]
        raise AssertionError("no run summary printed; stderr tail:\n" + self.stderr()[-3000:])


def run_pipeline(args: list[str], *, env: dict, log_dir: str, timeout: float = 300) -> tuple[int, PipelineRun]:
    run = PipelineRun(args, env=env, log_dir=log_dir)
    return run.wait(timeout), run


# -- reading the lake back -----------------------------------------------------------------------------

def local_parquet_files(lake: str) -> list[str]:
    return sorted(glob.glob(os.path.join(lake, "events", "**", "*.parquet"), recursive=True))


def read_local_lake(lake: str) -> list[dict]:
    """Every row with its partition columns (Hive discovery), as Python values.

    One dataset per event type: each type has its own ``properties`` struct, and a
    single dataset over ``events/`` would read every file with the first file's schema.
    """
    rows = []
    for folder in sorted(glob.glob(os.path.join(lake, "events", "event_type=*"))):
        event_type = os.path.basename(folder).split("=", 1)[1]
        dataset = ds.dataset(folder, format="parquet", partitioning="hive")
        rows += [{**row, "event_type": event_type} for row in dataset.to_table().to_pylist()]
    return rows


def read_s3_lake(s3, bucket: str, prefix: str) -> tuple[list[dict], list[bytes]]:
    """Rows (partition columns from the key) and the raw bytes of every object under ``prefix``/events/."""
    rows, blobs = [], []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/events/"):
        for obj in page.get("Contents", []):
            data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            blobs.append(data)
            assert obj["Key"].endswith(".parquet"), obj["Key"]
            parts = dict(p.split("=", 1) for p in obj["Key"][len(prefix) + 1:].split("/")[1:5])
            for row in pq.read_table(io.BytesIO(data)).to_pylist():
                rows.append({**row, **parts})
    return rows, blobs


def partition_of(row: dict) -> tuple:
    return row["event_type"], int(row["year"]), int(row["month"]), int(row["day"])


def expected_partition(row: dict) -> tuple:
    received = row["received_at"].astimezone(UTC)
    return row["event_type"], received.year, received.month, received.day


def dead_letter_reasons(records: list[dict]) -> dict[str, str]:
    """event_id -> reason of each dead letter (the payload is the original record)."""
    out = {}
    for record in records:
        out[json.loads(decode_payload(record))["event_id"]] = record["failure"]["reason"]
    return out


def assert_no_planted_personal_data(blobs: list[bytes], values: list) -> None:
    """Neither the raw bytes (Parquet pages may be compressed, so also the decoded values) hold a planted value."""
    needles = [s.encode() for s in (*PLANTED_EMAILS, *PLANTED_IPS, "Planted Fullname")]
    for blob in blobs:
        for needle in needles:
            assert needle not in blob, "a planted value is stored in the lake"
    text = json.dumps(values, default=str)
    for needle in needles:
        assert needle.decode() not in text, "a planted value survives in the decoded rows"


def check_masked_and_enriched(rows: list[dict]) -> None:
    """The masking and enrichment contract, row by row."""
    assert rows
    for row in rows:
        ip = row["context"]["ip"]
        assert ip.rsplit(".", 1)[0] in {p.rsplit(".", 1)[0] for p in PLANTED_IPS} and ip.endswith(".0"), ip
        user_id = row["user_id"]
        if user_id in KNOWN_USERS:
            seeded = KNOWN_USERS[user_id]
            assert row["user_found"] is True
            assert row["user"]["email"].startswith(f"{KEY_ID}:")
            assert row["user"]["profile"]["country"] == "CH"
            assert row["user"]["profile"]["height_cm"] == seeded["profile"]["height_cm"]
            assert row["user"]["subscription"]["plan"] == "premium"
            assert all(d.startswith(f"{KEY_ID}:") for d in row["user"]["devices"])
            assert "full_name" not in row["user"]  # x-pii: drop
        else:
            assert row["user_found"] is False
            assert row["user"] is None
        props = row["properties"]
        if row["event_type"] == "workout_completed":
            assert props["device_id"].startswith(f"{KEY_ID}:")
            assert props["note"] != "" and "@" not in props["note"]
        if row["event_type"] == "training_plan_started":
            assert props["coach_email"] is not None and "@" not in props["coach_email"]


def comparable(row: dict) -> dict:
    """The columns a stream run and a backfill of the same records must agree on (processed_at differs)."""
    keep = {k: v for k, v in row.items() if k not in ("processed_at",)}
    return json.loads(json.dumps(keep, default=str, sort_keys=True))


def counts_by(rows: list[dict], key) -> dict:
    return dict(collections.Counter(key(r) for r in rows))


def only(rows: list[dict], ids: set[str]) -> list[dict]:
    return [r for r in rows if r["event_id"] in ids]


def as_optional(value) -> Optional[str]:
    return None if value is None else str(value)

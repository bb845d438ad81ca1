"""The events pipeline with its lake and dead letters on S3 (moto): ``--output=s3://...``, ``--dead_letter=s3://...``."""
from __future__ import annotations

import json

import pytest

from ingress import create_app
from runners.profiles import PRISM
from tests.test_events_support import (
    KNOWN_USERS,
    WRITE_KEY,
    assert_no_planted_personal_data,
    check_masked_and_enriched,
    dead_letter_reasons,
    expected_partition,
    invalid_events,
    partition_of,
    pipeline_env,
    post,
    read_s3_lake,
    valid_events,
    PipelineRun,
)

pytestmark = pytest.mark.slow


def _dead_letters_on_s3(s3, bucket: str, prefix: str) -> list[dict]:
    records = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8")
        records += [json.loads(line) for line in body.splitlines() if line.strip()]
    return records


def test_lake_and_dead_letters_on_s3_read_back(stack, tmp_path):
    stack.seed_users(KNOWN_USERS.values())
    bucket = stack.config.bucket
    run = PipelineRun([
        "--mode=stream", f"--input_stream={stack.config.stream}", f"--users_table={stack.config.users_table}",
        f"--output=s3://{bucket}/lake", f"--dead_letter=s3://{bucket}/dead", "--window_seconds=2",
        "--stop_when_idle_seconds=6",
    ], env=pipeline_env(stack.env()), log_dir=str(tmp_path / "logs"))
    try:
        valid, invalid = valid_events("s3"), invalid_events("s3")
        with create_app({"EVENTLAKE_WRITE_KEYS": WRITE_KEY}).test_client() as client:
            post(client, valid + [event for _, event in invalid])
        code = run.wait(timeout=300)
    finally:
        run.stop()
    assert code == 0, run.stderr()[-3000:]
    summary = run.summary()
    assert summary["runner"] == PRISM and summary["conserved"]
    assert summary["read"] == len(valid) + len(invalid)

    s3 = stack.client("s3")
    rows, blobs = read_s3_lake(s3, bucket, "lake")
    assert sorted(r["event_id"] for r in rows) == sorted(e["event_id"] for e in valid)
    for row in rows:
        assert partition_of(row) == expected_partition(row)
    check_masked_and_enriched(rows)
    assert_no_planted_personal_data(blobs, rows)

    dead = _dead_letters_on_s3(s3, bucket, "dead")
    assert dead_letter_reasons(dead) == {e["event_id"]: reason for reason, e in invalid}
    leftovers = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
                 if not o["Key"].startswith(("lake/events/", "dead/"))]
    assert leftovers == []  # no staging or probe objects left in the bucket

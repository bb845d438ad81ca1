"""Preflight: ``python -m pipelines.events`` refuses to start, with exit code 2 and one sentence, when a resource is missing."""
from __future__ import annotations

import os
import stat

import pytest

from tests.test_events_support import pipeline_env, run_pipeline


def _args(stack, tmp_path, **override) -> list[str]:
    values = {
        "input_stream": stack.config.stream,
        "users_table": stack.config.users_table,
        "output": str(tmp_path / "lake"),
        "dead_letter": stack.queue_url,
    }
    values.update(override)
    return ["--mode=stream", "--stop_when_idle_seconds=1", *(f"--{k}={v}" for k, v in values.items())]


def _refused(stack, tmp_path, **override) -> str:
    code, run = run_pipeline(_args(stack, tmp_path, **override), env=pipeline_env(stack.env()),
                             log_dir=str(tmp_path / "logs"), timeout=120)
    assert code == 2, run.stderr()[-2000:]
    errors = [line for line in run.stderr().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr()[-2000:]
    assert "Traceback" not in run.stderr()
    assert "Prism" not in run.stderr() and "Really starting service" not in run.stderr()  # no pipeline started
    return errors[0]


def test_a_missing_stream_is_named(stack, tmp_path):
    message = _refused(stack, tmp_path, input_stream="no-such-stream")
    assert "Kinesis stream 'no-such-stream'" in message


def test_a_missing_users_table_is_named(stack, tmp_path):
    message = _refused(stack, tmp_path, users_table="no-such-table")
    assert "DynamoDB users table 'no-such-table'" in message


def test_a_missing_dead_letter_queue_is_named(stack, tmp_path):
    url = stack.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    message = _refused(stack, tmp_path, dead_letter=url)
    assert "dead-letter queue" in message and "no-such-queue" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_an_unwritable_local_output_is_named(stack, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    message = _refused(stack, tmp_path, output=str(locked / "lake"))
    assert "lake output" in message and "not writable" in message


def test_an_output_under_a_file_is_named(stack, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = _refused(stack, tmp_path, output=str(blocker / "lake"))
    assert "lake output" in message and "not writable" in message


def test_a_missing_output_bucket_is_named(stack, tmp_path):
    message = _refused(stack, tmp_path, output="s3://no-such-bucket-e2e/lake")
    assert "lake output 's3://no-such-bucket-e2e/lake' is not writable" in message


def test_a_missing_dead_letter_bucket_is_named(stack, tmp_path):
    message = _refused(stack, tmp_path, dead_letter="s3://no-such-bucket-e2e/dead")
    assert "dead-letter output" in message


def test_a_missing_option_is_named(stack, tmp_path):
    args = [a for a in _args(stack, tmp_path) if not a.startswith("--output=")]
    code, run = run_pipeline(args, env=pipeline_env(stack.env()), log_dir=str(tmp_path / "logs"), timeout=120)
    assert code == 2
    assert "--output" in run.stderr()

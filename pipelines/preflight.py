"""Checks that the resources a pipeline needs exist before any work starts.

Each failed check is one sentence naming the resource, so an operator knows
what to create or fix; nothing else is printed (no credentials, no payloads).
"""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from transforms.dead_letter_sinks import is_queue_uri, resolve_queue


class PreflightError(RuntimeError):
    """A resource the pipeline needs is missing or unusable."""


def _aws(service: str):
    return boto3.client(service)


def check_stream(name: str) -> None:
    try:
        status = _aws("kinesis").describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"]
    except (ClientError, BotoCoreError) as exc:
        raise PreflightError(f"The Kinesis stream {name!r} cannot be read ({type(exc).__name__}).") from None
    if status not in ("ACTIVE", "UPDATING"):
        raise PreflightError(f"The Kinesis stream {name!r} is {status}, not ACTIVE.")


def check_table(name: str) -> None:
    try:
        _aws("dynamodb").describe_table(TableName=name)
    except (ClientError, BotoCoreError) as exc:
        raise PreflightError(f"The DynamoDB users table {name!r} cannot be read ({type(exc).__name__}).") from None


def check_queue(url: str) -> None:
    try:
        sqs = _aws("sqs")
        sqs.get_queue_attributes(QueueUrl=resolve_queue(sqs, url), AttributeNames=["QueueArn"])
    except (ClientError, BotoCoreError) as exc:
        raise PreflightError(f"The dead-letter queue {url!r} cannot be used ({type(exc).__name__}).") from None


def check_writable(uri: str, what: str, *, moves: bool = False) -> None:
    """A probe object is written and removed under ``uri`` (local path or s3://).

    ``moves``: also copied and listed, as a backfill's commit step moves its staged files (S3: GetObject on the
    copy's source, ListBucket for the staging folder's removal).
    """
    parsed = urlparse(uri)
    probe = f".eventlake-preflight-{uuid.uuid4().hex}"
    if parsed.scheme == "s3":
        s3 = _aws("s3")
        key = "/".join(p for p in (parsed.path.strip("/"), probe) if p)
        try:
            s3.put_object(Bucket=parsed.netloc, Key=key, Body=b"")
            try:
                if moves:
                    s3.copy_object(Bucket=parsed.netloc, Key=key + ".moved", CopySource={"Bucket": parsed.netloc,
                                                                                       "Key": key})
                    s3.delete_object(Bucket=parsed.netloc, Key=key + ".moved")
                    s3.list_objects_v2(Bucket=parsed.netloc, Prefix=key, MaxKeys=1)
            finally:
                s3.delete_object(Bucket=parsed.netloc, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise PreflightError(f"The {what} {uri!r} is not writable ({type(exc).__name__}).") from None
        return
    if parsed.scheme not in ("", "file"):
        raise PreflightError(f"The {what} {uri!r} is neither a local path nor an s3:// URI.")
    path = parsed.path if parsed.scheme == "file" else uri
    try:
        os.makedirs(path, exist_ok=True)
        probe_path = os.path.join(path, probe)
        with open(probe_path, "wb"):
            pass
        os.remove(probe_path)
    except OSError as exc:
        raise PreflightError(f"The {what} {uri!r} is not writable ({exc.strerror}).") from None


def check_schema_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise PreflightError(f"The schema directory {path!r} does not exist.")


def check_events_pipeline(opts) -> None:
    """All checks of ``pipelines.events``; raises :class:`PreflightError`."""
    check_schema_dir(opts.schema_dir)
    if opts.mode == "stream":
        check_stream(opts.input_stream)
    if opts.users_table:
        check_table(opts.users_table)
    check_writable(opts.output, "lake output", moves=opts.mode == "backfill")
    if is_queue_uri(opts.dead_letter):
        check_queue(opts.dead_letter)
    else:
        check_writable(opts.dead_letter, "dead-letter output")

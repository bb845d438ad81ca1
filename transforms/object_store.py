"""Whole-object writes to a local path or an ``s3://`` URI, for the sinks.

The lake and the dead-letter files must never show a partial file under its
final name: a local file is staged elsewhere and renamed into place (one
``os.replace``), an S3 object is one PUT (or one completed multipart upload),
which S3 makes visible only when complete.

The S3 client is made lazily on the worker (never pickled), from the
process's shared session (:mod:`transforms.aws`), so the standard ``AWS_*``
variables, ``AWS_ENDPOINT_URL`` included, choose the account and endpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import NamedTuple, Optional

from botocore.exceptions import ClientError

from transforms import aws


class Location(NamedTuple):
    """A parsed URI: ``scheme`` is ``"s3"`` (with ``bucket`` and ``key``) or ``"file"`` (``key`` is the path)."""

    scheme: str
    bucket: str
    key: str


def parse_uri(uri: str) -> Location:
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"not a path or s3:// URI: {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return Location("s3", bucket, key.strip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme (a local path or s3:// expected): {uri!r}")
    return Location("file", "", os.path.abspath(uri))


def join(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/`` (local paths and S3 keys alike)."""
    text = base.rstrip("/")
    for part in parts:
        text += "/" + part.strip("/")
    return text


def s3_client(service: str = "s3"):
    """A boto3 client with standard retries from the process's shared session (:mod:`transforms.aws`); endpoint and
    credentials from the environment."""
    from botocore.config import Config

    return aws.client(service, config=Config(retries={"mode": "standard", "max_attempts": 8}))


class ObjectStore:
    """Puts whole objects; see the module docstring.

    ``staging_directory`` is a local directory for files being written (for
    local targets it should be on the same filesystem as the target, so the
    final move is a rename).
    """

    def __init__(self, staging_directory: Optional[str] = None, *, client=None):
        self.staging_directory = staging_directory or tempfile.gettempdir()
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def staging_file(self, suffix: str = "") -> str:
        """A new local path to write a file to before :meth:`put_file` publishes it."""
        os.makedirs(self.staging_directory, exist_ok=True)
        return os.path.join(self.staging_directory, f"{uuid.uuid4().hex}{suffix}")

    def put_file(self, local_path: str, uri: str) -> None:
        """Publishes a finished local file at ``uri`` (moved or uploaded, then removed)."""
        where = parse_uri(uri)
        if where.scheme == "s3":
            try:
                self.client.upload_file(local_path, where.bucket, where.key)
            finally:
                os.remove(local_path)
            return
        os.makedirs(os.path.dirname(where.key), exist_ok=True)
        try:
            os.replace(local_path, where.key)
        except OSError:  # another filesystem: copy next to the target (hidden name), then rename
            hidden = os.path.join(os.path.dirname(where.key), f".{uuid.uuid4().hex}.tmp")
            shutil.copyfile(local_path, hidden)
            os.replace(hidden, where.key)
            os.remove(local_path)

    def move(self, source: str, uri: str) -> None:
        """Moves a published-elsewhere object to ``uri`` (same scheme): a rename locally, copy and delete on S3.

        Idempotent: when ``source`` is gone and ``uri`` exists, an earlier attempt already moved it.
        """
        where, origin = parse_uri(uri), parse_uri(source)
        if where.scheme != origin.scheme:
            raise ValueError(f"cannot move between {origin.scheme} and {where.scheme}")
        if where.scheme == "file":
            if not os.path.exists(origin.key) and os.path.exists(where.key):
                return
            self.put_file(origin.key, uri)
            return
        try:
            self.client.copy({"Bucket": origin.bucket, "Key": origin.key}, where.bucket, where.key)
        except ClientError as exc:
            if _status(exc) != 404 or not self.exists(uri):
                raise
            return
        self.client.delete_object(Bucket=origin.bucket, Key=origin.key)

    def exists(self, uri: str) -> bool:
        where = parse_uri(uri)
        if where.scheme == "file":
            return os.path.exists(where.key)
        try:
            self.client.head_object(Bucket=where.bucket, Key=where.key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def delete_tree(self, uri: str) -> int:
        """Removes a folder (locally) or every object under a prefix (S3); returns how many files could not be
        removed (nothing there is no error)."""
        where = parse_uri(uri)
        if where.scheme == "file":
            shutil.rmtree(where.key, ignore_errors=True)
            return sum(len(files) for _, _, files in os.walk(where.key))
        prefix = where.key.rstrip("/") + "/"
        left = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]  # at most 1,000: one call
            if keys:
                answer = self.client.delete_objects(Bucket=where.bucket, Delete={"Objects": keys, "Quiet": True})
                left += len(answer.get("Errors", []))
        return left

    def put_bytes(self, data: bytes, uri: str) -> None:
        where = parse_uri(uri)
        if where.scheme == "s3":
            self.client.put_object(Bucket=where.bucket, Key=where.key, Body=data)
            return
        staged = os.path.join(os.path.dirname(where.key), f".{uuid.uuid4().hex}.tmp")
        os.makedirs(os.path.dirname(where.key), exist_ok=True)
        with open(staged, "wb") as handle:
            handle.write(data)
        os.replace(staged, where.key)

    def get_bytes(self, uri: str) -> bytes:
        where = parse_uri(uri)
        if where.scheme == "s3":
            return self.client.get_object(Bucket=where.bucket, Key=where.key)["Body"].read()
        with open(where.key, "rb") as handle:
            return handle.read()


def _status(exc: "ClientError") -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0

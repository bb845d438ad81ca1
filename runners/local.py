"""The embedded local stack: AWS emulated on loopback by a moto server process.

Starts ``moto.server`` (through ``runners.moto_server``, which makes its Kinesis shards safe for
concurrent writers) as a separate process on a free 127.0.0.1 port, creates the
Kinesis stream, the DynamoDB users table, the SQS dead-letter queue and the S3
bucket, optionally seeds users, and stops cleanly. Tests use it through fixtures
(``tests/conftest.py``); people use it as a command::

    python -m runners.local up [--shards 2] [--users users.jsonl]

which prints the settings to export and keeps the stack up until Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal
from typing import Iterable, Iterator, Optional
from urllib.request import urlopen

import boto3


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the thing polled is not up yet
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class MotoServer:
    """A moto server in its own process (its own GIL), on loopback."""

    def __init__(self, port: Optional[int] = None, *, log_path: Optional[str] = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        """The server's command line (a subclass may start a patched moto the same way)."""
        return [sys.executable, "-m", "runners.moto_server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self, timeout: float = 60.0) -> "MotoServer":
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

        def up():
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._proc.returncode}")
            with urlopen(self.endpoint + "/moto-api/", timeout=2) as resp:
                return resp.status == 200

        try:
            wait_until(up, timeout=timeout, what="moto server")
        except Exception:
            self.stop()
            raise
        return self

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        urlopen(self.endpoint + "/moto-api/reset", data=b"", timeout=10).close()

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None


@dataclasses.dataclass
class StackConfig:
    stream: str = "eventlake-events"
    shards: int = 2
    users_table: str = "eventlake-users"
    dead_letter_queue: str = "eventlake-dead-letters"
    bucket: str = "eventlake-lake"
    region: str = "us-east-1"


class LocalStack:
    """Provisioned AWS resources on a moto server; see the module docstring."""

    def __init__(self, config: Optional[StackConfig] = None, *, server: Optional[MotoServer] = None):
        self.config = config or StackConfig()
        self.server = server or MotoServer()
        self._owns_server = server is None
        self.queue_url: Optional[str] = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "LocalStack":
        if self._owns_server:
            self.server.start()
        self.provision()
        return self

    def stop(self) -> None:
        if self._owns_server:
            self.server.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- settings ----------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def env(self) -> dict[str, str]:
        """Environment for boto3 clients, the ingress and the pipelines."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.config.region,
            "AWS_REGION": self.config.region,
            "EVENTLAKE_STREAM": self.config.stream,
            "EVENTLAKE_USERS_TABLE": self.config.users_table,
            "EVENTLAKE_DEAD_LETTER_QUEUE_URL": self.queue_url or "",
            "EVENTLAKE_BUCKET": self.config.bucket,
        }

    def client(self, service: str):
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.config.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def resource(self, service: str):
        return boto3.resource(
            service,
            endpoint_url=self.endpoint,
            region_name=self.config.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    # -- resources ---------------------------------------------------------
    def provision(self) -> None:
        """Create the stream, table, queue and bucket (idempotent)."""
        cfg = self.config
        kinesis = self.client("kinesis")
        try:
            kinesis.describe_stream_summary(StreamName=cfg.stream)
        except kinesis.exceptions.ResourceNotFoundException:
            kinesis.create_stream(StreamName=cfg.stream, ShardCount=cfg.shards)
        wait_until(
            lambda: kinesis.describe_stream_summary(StreamName=cfg.stream)["StreamDescriptionSummary"][
                "StreamStatus"
            ]
            == "ACTIVE",
            timeout=30,
            what="the Kinesis stream",
        )
        dynamodb = self.client("dynamodb")
        try:
            dynamodb.describe_table(TableName=cfg.users_table)
        except dynamodb.exceptions.ResourceNotFoundException:
            dynamodb.create_table(
                TableName=cfg.users_table,
                KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
        self.queue_url = self.client("sqs").create_queue(QueueName=cfg.dead_letter_queue)["QueueUrl"]
        s3 = self.client("s3")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=cfg.bucket)

    def seed_users(self, users: Iterable[dict]) -> int:
        """Put user items (each with ``user_id``) into the users table."""
        table = self.resource("dynamodb").Table(self.config.users_table)
        count = 0
        with table.batch_writer() as batch:
            for user in users:
                batch.put_item(Item=_to_dynamodb(user))
                count += 1
        return count


def _to_dynamodb(value):
    """JSON values as boto3's DynamoDB resource wants them (floats as Decimal)."""
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {k: _to_dynamodb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dynamodb(v) for v in value]
    return value


def read_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.local", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack and print its settings")
    up.add_argument("--port", type=int, default=None, help="moto server port (default: a free one)")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--users", help="JSON Lines file of user items to seed")
    args = parser.parse_args(argv)

    stack = LocalStack(StackConfig(shards=args.shards), server=None)
    if args.port:
        stack.server = MotoServer(args.port)
    stack.start()
    try:
        if args.users:
            print(f"# seeded {stack.seed_users(read_jsonl(args.users))} users", flush=True)
        for key, value in stack.env().items():
            print(f"export {key}={value}", flush=True)
        print("# local stack up; Ctrl-C stops it", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

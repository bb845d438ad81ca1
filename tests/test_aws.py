"""The workers' AWS clients come from one boto3 session per process (transforms.aws)."""
from __future__ import annotations

import concurrent.futures
import contextlib

import pytest

from transforms import aws
from transforms.dead_letter_sinks import sqs_client_for
from transforms.dynamodb_users import DynamoDBUserLookup
from transforms.kinesis import default_kinesis_client
from transforms.object_store import s3_client

UNREACHABLE = "http://127.0.0.1:9"  # nothing is called: building a client makes no request


def test_every_client_a_worker_builds_shares_one_session(monkeypatch):
    """A session loads botocore's models anew (~9 MB); on Prism a Kinesis reader and its client are rebuilt whenever
    a read resumes on another DoFn instance, and a session per client grew the stream's worker by ~1 GB in three
    minutes. Every service's client must come from the one session, whoever builds it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", UNREACHABLE)
    lookup = DynamoDBUserLookup("users", user_schema={"type": "object", "properties": {}}, endpoint_url=UNREACHABLE,
                                region_name="eu-west-1")
    lookup.setup()
    try:
        clients = [default_kinesis_client(UNREACHABLE, "us-east-1"), default_kinesis_client(UNREACHABLE, "eu-west-1"),
                   s3_client(), sqs_client_for("sqs://dead-letters"), lookup._client]
        assert len({id(client) for client in clients}) == len(clients)
        assert all(client._loader is clients[0]._loader for client in clients)  # the models are loaded once
        assert [client.meta.service_model.service_name for client in clients] == [
            "kinesis", "kinesis", "s3", "sqs", "dynamodb"]
        assert clients[1].meta.region_name == "eu-west-1"
    finally:
        lookup.teardown()


def test_clients_built_on_many_threads_at_once_are_all_usable():
    """DoFn setups run on several SDK-harness threads; building clients on one session is not thread-safe alone."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        clients = list(pool.map(lambda n: aws.client("dynamodb", endpoint_url=UNREACHABLE, region_name="us-east-1"),
                                range(32)))
    assert all(client._loader is clients[0]._loader for client in clients)
    assert all(client.meta.endpoint_url == UNREACHABLE for client in clients)


def test_response_timestamps_are_utc_datetimes_whatever_their_form():
    import datetime as dt

    utc = dt.timezone.utc
    assert aws.epoch_timestamp(1_790_000_000.123) == dt.datetime(2026, 9, 21, 14, 13, 20, 123000, tzinfo=utc)
    assert aws.epoch_timestamp(1_790_000_000) == dt.datetime(2026, 9, 21, 14, 13, 20, tzinfo=utc)
    assert aws.epoch_timestamp("2026-09-21T14:13:20.5Z") == dt.datetime(2026, 9, 21, 14, 13, 20, 500000, tzinfo=utc)
    assert aws.epoch_timestamp(1_790_000_000.5).utcoffset() == dt.timedelta(0)


def test_the_default_kinesis_client_is_one_per_endpoint_and_region(monkeypatch):
    """Every Kinesis reader gets the default client, and a reader is rebuilt whenever a read resumes on another DoFn instance (15-25 % of resumes on Prism);
    a client per reader cost ~35 ms of CPU and ~1,000 objects in reference cycles each time. The process keeps one
    client per endpoint and region, and builds no other."""
    import botocore.client

    built = []
    create = botocore.client.ClientCreator.create_client
    monkeypatch.setattr(botocore.client.ClientCreator, "create_client",
                        lambda self, *a, **kw: built.append(a[0] if a else kw.get("service_name")) or create(
                            self, *a, **kw))
    here = [default_kinesis_client("http://127.0.0.1:9", "us-east-1") for _ in range(20)]
    elsewhere = default_kinesis_client("http://127.0.0.1:9", "eu-west-1")
    assert len({id(client) for client in here}) == 1
    assert elsewhere is not here[0] and elsewhere.meta.region_name == "eu-west-1"
    assert len(built) <= 2  # none at all if an earlier test in this process built these two already


def test_clients_shared_on_many_threads_at_once_are_one_client():
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        clients = list(pool.map(lambda n: aws.shared_client("dynamodb", endpoint_url=UNREACHABLE,
                                                              region_name="ap-south-1", read_timeout=7), range(32)))
    assert len({id(client) for client in clients}) == 1


def test_shared_client_settings_must_be_plain_values():
    """The settings are the client's identity: an object (whose text may be its address) is refused."""
    with pytest.raises(TypeError):
        aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1", proxies=object())


def test_shared_clients_differ_by_their_settings():
    short = aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1", read_timeout=5)
    long = aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1", read_timeout=30)
    assert short is not long
    assert short is aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1", read_timeout=5)
    assert (short.meta.config.read_timeout, long.meta.config.read_timeout) == (5, 30)


def test_a_forked_child_builds_its_own_clients():
    """A client's connections belong to the process that opened them."""
    import os
    import select
    import signal
    import traceback

    parent = aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answers "own" when its client is its own, else what went wrong
        try:
            child = aws.shared_client("sqs", endpoint_url=UNREACHABLE, region_name="us-east-1")
            os.write(write, b"own" if child is not parent else b"parent's")
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(write, traceback.format_exc().encode()[-2000:])
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 60)
        assert ready, "the forked child did not answer within 60 s"
        assert os.read(read, 4096) == b"own"
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

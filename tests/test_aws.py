"""The workers' AWS clients come from one boto3 session per process (transforms.aws)."""
from __future__ import annotations

import concurrent.futures

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

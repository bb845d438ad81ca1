"""The local stack's moto launcher answers Kinesis reads exactly as moto does, in time that does not grow with
the shard (``runners.moto_server.fast_shards``)."""
from __future__ import annotations

import base64
import contextlib
import itertools
import os

import pytest
from moto.kinesis import models

from runners.moto_server import fast_shards

fast_shards()


def _shard(count: int) -> models.Shard:
    shard = models.Shard(0, starting_hash=0, ending_hash=2**128 - 1)
    for n in range(count):
        shard.put_record(f"key-{n % 7}", base64.b64encode(f"record {n}".encode()).decode(), None)
    return shard


def _expected(shard: models.Shard, after: int, limit):
    """moto's own answer: its scan of the shard from the first record, kept aside by ``fast_shards``."""
    return models.Shard._eventlake_moto_get_records(shard, str(after), limit)


def test_puts_number_records_one_after_another_from_one():
    shard = _shard(120)
    assert list(shard.records) == list(range(1, 121))
    assert shard.get_min_sequence_number() == 1 and shard.get_max_sequence_number() == 120
    empty = _shard(0)
    assert empty.get_min_sequence_number() == empty.get_max_sequence_number() == 0


@pytest.mark.parametrize("after, limit", itertools.product([-1, 0, 1, 37, 119, 120, 500], [None, 0, 1, 7, 1000]))
def test_get_records_answers_like_a_scan_of_the_shard(after, limit):
    shard = _shard(120)
    assert shard.get_records(str(after), limit) == _expected(shard, after, limit)


def test_reading_in_pages_returns_every_record_once_in_order():
    shard = _shard(1000)
    seen, position = [], "0"
    for _ in range(100):  # bounded: 1000 records in pages of 300 take 4 reads
        records, last, _ = shard.get_records(position, 300)
        if not records:
            break
        seen.extend(r.sequence_number for r in records)
        position = str(last)
    assert seen == list(range(1, 1001))


def test_a_shard_whose_numbers_have_gaps_is_still_answered_right():
    """moto itself numbers records without gaps; should a shard have them anyway, it is read by moto's scan."""
    shard = _shard(30)
    for number in (3, 4, 17):
        del shard.records[number]
    for after, limit in itertools.product([0, 2, 3, 16, 29, 30], [None, 1, 5]):
        assert shard.get_records(str(after), limit) == _expected(shard, after, limit)
    assert shard.get_max_sequence_number() == 30


def test_what_outlives_an_interval_leaves_the_collectors_reach_and_garbage_cycles_are_collected_first():
    """In a child process (freezing is process-wide): 200,000 live objects are frozen after one interval, a
    garbage cycle made before it is collected, not frozen."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import gc, threading, weakref
        from runners.moto_server import steady_garbage_collection

        class Node:
            pass

        live = [Node() for _ in range(200_000)]
        cycle = Node(); cycle.me = cycle
        dead = weakref.ref(cycle); del cycle
        gc.disable()  # only the freezer's own collections
        assert gc.get_freeze_count() < 200_000
        stop = threading.Event()
        thread = steady_garbage_collection(0.2, stop)
        for _ in range(300):
            if gc.get_freeze_count() >= 200_000:
                break
            stop.wait(0.05)
        stop.set(); thread.join(5)
        print(gc.get_freeze_count() >= 200_000, dead() is None, len(live))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True", "200000"]


def test_the_interval_must_be_positive():
    from runners.moto_server import steady_garbage_collection

    with pytest.raises(ValueError):
        steady_garbage_collection(0)


def test_the_server_finds_each_hosts_backend_once_and_answers_as_moto_does():
    from moto import backends
    from moto.moto_server import werkzeug_app

    from runners.moto_server import route_by_remembered_host

    dispatcher = werkzeug_app.DomainDispatcherApplication
    hosts = ["kinesis.us-east-1.amazonaws.com", "dynamodb.eu-west-1.amazonaws.com", "sqs.us-east-1.amazonaws.com",
             "s3", "moto_api", None, "nothing.example.org"]
    expected = [dispatcher(werkzeug_app.create_backend_app).get_backend_for_host(host) for host in hosts]
    assert expected[0] == "kinesis" and expected[1] == "dynamodb" and expected[-1] is None

    original = dispatcher.get_backend_for_host
    listed = backends.list_of_moto_modules
    listings = []
    route_by_remembered_host()
    route_by_remembered_host()  # once only: the second call does not wrap the wrapper
    backends.list_of_moto_modules = lambda: (listings.append(1), listed())[1]
    try:
        app = dispatcher(werkzeug_app.create_backend_app)
        found = [[app.get_backend_for_host(host) for host in hosts] for _ in range(3)]
    finally:
        backends.list_of_moto_modules = listed
        dispatcher.get_backend_for_host = original
        dispatcher._eventlake_remembered = False
    assert found == [expected] * 3
    # only the first round looked: every host but moto_api and None lists moto's folders, once
    assert len(listings) == len([host for host in hosts if host not in (None, "moto_api")])


def _without_endpoints(monkeypatch) -> None:
    """Clients of this test go to moto in this process, not to a server another test left in the environment."""
    for name in [name for name in os.environ if name.startswith("AWS_ENDPOINT_URL")]:
        monkeypatch.delenv(name)


@contextlib.contextmanager
def _kinesis_answers(direct: bool):
    """moto's Kinesis answers written directly (``direct_kinesis_answers``) or by moto's own serializer; moto's own
    again afterwards, as this process had them before."""
    from moto.kinesis import responses

    from runners.moto_server import direct_kinesis_answers

    answer = responses.KinesisResponse
    direct_kinesis_answers()
    moto_own = (answer._eventlake_moto_get_records, answer._eventlake_moto_put_records)
    direct_own = (answer.get_records, answer.put_records)
    answer.get_records, answer.put_records = direct_own if direct else moto_own
    try:
        yield
    finally:
        answer.get_records, answer.put_records = moto_own
        answer._eventlake_direct = False


def _put_and_read(direct_put: bool, monkeypatch) -> tuple:
    """PutRecords, then every page of GetRecords read twice from the same iterator (moto's own writing, then the
    direct one), on moto in this process, as a boto3 client reads them."""
    import boto3
    from moto import mock_aws

    _without_endpoints(monkeypatch)
    with mock_aws():
        client = boto3.client("kinesis", region_name="eu-west-1")
        client.create_stream(StreamName="answers", ShardCount=2)
        records = [{"Data": f"record {n} é".encode() + bytes([n % 256]), "PartitionKey": f"key-{n % 13}"}
                   for n in range(300)]
        with _kinesis_answers(direct_put):
            put = client.put_records(StreamName="answers", Records=records)
            with pytest.raises(client.exceptions.ResourceNotFoundException):
                client.put_records(StreamName="missing", Records=records[:1])
        pages = []
        for shard in client.list_shards(StreamName="answers")["Shards"]:
            iterator = client.get_shard_iterator(StreamName="answers", ShardId=shard["ShardId"],
                                                 ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            for _ in range(5):
                both = []
                for direct in (False, True):
                    with _kinesis_answers(direct):
                        page = client.get_records(ShardIterator=iterator, Limit=70)
                    page["content-type"] = page.pop("ResponseMetadata")["HTTPHeaders"]["content-type"]
                    both.append(page)
                pages.append(both)
                iterator = both[0]["NextShardIterator"]
    put["content-type"] = put.pop("ResponseMetadata")["HTTPHeaders"]["content-type"]
    return put, pages


def test_direct_kinesis_answers_read_as_moto_own_do(monkeypatch):
    moto_put, pages = _put_and_read(False, monkeypatch)
    direct_put, _ = _put_and_read(True, monkeypatch)
    assert direct_put == moto_put and len(direct_put["Records"]) == 300
    for moto_page, direct_page in pages:
        assert direct_page == moto_page
    assert direct_put["content-type"] == moto_put["content-type"] == pages[0][0]["content-type"] != "text/html"
    read = [record for moto_page, _ in pages for record in moto_page["Records"]]
    assert len(read) == 300 and all(record["ApproximateArrivalTimestamp"].tzinfo for record in read)


@contextlib.contextmanager
def _dynamodb_answers(direct: bool):
    """moto's BatchGetItem answers written directly (``direct_dynamodb_answers``) or by moto's own serializer;
    moto's own again afterwards, as this process had them before."""
    from moto.dynamodb import responses

    from runners.moto_server import direct_dynamodb_answers

    handler = responses.DynamoHandler
    direct_dynamodb_answers()
    moto_own = handler._eventlake_moto_batch_get_item
    handler.batch_get_item = handler._eventlake_direct_batch_get_item if direct else moto_own
    try:
        yield
    finally:
        handler.batch_get_item = moto_own
        handler._eventlake_direct = False


def _batch_get(direct: bool, monkeypatch) -> list:
    """BatchGetItem answers (with and without a projection, a missing key, a missing table) on moto in this
    process, as a boto3 client reads them, written by moto's serializer or directly (``direct_dynamodb_answers``)."""
    import boto3
    from moto import mock_aws

    _without_endpoints(monkeypatch)
    with mock_aws(), _dynamodb_answers(direct):
        client = boto3.client("dynamodb", region_name="eu-west-1")
        client.create_table(TableName="users", KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"}],
                            BillingMode="PAY_PER_REQUEST")
        for n in range(30):
            client.put_item(TableName="users", Item={
                "user_id": {"S": f"user-{n}"}, "email": {"S": f"ü{n}@example.com"}, "visits": {"N": str(n * 7)},
                "avatar": {"B": bytes([n, 0, 255]) + "é".encode()}, "keys": {"BS": [b"a" + bytes([n]), b"\x00"]},
                "tags": {"SS": ["red", f"t{n}"]}, "scores": {"NS": ["1.5", str(n)]}, "vip": {"BOOL": n % 2 == 0},
                "nothing": {"NULL": True},
                "profile": {"M": {"city": {"S": "Lyon"}, "age": {"N": str(20 + n)},
                                  "devices": {"L": [{"S": "ios"}, {"M": {"os": {"S": "android"}, "v": {"N": "14"}}}]}}},
            })
        keys = [{"user_id": {"S": f"user-{n}"}} for n in (*range(0, 30, 3), 99)]
        answers = [
            client.batch_get_item(RequestItems={"users": {"Keys": keys}}),
            client.batch_get_item(RequestItems={"users": {
                "Keys": keys, "ProjectionExpression": "#u, email, #p.city, #p.devices, avatar",
                "ExpressionAttributeNames": {"#u": "user_id", "#p": "profile"}}}),
        ]
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.batch_get_item(RequestItems={"missing": {"Keys": keys[:1]}})
    for answer in answers:
        answer["content-type"] = answer.pop("ResponseMetadata")["HTTPHeaders"]["content-type"]
        answer["Responses"]["users"].sort(key=lambda item: item["user_id"]["S"])
    return answers


def _typed(value):
    """``value`` with the type of every leaf beside it: 10 and 10.0 differ."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_typed(item) for item in value]
    return type(value).__name__, value


def test_direct_dynamodb_answers_read_as_moto_own_do(monkeypatch):
    moto_own = _batch_get(False, monkeypatch)
    direct = _batch_get(True, monkeypatch)
    assert _typed(direct) == _typed(moto_own)
    whole, projected = direct
    assert len(whole["Responses"]["users"]) == 10 and whole["content-type"] == "application/x-amz-json-1.0"
    assert whole["Responses"]["users"][0]["avatar"]["B"] == bytes([0, 0, 255]) + "é".encode()
    assert set(projected["Responses"]["users"][0]) == {"user_id", "email", "profile", "avatar"}

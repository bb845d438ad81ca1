"""DynamoDBUserLookup against moto DynamoDB over the wire (the `stack` fixture).

Failures moto cannot produce (throttling, UnprocessedKeys) are forced by a thin
wrapper around the real client; everything else is the real thing.
"""
from __future__ import annotations

import json
import pathlib
import random
import threading

import pytest
from botocore.exceptions import ClientError

from runners.local import free_port
from transforms.dynamodb_users import MAX_KEYS_PER_CALL, Backoff, DynamoDBUserLookup, project

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent.parent / "schemas"
USER_SCHEMA = json.loads((SCHEMA_DIR / "_user.json").read_text())
FAST = Backoff(max_attempts=4, base_delay=0.001, max_delay=0.004)

NUMBERS_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "number"},
        "visits": {"type": "integer"},
        "ratio": {"type": ["number", "null"]},
        "flags": {"type": "array", "items": {"type": "integer"}},
        "free_form": {"type": "object"},
        "seen_at": {"type": "string", "format": "date-time"},
        "name": {"type": "string"},
    },
}


class ScriptedClient:
    """The real client, wrapped: records every BatchGetItem, fails or holds back keys on cue."""

    def __init__(self, real, *, fail_first=0, error_code="ProvisionedThroughputExceededException",
                 status=400, hold_back_first=0):
        self.real = real
        self.fail_first = fail_first
        self.error_code = error_code
        self.status = status
        self.hold_back_first = hold_back_first
        self.key_counts: list[int] = []
        self._lock = threading.Lock()

    def batch_get_item(self, RequestItems):
        ((table, request),) = RequestItems.items()
        keys = request["Keys"]
        with self._lock:
            self.key_counts.append(len(keys))
            call = len(self.key_counts)
        if call <= self.fail_first:
            raise ClientError(
                {"Error": {"Code": self.error_code, "Message": "forced"},
                 "ResponseMetadata": {"HTTPStatusCode": self.status}},
                "BatchGetItem",
            )
        if call <= self.fail_first + self.hold_back_first and len(keys) > 1:
            served, held = keys[: len(keys) // 2], keys[len(keys) // 2 :]
            response = self.real.batch_get_item(RequestItems={table: dict(request, Keys=served)})
            response["UnprocessedKeys"] = {table: dict(request, Keys=held)}
            return response
        return self.real.batch_get_item(RequestItems=RequestItems)

    def close(self):
        self.real.close()


def full_user(user_id: str) -> dict:
    return {
        "user_id": user_id,
        "email": f"{user_id}@example.com",
        "full_name": "Ada Lovelace",
        "profile": {"age_band": "25-34", "country": "GB", "city": "London", "height_cm": 171},
        "subscription": {"plan": "premium", "status": "active", "since": "2024-03-01T10:00:00+02:00"},
        "devices": {"phone-2", "phone-1"},  # a DynamoDB string set
        "preferences": {"units": "metric", "notifications": True, "weekly_goal_workouts": 4},
        "signed_up_at": "2023-12-31T23:59:59.999Z",
        "internal_note": "not declared in _user.json",
    }


def make_lookup(stack, *, wrap=None, schema=USER_SCHEMA, **kwargs) -> tuple[DynamoDBUserLookup, list]:
    holder = []

    def factory():
        client = stack.client("dynamodb")
        if wrap is not None:
            client = wrap(client)
        holder.append(client)
        return client

    kwargs.setdefault("backoff", FAST)
    return DynamoDBUserLookup(stack.config.users_table, user_schema=schema, client_factory=factory, **kwargs), holder


def test_nested_maps_lists_sets_and_dates_come_through_typed(stack):
    stack.seed_users([full_user("u1"), {"user_id": "u2", "profile": {"country": "FR"}}])
    lookup, _ = make_lookup(stack)
    with lookup:
        result = lookup.lookup(["u1", "u2"])

    assert result.users["u1"] == {
        "email": "u1@example.com",
        "full_name": "Ada Lovelace",
        "profile": {"age_band": "25-34", "country": "GB", "city": "London", "height_cm": 171},
        "subscription": {"plan": "premium", "status": "active", "since": 1709280000000},
        "devices": ["phone-1", "phone-2"],
        "preferences": {"units": "metric", "notifications": True, "weekly_goal_workouts": 4},
        "signed_up_at": 1704067199999,
    }
    assert type(result.users["u1"]["profile"]["height_cm"]) is int
    # every declared field is present, None where the item lacks it
    assert result.users["u2"] == {
        "email": None,
        "full_name": None,
        "profile": {"age_band": None, "country": "FR", "city": None, "height_cm": None},
        "subscription": None,
        "devices": None,
        "preferences": None,
        "signed_up_at": None,
    }
    assert result.missing == set() and result.unavailable == {}
    assert result.type_mismatches == 0


def test_numbers_follow_the_declared_type_and_mismatches_become_none(stack):
    stack.seed_users([{
        "user_id": "n1", "score": 7, "visits": 3.5, "ratio": 0.25, "flags": [1, 2.0, "x"],
        "free_form": {"a": {"b": 1.5, "c": [1, 2]}}, "seen_at": "yesterday", "name": 12,
    }])
    lookup, _ = make_lookup(stack, schema=NUMBERS_SCHEMA)
    with lookup:
        user = lookup.lookup(["n1"]).users["n1"]
    assert user == {
        "score": 7.0, "visits": None, "ratio": 0.25, "flags": [1, 2, None],
        "free_form": {"a": {"b": 1.5, "c": [1, 2]}}, "seen_at": None, "name": None,
    }
    assert type(user["score"]) is float and type(user["flags"][0]) is int


def test_unknown_users_are_missing_not_failures(stack):
    stack.seed_users([full_user("known")])
    lookup, _ = make_lookup(stack)
    with lookup:
        result = lookup.lookup(["known", "ghost-1", "ghost-2", "ghost-1"])
    assert set(result.users) == {"known"}
    assert result.missing == {"ghost-1", "ghost-2"}
    assert result.unavailable == {}
    assert result.calls == 1


def test_250_distinct_users_take_3_batch_calls_of_at_most_100_keys(stack):
    ids = [f"user-{i:04d}" for i in range(250)]
    stack.seed_users({"user_id": i, "profile": {"height_cm": n}} for n, i in enumerate(ids))
    lookup, clients = make_lookup(stack, wrap=ScriptedClient, max_concurrency=3)
    with lookup:
        result = lookup.lookup(ids + ids[:40])  # duplicates are looked up once
    (client,) = clients
    assert sorted(client.key_counts) == [50, 100, 100]
    assert max(client.key_counts) <= MAX_KEYS_PER_CALL
    assert result.calls == 3
    assert {k: u["profile"]["height_cm"] for k, u in result.users.items()} == {i: n for n, i in enumerate(ids)}


@pytest.mark.parametrize("code,status", [
    ("ProvisionedThroughputExceededException", 400),
    ("ThrottlingException", 400),
    ("InternalServerError", 500),
    ("ServiceUnavailable", 503),
])
def test_throttling_and_5xx_are_retried_until_all_are_enriched(stack, code, status):
    ids = [f"t-{i}" for i in range(30)]
    stack.seed_users({"user_id": i, "email": f"{i}@x.org"} for i in ids)
    delays = []
    lookup, clients = make_lookup(
        stack, wrap=lambda real: ScriptedClient(real, fail_first=2, error_code=code, status=status),
        sleep=delays.append,
    )
    with lookup:
        result = lookup.lookup(ids)
    assert set(result.users) == set(ids) and not result.unavailable
    assert clients[0].key_counts == [30, 30, 30]
    assert result.calls == 3
    throttling = code in ("ProvisionedThroughputExceededException", "ThrottlingException")
    assert result.throttles == (2 if throttling else 0)
    assert len(delays) == 2 and all(0 <= d <= FAST.max_delay for d in delays)


def test_unprocessed_keys_are_retried_until_all_are_enriched(stack):
    ids = [f"p-{i}" for i in range(80)]
    stack.seed_users({"user_id": i, "email": f"{i}@x.org"} for i in ids)
    lookup, clients = make_lookup(stack, wrap=lambda real: ScriptedClient(real, hold_back_first=3), sleep=lambda s: None)
    with lookup:
        result = lookup.lookup(ids + ["nobody"])
    assert set(result.users) == set(ids)
    assert result.missing == {"nobody"}
    assert not result.unavailable
    # each retry asks only for what was held back
    assert clients[0].key_counts == [81, 41, 21, 11]
    assert result.throttles == 3


def test_throttling_that_never_ends_leaves_keys_unavailable_after_bounded_attempts(stack):
    stack.seed_users([full_user("u1")])
    delays = []
    lookup, clients = make_lookup(
        stack, wrap=lambda real: ScriptedClient(real, fail_first=10**6), sleep=delays.append,
        backoff=Backoff(max_attempts=5, base_delay=0.01, max_delay=0.03),
    )
    with lookup:
        result = lookup.lookup(["u1", "u2"])
    assert result.unavailable == {
        "u1": (5, "ProvisionedThroughputExceededException"),
        "u2": (5, "ProvisionedThroughputExceededException"),
    }
    assert not result.users and not result.missing
    assert len(clients[0].key_counts) == 5 and result.throttles == 5
    assert len(delays) == 4
    caps = [0.01, 0.02, 0.03, 0.03]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps))


def test_an_unreachable_endpoint_is_an_outage_with_bounded_attempts(stack):
    closed = f"http://127.0.0.1:{free_port()}"
    lookup = DynamoDBUserLookup(
        stack.config.users_table, user_schema=USER_SCHEMA, endpoint_url=closed,
        backoff=Backoff(max_attempts=3, base_delay=0.001, max_delay=0.002), connect_timeout=1, read_timeout=1,
    )
    with lookup:
        result = lookup.lookup(["u1", "u2"])
    assert result.unavailable == {"u1": (3, "EndpointConnectionError"), "u2": (3, "EndpointConnectionError")}
    assert result.calls == 3


def test_a_deleted_table_is_an_outage(stack):
    stack.seed_users([full_user("u1")])
    stack.client("dynamodb").delete_table(TableName=stack.config.users_table)
    lookup, _ = make_lookup(stack, backoff=Backoff(max_attempts=2, base_delay=0.001, max_delay=0.001))
    with lookup:
        result = lookup.lookup(["u1"])
    assert result.unavailable == {"u1": (2, "ResourceNotFoundException")}


def test_a_permanent_error_is_not_retried(stack):
    lookup, clients = make_lookup(
        stack, wrap=lambda real: ScriptedClient(real, fail_first=10, error_code="AccessDeniedException"),
    )
    with lookup:
        result = lookup.lookup(["u1"])
    assert result.unavailable == {"u1": (1, "AccessDeniedException")}
    assert clients[0].key_counts == [1]


def test_only_declared_attributes_are_read(stack):
    stack.seed_users([full_user("u1")])
    requests = []

    class Recording(ScriptedClient):
        def batch_get_item(self, RequestItems):
            requests.append(RequestItems)
            return super().batch_get_item(RequestItems)

    lookup, _ = make_lookup(stack, wrap=Recording)
    with lookup:
        user = lookup.lookup(["u1"]).users["u1"]
    ((request,),) = [list(r.values()) for r in requests]
    assert set(request["ExpressionAttributeNames"].values()) == {"user_id", *USER_SCHEMA["properties"]}
    assert "internal_note" not in user and "user_id" not in user


def test_project_fills_every_declared_field():
    assert project({}, USER_SCHEMA) == {name: None for name in USER_SCHEMA["properties"]}


def test_jitter_stays_under_the_exponential_cap():
    backoff = Backoff(max_attempts=6, base_delay=0.1, max_delay=1.0)
    rng = random.Random(7)
    for attempt, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], start=1):
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # it is jittered over the range, not fixed


@pytest.mark.parametrize("kwargs,word", [
    ({"table": ""}, "table"),
    ({"user_schema": {"type": "string"}}, "user_schema"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"key_attribute": ""}, "key_attribute"),
    ({"connect_timeout": 0}, "timeouts"),
])
def test_bad_configuration_is_rejected_by_name(kwargs, word):
    args = {"table": "users", "user_schema": USER_SCHEMA, **kwargs}
    with pytest.raises(ValueError, match=word):
        DynamoDBUserLookup(args.pop("table"), **args)


@pytest.mark.parametrize("kwargs,word", [
    ({"max_attempts": 0}, "max_attempts"),
    ({"base_delay": -1}, "base_delay"),
    ({"base_delay": 2, "max_delay": 1}, "max_delay"),
])
def test_bad_backoff_is_rejected_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Backoff(**kwargs)


def test_lookup_before_setup_is_an_error_and_the_backend_pickles_without_a_client(stack):
    import pickle

    lookup = DynamoDBUserLookup(stack.config.users_table, user_schema=USER_SCHEMA)
    with pytest.raises(RuntimeError):
        lookup.lookup(["u1"])
    lookup.setup()
    try:
        clone = pickle.loads(pickle.dumps(lookup))
    finally:
        lookup.teardown()
    assert clone._client is None
    stack.seed_users([full_user("u1")])
    with clone:
        assert clone.lookup(["u1"]).users["u1"]["email"] == "u1@example.com"


def test_concurrent_calls_are_bounded_per_worker_across_lookup_instances(stack):
    ids = [f"c-{i:04d}" for i in range(1000)]
    stack.seed_users({"user_id": i} for i in ids)
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    class Gauge(ScriptedClient):
        def batch_get_item(self, RequestItems):
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            try:
                return super().batch_get_item(RequestItems)
            finally:
                with lock:
                    state["now"] -= 1

    # two DoFn instances of one worker: each has a pool of 2 threads, the worker allows 2 calls in flight
    lookups = [make_lookup(stack, wrap=Gauge, max_concurrency=2)[0] for _ in range(2)]
    results = [None, None]
    for lookup in lookups:
        lookup.setup()
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, lookups[i].lookup(ids[i::2])))
                   for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for lookup in lookups:
            lookup.teardown()
    assert sum(len(r.users) for r in results) == 1000
    assert 1 <= state["max"] <= 2

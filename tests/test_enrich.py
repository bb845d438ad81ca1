"""EnrichWithUserAttributes against moto DynamoDB over the wire.

The composite runs in TestPipeline (FnApiRunner) with assert_that; the per-worker
cache's TTLs are driven through the DoFn with a fake clock.
"""
from __future__ import annotations

import copy
import json
import logging
import threading

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PANE_INFO_UNKNOWN, WindowedValue

from runners.local import free_port
from tests.test_dynamodb_users import ScriptedClient, full_user
from transforms.dead_letter import decode_payload
from transforms.dynamodb_users import Backoff, DynamoDBUserLookup
from transforms.enrich import (
    DEAD_LETTERS, NOT_CACHED, EnrichUserAttributesFn, EnrichWithUserAttributes, UserCache, user_join,
)
from transforms.records import SourceRecord
from transforms.schemas import SchemaRegistry, default_schema_dir

USER_SCHEMA = SchemaRegistry.load(default_schema_dir()).user_schema
FAST = Backoff(max_attempts=3, base_delay=0.001, max_delay=0.002)
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def event_for(n: int, user_id, *, received_at=None) -> tuple[SourceRecord, dict]:
    event = {
        "event_type": "workout_started",
        "event_id": f"e-{n}",
        "user_id": user_id,
        "anonymous_id": None if user_id else f"anon-{n}",
        "event_time": None,
        "received_at": received_at or BASE_MS + n,
        "properties": {"n": n},
        "context": {},
    }
    envelope = {k: v for k, v in event.items() if v is not None and k not in ("received_at", "event_time")}
    record = SourceRecord(json.dumps(envelope).encode(), "events", "shardId-000000000000", str(10**6 + n), user_id or "")
    return record, event


def expected(pair, user, found):
    record, event = pair
    return record, dict(event, user=user, user_found=found)


def lookup_for(stack, **kwargs) -> DynamoDBUserLookup:
    kwargs.setdefault("backoff", FAST)
    return DynamoDBUserLookup(stack.config.users_table, user_schema=USER_SCHEMA, **kwargs)


def counters(result) -> dict[str, int]:
    query = result.metrics().query(MetricsFilter().with_namespace("eventlake"))
    return {c.key.metric.name: c.committed for c in query["counters"]}


def test_known_unknown_and_anonymous_events_are_enriched(stack):
    stack.seed_users([full_user("u1"), {"user_id": "u2", "preferences": {"units": "imperial"}}])
    u1 = {
        "email": "u1@example.com", "full_name": "Ada Lovelace",
        "profile": {"age_band": "25-34", "country": "GB", "city": "London", "height_cm": 171},
        "subscription": {"plan": "premium", "status": "active", "since": 1709280000000},
        "devices": ["phone-1", "phone-2"],
        "preferences": {"units": "metric", "notifications": True, "weekly_goal_workouts": 4},
        "signed_up_at": 1704067199999,
    }
    u2 = {name: None for name in USER_SCHEMA["properties"]}
    u2["preferences"] = {"units": "imperial", "notifications": None, "weekly_goal_workouts": None}
    inputs = [event_for(1, "u1"), event_for(2, "u2"), event_for(3, "ghost"), event_for(4, None), event_for(5, "u1")]

    p = test_pipeline.TestPipeline(runner="FnApiRunner")
    events, dead = p | beam.Create(inputs) | EnrichWithUserAttributes(lookup_for(stack))
    assert_that(events, equal_to([
        expected(inputs[0], u1, True), expected(inputs[1], u2, True), expected(inputs[2], None, False),
        expected(inputs[3], None, False), expected(inputs[4], u1, True),
    ]), label="Events")
    assert_that(dead, is_empty(), label="NoDeadLetters")
    metrics = counters(p.run())
    assert metrics["enrich.received"] == 5
    assert metrics["enrich.succeeded"] == 5
    assert metrics["enrich.dead_lettered"] == 0
    assert metrics["enrich.anonymous"] == 1
    assert metrics["enrich.users_found"] == 3 and metrics["enrich.users_unknown"] == 1
    assert metrics.get("enrich.cache_hits", 0) + metrics.get("enrich.cache_misses", 0) == 4
    assert metrics["enrich.lookup_calls"] >= 1


def test_an_unreachable_dynamodb_dead_letters_every_event_as_retryable(stack, caplog):
    caplog.set_level(logging.INFO)
    inputs = [event_for(n, f"user-{n % 7}") for n in range(40)] + [event_for(99, None)]
    closed = f"http://127.0.0.1:{free_port()}"

    p = test_pipeline.TestPipeline(runner="FnApiRunner")
    events, dead = p | beam.Create(inputs) | EnrichWithUserAttributes(
        lookup_for(stack, endpoint_url=closed, connect_timeout=1, read_timeout=1), batch_size=10)
    assert_that(events, equal_to([expected(inputs[-1], None, False)]), label="OnlyTheAnonymousEvent")

    def check(letters):
        assert len(letters) == 40
        assert sorted(decode_payload(d) for d in letters) == sorted(r.data for r, _ in inputs[:-1])
        for letter in letters:
            failure = letter["failure"]
            assert (failure["stage"], failure["reason"], failure["retryable"]) == ("enrich", "enrichment_unavailable", True)
            assert failure["attempts"] == 3
            assert "user-" not in failure["message"]
        assert {d["source"]["sequence_number"] for d in letters} == {r.sequence_number for r, _ in inputs[:-1]}

    assert_that(dead, check, label="DeadLetters")
    metrics = counters(p.run())
    assert metrics["enrich.received"] == 41
    assert metrics["enrich.dead_lettered"] == 40 and metrics["enrich.succeeded"] == 1
    assert "user-" not in caplog.text


def test_a_deleted_table_dead_letters_and_a_restored_one_enriches_the_redrive(stack):
    inputs = [event_for(n, f"user-{n}") for n in range(5)]
    stack.seed_users([full_user(f"user-{n}") for n in range(5)])
    dynamodb = stack.client("dynamodb")
    dynamodb.delete_table(TableName=stack.config.users_table)

    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        events, dead = p | beam.Create(inputs) | EnrichWithUserAttributes(lookup_for(stack))
        assert_that(events, is_empty(), label="NoEvents")
        assert_that(dead | beam.Map(lambda d: (d["failure"]["reason"], d["failure"]["attempts"], decode_payload(d))),
                    equal_to([("enrichment_unavailable", 3, r.data) for r, _ in inputs]), label="DeadLetters")

    dynamodb.create_table(  # the table is restored
        TableName=stack.config.users_table,
        KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    stack.seed_users([full_user(f"user-{n}") for n in range(5)])
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        events, dead = p | beam.Create(inputs) | EnrichWithUserAttributes(lookup_for(stack))
        assert_that(events | beam.Map(lambda pair: (pair[1]["event_id"], pair[1]["user"]["email"])),
                    equal_to([(f"e-{n}", f"user-{n}@example.com") for n in range(5)]), label="Events")
        assert_that(dead, is_empty(), label="NoDeadLetters")


class _WhereAndWhen(beam.DoFn):
    def process(self, pair, timestamp=beam.DoFn.TimestampParam, win=beam.DoFn.WindowParam):
        yield pair[1]["event_id"], int(timestamp.micros // 1000), int(win.start.micros // 1000), pair[1]["user_found"]


def test_buffered_events_keep_their_timestamp_and_window(stack):
    stack.seed_users([{"user_id": f"w-{n}"} for n in range(0, 9, 2)])
    # 9 events over three one-minute windows; batches of 2 users flush inside process() and in finish_bundle
    inputs = [event_for(n, f"w-{n}", received_at=BASE_MS + n * 25_000) for n in range(9)]
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        stamped = (
            p | beam.Create(inputs)
            | "Stamp" >> beam.Map(lambda pair: window.TimestampedValue(pair, pair[1]["received_at"] / 1000))
            | "Minute" >> beam.WindowInto(window.FixedWindows(60))
        )
        events, dead = stamped | EnrichWithUserAttributes(lookup_for(stack), batch_size=2)
        placed = events | beam.ParDo(_WhereAndWhen())
        assert_that(placed, equal_to([
            (f"e-{n}", BASE_MS + n * 25_000, BASE_MS + (n * 25_000 // 60_000) * 60_000, n % 2 == 0)
            for n in range(9)
        ]))
        assert_that(dead, is_empty(), label="NoDeadLetters")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_bundle(fn: EnrichUserAttributesFn, inputs) -> list:
    fn.start_bundle()
    out = []
    for pair in inputs:
        out.extend(fn.process(pair, Timestamp(0), window.GlobalWindow(), PANE_INFO_UNKNOWN) or [])
    out.extend(fn.finish_bundle() or [])
    return [o.value if isinstance(o, WindowedValue) else o for o in out]


def test_the_cache_serves_hits_and_expires_misses_sooner_than_hits(stack):
    stack.seed_users([full_user("known")])
    clients = []

    def factory():
        clients.append(ScriptedClient(stack.client("dynamodb")))
        return clients[-1]

    clock = FakeClock()
    fn = EnrichUserAttributesFn(
        lookup_for(stack, client_factory=factory), cache_ttl_seconds=300, miss_ttl_seconds=30,
        cache_max_entries=100, batch_size=100, max_buffered_events=1000, clock=clock,
    )
    fn.setup()
    try:
        calls = clients[0].key_counts
        first = run_bundle(fn, [event_for(1, "known"), event_for(2, "ghost"), event_for(3, "known")])
        assert [e["user_found"] for _, e in first] == [True, False, True]
        assert calls == [2]

        clock.now += 29  # both still cached
        assert [e["user_found"] for _, e in run_bundle(fn, [event_for(4, "known"), event_for(5, "ghost")])] == [True, False]
        assert calls == [2]

        stack.seed_users([full_user("ghost")])  # the user appears
        clock.now += 2  # the miss has expired (30 s), the hit has not (300 s)
        second = run_bundle(fn, [event_for(6, "known"), event_for(7, "ghost")])
        assert [e["user_found"] for _, e in second] == [True, True]
        assert calls == [2, 1]

        clock.now += 300  # everything has expired
        run_bundle(fn, [event_for(8, "known"), event_for(9, "ghost")])
        assert calls == [2, 1, 2]
    finally:
        fn.teardown()


def test_emitted_users_are_copies_that_cannot_corrupt_the_cache(stack):
    stack.seed_users([full_user("u1")])
    fn = EnrichUserAttributesFn(lookup_for(stack), cache_ttl_seconds=300, miss_ttl_seconds=30,
                                cache_max_entries=100, batch_size=100, max_buffered_events=1000, clock=FakeClock())
    fn.setup()
    try:
        (_, first), = run_bundle(fn, [event_for(1, "u1")])
        pristine = copy.deepcopy(first["user"])
        first["user"]["profile"]["city"] = "masked"
        first["user"]["devices"].clear()
        (_, again), = run_bundle(fn, [event_for(2, "u1")])
        assert again["user"] == pristine
    finally:
        fn.teardown()


def test_the_buffer_is_flushed_when_it_holds_max_buffered_events(stack):
    stack.seed_users([full_user("u1")])
    fn = EnrichUserAttributesFn(lookup_for(stack), cache_ttl_seconds=0, miss_ttl_seconds=0,
                                cache_max_entries=0, batch_size=100, max_buffered_events=3,
                                max_lookups_in_flight=0, clock=FakeClock())
    fn.setup()
    try:
        fn.start_bundle()
        emitted = [list(fn.process(event_for(n, "u1"), Timestamp(n), window.GlobalWindow(), PANE_INFO_UNKNOWN))
                   for n in range(3)]
        assert [len(e) for e in emitted] == [0, 0, 3]
        assert [wv.timestamp for wv in emitted[2]] == [Timestamp(0), Timestamp(1), Timestamp(2)]
        assert list(fn.finish_bundle()) == []
    finally:
        fn.teardown()


class GatedClient:
    """The real client, wrapped: each BatchGetItem waits until the test opens the gate."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()
        self.started = threading.Event()
        self.key_sets: list[set] = []

    def batch_get_item(self, RequestItems):
        ((_, request),) = RequestItems.items()
        self.key_sets.append({key["user_id"]["S"] for key in request["Keys"]})
        self.started.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return self.real.batch_get_item(RequestItems=RequestItems)


def test_a_lookup_under_way_does_not_stall_the_events_behind_it(stack):
    """While a batch lookup waits on DynamoDB, cached users are answered and a user already being looked up is not
    looked up twice; the end of the bundle waits for the lookup and answers every event."""
    stack.seed_users([full_user("cached"), full_user("slow-1"), full_user("slow-2")])
    clients = []

    def factory():
        clients.append(GatedClient(stack.client("dynamodb")))
        return clients[-1]

    fn = EnrichUserAttributesFn(lookup_for(stack, client_factory=factory), cache_ttl_seconds=300,
                                miss_ttl_seconds=30, cache_max_entries=100, batch_size=2, max_buffered_events=100,
                                max_lookups_in_flight=2, clock=FakeClock())
    fn.setup()
    try:
        client = clients[0]
        client.gate.set()
        assert [e["user_found"] for _, e in run_bundle(fn, [event_for(0, "cached")])] == [True]
        client.gate.clear()
        client.started.clear()
        fn.start_bundle()
        emitted = [list(fn.process(event_for(n, user), Timestamp(n), window.GlobalWindow(), PANE_INFO_UNKNOWN))
                   for n, user in enumerate(["slow-1", "slow-2"], start=1)]
        assert emitted == [[], []]
        assert client.started.wait(timeout=30)  # the batch of two users is being looked up, and blocks
        answered = [list(fn.process(event_for(n, user), Timestamp(n), window.GlobalWindow(), PANE_INFO_UNKNOWN))
                    for n, user in ((3, "cached"), (4, "slow-1"))]
        assert [[e["user_found"] for _, e in out] for out in answered] == [[True], []]
        client.gate.set()
        rest = [o.value for o in fn.finish_bundle()]
        assert sorted((e["event_id"], e["user_found"]) for _, e in rest) == [("e-1", True), ("e-2", True),
                                                                             ("e-4", True)]
        assert client.key_sets[1:] == [{"slow-1", "slow-2"}]  # slow-1's second event waited for the same lookup
    finally:
        client.gate.set()
        fn.teardown()


def test_events_waiting_for_lookups_are_bounded(stack):
    """Up to max_waiting_events events wait for lookups without stopping the caller; past it, answers() waits for
    the oldest lookup."""
    stack.seed_users([full_user("slow-1"), full_user("slow-2")])
    clients = []

    def factory():
        clients.append(GatedClient(stack.client("dynamodb")))
        return clients[-1]

    joins = {limit: user_join(lookup_for(stack, client_factory=factory), batch_size=2, max_lookups_in_flight=2,
                              max_waiting_events=limit, clock=FakeClock()) for limit in (2, 1)}
    for join in joins.values():
        join.setup()
    waiter = None
    try:
        for join in joins.values():
            assert join.join("slow-1", "first") is None and list(join.answers()) == []  # held, not yet looked up
            assert join.join("slow-2", "second") is None
        assert list(joins[2].answers()) == []  # two wait, as many as allowed: the caller goes on
        answered = []
        waiter = threading.Thread(target=lambda: answered.extend(joins[1].answers()))
        waiter.start()  # two wait, one allowed: this waits for the lookup, which waits for the gate
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and answered == []
        for client in clients:
            client.gate.set()
        waiter.join(timeout=30)
        assert sorted((item, user["email"]) for item, user, _ in answered) == [("first", "slow-1@example.com"),
                                                                              ("second", "slow-2@example.com")]
        assert sorted(item for item, _, _ in joins[2].flush()) == ["first", "second"]
    finally:
        for client in clients:
            client.gate.set()
        if waiter is not None:
            waiter.join(timeout=30)
        for join in joins.values():
            join.teardown()


def test_throttled_lookups_inside_the_dofn_end_enriched_and_are_counted(stack):
    stack.seed_users([full_user(f"t-{n}") for n in range(5)])
    fn = EnrichUserAttributesFn(
        lookup_for(stack, client_factory=lambda: ScriptedClient(stack.client("dynamodb"), fail_first=2),
                   backoff=Backoff(max_attempts=4, base_delay=0.001, max_delay=0.002)),
        cache_ttl_seconds=300, miss_ttl_seconds=30, cache_max_entries=100, batch_size=100,
        max_buffered_events=1000, clock=FakeClock(),
    )
    fn.setup()
    try:
        out = run_bundle(fn, [event_for(n, f"t-{n}") for n in range(5)])
    finally:
        fn.teardown()
    assert [e["user"]["email"] for _, e in out] == [f"t-{n}@example.com" for n in range(5)]


def test_exhausted_retries_dead_letter_with_the_number_of_tries(stack):
    fn = EnrichUserAttributesFn(
        lookup_for(stack, client_factory=lambda: ScriptedClient(stack.client("dynamodb"), fail_first=10**6,
                                                                 error_code="ThrottlingException"),
                   backoff=Backoff(max_attempts=4, base_delay=0.001, max_delay=0.002)),
        cache_ttl_seconds=300, miss_ttl_seconds=30, cache_max_entries=100, batch_size=100,
        max_buffered_events=1000, clock=FakeClock(),
    )
    fn.setup()
    try:
        fn.start_bundle()
        for n in range(3):
            assert list(fn.process(event_for(n, "secret-user"), Timestamp(n), window.GlobalWindow(),
                                   PANE_INFO_UNKNOWN)) == []
        out = list(fn.finish_bundle())
    finally:
        fn.teardown()
    assert [o.tag for o in out] == [DEAD_LETTERS] * 3
    letters = [o.value.value for o in out]
    assert [(d["failure"]["attempts"], d["failure"]["retryable"]) for d in letters] == [(4, True)] * 3
    assert "ThrottlingException" in letters[0]["failure"]["message"]
    assert all("secret-user" not in json.dumps(d["failure"]) for d in letters)


def test_user_cache_is_bounded_and_evicts_the_least_recently_used():
    cache = UserCache(ttl_seconds=10, miss_ttl_seconds=1, max_entries=2)
    cache.put("a", {"x": 1}, now=0)
    cache.put("b", None, now=0)
    assert cache.get("a", now=0.5) == {"x": 1}  # a is now the most recent
    cache.put("c", {"x": 3}, now=0.5)
    assert len(cache) == 2
    assert cache.get("b", now=0.5) is NOT_CACHED  # evicted
    assert cache.get("a", now=0.6) == {"x": 1}
    assert cache.get("c", now=9) == {"x": 3}
    assert cache.get("c", now=10.5) is NOT_CACHED  # expired


def test_user_cache_keeps_misses_for_the_shorter_ttl():
    cache = UserCache(ttl_seconds=10, miss_ttl_seconds=1, max_entries=5)
    cache.put("ghost", None, now=0)
    cache.put("known", {"x": 1}, now=0)
    assert cache.get("ghost", now=0.9) is None  # a cached miss
    assert cache.get("ghost", now=1.0) is NOT_CACHED
    assert cache.get("known", now=9.9) == {"x": 1}


def test_a_zero_ttl_disables_the_cache():
    cache = UserCache(ttl_seconds=0, miss_ttl_seconds=0, max_entries=5)
    cache.put("known", {"x": 1}, now=0)
    assert cache.get("known", now=0) is NOT_CACHED


@pytest.mark.parametrize("kwargs,word", [
    ({"cache_ttl_seconds": -1}, "cache_ttl_seconds"),
    ({"miss_ttl_seconds": 600}, "miss_ttl_seconds"),
    ({"cache_max_entries": -1}, "cache_max_entries"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_buffered_events": 0}, "max_buffered_events"),
])
def test_bad_configuration_is_rejected_by_name(kwargs, word):
    lookup = DynamoDBUserLookup("users", user_schema=USER_SCHEMA)
    with pytest.raises(ValueError, match=word):
        EnrichWithUserAttributes(lookup, **kwargs)


def test_something_that_is_not_a_lookup_is_rejected():
    with pytest.raises(ValueError, match="lookup"):
        EnrichWithUserAttributes("users-table")


def test_for_table_wires_the_dynamodb_backend(stack):
    stack.seed_users([full_user("u1")])
    inputs = [event_for(1, "u1")]
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        events, _ = p | beam.Create(inputs) | EnrichWithUserAttributes.for_table(stack.config.users_table, USER_SCHEMA)
        assert_that(events | beam.Map(lambda pair: pair[1]["user"]["profile"]["height_cm"]), equal_to([171]))


def test_the_composite_runs_on_prism_with_windows_and_dead_letters(stack):
    from runners import prism, profiles

    try:
        options = profiles.local_streaming_options(streaming=False)
    except prism.PrismUnavailable:
        pytest.skip("Prism is not built (python -m runners.prism build)")
    stack.seed_users([{"user_id": f"w-{n}", "email": f"w-{n}@x.org"} for n in range(0, 6, 2)])
    inputs = [event_for(n, f"w-{n}", received_at=BASE_MS + n * 25_000) for n in range(6)] + [event_for(6, None)]
    p = beam.Pipeline(options=options)
    stamped = (
        p | beam.Create(inputs)
        | "Stamp" >> beam.Map(lambda pair: window.TimestampedValue(pair, pair[1]["received_at"] / 1000))
        | "Minute" >> beam.WindowInto(window.FixedWindows(60))
    )
    events, dead = stamped | "Enrich" >> EnrichWithUserAttributes(lookup_for(stack), batch_size=2)
    assert_that(events | beam.ParDo(_WhereAndWhen()), equal_to([
        (f"e-{n}", BASE_MS + n * 25_000, BASE_MS + (n * 25_000 // 60_000) * 60_000, n % 2 == 0) for n in range(6)
    ] + [("e-6", BASE_MS + 6, BASE_MS, False)]))
    assert_that(dead, is_empty(), label="NoDeadLetters")
    closed = f"http://127.0.0.1:{free_port()}"
    _, outage_dead = stamped | "EnrichOutage" >> EnrichWithUserAttributes(
        lookup_for(stack, endpoint_url=closed, connect_timeout=1, read_timeout=1))
    assert_that(outage_dead | beam.Map(lambda d: (d["source"]["sequence_number"], d["failure"]["attempts"])),
                equal_to([(r.sequence_number, 3) for r, _ in inputs[:6]]), label="OutageDeadLetters")
    result = p.run()
    result.wait_until_finish()
    assert profiles.is_prism(result)

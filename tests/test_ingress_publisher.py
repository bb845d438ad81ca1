"""The Kinesis publisher under failure: partial PutRecords failures, throttling, an unreachable
endpoint, concurrent requests sharing calls, and draining on shutdown. Kinesis is the moto server;
faults are injected by a wrapper around the real client (tests.ingress_support.FaultyKinesis)."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import threading
import zlib

import pytest

from ingress import create_app, shutdown
from ingress.publisher import KinesisPublisher, PublishFailed
from runners.local import free_port, wait_until
from tests.ingress_support import (AUTH, FaultyKinesis, decoded, event, ingress_env,  # noqa: F401
                                   make_app, metric_value, read_stream)

URL = "/v1/events"


def post(client, body):
    return client.post(URL, data=json.dumps(body), headers={"Content-Type": "application/json", **AUTH})


def stream_ids(stack) -> list[str]:
    return [e["event_id"] for e in decoded(read_stream(stack.client("kinesis"), stack.config.stream))]


def test_partial_failures_are_retried_without_loss_or_duplicates(ingress_env):
    # A third of the entries fail on their first two attempts, as a partially throttled shard reports them.
    faulty = FaultyKinesis(ingress_env.client("kinesis"), fail_first_attempts=2,
                           select=lambda data: zlib.crc32(data) % 3 == 0)
    app = make_app(ingress_env, faulty)
    resp = post(app.test_client(), {"events": [event(i) for i in range(300)]})
    assert resp.status_code == 202 and resp.get_json()["accepted"] == 300
    assert faulty.failed_entries > 0
    ids = stream_ids(ingress_env)
    assert collections.Counter(ids) == collections.Counter(f"ev-{i}" for i in range(300))
    assert metric_value(app, "eventlake_ingress_kinesis_retries_total") == faulty.failed_entries
    # Only the failed entries were put again: every call after the first is no larger than the failures left.
    assert faulty.records_per_call[0] == 300 and max(faulty.records_per_call[1:]) < 300


def test_whole_call_throttling_is_retried(ingress_env):
    faulty = FaultyKinesis(ingress_env.client("kinesis"), throttle_calls=3)
    app = make_app(ingress_env, faulty)
    resp = post(app.test_client(), {"events": [event(i) for i in range(10)]})
    assert resp.status_code == 202
    assert sorted(stream_ids(ingress_env)) == sorted(f"ev-{i}" for i in range(10))
    assert faulty.calls == 4
    assert metric_value(app, "eventlake_ingress_kinesis_retries_total") == 30


def test_entries_that_keep_failing_give_503_and_nothing_counts_as_accepted(ingress_env):
    faulty = FaultyKinesis(ingress_env.client("kinesis"), fail_first_attempts=10**6,
                           select=lambda data: b'"ev-3"' in data)
    app = make_app(ingress_env, faulty, max_attempts=3)
    resp = post(app.test_client(), {"events": [event(i) for i in range(5)]})
    assert resp.status_code == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.get_json()["error"] == "kinesis_unavailable"
    assert "accepted" not in resp.get_json()
    assert metric_value(app, "eventlake_ingress_events_accepted_total") == 0
    assert metric_value(app, "eventlake_ingress_events_rejected_total", reason="kinesis_unavailable") == 5
    assert faulty.calls == 3  # bounded attempts
    assert "ev-3" not in stream_ids(ingress_env)


def test_unreachable_kinesis_gives_503_and_not_ready(ingress_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    app = create_app({"EVENTLAKE_PUBLISH_TIMEOUT_SECONDS": "1.5", "EVENTLAKE_PUBLISH_MAX_ATTEMPTS": "4"})
    client = app.test_client()
    resp = post(client, {"events": [event(i) for i in range(3)]})
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert metric_value(app, "eventlake_ingress_events_accepted_total") == 0
    assert metric_value(app, "eventlake_ingress_kinesis_put_records_calls_total", outcome="unreachable") >= 1
    assert client.get("/readyz").status_code == 503
    assert stream_ids(ingress_env) == []


def test_concurrent_requests_share_put_records_calls(ingress_env):
    gate = threading.Event()
    faulty = FaultyKinesis(ingress_env.client("kinesis"), gate=gate)
    app = make_app(ingress_env, faulty, senders=1)
    statuses = []

    def send(n):
        resp = post(app.test_client(), {"events": [event(n * 10 + i) for i in range(10)]})
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    publisher = app.extensions["eventlake"].publisher
    # The first call holds the only sender; the other seven requests queue up behind it.
    wait_until(lambda: faulty.calls == 1 and len(publisher._queue) + faulty.records_per_call[0] == 80,
               timeout=30, what="queued requests")
    gate.set()
    for thread in threads:
        thread.join(30)
    assert statuses == [202] * 8
    assert len(faulty.records_per_call) == 2 and sum(faulty.records_per_call) == 80
    assert sorted(stream_ids(ingress_env)) == sorted(f"ev-{i}" for i in range(80))


@contextlib.contextmanager
def _requests_behind_a_held_call(stack, *, requests: int, size: int):
    """An app with four senders and a long hold (60 s) whose first PutRecords call waits at a gate. Posts request 0
    (events ``0 .. size-1``), waits until its call is in flight, then posts requests 1 .. ``requests``-1 of ``size``
    events each. Yields ``(faulty, publisher, statuses)``; on the way out opens the gate and joins the requests."""
    gate = threading.Event()
    faulty = FaultyKinesis(stack.client("kinesis"), gate=gate)
    app = make_app(stack, faulty, senders=4, hold_s=60)
    statuses = []

    def send(n):
        statuses.append(post(app.test_client(), {"events": [event(n * size + i) for i in range(size)]}).status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(requests)]
    try:
        threads[0].start()
        wait_until(lambda: faulty.calls == 1, timeout=30, what="the first call")
        for thread in threads[1:]:
            thread.start()
        yield faulty, app.extensions["eventlake"].publisher, statuses
    finally:
        gate.set()
        for thread in threads:
            if thread.is_alive():  # started (a failure may come before all are) and not yet done
                thread.join(30)


def _post_in_thread(app, statuses: dict, first: int, count: int) -> threading.Thread:
    """A started thread posting events ``first .. first+count-1``; its status lands in ``statuses[first]``."""
    def send():
        statuses[first] = post(app.test_client(), {"events": [event(first + i) for i in range(count)]}).status_code

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_requests_arriving_during_a_call_leave_together_in_the_next_one(ingress_env):
    # Four senders, as by default: while one call is in flight, a request's records wait for it rather than
    # start a small call of their own, so every call carries as many records as have come in. (The hold is long
    # here: the first call is held at the gate for as long as the test needs.)
    with _requests_behind_a_held_call(ingress_env, requests=8, size=10) as (faulty, publisher, statuses):
        wait_until(lambda: faulty.calls > 1 or len(publisher._queue) == 70, timeout=30, what="queued requests")
        assert faulty.calls == 1  # three senders idle, seventy records waiting: no call of ten each
    assert statuses == [202] * 8
    assert faulty.records_per_call == [10, 70]
    assert sorted(stream_ids(ingress_env)) == sorted(f"ev-{i}" for i in range(80))


def test_a_backlog_of_a_full_call_is_sent_beside_the_call_in_flight(ingress_env):
    with _requests_behind_a_held_call(ingress_env, requests=9, size=100) as (faulty, publisher, statuses):
        # 800 records wait: a full call of 500 goes out while the first is still held; the other 300 wait for one.
        wait_until(lambda: faulty.calls == 2 and len(publisher._queue) == 300, timeout=30,
                   what="a second, full call")
        assert faulty.records_per_call == [100, 500]
    assert statuses == [202] * 9
    assert faulty.records_per_call == [100, 500, 300]
    assert len(set(stream_ids(ingress_env))) == 900


def test_a_retry_backoff_does_not_hold_back_other_requests(ingress_env, monkeypatch):
    # The first request's records fail once; while its sender backs off, the next request's records go out.
    import ingress.publisher as publisher_module

    backing_off, release = threading.Event(), threading.Event()

    def sleep(seconds):
        backing_off.set()
        assert release.wait(30), "the backoff was never released"

    monkeypatch.setattr(publisher_module, "time", type("Clock", (), {
        "monotonic": staticmethod(publisher_module.time.monotonic), "sleep": staticmethod(sleep)}))
    faulty = FaultyKinesis(ingress_env.client("kinesis"), fail_first_attempts=1,
                           select=lambda data: any(f'"ev-{i}"'.encode() in data for i in range(5)))
    app = make_app(ingress_env, faulty, senders=4, hold_s=60)
    statuses = {}
    first = _post_in_thread(app, statuses, 0, 5)  # ev-0 .. ev-4 fail once
    try:
        wait_until(backing_off.is_set, timeout=30, what="the first request's backoff")
        _post_in_thread(app, statuses, 10, 5).join(30)  # ev-10 .. ev-14
        assert statuses == {10: 202} and faulty.records_per_call == [5, 5]
    finally:
        release.set()
    first.join(30)
    assert statuses == {10: 202, 0: 202} and faulty.records_per_call == [5, 5, 5]
    assert sorted(stream_ids(ingress_env)) == sorted(f"ev-{i}" for i in (*range(5), *range(10, 15)))


def test_a_slow_call_holds_back_other_requests_only_for_the_hold(ingress_env):
    # A call that hangs (here: held at the gate until the end) keeps the next request's records back for the hold
    # only; then they go out in a call of their own, beside it.
    gate = threading.Event()
    faulty = FaultyKinesis(ingress_env.client("kinesis"), gate=gate)
    app = make_app(ingress_env, faulty, senders=4, hold_s=0.05)
    statuses = {}
    first = _post_in_thread(app, statuses, 0, 10)
    try:
        wait_until(lambda: faulty.calls == 1, timeout=30, what="the first call")
        _post_in_thread(app, statuses, 10, 10).join(30)
        assert statuses == {10: 202} and faulty.records_per_call == [10, 10]
    finally:
        gate.set()
    first.join(30)
    assert statuses == {10: 202, 0: 202}
    assert sorted(stream_ids(ingress_env)) == sorted(f"ev-{i}" for i in range(20))


def test_call_size_stays_within_kinesis_limits(ingress_env):
    faulty = FaultyKinesis(ingress_env.client("kinesis"))
    publisher = KinesisPublisher(ingress_env.config.stream, client_factory=lambda: faulty, senders=1)
    big = b"x" * 900_000
    publisher.publish([(big + str(i).encode(), f"k{i}") for i in range(7)])
    assert all(n * 900_000 <= 5 * 1024 * 1024 for n in faulty.records_per_call)
    assert sum(faulty.records_per_call) == 7 and len(faulty.records_per_call) >= 2
    with pytest.raises(ValueError):
        publisher.publish([(b"x" * (1024 * 1024), "k")])
    publisher.close(5)


def test_shutdown_drains_queued_records(ingress_env):
    gate = threading.Event()
    faulty = FaultyKinesis(ingress_env.client("kinesis"), gate=gate)
    app = make_app(ingress_env, faulty, senders=1)
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(
        post(app.test_client(), {"events": [event(n * 10 + i) for i in range(10)]}).status_code)) for n in range(3)]
    for thread in threads:
        thread.start()
    publisher = app.extensions["eventlake"].publisher
    wait_until(lambda: faulty.calls == 1 and len(publisher._queue) + faulty.records_per_call[0] == 30,
               timeout=30, what="queued requests")
    closer = threading.Thread(target=lambda: results.append(shutdown(app, timeout=30)))
    closer.start()
    gate.set()
    closer.join(30)
    for thread in threads:
        thread.join(30)
    assert sorted(results, key=str) == sorted([202, 202, 202, True], key=str)
    assert len(stream_ids(ingress_env)) == 30
    with pytest.raises(PublishFailed):
        publisher.publish([(b"{}", "k")])


def test_a_forked_child_publishes_and_drains_on_its_own(ingress_env):
    # gunicorn --preload with a started publisher: a worker is forked while the master's call is in flight. The
    # child has none of the master's sender threads; it must neither wait for their calls nor hold its records
    # behind them.
    gate, parent = threading.Event(), os.getpid()
    made = []

    def kinesis():  # each process makes its own client; only the parent's first call waits at the gate
        made.append(FaultyKinesis(ingress_env.client("kinesis"), gate=gate if os.getpid() == parent else None))
        return made[-1]

    publisher = KinesisPublisher(ingress_env.config.stream, client_factory=kinesis, senders=2, timeout_s=10,
                                 hold_s=60)
    held = threading.Thread(target=publisher.publish, args=([(b'{"event_id": "parent"}', "p")],))
    try:
        held.start()
        wait_until(lambda: made and made[0].calls == 1, timeout=30, what="the parent's call in flight")
        child = os.fork()
        if child == 0:  # the child: exits with 0 only when its record was acknowledged and it drained at once
            code = 3
            try:
                publisher.publish([(b'{"event_id": "child"}', "c")])
                code = 0 if publisher.close(timeout=5) else 2
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        ended = []

        def child_ended():
            done, status_word = os.waitpid(child, os.WNOHANG)
            if done:
                ended.append(os.waitstatus_to_exitcode(status_word))
            return bool(ended)

        try:
            wait_until(child_ended, timeout=60, interval=0.05, what="the forked child")
        except TimeoutError:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    finally:
        gate.set()
        held.join(30)
        publisher.close(5)
    assert ended == [0]
    assert sorted(stream_ids(ingress_env)) == ["child", "parent"]

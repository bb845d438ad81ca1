"""POST /v1/events against the moto Kinesis stream: every status of SPEC "HTTP ingress"."""
from __future__ import annotations

import base64
import gzip
import io
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingress import ConfigError, create_app
from ingress.api import caller_ip
from tests.ingress_support import (AUTH, WRITE_KEY, app, client, decoded, event, ingress_env,  # noqa: F401
                                   make_app, metric_value, read_stream)
from transforms.envelope import parse_rfc3339_ms

URL = "/v1/events"


def post(client, body, headers=None, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(URL, data=data, headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
                       **kwargs)


def test_batch_is_accepted_and_read_back_exactly_once_with_stamps(app, client, ingress_env):
    events = [event(i) for i in range(20)] + [event(99, event_id=None, anonymous_id="anon-1", user_id=None)]
    events[-1] = {k: v for k, v in events[-1].items() if v is not None}
    resp = post(client, {"events": events})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json() == {"accepted": 21, "rejected": []}

    records = read_stream(ingress_env.client("kinesis"), ingress_env.config.stream)
    got = decoded(records)
    assert len(got) == 21
    ids = [e["event_id"] for e in got]
    assert len(set(ids)) == 21
    assert {f"ev-{i}" for i in range(20)} <= set(ids)
    assigned = (set(ids) - {f"ev-{i}" for i in range(20)}).pop()
    assert uuid.UUID(assigned)
    for record, env in zip(records, got):
        assert parse_rfc3339_ms(env["received_at"]) is not None and env["received_at"].endswith("Z")
        assert env["context"]["ip"] == "127.0.0.1"
        assert record["PartitionKey"] == (env.get("user_id") or env["anonymous_id"])
    assert metric_value(app, "eventlake_ingress_events_accepted_total") == 21


def test_single_event_object_and_client_ip_kept(client, ingress_env):
    resp = post(client, event(1, context={"ip": "192.0.2.44", "locale": "fr-FR"}))
    assert resp.status_code == 202
    (got,) = decoded(read_stream(ingress_env.client("kinesis"), ingress_env.config.stream))
    assert got["context"] == {"ip": "192.0.2.44", "locale": "fr-FR"}


def test_trusted_proxies_pick_the_forwarded_address(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_TRUSTED_PROXIES="1").test_client()
    resp = post(client, event(1), headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    assert resp.status_code == 202
    (got,) = decoded(read_stream(ingress_env.client("kinesis"), ingress_env.config.stream))
    assert got["context"]["ip"] == "198.51.100.7"


@pytest.mark.parametrize("remote, forwarded, trusted, expected", [
    ("10.0.0.1", None, 0, "10.0.0.1"),
    ("10.0.0.1", "1.2.3.4", 0, "10.0.0.1"),
    ("10.0.0.1", "1.2.3.4, 5.6.7.8", 2, "1.2.3.4"),
    ("10.0.0.1", "5.6.7.8", 2, "10.0.0.1"),
    ("10.0.0.1", "not-an-ip", 1, None),
    ("::ffff:10.0.0.1", None, 0, "::ffff:a00:1"),
])
def test_caller_ip(remote, forwarded, trusted, expected):
    assert caller_ip(remote, forwarded, trusted) == expected


def test_partial_batch_rejects_bad_events_with_reasons_and_accepts_the_rest(app, client, ingress_env):
    deep = {"a": None}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    events = [
        event(0),
        {"event_type": "Bad-Type", "user_id": "u"},
        {"event_type": "x", "properties": {}},  # no identity
        event(3, properties={"blob": "x" * 70_000}),
        event(4, properties=deep),
        "not an object",
        event(6, user_id="u" * 129),
        event(7),
    ]
    resp = post(client, {"events": events})
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["accepted"] == 2
    reasons = {item["index"]: item["reason"] for item in body["rejected"]}
    assert reasons == {1: "invalid_envelope", 2: "invalid_envelope", 3: "event_too_large", 4: "too_deep",
                       5: "invalid_envelope", 6: "invalid_envelope"}
    assert "u" * 129 not in resp.get_data(as_text=True)
    got = decoded(read_stream(ingress_env.client("kinesis"), ingress_env.config.stream))
    assert sorted(e["event_id"] for e in got) == ["ev-0", "ev-7"]
    assert metric_value(app, "eventlake_ingress_events_rejected_total", reason="invalid_envelope") == 4


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b"", "invalid_json"),
    (b"[]", "invalid_body"),
    (b'"text"', "invalid_body"),
    (b"null", "invalid_body"),
    (b"123", "invalid_body"),
    (b'{"events": {}}', "invalid_body"),
    (b'{"events": [], "x": 1}', "invalid_body"),
    (b'{"events": []}', "empty_batch"),
    (b'{"event_type": "a", "user_id": "u", "properties": {"v": NaN}}', "invalid_json"),
    (b'{"event_type": "a", "user_id": "u", "properties": {"v": Infinity}}', "invalid_json"),
    (b'{"event_type": "a", "user_id": "u", "properties": {"v": ' + b"9" * 5000 + b"}}", "invalid_json"),
    (b"[" * 200_000 + b"]" * 200_000, "too_deep"),
    (b'{"event_type": "a"}', "all_events_rejected"),
    (b'{"events": [{"event_type": "a"}, 5]}', "all_events_rejected"),
])
def test_bodies_that_are_not_acceptable_get_400(client, body, code):
    resp = post(client, body)
    assert resp.status_code == 400
    answer = resp.get_json()
    assert answer["error"] == code
    assert answer["accepted"] == 0 and isinstance(answer["rejected"], list)


def test_batch_too_long_gets_400(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_MAX_BATCH="3").test_client()
    resp = post(client, {"events": [event(i) for i in range(4)]})
    assert resp.status_code == 400 and resp.get_json()["error"] == "batch_too_long"
    assert post(client, {"events": [event(i) for i in range(3)]}).status_code == 202


def test_utf8_bom_and_non_ascii_are_fine(client, ingress_env):
    resp = post(client, "\ufeff".encode() + json.dumps(event(1, properties={"name": "Zoë 🚀"}),
                                                     ensure_ascii=False).encode())
    assert resp.status_code == 202
    (got,) = decoded(read_stream(ingress_env.client("kinesis"), ingress_env.config.stream))
    assert got["properties"]["name"] == "Zoë 🚀"


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {WRITE_KEY}x"},
    {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:secret".encode()).decode()},
    {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Token " + WRITE_KEY},
    {"X-Write-Key": "nope"},
])
def test_missing_or_unknown_key_gets_401(client, headers):
    resp = client.post(URL, data=json.dumps(event(1)), headers={"Content-Type": "application/json", **headers})
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"
    assert WRITE_KEY not in resp.get_data(as_text=True)


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {WRITE_KEY}"},
    {"Authorization": "Bearer another-key"},
    {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()},
    {"X-Write-Key": WRITE_KEY},
])
def test_every_supported_way_of_presenting_a_key(client, headers):
    resp = client.post(URL, data=json.dumps(event(1)), headers={"Content-Type": "application/json", **headers})
    assert resp.status_code == 202


def test_refuses_to_start_without_keys_unless_auth_is_off(ingress_env, monkeypatch):
    monkeypatch.delenv("EVENTLAKE_WRITE_KEYS")
    with pytest.raises(ConfigError, match="EVENTLAKE_WRITE_KEYS"):
        create_app()
    client = create_app({"EVENTLAKE_AUTH": "off"}).test_client()
    resp = client.post(URL, json=event(1))
    assert resp.status_code == 202


@pytest.mark.parametrize("env, match", [
    ({"EVENTLAKE_STREAM": ""}, "EVENTLAKE_STREAM"),
    ({"EVENTLAKE_MAX_BATCH": "many"}, "EVENTLAKE_MAX_BATCH"),
    ({"EVENTLAKE_MAX_EVENT_BYTES": "2000000"}, "EVENTLAKE_MAX_EVENT_BYTES"),
    ({"EVENTLAKE_AUTH": "maybe"}, "EVENTLAKE_AUTH"),
    ({"EVENTLAKE_PUBLISHER": "nowhere"}, "EVENTLAKE_PUBLISHER"),
])
def test_invalid_settings_name_the_variable(ingress_env, env, match):
    with pytest.raises(ConfigError, match=match):
        create_app(env)


@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/json; charset=latin-1"},
    {"Content-Type": "application/json", "Content-Encoding": "br"},
    {"Content-Type": "application/json", "Content-Encoding": "deflate"},
])
def test_wrong_content_type_or_encoding_gets_415(client, headers):
    resp = client.post(URL, data=json.dumps(event(1)), headers={**AUTH, **headers})
    assert resp.status_code == 415
    assert resp.get_json()["error"].startswith("unsupported_")


def test_missing_content_type_gets_415(client):
    resp = client.post(URL, data=json.dumps(event(1)), headers=AUTH, content_type="")
    assert resp.status_code == 415


def test_gzip_body_is_accepted(client, ingress_env):
    body = gzip.compress(json.dumps({"events": [event(i) for i in range(5)]}).encode())
    resp = post(client, body, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 202 and resp.get_json()["accepted"] == 5
    assert len(read_stream(ingress_env.client("kinesis"), ingress_env.config.stream)) == 5


def test_gzip_bomb_gets_413(client):
    bomb = gzip.compress(b" " * (20 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    resp = post(client, bomb, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 413 and resp.get_json()["error"] == "payload_too_large"


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b'{"a": 1}')[:-6],
                                  gzip.compress(b"{}") + b"trailing"])
def test_broken_gzip_gets_400(client, body):
    resp = post(client, body, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 400


def test_declared_length_over_limit_gets_413_before_reading(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_MAX_BODY_BYTES="1000").test_client()

    reads = []

    class Watched(io.BytesIO):
        def read(self, *args):
            reads.append(args)
            return super().read(*args)

        def readinto(self, buffer):
            reads.append(len(buffer))
            return super().readinto(buffer)

    resp = client.post(URL, input_stream=Watched(b"x" * 5000), content_length=5000,
                       headers={"Content-Type": "application/json", **AUTH})
    assert resp.status_code == 413
    assert reads == []


def test_body_over_limit_gets_413(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_MAX_BODY_BYTES="1000").test_client()
    resp = post(client, {"events": [event(i) for i in range(30)]})
    assert resp.status_code == 413
    assert post(client, {"events": [event(i) for i in range(3)]}).status_code == 202


def test_rate_limited_key_gets_429_with_retry_after(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_RATE_LIMIT_RPS="0.01", EVENTLAKE_RATE_LIMIT_BURST="2").test_client()
    assert post(client, event(1)).status_code == 202
    assert post(client, event(2)).status_code == 202
    resp = post(client, event(3))
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.get_json()["error"] == "rate_limited"
    other = post(client, event(4), headers={"Authorization": "Bearer another-key"})
    assert other.status_code == 202  # buckets are per key


def test_cors_preflight_and_simple_request(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_CORS_ORIGINS="https://shop.example").test_client()
    preflight = client.options(URL, headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    resp = post(client, event(1), headers={"Origin": "https://shop.example"})
    assert resp.status_code == 202
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    foreign = client.options(URL, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in foreign.headers


@pytest.mark.parametrize("method, path, status", [
    ("get", URL, 405), ("put", URL, 405), ("delete", URL, 405), ("get", "/nope", 404), ("post", "/healthz", 405),
])
def test_other_routes_and_methods_answer_json(client, method, path, status):
    resp = getattr(client, method)(path)
    assert resp.status_code == status
    assert resp.is_json and resp.get_json()["error"]


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    post(client, event(1))
    post(client, {"events": [{"event_type": "a"}]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'eventlake_ingress_requests_total{status="202"} 1.0' in text
    assert 'eventlake_ingress_requests_total{status="400"} 1.0' in text
    assert "eventlake_ingress_events_accepted_total 1.0" in text
    assert 'eventlake_ingress_events_rejected_total{reason="invalid_envelope"} 1.0' in text
    assert "eventlake_ingress_publish_seconds_count 1.0" in text
    assert "eventlake_ingress_kinesis_retries_total 0.0" in text


def test_readyz_is_503_while_the_stream_does_not_exist(ingress_env):
    client = make_app(ingress_env, EVENTLAKE_STREAM="no-such-stream").test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert client.get("/healthz").status_code == 200


def test_openapi_document_is_served(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]["/v1/events"]["post"]["responses"]) == {"202", "400", "401", "413", "415", "429",
                                                                     "503"}


def test_token_bucket_refills_at_the_configured_rate():
    from ingress.ratelimit import RateLimiter

    now = [100.0]
    limiter = RateLimiter(2.0, 3.0, clock=lambda: now[0])
    assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("k") == 1  # empty: half a second to the next token, rounded up
    now[0] += 0.5
    assert limiter.acquire("k") is None
    assert limiter.acquire("other") is None
    now[0] += 100
    assert [limiter.acquire("k") for _ in range(4)] == [None, None, None, 1]  # never above the burst
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1.0, 0.5)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_event_like = st.fixed_dictionaries(
    {"event_type": st.sampled_from(["page_view", "Bad", "", "a" * 65])},
    optional={"user_id": st.text(max_size=130) | st.none() | st.integers(),
              "anonymous_id": st.text(max_size=3), "event_id": st.text(max_size=70),
              "properties": _json_values, "context": _json_values, "timestamp": _json_values,
              "extra": _json_values})


@given(body=st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _event_like.map(lambda v: json.dumps(v).encode()),
    st.lists(_event_like, max_size=5).map(lambda v: json.dumps({"events": v}).encode()),
), gzipped=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_body_gives_a_server_error(client, body, gzipped):
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    resp = post(client, gzip.compress(body) if gzipped else body, headers=headers)
    assert resp.status_code in (202, 400, 413)
    answer = resp.get_json()
    assert isinstance(answer, dict)
    if resp.status_code in (202, 400):
        assert isinstance(answer["accepted"], int) and isinstance(answer["rejected"], list)

"""No write key, IP, e-mail, identity or body ever reaches a log line of the ingress."""
from __future__ import annotations

import base64
import gzip
import json
import logging

from ingress.logs import JsonFormatter
from runners.local import free_port
from tests.ingress_support import WRITE_KEY, event, ingress_env, make_app  # noqa: F401

EMAIL = "jane.doe.secret@example.com"
CLIENT_IP = "198.51.100.77"
CONTEXT_IP = "203.0.113.201"
USER = "user-zzsecret"
MARKER = "body-marker-qq81"


def _exercise(client):
    auth = {"Authorization": f"Bearer {WRITE_KEY}", "Content-Type": "application/json",
            "X-Forwarded-For": CLIENT_IP}
    good = event(1, user_id=USER, properties={"email": EMAIL, "note": MARKER}, context={"ip": CONTEXT_IP})
    statuses = [
        client.post("/v1/events", data=json.dumps({"events": [good, event(2, user_id=USER)]}), headers=auth),
        client.post("/v1/events", data=json.dumps({"event_type": "BAD", "user_id": EMAIL, "x": MARKER}),
                    headers=auth),
        client.post("/v1/events", data=f'{{"{MARKER}": "{EMAIL}"', headers=auth),
        client.post("/v1/events", data=json.dumps(good), headers={**auth, "Authorization": f"Bearer {WRITE_KEY}X"}),
        client.post("/v1/events", data=json.dumps(good), headers={
            **auth, "Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:pw".encode()).decode()}),
        client.post("/v1/events", data=gzip.compress(json.dumps(good).encode()),
                    headers={**auth, "Content-Encoding": "gzip"}),
        client.post("/v1/events", data=MARKER, headers={**auth, "Content-Type": "text/" + MARKER}),
    ]
    return [resp.status_code for resp in statuses]


def _assert_clean(caplog):
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    text = caplog.text + "\n".join(lines)
    assert lines, "nothing was logged"
    for secret in (WRITE_KEY, EMAIL, CLIENT_IP, CONTEXT_IP, USER, MARKER, "127.0.0.1"):
        assert secret not in text, f"a log line holds {secret!r}"
    for line in lines:
        json.loads(line)


def test_logs_hold_no_personal_data_keys_or_bodies(ingress_env, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_app(ingress_env, EVENTLAKE_TRUSTED_PROXIES="1").test_client()
    assert _exercise(client) == [202, 400, 400, 401, 401, 202, 415]
    assert any(getattr(r, "fields", {}).get("status") == 202 for r in caplog.records)
    _assert_clean(caplog)


def test_failure_logs_hold_no_personal_data(ingress_env, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    client = make_app(ingress_env, EVENTLAKE_PUBLISH_TIMEOUT_SECONDS="1", EVENTLAKE_PUBLISH_MAX_ATTEMPTS="2",
                      EVENTLAKE_TRUSTED_PROXIES="1").test_client()
    statuses = _exercise(client)
    assert statuses[0] == 503
    assert any(r.name == "ingress.publisher" for r in caplog.records)
    _assert_clean(caplog)

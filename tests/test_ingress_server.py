"""The ingress as it really runs: gunicorn (production) and ``python -m ingress`` (development)
as subprocesses on free loopback ports, posting over HTTP to moto Kinesis."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from runners.local import free_port, wait_until
from tests.ingress_support import AUTH, WRITE_KEY, decoded, event, read_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = {**AUTH, "Content-Type": "application/json"}


class Server:
    def __init__(self, argv, env, port):
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stdout.read().decode(errors="replace"))
            return requests.get(self.base + "/readyz", timeout=2).status_code == 200
        wait_until(ready, timeout=60, what="the ingress")

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")


def _env(stack, **extra):
    return {**os.environ, **stack.env(), "EVENTLAKE_WRITE_KEYS": WRITE_KEY, "EVENTLAKE_MAX_BODY_BYTES": "100000",
            **extra}


@pytest.fixture
def gunicorn(stack):
    port = free_port()
    env = _env(stack, GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="2", GUNICORN_THREADS="4")
    server = Server([sys.executable, "-m", "gunicorn", "-c", "python:ingress.gunicorn_conf", "ingress:create_app()"],
                    env, port)
    server.wait_ready()
    yield server
    server.stop()


def test_gunicorn_serves_events_chunked_bodies_and_shuts_down_gracefully(gunicorn, stack):
    resp = requests.post(gunicorn.base + "/v1/events", headers=HEADERS, timeout=30,
                         data=json.dumps({"events": [event(i) for i in range(50)]}))
    assert resp.status_code == 202 and resp.json() == {"accepted": 50, "rejected": []}

    def chunks(body: bytes, size: int = 1000):
        for start in range(0, len(body), size):
            yield body[start:start + size]

    small = json.dumps({"events": [event(100 + i) for i in range(5)]}).encode()
    resp = requests.post(gunicorn.base + "/v1/events", headers=HEADERS, data=chunks(small), timeout=30)
    assert resp.status_code == 202 and resp.json()["accepted"] == 5
    large = json.dumps({"events": [event(200 + i, properties={"pad": "x" * 1000}) for i in range(200)]}).encode()
    resp = requests.post(gunicorn.base + "/v1/events", headers=HEADERS, data=chunks(large), timeout=30)
    assert resp.status_code == 413

    # A declared length over the limit is refused before the body is sent at all.
    conn = http.client.HTTPConnection("127.0.0.1", int(gunicorn.base.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/events")
    for name, value in {**HEADERS, "Content-Length": "100001"}.items():
        conn.putheader(name, value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and json.loads(answer.read())["error"] == "payload_too_large"
    conn.close()
    assert requests.get(gunicorn.base + "/metrics", timeout=5).status_code == 200

    output = gunicorn.stop(signal.SIGTERM)
    assert gunicorn.proc.returncode == 0, output
    assert "publisher flushed" in output
    assert output.count("worker warmed: publisher started") == 2  # each worker, before its first request
    assert WRITE_KEY not in output and "127.0.0.1 -" not in output
    ids = [e["event_id"] for e in decoded(read_stream(stack.client("kinesis"), stack.config.stream))]
    assert sorted(ids) == sorted([f"ev-{i}" for i in range(50)] + [f"ev-{100 + i}" for i in range(5)])


def test_python_m_ingress_serves_and_refuses_to_start_without_keys(stack):
    env = {**_env(stack)}
    del env["EVENTLAKE_WRITE_KEYS"]
    refused = subprocess.run([sys.executable, "-m", "ingress", "--port", str(free_port())], env=env, cwd=ROOT,
                             capture_output=True, timeout=60)
    assert refused.returncode == 2
    assert b"EVENTLAKE_WRITE_KEYS" in refused.stderr

    port = free_port()
    server = Server([sys.executable, "-m", "ingress", "--host", "127.0.0.1", "--port", str(port)], _env(stack), port)
    try:
        server.wait_ready()
        resp = requests.post(server.base + "/v1/events", headers=HEADERS, data=json.dumps(event(1)), timeout=30)
        assert resp.status_code == 202
        body = json.dumps(event(2)).encode()
        resp = requests.post(server.base + "/v1/events", headers=HEADERS, data=iter([body[:10], body[10:]]),
                             timeout=30)
        assert resp.status_code == 202
    finally:
        output = server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0, output
    assert "127.0.0.1 -" not in output and WRITE_KEY not in output
    assert len(read_stream(stack.client("kinesis"), stack.config.stream)) == 2

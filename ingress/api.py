"""``POST /v1/events``: authenticate, bound, validate, stamp, publish, answer.

Checks run cheapest first (key, content type, rate, declared size) so that a
refused request costs little. Each event is validated with the shared envelope
(:mod:`transforms.envelope`); a bad event is rejected with a reason code while
its neighbours go on. 202 only after Kinesis acknowledged every accepted event.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any, Optional

from flask import Blueprint, current_app, g, jsonify, request

from ingress.body import check_content_type, inflate_limited, parse_json, read_limited
from ingress.errors import ApiError
from ingress.publisher import PublishFailed
from transforms.envelope import (
    InvalidEvent,
    format_rfc3339_ms,
    partition_key,
    stamp,
    to_wire,
    utc_now_ms,
    validate_event,
)

log = logging.getLogger("ingress.api")
bp = Blueprint("events", __name__)


def caller_ip(remote_addr: Optional[str], forwarded_for: Optional[str], trusted_proxies: int) -> Optional[str]:
    """The client's address: ``remote_addr``, or the hop ``trusted_proxies`` back in X-Forwarded-For."""
    candidate = remote_addr
    if trusted_proxies and forwarded_for:
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        if len(hops) >= trusted_proxies:
            candidate = hops[-trusted_proxies]
    try:
        return str(ipaddress.ip_address((candidate or "").strip().strip("[]")))
    except ValueError:
        return None


def _events_of(payload: Any, max_batch: int) -> list:
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_body", "the body must be an event object or {\"events\": [...]}",
                       body={"accepted": 0, "rejected": []})
    if "events" not in payload:
        return [payload]
    events = payload["events"]
    if not isinstance(events, list) or len(payload) != 1:
        raise ApiError(400, "invalid_body", "\"events\" must be the only field and an array",
                       body={"accepted": 0, "rejected": []})
    if not events:
        raise ApiError(400, "empty_batch", "the batch holds no events", body={"accepted": 0, "rejected": []})
    if len(events) > max_batch:
        raise ApiError(400, "batch_too_long", f"a batch holds at most {max_batch} events",
                       body={"accepted": 0, "rejected": []})
    return events


@bp.post("/v1/events")
def post_events():
    state = current_app.extensions["eventlake"]
    config = state.config
    limits = config.limits
    metrics = state.metrics

    key_id = state.write_keys.identify(request.headers)
    if key_id is None:
        raise ApiError(401, "unauthorized", "a valid write key is required")
    encoding = check_content_type(request.headers.get("Content-Type"), request.headers.get("Content-Encoding"))
    retry_after = state.rate_limiter.acquire(key_id)
    if retry_after is not None:
        raise ApiError(429, "rate_limited", "too many requests for this write key", retry_after=retry_after)

    raw = read_limited(request.stream, request.content_length, limits.max_body_bytes)
    if encoding == "gzip":
        raw = inflate_limited(raw, limits.max_body_bytes)
    events = _events_of(parse_json(raw), limits.max_batch)

    received_at = format_rfc3339_ms(utc_now_ms())  # one arrival time for the whole request
    ip = caller_ip(request.remote_addr, request.headers.get("X-Forwarded-For"), config.trusted_proxies)
    records: list[tuple[bytes, str]] = []
    rejected: list[dict] = []
    for index, event in enumerate(events):
        try:
            envelope = validate_event(event, limits)
        except InvalidEvent as exc:
            rejected.append({"index": index, "reason": exc.reason, "message": exc.message})
            continue
        record = stamp(envelope, received_at=received_at, caller_ip=ip)
        data = to_wire(record)
        if len(data) > limits.max_event_bytes:
            rejected.append({"index": index, "reason": "event_too_large",
                             "message": f"the event exceeds {limits.max_event_bytes} bytes"})
            continue
        records.append((data, partition_key(record)))

    for item in rejected:
        metrics.events_rejected.labels(item["reason"]).inc()
    if not records:
        raise ApiError(400, "all_events_rejected", "no event was accepted",
                       body={"accepted": 0, "rejected": rejected})
    try:
        state.publisher.publish(records)
    except PublishFailed as exc:
        metrics.events_rejected.labels("kinesis_unavailable").inc(len(records))
        raise ApiError(503, "kinesis_unavailable", "the events could not be stored; retry later",
                       retry_after=exc.retry_after) from None
    metrics.events_accepted.inc(len(records))
    response = jsonify({"accepted": len(records), "rejected": rejected})
    response.status_code = 202
    return response


def log_request(response):
    """One structured line per request: route, status, sizes, time. No IP, key or body."""
    started = g.get("eventlake_started")
    state = current_app.extensions["eventlake"]
    state.metrics.requests.labels(str(response.status_code)).inc()
    if request.path in ("/healthz", "/readyz", "/metrics"):
        return response
    fields = {"method": request.method, "path": request.url_rule.rule if request.url_rule else "unmatched",
              "status": response.status_code}
    if started is not None:
        fields["duration_ms"] = round((time.monotonic() - started) * 1000, 2)
    log.info("request", extra={"fields": fields})
    return response


def mark_start():
    g.eventlake_started = time.monotonic()

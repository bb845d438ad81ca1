"""The event envelope: one definition shared by the ingress and the pipeline.

The ingress validates envelopes before they reach Kinesis; the pipeline validates
them again when it reads the stream (a backfill file or a re-driven dead letter
did not necessarily pass the ingress). Both use this module, so the two can
never disagree on what an event is.

Error messages name the field and the rule, never the value: values may hold
personal data.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import threading
import time
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
EVENT_TYPE_RE = re.compile(EVENT_TYPE_PATTERN)

Identity = Annotated[str, StringConstraints(min_length=1, max_length=128)]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
EventType = Annotated[str, StringConstraints(pattern=EVENT_TYPE_PATTERN)]
Timestamp = Annotated[str, StringConstraints(max_length=64)]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits of the HTTP API and of one event (SPEC "HTTP ingress")."""

    max_body_bytes: int = 1_048_576  # after decompression
    max_event_bytes: int = 65_536  # one event, serialized as it goes to Kinesis
    max_batch: int = 500
    max_depth: int = 32  # JSON nesting depth of one event


DEFAULT_LIMITS = Limits()


class InvalidEvent(ValueError):
    """An event that is not a valid envelope; ``reason`` is a machine code.

    The message never holds a value taken from the event.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Envelope(BaseModel):
    """What a client sends (plus ``received_at``, which the ingress sets)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_type: EventType
    event_id: Optional[EventId] = None
    user_id: Optional[Identity] = None
    anonymous_id: Optional[Identity] = None
    timestamp: Optional[Timestamp] = None
    received_at: Optional[Timestamp] = None
    properties: Optional[dict[str, Any]] = None
    context: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _needs_an_identity(self) -> "Envelope":
        if self.user_id is None and self.anonymous_id is None:
            raise ValueError("user_id or anonymous_id is required")
        return self


_RULES = {
    "missing": "is required",
    "extra_forbidden": "is not an envelope field",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "string_too_short": "is too short",
    "string_too_long": "is too long",
    "string_pattern_mismatch": "must match " + EVENT_TYPE_PATTERN,
    "model_type": "must be an object",
}


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line, value-free description of the first problems of ``exc``."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        if err["type"] == "extra_forbidden":
            # The name of an unknown field is client text and may hold personal data.
            parts.append("event has a field that is not an envelope field")
            continue
        field = ".".join(str(p) for p in err.get("loc", ()) if str(p) in Envelope.model_fields)
        if err["type"] == "value_error":
            parts.append("user_id or anonymous_id is required")
            continue
        rule = _RULES.get(err["type"], "is invalid")
        parts.append(f"{field or 'event'} {rule}")
    return "; ".join(parts) or "invalid envelope"


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping early past ``limit``.

    Recursive, at most ``limit + 1`` calls deep: cheaper than a work list of (node, level) pairs, which built a
    tuple per container and was costlier than the envelope's own validation.
    """
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return 0
    if limit <= 0:
        return 1
    deepest = 0
    for child in children:
        if isinstance(child, (dict, list)):
            depth = json_depth(child, limit - 1)
            if depth > deepest:
                deepest = depth
                if deepest >= limit:
                    break
    return deepest + 1


def validate_event(obj: Any, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Validate one decoded event object; raises :class:`InvalidEvent`."""
    if not isinstance(obj, dict):
        raise InvalidEvent("invalid_envelope", "event must be a JSON object")
    if json_depth(obj, limits.max_depth) > limits.max_depth:
        raise InvalidEvent("too_deep", f"event nests deeper than {limits.max_depth} levels")
    try:
        return Envelope.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEvent("invalid_envelope", describe_validation_error(exc)) from None


def utc_now_ms() -> int:
    """Now, as epoch milliseconds (stamped on every row: ``time_ns`` costs a tenth of a ``datetime``)."""
    return time.time_ns() // 1_000_000


def format_rfc3339_ms(epoch_ms: int) -> str:
    """``2026-11-26T23:30:00.123Z``: UTC with millisecond precision."""
    moment = dt.datetime.fromtimestamp(epoch_ms / 1000, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def parse_rfc3339_ms(text: Any) -> Optional[int]:
    """Epoch milliseconds of an RFC 3339 time, or None when it is not one.

    A time without an offset is not RFC 3339 and gives None.
    """
    if not isinstance(text, str) or not 10 <= len(text) <= 64:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1000)


class _RandomBytes(threading.local):
    """Each thread's block of ``os.urandom`` bytes for event ids, drawn 4 KiB (256 ids) at a time.

    ``uuid.uuid4()`` per event let go of the GIL and took it back around each ``os.urandom(16)``; with 16 request
    threads per gunicorn worker every such hand-over waited behind the other threads, and ``uuid4`` was 11 % of the
    ingress's samples under load. The bytes are the same kernel randomness. A block belongs to the process that drew
    it: gunicorn forks its workers, and a block inherited across a fork would give two processes the same ids, so a
    forked child drops it (only the forking thread lives on in the child, so its block is the only one).
    """

    block = b""
    offset = 0


_RANDOM = _RandomBytes()


def _forget_random_bytes() -> None:
    _RANDOM.block, _RANDOM.offset = b"", 0


os.register_at_fork(after_in_child=_forget_random_bytes)


def new_event_id() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())``."""
    pool = _RANDOM
    if pool.offset >= len(pool.block):
        pool.block, pool.offset = os.urandom(4096), 0
    raw = bytearray(pool.block[pool.offset:pool.offset + 16])
    pool.offset += 16
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()  # as str(uuid.UUID(bytes=raw, version=4)), without its checks: 3.8 -> 2.6 us per id
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def stamp(envelope: Envelope, *, received_at: str, caller_ip: Optional[str]) -> dict:
    """The envelope as the ingress puts it on the stream.

    Sets ``received_at`` (the request's arrival, :func:`format_rfc3339_ms`, formatted once per request) and a
    missing ``event_id``; adds the caller's address as ``context.ip`` when the client sent none (the pipeline
    masks it).
    """
    record = envelope.model_dump(exclude_none=True)
    record["event_id"] = envelope.event_id or new_event_id()
    record["received_at"] = received_at
    if caller_ip:
        context = dict(record.get("context") or {})
        if not context.get("ip"):
            context["ip"] = caller_ip
            record["context"] = context
    return record


def partition_key(record: dict) -> str:
    """Kinesis partition key: ``user_id``, else ``anonymous_id`` (per-user order)."""
    return record.get("user_id") or record["anonymous_id"]


def _reject_constant(name: str):
    raise ValueError("NaN and Infinity are not JSON")


# One decoder for every call: json.loads(text, parse_constant=...) builds a decoder per call, which cost as much as
# decoding a typical event (8.7 -> 4.8 us per event on the bench machine).
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def strict_json(text: str) -> Any:
    """JSON text decoded as the ingress and the pipeline accept it: NaN and Infinity raise ``ValueError``.

    Other errors are the decoder's (``json.JSONDecodeError``, ``RecursionError``); callers map them to reasons.
    """
    return _STRICT_DECODER.decode(text)


_WIRE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps would build one per call


def to_wire(record: dict) -> bytes:
    """Compact UTF-8 JSON, the form of a Kinesis record and of a backfill line."""
    return _WIRE_ENCODER.encode(record).encode("utf-8")


_RECEIVED_AT_RE = re.compile(rb'"received_at"\s*:\s*"([^"]{10,64})"')


def received_at_of(data: bytes) -> Optional[int]:
    """Epoch ms of a raw record's ``received_at``, without decoding the whole JSON.

    Sources use it to stamp event time cheaply; None when absent or unparsable
    (the caller falls back to the arrival time). A match inside a nested string
    is possible only for hand-made records and is harmless: the parse stage
    re-reads the real field.
    """
    match = _RECEIVED_AT_RE.search(data)
    if not match:
        return None
    try:
        return parse_rfc3339_ms(match.group(1).decode("ascii"))
    except UnicodeDecodeError:
        return None

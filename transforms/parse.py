"""Parse stage: raw ``SourceRecord`` -> ``(record, event)``, or a dead letter.

The record is read as the ingress wrote it (SPEC "HTTP ingress") and checked
again with the shared envelope (``transforms.envelope``): backfill files and
re-driven payloads did not necessarily pass the ingress. Failures are dead
letters of stage ``parse``, never retryable (the bytes will not change):

* ``too_large``: the record is over ``Limits.max_event_bytes`` (checked before decoding);
* ``invalid_utf8``: the bytes are not UTF-8;
* ``invalid_json``: not JSON (including NaN/Infinity and nesting deep enough
  to exhaust the decoder's recursion);
* ``invalid_envelope``, ``too_deep``, ...: the reasons of ``validate_event``.

``received_at`` missing or unreadable falls back to the element timestamp (the
arrival time the source stamped), or the processing time when the element has
none; a missing ``event_id`` becomes a UUID derived from the bytes, so that a
reprocessed or re-driven record keeps its dedup key.

Metrics (namespace ``eventlake``): ``parse.received``, ``parse.succeeded``,
``parse.dead_lettered``.
"""
from __future__ import annotations

import json
import re
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue

from transforms.dead_letter import dead_letter
from transforms.envelope import (
    DEFAULT_LIMITS, Envelope, InvalidEvent, Limits, parse_rfc3339_ms, strict_json, utc_now_ms, validate_event,
)
from transforms.records import SourceRecord

NAMESPACE = "eventlake"
STAGE = "parse"
EVENTS = "events"
DEAD_LETTERS = "dead_letters"
EVENT_ID_NAMESPACE = uuid.UUID("6f1c7f8e-2b1e-4e57-9a0e-6c1d2b3e4f50")
_PLAUSIBLE_MS = (0, 253402300799999)  # 1970 .. 9999-12-31: a real element timestamp, not MIN/MAX
_ENVELOPE_FIELDS = frozenset(Envelope.model_fields)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class ParseFailure(ValueError):
    """A record that is not an event; ``reason`` is the dead-letter code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict:
    """The JSON object of a record; raises :class:`ParseFailure` (messages hold no values)."""
    if len(data) > limits.max_event_bytes:
        raise ParseFailure("too_large", f"record is larger than {limits.max_event_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseFailure("invalid_utf8", f"record is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = strict_json(text)
        if _SURROGATE_ESCAPE.search(text):  # "\ud800" decodes to a string no UTF-8 writer can store
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except UnicodeEncodeError:
        raise ParseFailure("invalid_utf8", "record escapes an unpaired UTF-16 surrogate") from None
    except RecursionError:
        raise ParseFailure("invalid_json", "record nests too deeply to decode") from None
    except json.JSONDecodeError as exc:
        raise ParseFailure("invalid_json", f"record is not JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError:
        raise ParseFailure("invalid_json", "record holds NaN or Infinity, which JSON does not allow") from None


def to_event(record: SourceRecord, element_ms: int, limits: Limits = DEFAULT_LIMITS) -> dict:
    """The parsed event of docs/CONTRACTS.md; raises ParseFailure or InvalidEvent."""
    obj = decode(record.data, limits)
    if isinstance(obj, dict) and not obj.keys() <= _ENVELOPE_FIELDS:
        # validate_event's message would name the unknown key, and keys are client data
        raise InvalidEvent("invalid_envelope", "event has fields that are not envelope fields")
    envelope = validate_event(obj, limits)
    received_at = parse_rfc3339_ms(envelope.received_at)
    if received_at is None:
        received_at = element_ms if _PLAUSIBLE_MS[0] <= element_ms <= _PLAUSIBLE_MS[1] else utc_now_ms()
    return {
        "event_type": envelope.event_type,
        "event_id": envelope.event_id or str(uuid.uuid5(EVENT_ID_NAMESPACE, record.data.hex())),
        "user_id": envelope.user_id,
        "anonymous_id": envelope.anonymous_id,
        "event_time": parse_rfc3339_ms(envelope.timestamp),
        "received_at": received_at,
        "properties": dict(envelope.properties or {}),
        "context": dict(envelope.context or {}),
    }


class ParseEventsFn(beam.DoFn):
    def __init__(self, limits: Limits):
        self.limits = limits
        self.received = Metrics.counter(NAMESPACE, "parse.received")
        self.succeeded = Metrics.counter(NAMESPACE, "parse.succeeded")
        self.dead_lettered = Metrics.counter(NAMESPACE, "parse.dead_lettered")

    def process(self, record: SourceRecord, timestamp=beam.DoFn.TimestampParam):
        self.received.inc()
        element_ms = int(timestamp.micros // 1000)
        try:
            event = to_event(record, element_ms, self.limits)
        except (ParseFailure, InvalidEvent) as exc:
            self.dead_lettered.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS,
                dead_letter(STAGE, exc.reason, str(exc), retryable=False, record=record),
            )
            return
        self.succeeded.inc()
        if event["received_at"] > element_ms:  # e.g. a backfill line without timestamp: move it forward
            yield TimestampedValue((record, event), event["received_at"] / 1000)
        else:
            yield record, event


class ParseEvents(beam.PTransform):
    """``SourceRecord`` -> ``(record, event)``; returns ``(events, dead_letters)``."""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS):
        super().__init__()
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a transforms.envelope.Limits, got {type(limits).__name__}")
        self._limits = limits

    def expand(self, records):
        results = records | "DecodeEnvelopes" >> beam.ParDo(ParseEventsFn(self._limits)).with_outputs(
            DEAD_LETTERS, main=EVENTS
        )
        return results[EVENTS], results[DEAD_LETTERS]

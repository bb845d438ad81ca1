"""The dead-letter record (SPEC "Dead letters"), built in one place.

Every stage that fails an event calls :func:`dead_letter`; the sinks in
``transforms.dead_letter_sinks`` only serialize what is built here.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Optional

from transforms.records import SourceRecord
from transforms.version import PIPELINE_VERSION

SCHEMA = "eventlake/dead_letter/1"
STAGES = ("ingress", "parse", "validate", "mask", "enrich", "write")


def encode_payload(data: bytes) -> tuple[str, str]:
    """The payload as text: UTF-8 when it is valid UTF-8, else base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def decode_payload(record: dict) -> bytes:
    """The original bytes of a dead letter (for re-drive)."""
    if record.get("payload_encoding") == "base64":
        return base64.b64decode(record["payload"])
    return record["payload"].encode("utf-8")


def dead_letter(
    stage: str,
    reason: str,
    message: str,
    *,
    retryable: bool,
    record: SourceRecord,
    attempts: int = 1,
    failed_at: Optional[dt.datetime] = None,
) -> dict:
    """One dead-letter record. ``message`` must not hold personal data."""
    if stage not in STAGES:
        raise ValueError(f"unknown dead-letter stage {stage!r}")
    payload, encoding = encode_payload(record.data)
    moment = failed_at or dt.datetime.now(dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "failure": {
            "stage": stage,
            "reason": reason,
            "message": message,
            "retryable": retryable,
            "failed_at": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "attempts": attempts,
            "pipeline_version": PIPELINE_VERSION,
        },
        "source": record.source(),
        "payload": payload,
        "payload_encoding": encoding,
    }


def to_json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

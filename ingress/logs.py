"""Structured JSON logs.

A log line carries a message and the ``fields`` passed via ``extra``: counts,
codes, durations. Call sites never pass keys, bodies, IPs or event values;
exception text is not logged (only its type) because it may hold request data.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
        return json.dumps(line, separators=(",", ":"), default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (servers and test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the ``ingress`` loggers (idempotent)."""
    logger = logging.getLogger("ingress")
    if any(getattr(h, "_eventlake", False) for h in logger.handlers):
        return
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._eventlake = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = True
    # botocore and urllib3 log request bodies (our events) at DEBUG: never let them.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

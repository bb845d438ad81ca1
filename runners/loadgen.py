"""Load generator: a realistic, seeded mix of events synthesized from the schemas.

Values are drawn from each event type's JSON Schema (types, enums, ranges,
formats), so the generator follows the schemas as they evolve. Free-text fields
sometimes carry planted personal data (e-mail and IP addresses) that the
pipeline must mask, and a share of events is invalid in the ways real clients
get things wrong (unknown type, schema violation, no identity, bad JSON), so a
run exercises the dead-letter path as well as the lake.

Used by ``make demo`` (over HTTP against the ingress) and by the benchmarks
(as JSON Lines for backfill).
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import random
import uuid
from typing import Any, Iterator, Optional

from transforms.envelope import format_rfc3339_ms, to_wire, utc_now_ms

PLANTED_EMAIL_DOMAIN = "example.org"
LOCALES = ["en-GB", "de-DE", "fr-FR", "es-ES", "en-US", "nl-NL"]
APP_VERSIONS = ["5.2.0", "5.2.1", "5.3.0"]
OS_NAMES = ["iOS", "Android"]
WORDS = "great session felt strong tired today legs core cardio recovery easy hard new plan again".split()


def load_schemas(schema_dir: str) -> tuple[dict[str, dict], Optional[dict]]:
    """Event type -> properties schema, and the user schema (or None)."""
    events, user = {}, None
    for name in sorted(os.listdir(schema_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(schema_dir, name), encoding="utf-8") as handle:
            schema = json.load(handle)
        if name == "_user.json":
            user = schema
        elif not name.startswith("_"):
            events[name[: -len(".json")]] = schema
    return events, user


class Synthesizer:
    """Draws JSON values that satisfy a (simple) JSON Schema, from a seeded RNG."""

    def __init__(self, rng: random.Random, pii_rate: float = 0.05):
        self.rng = rng
        self.pii_rate = pii_rate

    def value(self, schema: dict, name: str = "", depth: int = 0) -> Any:
        rng = self.rng
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        kind = schema.get("type", "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            low = schema.get("minItems", 0)
            high = min(schema.get("maxItems", low + 4), low + 4)
            return [self.value(schema.get("items", {}), name, depth + 1) for _ in range(rng.randint(low, high))]
        if kind == "integer":
            low = int(schema.get("minimum", 0))
            high = int(schema.get("maximum", low + 1000))
            return rng.randint(low, high)
        if kind == "number":
            low = float(schema.get("minimum", 0.0))
            high = float(schema.get("maximum", low + 500.0))
            return round(rng.uniform(low, high), 2)
        if kind == "boolean":
            return rng.random() < 0.5
        return self.string(schema, name)

    def object(self, schema: dict, depth: int = 0) -> dict:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        out = {}
        for key, sub in props.items():
            if key in required or self.rng.random() < 0.8:
                out[key] = self.value(sub, key, depth + 1)
        return out

    def string(self, schema: dict, name: str) -> str:
        rng = self.rng
        fmt = schema.get("format")
        if fmt == "date-time":
            moment = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=rng.randint(0, 3e7))
            return moment.isoformat().replace("+00:00", "Z")
        if fmt == "email" or "email" in name:
            return f"person{rng.randint(1, 10**6)}@{PLANTED_EMAIL_DOMAIN}"
        if fmt in ("ipv4",) or name.endswith("ip"):
            return f"203.0.113.{rng.randint(1, 254)}"
        low = schema.get("minLength", 1)
        high = schema.get("maxLength", 40)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        if rng.random() < self.pii_rate:  # personal data where it does not belong
            text += rng.choice([f" mail me at coach{rng.randint(1, 99)}@{PLANTED_EMAIL_DOMAIN}",
                                f" from 198.51.100.{rng.randint(1, 254)}"])
        text = text[:high]
        return text if len(text) >= low else text.ljust(low, "x")


class EventMix:
    """Envelopes for many users and several event types; some invalid on purpose."""

    def __init__(self, schema_dir: str, *, users: int = 1000, invalid_rate: float = 0.05,
                 anonymous_rate: float = 0.1, seed: int = 7):
        self.events, self.user_schema = load_schemas(schema_dir)
        if not self.events:
            raise ValueError(f"no event schemas in {schema_dir!r}")
        self.rng = random.Random(seed)
        self.synth = Synthesizer(self.rng)
        self.user_ids = [f"user-{i:06d}" for i in range(users)]
        self.invalid_rate = invalid_rate
        self.anonymous_rate = anonymous_rate
        self.types = sorted(self.events)
        # A skewed popularity, as real apps have: the first types are the common ones.
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.types))]

    def users(self, known_share: float = 0.9) -> Iterator[dict]:
        """User items for DynamoDB; a share of users is left unknown on purpose."""
        if self.user_schema is None:
            return
        for user_id in self.user_ids:
            if self.rng.random() < known_share:
                item = self.synth.object({**self.user_schema, "required": list(self.user_schema.get("properties", {}))})
                item["user_id"] = user_id
                yield item

    def valid(self, received_at_ms: Optional[int] = None) -> dict:
        rng = self.rng
        event_type = rng.choices(self.types, self.weights)[0]
        envelope = {"event_type": event_type, "event_id": str(uuid.UUID(int=rng.getrandbits(128)))}
        if rng.random() < self.anonymous_rate:
            envelope["anonymous_id"] = f"anon-{rng.getrandbits(48):012x}"
        else:
            envelope["user_id"] = rng.choice(self.user_ids)
        now = received_at_ms or utc_now_ms()
        envelope["timestamp"] = format_rfc3339_ms(now - rng.randint(0, 5000))
        envelope["properties"] = self.synth.object(self.events[event_type])
        envelope["context"] = {
            "ip": f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "user_agent": rng.choice(["FitApp/5.2 (iPhone; iOS 18.1)", "FitApp/5.3 (Android 15; Pixel 9)"]),
            "locale": rng.choice(LOCALES),
            "app_version": rng.choice(APP_VERSIONS),
        }
        return envelope

    def invalid(self) -> tuple[str, Any]:
        """(expected dead-letter reason, an event the ingress accepts but the pipeline rejects)."""
        rng = self.rng
        event = self.valid()
        kind = rng.choice(["unknown_event_type", "schema_violation"])
        if kind == "unknown_event_type":
            event["event_type"] = "legacy_" + rng.choice(["ping", "heartbeat", "banner_click"])
        else:
            event["properties"] = {"__unexpected__": {"nested": [1, 2, 3]}}
        return kind, event

    def next(self) -> tuple[Optional[str], dict]:
        """(None or the expected dead-letter reason, event)."""
        if self.rng.random() < self.invalid_rate:
            return self.invalid()
        return None, self.valid()


def write_backfill(path: str, envelopes: Iterator[dict]) -> int:
    """JSON Lines of stamped envelopes (as the ingress writes them); gzip when ``.gz``."""
    opener = gzip.open if path.endswith(".gz") else open
    count = 0
    with opener(path, "wb") as handle:
        for envelope in envelopes:
            handle.write(to_wire(envelope) + b"\n")
            count += 1
    return count

"""Ingress settings, read from the environment (12-factor).

SPEC variables:

- ``EVENTLAKE_STREAM`` (required): the Kinesis stream events go to.
- ``EVENTLAKE_WRITE_KEYS``: comma-separated write keys. Without keys the server
  refuses to start unless ``EVENTLAKE_AUTH=off`` is set explicitly.
- ``EVENTLAKE_AUTH``: ``on`` (default) or ``off``.
- ``EVENTLAKE_CORS_ORIGINS``: comma-separated origins allowed to post from a
  browser (``*`` for any); empty disables CORS.
- ``EVENTLAKE_MAX_BODY_BYTES`` (1048576, after decompression),
  ``EVENTLAKE_MAX_EVENT_BYTES`` (65536, one event as serialized for Kinesis),
  ``EVENTLAKE_MAX_BATCH`` (500), ``EVENTLAKE_TRUSTED_PROXIES`` (0: how many
  ``X-Forwarded-For`` hops to trust for the caller's address).

Rate limiting (a token bucket per write key, per server process):

- ``EVENTLAKE_RATE_LIMIT_RPS`` (default 200): requests per second a key may
  sustain; ``0`` disables rate limiting.
- ``EVENTLAKE_RATE_LIMIT_BURST`` (default 2 x the rate): bucket size.

Publishing to Kinesis:

- ``EVENTLAKE_PUBLISH_TIMEOUT_SECONDS`` (default 10): how long a request may
  wait for Kinesis, retries included, before it gets 503.
- ``EVENTLAKE_PUBLISH_MAX_ATTEMPTS`` (default 5): PutRecords attempts per event.
- ``EVENTLAKE_PUBLISH_SENDERS`` (default 4): at most this many PutRecords calls in
  flight per process; a call that is not full waits for the one in flight
  (``ingress.publisher``).
- ``EVENTLAKE_READY_CACHE_SECONDS`` (default 2): how long /readyz trusts its
  last look at the stream.
- ``EVENTLAKE_PUBLISHER``: ``kinesis`` (default) or ``discard``. ``discard`` is a
  BENCHMARK-ONLY mode that serializes events and throws them away, to measure
  the ingress's own cost; never use it in production.

AWS settings are the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL`` honoured).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from transforms.envelope import DEFAULT_LIMITS, Limits

KINESIS_MAX_RECORD_BYTES = 1_048_576
PUBLISHERS = ("kinesis", "discard")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class IngressConfig:
    stream: str
    write_keys: tuple[str, ...] = ()
    auth: bool = True
    cors_origins: tuple[str, ...] = ()
    limits: Limits = DEFAULT_LIMITS
    trusted_proxies: int = 0
    rate_limit_rps: float = 200.0
    rate_limit_burst: float = 400.0
    publish_timeout_s: float = 10.0
    publish_max_attempts: int = 5
    publish_senders: int = 4
    ready_cache_s: float = 2.0
    publisher: str = "kinesis"

    def __post_init__(self):
        if not self.stream:
            raise ConfigError("EVENTLAKE_STREAM is required")
        if self.auth and not self.write_keys:
            raise ConfigError("EVENTLAKE_WRITE_KEYS is empty: set write keys, or EVENTLAKE_AUTH=off explicitly")
        if any(not key for key in self.write_keys):
            raise ConfigError("EVENTLAKE_WRITE_KEYS holds an empty key")
        lim = self.limits
        for name, value in (("EVENTLAKE_MAX_BODY_BYTES", lim.max_body_bytes),
                            ("EVENTLAKE_MAX_EVENT_BYTES", lim.max_event_bytes),
                            ("EVENTLAKE_MAX_BATCH", lim.max_batch)):
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if lim.max_event_bytes > KINESIS_MAX_RECORD_BYTES - 256:
            raise ConfigError(f"EVENTLAKE_MAX_EVENT_BYTES must fit a Kinesis record, got {lim.max_event_bytes}")
        if self.trusted_proxies < 0:
            raise ConfigError(f"EVENTLAKE_TRUSTED_PROXIES must be >= 0, got {self.trusted_proxies}")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 0:
            raise ConfigError(f"EVENTLAKE_RATE_LIMIT_RPS/BURST must be >= 0, got {self.rate_limit_rps}/"
                              f"{self.rate_limit_burst}")
        if self.rate_limit_rps and self.rate_limit_burst < 1:
            raise ConfigError(f"EVENTLAKE_RATE_LIMIT_BURST must be >= 1, got {self.rate_limit_burst}")
        if self.publish_timeout_s <= 0:
            raise ConfigError(f"EVENTLAKE_PUBLISH_TIMEOUT_SECONDS must be positive, got {self.publish_timeout_s}")
        if self.publish_max_attempts < 1:
            raise ConfigError(f"EVENTLAKE_PUBLISH_MAX_ATTEMPTS must be >= 1, got {self.publish_max_attempts}")
        if self.publish_senders < 1:
            raise ConfigError(f"EVENTLAKE_PUBLISH_SENDERS must be >= 1, got {self.publish_senders}")
        if self.publisher not in PUBLISHERS:
            raise ConfigError(f"EVENTLAKE_PUBLISHER must be one of {PUBLISHERS}, got {self.publisher!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "IngressConfig":
        env = os.environ if environ is None else environ
        auth = _text(env, "EVENTLAKE_AUTH", "on").lower()
        if auth not in ("on", "off"):
            raise ConfigError(f"EVENTLAKE_AUTH must be 'on' or 'off', got {auth!r}")
        rps = _number(env, "EVENTLAKE_RATE_LIMIT_RPS", 200.0, float)
        return cls(
            stream=_text(env, "EVENTLAKE_STREAM", ""),
            write_keys=_csv(env, "EVENTLAKE_WRITE_KEYS"),
            auth=auth == "on",
            cors_origins=_csv(env, "EVENTLAKE_CORS_ORIGINS"),
            limits=Limits(
                max_body_bytes=_number(env, "EVENTLAKE_MAX_BODY_BYTES", DEFAULT_LIMITS.max_body_bytes, int),
                max_event_bytes=_number(env, "EVENTLAKE_MAX_EVENT_BYTES", DEFAULT_LIMITS.max_event_bytes, int),
                max_batch=_number(env, "EVENTLAKE_MAX_BATCH", DEFAULT_LIMITS.max_batch, int),
                max_depth=DEFAULT_LIMITS.max_depth,
            ),
            trusted_proxies=_number(env, "EVENTLAKE_TRUSTED_PROXIES", 0, int),
            rate_limit_rps=rps,
            rate_limit_burst=_number(env, "EVENTLAKE_RATE_LIMIT_BURST", max(2 * rps, 1.0), float),
            publish_timeout_s=_number(env, "EVENTLAKE_PUBLISH_TIMEOUT_SECONDS", 10.0, float),
            publish_max_attempts=_number(env, "EVENTLAKE_PUBLISH_MAX_ATTEMPTS", 5, int),
            publish_senders=_number(env, "EVENTLAKE_PUBLISH_SENDERS", 4, int),
            ready_cache_s=_number(env, "EVENTLAKE_READY_CACHE_SECONDS", 2.0, float),
            publisher=_text(env, "EVENTLAKE_PUBLISHER", "kinesis").lower(),
        )


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return (env.get(name) or default).strip()


def _csv(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in (env.get(name) or "").split(",") if part.strip())


def _number(env: Mapping[str, str], name: str, default, kind):
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {raw!r}") from None

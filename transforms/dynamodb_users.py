"""The DynamoDB backend of user enrichment: batched lookups of user attributes.

``DynamoDBUserLookup`` answers "who are these users?" for many ``user_id`` s at
once with ``BatchGetItem`` (100 keys per call, chunks sent with bounded
concurrency), retries ``UnprocessedKeys``, and backs off with full jitter on
throttling, 5xx and connection failures, for a bounded number of attempts. Keys
it could not resolve come back as *unavailable* with the number of tries, so the
caller can dead-letter them for re-drive; a missing table counts as an outage
(re-drive works once it is restored). It is the pluggable backend of
``transforms.enrich.EnrichWithUserAttributes``, in the manner of Beam's
``BigTableEnrichmentHandler``.

Items are projected onto the attributes ``_user.json`` declares and typed as
declared (``Decimal`` -> int/float, sets -> sorted lists, maps -> dicts,
``format: date-time`` -> int epoch ms UTC); every declared field is present,
``None`` when the item lacks it or holds a value of another type.

Nothing here logs or raises with a user id or an attribute value. (botocore's
own DEBUG logs print request and response bodies: keep the ``botocore`` loggers
at INFO or above wherever personal data flows.) botocore's retries are off in
the default client: this policy owns the retries, so ``attempts`` counts real tries.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import random
import threading
import time
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Optional

from transforms import aws
from transforms.envelope import parse_rfc3339_ms

MAX_KEYS_PER_CALL = 100  # the BatchGetItem limit

#: Error codes that mean "try again later" (throttling and server-side trouble).
THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
TRANSIENT_CODES = THROTTLING_CODES | frozenset(
    {"InternalServerError", "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure"}
)
#: The table is missing: an outage as far as events are concerned (re-drive after restore).
MISSING_TABLE_CODE = "ResourceNotFoundException"


_IN_FLIGHT: dict[str, threading.BoundedSemaphore] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def _in_flight_limit(identity: str, limit: int) -> threading.BoundedSemaphore:
    """One semaphore per backend and process: bounds the worker's concurrent calls, not each DoFn's."""
    key = f"{identity}:{limit}"
    with _IN_FLIGHT_LOCK:
        if key not in _IN_FLIGHT:
            _IN_FLIGHT[key] = threading.BoundedSemaphore(limit)
        return _IN_FLIGHT[key]


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff with a bounded number of attempts."""

    max_attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 5.0

    def __post_init__(self):
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive int, got {self.max_attempts!r}")
        if self.base_delay < 0:
            raise ValueError(f"base_delay must be >= 0, got {self.base_delay!r}")
        if self.max_delay < self.base_delay:
            raise ValueError(f"max_delay must be >= base_delay, got {self.max_delay!r}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@dataclasses.dataclass
class LookupResult:
    """Answers for a set of keys: found users, known misses, unavailable keys."""

    users: dict[str, dict] = dataclasses.field(default_factory=dict)  # typed per _user.json
    missing: set[str] = dataclasses.field(default_factory=set)
    unavailable: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)  # key -> (attempts, code)
    calls: int = 0
    throttles: int = 0
    type_mismatches: int = 0

    def merge(self, other: "LookupResult") -> None:
        self.users.update(other.users)
        self.missing |= other.missing
        self.unavailable.update(other.unavailable)
        self.calls += other.calls
        self.throttles += other.throttles
        self.type_mismatches += other.type_mismatches


# -- typing items per _user.json ------------------------------------------------------


def _declared_type(schema: Mapping) -> Optional[str]:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    return kind


class _Mismatch(Exception):
    """A stored value does not have the declared type (internal; never surfaces)."""


def _plain(value: Any) -> Any:
    """A DynamoDB value as plain JSON-like Python, for parts the schema leaves free."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return value


def _coerce(value: Any, schema: Mapping) -> Any:
    if value is None:
        return None
    kind = _declared_type(schema)
    if kind is None:
        return _plain(value)
    if kind == "string":
        if schema.get("format") == "date-time":
            if isinstance(value, Decimal):  # stored as epoch milliseconds
                return int(value)
            parsed = parse_rfc3339_ms(value)
            if parsed is None:
                raise _Mismatch
            return parsed
        if isinstance(value, str):
            return value
        raise _Mismatch
    if kind == "integer":
        if isinstance(value, Decimal) and value == value.to_integral_value():
            return int(value)
        raise _Mismatch
    if kind == "number":
        if isinstance(value, Decimal):
            return float(value)
        raise _Mismatch
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if kind == "array":
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if not isinstance(value, list):
            raise _Mismatch
        items = schema.get("items") or {}
        return [_coerce_or_none(v, items)[0] for v in value]
    if kind == "object":
        if not isinstance(value, dict):
            raise _Mismatch
        if "properties" not in schema:
            return _plain(value)
        return project(value, schema)
    return _plain(value)


def _coerce_or_none(value: Any, schema: Mapping) -> tuple[Any, bool]:
    try:
        return _coerce(value, schema), False
    except _Mismatch:
        return None, True


def project(item: Mapping[str, Any], schema: Mapping) -> dict:
    """``item`` (deserialized DynamoDB) as the object ``schema`` declares: every field, typed."""
    return project_counting(item, schema)[0]


def project_counting(item: Mapping[str, Any], schema: Mapping) -> tuple[dict, int]:
    """Like :func:`project`, plus how many values had another type than declared."""
    out: dict[str, Any] = {}
    mismatches = 0
    for name, sub in (schema.get("properties") or {}).items():
        value = item.get(name)
        if isinstance(value, dict) and _declared_type(sub) == "object" and "properties" in sub:
            out[name], inner = project_counting(value, sub)
            mismatches += inner
            continue
        out[name], bad = _coerce_or_none(value, sub)
        mismatches += bad
    return out, mismatches


# -- the backend ----------------------------------------------------------------------


def _error_code(exc: Exception) -> tuple[str, bool, bool]:
    """(code, transient, throttled) of an exception raised by a botocore call."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "ClientError")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        throttled = code in THROTTLING_CODES or status == 429
        transient = throttled or code in TRANSIENT_CODES or status >= 500 or code == MISSING_TABLE_CODE
        return code, transient, throttled
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return type(exc).__name__, True, False
    return type(exc).__name__, False, False


class DynamoDBUserLookup:
    """Batched, retried lookups of users by key in one DynamoDB table.

    Construct anywhere (nothing connects); call :meth:`setup` on the worker
    (``DoFn.setup``) and :meth:`teardown` when done. ``client_factory`` is for
    tests that wrap the real client; by default a boto3 client honouring the
    standard ``AWS_*`` settings (including ``AWS_ENDPOINT_URL``) is made.
    """

    def __init__(
        self,
        table: str,
        *,
        user_schema: Mapping,
        key_attribute: str = "user_id",
        endpoint_url: Optional[str] = None,
        region_name: Optional[str] = None,
        backoff: Backoff = Backoff(),
        max_concurrency: int = 4,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        client_factory: Optional[Callable[[], Any]] = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not isinstance(table, str) or not table:
            raise ValueError(f"table must be a non-empty string, got {table!r}")
        if not isinstance(user_schema, Mapping) or _declared_type(user_schema) not in ("object", None):
            raise ValueError("user_schema must be a JSON Schema object (the _user.json document)")
        if not isinstance(user_schema.get("properties", {}), Mapping):
            raise ValueError("user_schema 'properties' must be an object")
        if not key_attribute:
            raise ValueError(f"key_attribute must be non-empty, got {key_attribute!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got {connect_timeout!r}, {read_timeout!r}")
        self.table = table
        self.user_schema = dict(user_schema)
        self.key_attribute = key_attribute
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._client_factory = client_factory
        self._sleep = sleep
        self._client = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._rng = random.Random()
        self._deserializer = None
        self._in_flight: Optional[threading.BoundedSemaphore] = None

    @property
    def cache_key(self) -> str:
        """Identity of the answers (for a per-worker cache shared between DoFn instances)."""
        schema = hashlib.sha256(json.dumps(self.user_schema, sort_keys=True, default=str).encode()).hexdigest()
        return f"dynamodb:{self.endpoint_url or ''}:{self.table}:{self.key_attribute}:{schema[:16]}"

    # -- lifecycle -------------------------------------------------------------------
    def setup(self) -> None:
        from boto3.dynamodb.types import TypeDeserializer

        self._deserializer = TypeDeserializer()
        self._client = self._client_factory() if self._client_factory else self._make_client()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="dynamodb-users"
        )
        self._in_flight = _in_flight_limit(self.cache_key, self.max_concurrency)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
        self._client = None

    def __enter__(self) -> "DynamoDBUserLookup":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def __getstate__(self):  # never pickle a live client or pool
        state = self.__dict__.copy()
        state.update(_client=None, _pool=None, _deserializer=None, _in_flight=None)
        return state

    def _make_client(self):
        from botocore.config import Config

        config = Config(
            # Our own retry policy owns the retries, so ``attempts`` counts real tries.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_concurrency,
        )
        return aws.client(
            "dynamodb", endpoint_url=self.endpoint_url, region_name=self.region_name, config=config
        )

    # -- lookups ---------------------------------------------------------------------
    def lookup(self, keys: Iterable[str]) -> LookupResult:
        """Resolve every distinct key: found, missing, or unavailable (with attempts)."""
        if self._client is None:
            raise RuntimeError("DynamoDBUserLookup.setup() was not called")
        distinct = list(dict.fromkeys(keys))
        chunks = [distinct[i : i + MAX_KEYS_PER_CALL] for i in range(0, len(distinct), MAX_KEYS_PER_CALL)]
        result = LookupResult()
        if len(chunks) <= 1 or self.max_concurrency == 1:
            for chunk in chunks:
                result.merge(self._lookup_chunk(chunk))
            return result
        for partial in self._pool.map(self._lookup_chunk, chunks):
            result.merge(partial)
        return result

    def _request(self, keys: list[str]) -> dict:
        names = {f"#a{i}": name for i, name in enumerate([self.key_attribute, *self._attributes()])}
        return {
            self.table: {
                "Keys": [{self.key_attribute: {"S": key}} for key in keys],
                "ProjectionExpression": ", ".join(names),
                "ExpressionAttributeNames": names,
                "ConsistentRead": False,
            }
        }

    def _attributes(self) -> list[str]:
        return [a for a in (self.user_schema.get("properties") or {}) if a != self.key_attribute]

    def _lookup_chunk(self, keys: list[str]) -> LookupResult:
        result = LookupResult()
        pending = list(keys)
        wanted = set(keys)
        attempts = 0
        last_code = ""
        while pending and attempts < self.backoff.max_attempts:
            attempts += 1
            try:
                result.calls += 1
                with self._in_flight:
                    response = self._client.batch_get_item(RequestItems=self._request(pending))
            except Exception as exc:  # noqa: BLE001 - classified below; never re-raised with data
                code, transient, throttled = _error_code(exc)
                last_code = code
                result.throttles += throttled
                if not transient:
                    break
            else:
                for raw in response.get("Responses", {}).get(self.table, []):
                    item = {k: self._deserializer.deserialize(v) for k, v in raw.items()}
                    key = item.get(self.key_attribute)
                    if key in wanted:
                        result.users[key], bad = project_counting(item, self.user_schema)
                        result.type_mismatches += bad
                unprocessed = response.get("UnprocessedKeys", {}).get(self.table, {}).get("Keys", [])
                retry = {k[self.key_attribute]["S"] for k in unprocessed if self.key_attribute in k}
                for key in pending:
                    if key not in retry and key not in result.users:
                        result.missing.add(key)
                pending = [key for key in pending if key in retry]
                wanted = set(pending)
                if not pending:
                    break
                last_code = "UnprocessedKeys"
                result.throttles += 1  # DynamoDB returns UnprocessedKeys when over capacity
            if attempts < self.backoff.max_attempts:
                self._sleep(self.backoff.delay(attempts, self._rng))
        for key in pending:
            result.unavailable[key] = (attempts, last_code or "Unknown")
        return result

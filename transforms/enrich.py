"""Enrichment with user attributes: ``(SourceRecord, event)`` -> event + ``user`` + ``user_found``.

Why our own DoFn rather than Beam's ``apache_beam.transforms.enrichment.Enrichment``:
tried on 2.77, it cannot even be imported without ``google-api-core`` (an extra
dependency for an AWS pipeline); a lookup that fails after its few retries fails
the whole bundle, so there is no dead-letter path (SPEC: throttling and outages
are dead-lettered as retryable, nothing dropped); its repeater retries only its
own quota/timeout exceptions, its default throttler does almost nothing, and its
batching (``BatchElements``) has no per-worker cache with separate TTLs for hits
and misses. It also expects ``beam.Row`` joins, while our elements are
``(SourceRecord, dict)`` pairs. A small DoFn does all of it with tagged outputs
that Prism and Flink run.

How it works: events whose user is in the per-worker cache (shared by every
DoFn instance of the process, TTL'd, LRU-bounded; misses get a shorter TTL) are
emitted at once; the others are buffered until ``batch_size`` distinct users
(or ``max_buffered_events`` events) are waiting, or the bundle ends, and then
resolved in one ``DynamoDBUserLookup.lookup`` (``BatchGetItem``, 100 keys per call,
bounded concurrency, retries with jittered backoff). Buffered events are
emitted with their own timestamp, window and pane. Anonymous events and
unknown users get ``user=None, user_found=False``; events whose user could not be
looked up become dead letters (stage ``enrich``, reason ``enrichment_unavailable``,
retryable, ``attempts`` = tries).

Metrics (namespace ``eventlake``): ``enrich.received``, ``enrich.succeeded``,
``enrich.dead_lettered``, ``enrich.cache_hits``, ``enrich.cache_misses``,
``enrich.throttles``, ``enrich.lookup_calls``, ``enrich.users_found``,
``enrich.users_unknown``, ``enrich.anonymous``, ``enrich.type_mismatches``.
Nothing logs a user id or an attribute value.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.dead_letter import dead_letter
from transforms.dynamodb_users import DynamoDBUserLookup

NAMESPACE = "eventlake"
EVENTS = "events"
DEAD_LETTERS = "dead_letters"
REASON = "enrichment_unavailable"

NOT_CACHED = object()  # what UserCache.get returns for a key it does not hold (None is a cached miss)


class UserCache:
    """A thread-safe TTL cache with LRU eviction; ``None`` values are cached misses.

    The caller passes ``now`` (seconds, monotonic) so that tests can drive time.
    """

    def __init__(self, *, ttl_seconds: float, miss_ttl_seconds: float, max_entries: int):
        if ttl_seconds < 0:
            raise ValueError(f"ttl_seconds must be >= 0, got {ttl_seconds!r}")
        if miss_ttl_seconds < 0:
            raise ValueError(f"miss_ttl_seconds must be >= 0, got {miss_ttl_seconds!r}")
        if not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(f"max_entries must be an int >= 0, got {max_entries!r}")
        self.ttl_seconds = ttl_seconds
        self.miss_ttl_seconds = miss_ttl_seconds
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, tuple[float, Optional[dict]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Any:
        """The cached user (or ``None`` for a cached miss); ``NOT_CACHED`` when unknown or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return NOT_CACHED
            expires, value = entry
            if now >= expires:
                del self._entries[key]
                return NOT_CACHED
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: Optional[dict], now: float) -> None:
        ttl = self.ttl_seconds if value is not None else self.miss_ttl_seconds
        if ttl <= 0 or self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = (now + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


_CACHES: dict[tuple, UserCache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(identity: str, *, ttl_seconds: float, miss_ttl_seconds: float, max_entries: int) -> UserCache:
    """The per-worker (per-process) cache for one backend and cache configuration."""
    key = (identity, ttl_seconds, miss_ttl_seconds, max_entries)
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = UserCache(
                ttl_seconds=ttl_seconds, miss_ttl_seconds=miss_ttl_seconds, max_entries=max_entries
            )
        return cache


def _copy(value: Any) -> Any:
    """A copy of a JSON-like value, so that later stages cannot mutate the cache."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _counter(name: str):
    return Metrics.counter(NAMESPACE, f"enrich.{name}")


class EnrichUserAttributesFn(beam.DoFn):
    """Buffers cache misses, looks them up in batches, emits events or dead letters."""

    def __init__(
        self,
        lookup: DynamoDBUserLookup,
        *,
        cache_ttl_seconds: float,
        miss_ttl_seconds: float,
        cache_max_entries: int,
        batch_size: int,
        max_buffered_events: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lookup = lookup
        self._cache_config = dict(
            ttl_seconds=cache_ttl_seconds, miss_ttl_seconds=miss_ttl_seconds, max_entries=cache_max_entries
        )
        self._batch_size = batch_size
        self._max_buffered = max_buffered_events
        self._clock = clock
        self._cache: Optional[UserCache] = None
        self._buffer: list = []
        self._pending: set[str] = set()
        self.received = _counter("received")
        self.succeeded = _counter("succeeded")
        self.dead_lettered = _counter("dead_lettered")
        self.cache_hits = _counter("cache_hits")
        self.cache_misses = _counter("cache_misses")
        self.throttles = _counter("throttles")
        self.lookup_calls = _counter("lookup_calls")
        self.users_found = _counter("users_found")
        self.users_unknown = _counter("users_unknown")
        self.anonymous = _counter("anonymous")
        self.type_mismatches = _counter("type_mismatches")

    def setup(self):
        self._lookup.setup()
        self._cache = shared_cache(self._lookup.cache_key, **self._cache_config)

    def start_bundle(self):
        self._buffer = []
        self._pending = set()
        for counter in (self.received, self.succeeded, self.dead_lettered):
            counter.inc(0)  # reported even when zero: the conservation check reads all three

    def process(
        self,
        element,
        timestamp=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        pane=beam.DoFn.PaneInfoParam,
    ):
        self.received.inc()
        record, event = element
        key = event.get("user_id")
        if not isinstance(key, str) or not key:
            self.anonymous.inc()
            self.succeeded.inc()
            yield (record, self._enriched(event, None))
            return
        cached = self._cache.get(key, self._clock())
        if cached is not NOT_CACHED:
            self.cache_hits.inc()
            self.succeeded.inc()
            (self.users_found if cached is not None else self.users_unknown).inc()
            yield (record, self._enriched(event, cached))
            return
        self.cache_misses.inc()
        self._buffer.append((record, event, key, timestamp, window, pane))
        self._pending.add(key)
        if len(self._pending) >= self._batch_size or len(self._buffer) >= self._max_buffered:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def teardown(self):
        self._lookup.teardown()

    # -- internals --------------------------------------------------------------------
    @staticmethod
    def _enriched(event: dict, user: Optional[dict]) -> dict:
        return dict(event, user=_copy(user), user_found=user is not None)

    def _flush(self):
        if not self._buffer:
            return
        buffer, keys = self._buffer, list(self._pending)
        self._buffer, self._pending = [], set()
        result = self._lookup.lookup(keys)
        self.lookup_calls.inc(result.calls)
        self.throttles.inc(result.throttles)
        self.type_mismatches.inc(result.type_mismatches)
        now = self._clock()
        for key, user in result.users.items():
            self._cache.put(key, user, now)
        for key in result.missing:
            self._cache.put(key, None, now)
        for record, event, key, timestamp, window, pane in buffer:
            if key in result.users or key in result.missing:
                user = result.users.get(key)
                (self.users_found if user is not None else self.users_unknown).inc()
                self.succeeded.inc()
                value = (record, self._enriched(event, user))
                yield WindowedValue(value, timestamp, (window,), pane)
                continue
            attempts, code = result.unavailable.get(key, (0, "NotLookedUp"))
            self.dead_lettered.inc()
            letter = dead_letter(
                "enrich",
                REASON,
                f"user attribute lookup unavailable after {attempts} attempt(s): {code}",
                retryable=True,
                record=record,
                attempts=attempts,
            )
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, timestamp, (window,), pane))


class EnrichWithUserAttributes(beam.PTransform):
    """Joins the ``_user.json`` attributes of each event's user; returns ``(events, dead_letters)``.

    Input and output elements are ``(SourceRecord, event)``; see docs/CONTRACTS.md.
    ``lookup`` is the backend (a :class:`DynamoDBUserLookup`; clients are made on the
    workers). Use :meth:`for_table` to build both from a table name and ``_user.json``.
    """

    def __init__(
        self,
        lookup: DynamoDBUserLookup,
        *,
        cache_ttl_seconds: float = 300.0,
        miss_ttl_seconds: float = 30.0,
        cache_max_entries: int = 100_000,
        batch_size: int = 400,
        max_buffered_events: int = 2_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if not callable(getattr(lookup, "lookup", None)) or not hasattr(lookup, "cache_key"):
            raise ValueError(f"lookup must be a user lookup backend, got {type(lookup).__name__}")
        if cache_ttl_seconds < 0:
            raise ValueError(f"cache_ttl_seconds must be >= 0, got {cache_ttl_seconds!r}")
        if miss_ttl_seconds < 0 or miss_ttl_seconds > cache_ttl_seconds:
            raise ValueError(f"miss_ttl_seconds must be in [0, cache_ttl_seconds], got {miss_ttl_seconds!r}")
        if not isinstance(cache_max_entries, int) or cache_max_entries < 0:
            raise ValueError(f"cache_max_entries must be an int >= 0, got {cache_max_entries!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_buffered_events, int) or max_buffered_events < 1:
            raise ValueError(f"max_buffered_events must be a positive int, got {max_buffered_events!r}")
        self._fn_args = dict(
            cache_ttl_seconds=cache_ttl_seconds,
            miss_ttl_seconds=miss_ttl_seconds,
            cache_max_entries=cache_max_entries,
            batch_size=batch_size,
            max_buffered_events=max_buffered_events,
            clock=clock,
        )
        self._lookup = lookup

    @classmethod
    def for_table(
        cls,
        users_table: str,
        user_schema: Mapping,
        *,
        endpoint_url: Optional[str] = None,
        region_name: Optional[str] = None,
        **options,
    ) -> "EnrichWithUserAttributes":
        """The usual wiring: a :class:`DynamoDBUserLookup` on ``users_table`` typed by ``user_schema``."""
        lookup = DynamoDBUserLookup(
            users_table, user_schema=user_schema, endpoint_url=endpoint_url, region_name=region_name
        )
        return cls(lookup, **options)

    def expand(self, pcoll):
        results = pcoll | "LookUpUserAttributes" >> beam.ParDo(
            EnrichUserAttributesFn(self._lookup, **self._fn_args)
        ).with_outputs(DEAD_LETTERS, main=EVENTS)
        return results[EVENTS], results[DEAD_LETTERS]

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
bounded concurrency, retries with jittered backoff). Up to
``max_lookups_in_flight`` such lookups run on background threads while the
next events are processed (``UserJoin``); the end of a bundle waits for them.
Buffered events are emitted with their own timestamp, window and pane. Anonymous events and
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
import concurrent.futures
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


def copied(value: Any) -> Any:
    """A copy of a JSON-like value that no change to the original reaches (containers copied, leaves shared):
    what ``enriched`` hands later stages, so they cannot mutate the cache, and what a masker compares a cached
    user with."""
    if isinstance(value, dict):
        return {k: copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copied(v) for v in value]
    if isinstance(value, tuple):
        return tuple(copied(v) for v in value)
    if isinstance(value, (set, bytearray)):
        return type(value)(value)
    return value


COUNTERS = ("received", "succeeded", "dead_lettered", "cache_hits", "cache_misses", "throttles", "lookup_calls",
            "users_found", "users_unknown", "anonymous", "type_mismatches")


def enriched(event: dict, user: Optional[dict]) -> dict:
    """The event with ``user`` (a copy, so that later stages cannot mutate the cache) and ``user_found``."""
    return dict(event, user=copied(user), user_found=user is not None)


def unavailable_letter(record, attempts: int, code: str) -> dict:
    """The retryable dead letter of an event whose user could not be looked up (no user id in it)."""
    return dead_letter("enrich", REASON, f"user attribute lookup unavailable after {attempts} attempt(s): {code}",
                       retryable=True, record=record, attempts=attempts)


class _Lookup:
    """One batched lookup under way: its future and the items waiting for its users."""

    __slots__ = ("future", "items")

    def __init__(self, future, items: list):
        self.future = future
        self.items = items


class UserJoin:
    """Joins items with their users: per-worker cache, buffered misses, batched lookups. Plain Python.

    ``join(key, item)`` answers at once for an anonymous item or a cached user,
    and otherwise holds the item. Held users are looked up in one batch
    (``lookup``, BatchGetItem) when ``batch_size`` users or
    ``max_buffered_events`` items are held. With ``max_lookups_in_flight`` > 0
    the batch runs on one of that many background threads (later batches
    queue) while the caller goes on with other items (an item whose user is
    already being looked up waits for that lookup); ``answers()`` returns what
    finished lookups answered, and waits for the oldest lookup only while more
    than ``max_waiting_events`` items wait for lookups (bounded memory). A
    lookup's latency (network, or an emulator sharing the cores) then overlaps
    the processing of the next events instead of stalling it: a cold cache at
    the start of a backfill is the common case. ``flush()`` waits for every
    lookup (end of bundle). With 0 threads, lookups block the caller.

    Answers are ``(item, user, failure)``: ``failure`` is None or ``(attempts,
    code)`` of an unavailable lookup. Counts go to ``tally`` (names of
    ``COUNTERS``) for the caller to report once per bundle: a Beam counter per
    event costs more than the join.
    """

    def __init__(self, lookup: DynamoDBUserLookup, *, cache_config: dict, batch_size: int,
                 max_buffered_events: int, clock: Callable[[], float], max_lookups_in_flight: int = 0,
                 max_waiting_events: int = 20_000):
        self.lookup = lookup
        self.cache_config = cache_config
        self.batch_size = batch_size
        self.max_buffered = max_buffered_events
        self.max_in_flight = max_lookups_in_flight
        self.max_waiting = max_waiting_events
        self.clock = clock
        self.cache: Optional[UserCache] = None
        self.tally: collections.Counter = collections.Counter()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.reset()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(cache=None, _executor=None, _held=[], _pending=set(), _in_flight=collections.deque(),
                     _waiting={}, _waiting_items=0)
        return state

    def setup(self) -> None:
        self.lookup.setup()
        self.cache = shared_cache(self.lookup.cache_key, **self.cache_config)
        if self.max_in_flight:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_in_flight, thread_name_prefix="eventlake-user-lookup")

    def teardown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.lookup.teardown()

    def reset(self) -> None:
        """A new bundle: zero counts, and forget held items and lookups under way (after a failed bundle)."""
        self.tally.clear()
        self._held: list = []
        self._pending: set[str] = set()
        self._in_flight: collections.deque[_Lookup] = collections.deque()
        self._waiting: dict[str, _Lookup] = {}  # key -> the lookup under way that will answer it
        self._waiting_items = 0  # items in lookups under way

    def join(self, key: Any, item: Any) -> Any:
        """``(item, user, None)`` when answered now, else ``None`` (held until its lookup answers)."""
        tally = self.tally
        tally["received"] += 1
        if not isinstance(key, str) or not key:
            tally["anonymous"] += 1
            tally["succeeded"] += 1
            return item, None, None
        cached = self.cache.get(key, self.clock())
        if cached is not NOT_CACHED:
            tally["cache_hits"] += 1
            tally["succeeded"] += 1
            tally["users_found" if cached is not None else "users_unknown"] += 1
            return item, cached, None
        tally["cache_misses"] += 1
        under_way = self._waiting.get(key)
        if under_way is not None:
            under_way.items.append((key, item))
            self._waiting_items += 1
            return None
        self._held.append((key, item))
        self._pending.add(key)
        return None

    def answers(self):
        """Starts the held batch when it is full; yields the answers of finished lookups."""
        if len(self._pending) >= self.batch_size or len(self._held) >= self.max_buffered:
            self._start()
        while self._in_flight and (self._in_flight[0].future.done() or self._waiting_items > self.max_waiting):
            yield from self._answer(self._in_flight.popleft())

    def flush(self):
        """Looks every held user up; yields the answers of every lookup, the last one waited for."""
        self._start()
        while self._in_flight:
            yield from self._answer(self._in_flight.popleft())

    def _start(self) -> None:
        if not self._held:
            return
        keys = list(self._pending)
        if self._executor is None:
            future = concurrent.futures.Future()
            future.set_result(self.lookup.lookup(keys))
        else:
            future = self._executor.submit(self.lookup.lookup, keys)
        under_way = _Lookup(future, self._held)
        self._in_flight.append(under_way)
        self._waiting_items += len(self._held)
        for key in keys:
            self._waiting[key] = under_way
        self._held, self._pending = [], set()

    def _answer(self, under_way: _Lookup):
        result = under_way.future.result()
        self._waiting_items -= len(under_way.items)
        tally = self.tally
        tally["lookup_calls"] += result.calls
        tally["throttles"] += result.throttles
        tally["type_mismatches"] += result.type_mismatches
        now = self.clock()
        for key, user in result.users.items():
            self.cache.put(key, user, now)
        for key in result.missing:
            self.cache.put(key, None, now)
        for key, item in under_way.items:
            if self._waiting.get(key) is under_way:
                del self._waiting[key]
            if key in result.users or key in result.missing:
                user = result.users.get(key)
                tally["users_found" if user is not None else "users_unknown"] += 1
                tally["succeeded"] += 1
                yield item, user, None
                continue
            tally["dead_lettered"] += 1
            yield item, None, result.unavailable.get(key, (0, "NotLookedUp"))


def report(tally: collections.Counter, counters: Mapping[str, Any]) -> None:
    """Adds the bundle's tally to its Beam counters (every counter, zeros included) and clears it."""
    for name, counter in counters.items():
        counter.inc(tally.get(name, 0))
    tally.clear()


def enrich_counters() -> dict:
    return {name: Metrics.counter(NAMESPACE, f"enrich.{name}") for name in COUNTERS}


def join_options(
    *,
    cache_ttl_seconds: float = 300.0,
    miss_ttl_seconds: float = 30.0,
    cache_max_entries: int = 100_000,
    batch_size: int = 400,
    max_buffered_events: int = 2_000,
    max_lookups_in_flight: int = 2,
    max_waiting_events: int = 20_000,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """The enrichment options, checked, with their defaults: the one place they are defined, for
    ``EnrichWithUserAttributes``, ``EnrichUserAttributesFn``, ``ProcessEvents(enrich_options=...)`` and ``user_join``."""
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
    if isinstance(max_lookups_in_flight, bool) or not isinstance(max_lookups_in_flight, int) \
            or max_lookups_in_flight < 0:
        raise ValueError(f"max_lookups_in_flight must be an int >= 0, got {max_lookups_in_flight!r}")
    if isinstance(max_waiting_events, bool) or not isinstance(max_waiting_events, int) or max_waiting_events < 0:
        raise ValueError(f"max_waiting_events must be an int >= 0, got {max_waiting_events!r}")
    return dict(cache_ttl_seconds=cache_ttl_seconds, miss_ttl_seconds=miss_ttl_seconds,
                cache_max_entries=cache_max_entries, batch_size=batch_size,
                max_buffered_events=max_buffered_events, max_lookups_in_flight=max_lookups_in_flight,
                max_waiting_events=max_waiting_events, clock=clock)


def user_join(lookup: DynamoDBUserLookup, **options) -> UserJoin:
    """A :class:`UserJoin` on ``lookup`` with the (checked) options of :func:`join_options`."""
    options = join_options(**options)
    return UserJoin(
        lookup,
        cache_config=dict(ttl_seconds=options["cache_ttl_seconds"], miss_ttl_seconds=options["miss_ttl_seconds"],
                          max_entries=options["cache_max_entries"]),
        batch_size=options["batch_size"], max_buffered_events=options["max_buffered_events"],
        max_lookups_in_flight=options["max_lookups_in_flight"], max_waiting_events=options["max_waiting_events"],
        clock=options["clock"],
    )


class EnrichUserAttributesFn(beam.DoFn):
    """Buffers cache misses, looks them up in batches, emits events or dead letters.

    ``options`` are those of :func:`join_options` (checked there, with their defaults).
    """

    def __init__(self, lookup: DynamoDBUserLookup, **options):
        self._join = user_join(lookup, **options)
        self._counters = enrich_counters()

    def setup(self):
        self._join.setup()

    def start_bundle(self):
        self._join.reset()

    def process(
        self,
        element,
        timestamp=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        pane=beam.DoFn.PaneInfoParam,
    ):
        record, event = element
        answer = self._join.join(event.get("user_id"), (record, event, timestamp, window, pane))
        if answer is not None:
            (record, event, _, _, _), user, _ = answer
            yield record, enriched(event, user)
        yield from self._emit(self._join.answers())

    def finish_bundle(self):
        yield from self._emit(self._join.flush())
        report(self._join.tally, self._counters)

    def teardown(self):
        self._join.teardown()

    @staticmethod
    def _emit(answers):
        for (record, event, timestamp, window, pane), user, failure in answers:
            if failure is None:
                yield WindowedValue((record, enriched(event, user)), timestamp, (window,), pane)
            else:
                letter = unavailable_letter(record, *failure)
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, timestamp, (window,), pane))


class EnrichWithUserAttributes(beam.PTransform):
    """Joins the ``_user.json`` attributes of each event's user; returns ``(events, dead_letters)``.

    Input and output elements are ``(SourceRecord, event)``; see docs/CONTRACTS.md.
    ``lookup`` is the backend (a :class:`DynamoDBUserLookup`; clients are made on the
    workers); ``options`` are those of :func:`join_options` (cache TTLs and size, lookup
    batching and concurrency). Use :meth:`for_table` to build both from a table name and
    ``_user.json``.
    """

    def __init__(self, lookup: DynamoDBUserLookup, **options):
        super().__init__()
        if not callable(getattr(lookup, "lookup", None)) or not hasattr(lookup, "cache_key"):
            raise ValueError(f"lookup must be a user lookup backend, got {type(lookup).__name__}")
        self._fn_args = join_options(**options)
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

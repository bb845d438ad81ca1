"""The processing core: raw records -> lake rows, every record accounted for.

``ProcessEvents`` runs the stages of docs/CONTRACTS.md, parse -> validate ->
enrich -> mask, and stamps each surviving event as a lake row
(``processed_at``, ``pipeline_version``); a record either becomes one row or
one dead letter of the stage that failed it.

Records come one per element or as ``RecordBatch``es (the backfill reader's, the Kinesis reader's);
the rows of a batch leave as one ``RowBatch`` per window and pane (each row
with its own timestamp), which ``WriteToLake`` takes as they are, so a batch
crosses the DoFns of its fused stage as one element instead of a thousand.

The stages run in one DoFn (``ProcessRecordsFn``), each a plain function of its
module (``parse.to_event``, ``validate.validated``, ``enrich.UserJoin``,
``mask.mask_event``), not as a chain of ParDos: a ParDo per stage cost each
record a dispatch, a tagged output and a counter update per stage, which
measured more than the stages' own work in a backfill (docs/benchmarks.md).
Within the DoFn a batch goes through one stage at a time (every record parsed,
then every event validated and joined, then every event masked), which kept
each stage's code and data in the CPU's caches: 21 % less CPU than taking each
record through all the stages in turn. The stage transforms (``ParseEvents``, ``ValidateEvents``,
``EnrichWithUserAttributes``, ``MaskPersonalData``) stay for pipelines that
compose them differently.

Metrics (namespace ``eventlake``): every stage counts ``<stage>.received``,
``<stage>.succeeded`` and ``<stage>.dead_lettered`` (plus enrich's cache and
lookup counters); the core adds ``core.received`` (records in),
``core.succeeded`` (rows out) and ``core.dead_lettered`` (dead letters out).
Conservation: ``core.received == core.succeeded + core.dead_lettered``. Counts
are added up per bundle and reported when the bundle finishes.
"""
from __future__ import annotations

import collections
from typing import Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.dead_letter import dead_letter
from transforms.dynamodb_users import DynamoDBUserLookup
from transforms.enrich import enrich_counters, join_options, report, unavailable_letter, user_join
from transforms.envelope import DEFAULT_LIMITS, InvalidEvent, Limits, utc_now_ms
from transforms.allocator import map_large_buffers
from transforms.garbage_collection import tune_for_batches
from transforms.mask import MaskingFailure, load_masker, mask_event
from transforms.parse import ParseFailure, to_event
from transforms.records import RecordBatch, RowBatch
from transforms.schemas import SchemaRegistry, SchemaViolation, UnknownEventType, read_documents
from transforms.validate import validated
from transforms.version import PIPELINE_VERSION

NAMESPACE = "eventlake"
ROWS = "rows"
DEAD_LETTERS = "dead_letters"
_STAGE_COUNTERS = tuple(f"{stage}.{count}" for stage in ("parse", "validate", "mask", "core")
                        for count in ("received", "succeeded", "dead_lettered"))


class ProcessRecordsFn(beam.DoFn):
    """``SourceRecord`` -> lake row (main output) or dead letter (``DEAD_LETTERS``), all stages in one call;
    ``RecordBatch`` -> ``RowBatch`` (main output) and dead letters.

    A batch goes through the stages one stage at a time: every record is
    parsed, then every parsed event validated and joined with its user, then
    every joined event masked and stamped. Taking each event through all the
    stages before the next one cost 27 % more CPU for the same work here
    (median 17.67 vs 13.87 s over 100,000 events: the stages' code and data,
    the schemas, the JSON decoder, the HMAC and regular expressions, no longer
    stayed in the CPU's caches from one event to the next; docs/benchmarks.md).

    Events whose user is not cached wait in the ``UserJoin`` for a batched
    lookup (started at ``batch_size`` users or ``max_buffered_events`` events,
    or at the end of the bundle; it runs while the next records are processed),
    then leave with their own timestamp, window and pane. The
    element timestamp of a row is its ``received_at`` when that is later than
    the record's (a backfill line without one moves forward, as in parse).
    Pseudonymization keys are loaded in ``setup()`` and never pickled.
    """

    def __init__(self, documents: dict, lookup: DynamoDBUserLookup, join: dict, *,
                 keys_secret_id: Optional[str], limits: Limits, pipeline_version: str):
        self._documents = documents
        self._lookup = lookup
        self._join_options = join
        self._keys_secret_id = keys_secret_id
        self._limits = limits
        self._pipeline_version = pipeline_version
        self._masker = None
        self._counters = {name: Metrics.counter(NAMESPACE, name) for name in _STAGE_COUNTERS}
        self._enrich_counters = enrich_counters()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masker"] = None  # never ship loaded keys, whoever pickles this
        state.pop("_join", None)
        return state

    def setup(self):
        tune_for_batches()
        map_large_buffers()
        self._registry = SchemaRegistry.from_documents(self._documents)
        self._masker = load_masker(self._registry, self._keys_secret_id, shared_users=True)  # the join's cache
        self._join = user_join(self._lookup, **self._join_options)
        self._join.setup()
        self._tally = collections.Counter()

    def teardown(self):
        self._masker = None
        join = getattr(self, "_join", None)
        if join is not None:
            join.teardown()

    def start_bundle(self):
        self._tally.clear()
        self._join.reset()
        self._batched = False  # whether this bundle's rows leave as RowBatches

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam):
        if isinstance(element, RecordBatch):
            self._batched = True
            timestamped = [(record, event_ms * 1000) for record, event_ms in element.timestamped()]
        else:
            timestamped = [(element, timestamp.micros)]
        letters, joined = self._parsed_and_joined(timestamped, window, pane)
        yield from letters
        yield from self._emitted(self._finished(joined))

    def finish_bundle(self):
        yield from self._emitted(self._finished(list(self._join.flush())))
        report(self._tally, self._counters)
        report(self._join.tally, self._enrich_counters)

    def _parsed_and_joined(self, timestamped: list, window, pane) -> tuple:
        """Parse every record, then validate and join every parsed event. Returns the dead letters, and what the
        join answered meanwhile (for these records, or held ones of earlier calls) as ``(item, user, failure)``."""
        tally, limits = self._tally, self._limits
        letters, parsed = [], []
        for record, micros in timestamped:
            try:
                parsed.append((record, to_event(record, micros // 1000, limits), micros))
            except (ParseFailure, InvalidEvent) as exc:
                letters.append(self._dead_letter("parse", exc.reason, str(exc), record, micros, window, pane))
        parse_failed = len(letters)
        registry, join = self._registry, self._join
        joined = []
        for record, event, micros in parsed:
            try:
                event = validated(registry, event)
            except (UnknownEventType, SchemaViolation) as exc:
                letters.append(self._dead_letter("validate", exc.reason, str(exc), record, micros, window, pane))
                continue
            received_micros = event["received_at"] * 1000
            if received_micros > micros:
                micros = received_micros
            answer = join.join(event.get("user_id"), (record, event, micros, window, pane))
            if answer is None:  # held: starts the lookup once enough users are held
                joined.extend(join.answers())
            else:
                joined.append(answer)
        joined.extend(join.answers())
        validate_failed = len(letters) - parse_failed
        tally["core.received"] += len(timestamped)
        tally["parse.received"] += len(timestamped)
        tally["parse.succeeded"] += len(parsed)
        tally["parse.dead_lettered"] += parse_failed
        tally["validate.received"] += len(parsed)
        tally["validate.succeeded"] += len(parsed) - validate_failed
        tally["validate.dead_lettered"] += validate_failed
        tally["core.dead_lettered"] += len(letters)
        return letters, joined

    def _finished(self, joined: list) -> tuple:
        """Mask and stamp every joined event. Returns the dead letters (lookup unavailable, masking failed) and
        the rows as ``(row, micros, window, pane)``."""
        masker, processed_at, version = self._masker, utc_now_ms(), self._pipeline_version
        letters, rows = [], []
        unavailable = 0
        for (record, event, micros, window, pane), user, failure in joined:
            if failure is not None:
                unavailable += 1
                letter = unavailable_letter(record, *failure)
            else:
                try:
                    # No copy of the cached user (enrich.enriched makes one): masking builds new containers.
                    row = mask_event(masker, dict(event, user=user, user_found=user is not None))
                except MaskingFailure as exc:
                    letter = dead_letter("mask", exc.reason, str(exc), retryable=False, record=record)
                else:
                    row["processed_at"] = processed_at
                    row["pipeline_version"] = version
                    rows.append((row, micros, window, pane))
                    continue
            letters.append(_tagged_letter(letter, micros, window, pane))
        tally = self._tally
        tally["mask.received"] += len(joined) - unavailable
        tally["mask.succeeded"] += len(rows)
        tally["mask.dead_lettered"] += len(letters) - unavailable
        tally["core.succeeded"] += len(rows)
        tally["core.dead_lettered"] += len(letters)
        return letters, rows

    def _emitted(self, finished: tuple):
        """The dead letters, then the rows: one ``RowBatch`` per window and pane in a bundle of batches, else one
        windowed value each."""
        letters, rows = finished
        yield from letters
        if not self._batched:
            for row, micros, window, pane in rows:
                yield WindowedValue(row, Timestamp(micros=micros), (window,), pane)
            return
        groups: dict = {}
        for row, micros, window, pane in rows:
            group = groups.get((window, pane))
            if group is None:
                group = groups[(window, pane)] = ([], [])
            group[0].append(row)
            group[1].append(micros)
        for (window, pane), (batch_rows, batch_micros) in groups.items():
            yield WindowedValue(RowBatch(tuple(batch_rows), tuple(batch_micros)), Timestamp(micros=min(batch_micros)),
                                (window,), pane)

    def _dead_letter(self, stage: str, reason: str, message: str, record, micros: int, window, pane):
        return _tagged_letter(dead_letter(stage, reason, message, retryable=False, record=record), micros, window, pane)


def _tagged_letter(letter: dict, micros: int, window, pane):
    """A dead letter as the core's ``DEAD_LETTERS`` output, in its record's time, window and pane."""
    return beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, Timestamp(micros=micros), (window,), pane))


class ProcessEvents(beam.PTransform):
    """``SourceRecord`` -> ``(rows, dead_letters)`` through parse, validate, enrich and mask.

    Given ``RecordBatch`` elements (the backfill or Kinesis reader's), ``rows`` holds ``RowBatch``es of rows.

    Users are looked up in DynamoDB table ``users_table`` (``endpoint_url``,
    ``region_name``; ``enrich_options`` are those of ``enrich.join_options``:
    cache TTLs and size, lookup batch size); masking uses the schemas of
    ``schema_dir`` and the keys in Secrets Manager ``pseudonymization_secret``,
    else in the workers' environment.
    """

    def __init__(
        self,
        schema_dir: str,
        users_table: str,
        *,
        endpoint_url: Optional[str] = None,
        region_name: Optional[str] = None,
        enrich_options: Optional[Mapping] = None,
        pseudonymization_secret: Optional[str] = None,
        limits: Limits = DEFAULT_LIMITS,
        pipeline_version: str = PIPELINE_VERSION,
    ):
        super().__init__()
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        if not isinstance(users_table, str) or not users_table:
            raise ValueError(f"users_table must be a DynamoDB table name, got {users_table!r}")
        if not isinstance(pipeline_version, str) or not pipeline_version:
            raise ValueError(f"pipeline_version must be a non-empty string, got {pipeline_version!r}")
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a transforms.envelope.Limits, got {type(limits).__name__}")
        if pseudonymization_secret is not None and (
                not isinstance(pseudonymization_secret, str) or not pseudonymization_secret.strip()):
            raise ValueError("pseudonymization_secret must be a Secrets Manager secret id or None, "
                             f"got {pseudonymization_secret!r}")
        self._schema_dir = schema_dir
        self._users_table = users_table
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._join_options = join_options(**dict(enrich_options or {}))
        self._pseudonymization_secret = pseudonymization_secret
        self._limits = limits
        self._pipeline_version = pipeline_version

    def expand(self, records):
        documents = read_documents(self._schema_dir)
        registry = SchemaRegistry.from_documents(documents)  # a bad directory fails here, naming the file
        lookup = DynamoDBUserLookup(self._users_table, user_schema=registry.user_schema,
                                    endpoint_url=self._endpoint_url, region_name=self._region_name)
        process = beam.ParDo(ProcessRecordsFn(
            documents, lookup, self._join_options, keys_secret_id=self._pseudonymization_secret,
            limits=self._limits, pipeline_version=self._pipeline_version,
        ))
        if records.element_type is RecordBatch:  # batches in, batches out: the batch coder (transforms.records)
            process = process.with_output_types(RowBatch)
        results = records | "ProcessRecords" >> process.with_outputs(DEAD_LETTERS, main=ROWS)
        return results[ROWS], results[DEAD_LETTERS]

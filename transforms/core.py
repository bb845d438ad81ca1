"""The processing core: raw records -> lake rows, every record accounted for.

``ProcessEvents`` chains the stages of docs/CONTRACTS.md, parse -> validate ->
enrich -> mask, and stamps each surviving event as a lake row
(``processed_at``, ``pipeline_version``). Each stage returns ``(events,
dead_letters)``; the dead letters of all stages are flattened into one
PCollection, so a record either becomes one row or one dead letter.

Metrics (namespace ``eventlake``): every stage counts ``<stage>.received``,
``<stage>.succeeded`` and ``<stage>.dead_lettered``; the core adds
``core.received`` (records in), ``core.succeeded`` (rows out) and
``core.dead_lettered`` (dead letters out). Conservation:
``core.received == core.succeeded + core.dead_lettered``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.envelope import DEFAULT_LIMITS, Limits, utc_now_ms
from transforms.parse import ParseEvents
from transforms.validate import ValidateEvents
from transforms.version import PIPELINE_VERSION

NAMESPACE = "eventlake"


class _Count(beam.DoFn):
    """Counts elements as they pass (one counter, no change to the element)."""

    def __init__(self, name: str):
        self.counter = Metrics.counter(NAMESPACE, name)

    def process(self, element):
        self.counter.inc()
        yield element


class StampRowsFn(beam.DoFn):
    """``(record, event)`` -> the lake row: the event plus ``processed_at`` and ``pipeline_version``."""

    def __init__(self, pipeline_version: str):
        self.pipeline_version = pipeline_version
        self.rows = Metrics.counter(NAMESPACE, "core.succeeded")

    def process(self, element):
        _, event = element
        self.rows.inc()
        yield {**event, "processed_at": utc_now_ms(), "pipeline_version": self.pipeline_version}


class ProcessEvents(beam.PTransform):
    """``SourceRecord`` -> ``(rows, dead_letters)`` through parse, validate, enrich and mask.

    ``enrich`` and ``mask`` take ready-made stage transforms (e.g. with test
    doubles or other options); by default they are built from ``users_table``
    (``EnrichWithUserAttributes.for_table`` with ``endpoint_url``,
    ``region_name`` and ``enrich_options``) and ``schema_dir``
    (``MaskPersonalData``, keys from ``pseudonymization_secret`` in Secrets
    Manager, else from the workers' environment).
    """

    def __init__(
        self,
        schema_dir: str,
        users_table: str,
        *,
        endpoint_url: Optional[str] = None,
        region_name: Optional[str] = None,
        enrich_options: Optional[Mapping] = None,
        enrich: Optional[beam.PTransform] = None,
        mask: Optional[beam.PTransform] = None,
        pseudonymization_secret: Optional[str] = None,
        limits: Limits = DEFAULT_LIMITS,
        pipeline_version: str = PIPELINE_VERSION,
    ):
        super().__init__()
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        if enrich is None and (not isinstance(users_table, str) or not users_table):
            raise ValueError(f"users_table must be a DynamoDB table name, got {users_table!r}")
        if not isinstance(pipeline_version, str) or not pipeline_version:
            raise ValueError(f"pipeline_version must be a non-empty string, got {pipeline_version!r}")
        for name, stage in (("enrich", enrich), ("mask", mask)):
            if stage is not None and not isinstance(stage, beam.PTransform):
                raise ValueError(f"{name} must be a PTransform, got {type(stage).__name__}")
        self._schema_dir = schema_dir
        self._users_table = users_table
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._enrich_options = dict(enrich_options or {})
        self._enrich = enrich
        self._mask = mask
        self._pseudonymization_secret = pseudonymization_secret
        self._limits = limits
        self._pipeline_version = pipeline_version

    def _enrich_stage(self) -> beam.PTransform:
        if self._enrich is not None:
            return self._enrich
        from transforms.enrich import EnrichWithUserAttributes
        from transforms.schemas import SchemaRegistry

        user_schema = SchemaRegistry.load(self._schema_dir).user_schema
        return EnrichWithUserAttributes.for_table(
            self._users_table, user_schema, endpoint_url=self._endpoint_url, region_name=self._region_name,
            **self._enrich_options,
        )

    def _mask_stage(self) -> beam.PTransform:
        if self._mask is not None:
            return self._mask
        from transforms.mask import MaskPersonalData

        return MaskPersonalData(self._schema_dir, keys_secret_id=self._pseudonymization_secret)

    def expand(self, records):
        counted = records | "CountRecords" >> beam.ParDo(_Count("core.received"))
        parsed, parse_dead = counted | "ParseEvents" >> ParseEvents(limits=self._limits)
        valid, validate_dead = parsed | "ValidateEvents" >> ValidateEvents(self._schema_dir)
        enriched, enrich_dead = valid | "EnrichWithUserAttributes" >> self._enrich_stage()
        masked, mask_dead = enriched | "MaskPersonalData" >> self._mask_stage()
        rows = masked | "StampRows" >> beam.ParDo(StampRowsFn(self._pipeline_version))
        dead_letters = (
            (parse_dead, validate_dead, enrich_dead, mask_dead)
            | "FlattenDeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.ParDo(_Count("core.dead_lettered"))
        )
        return rows, dead_letters

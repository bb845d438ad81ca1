"""Validate stage: each event's ``properties`` and ``context`` against the schema registry.

Events of a type with no schema are dead letters ``unknown_event_type``;
properties or declared context fields that do not match are ``schema_violation``
with a message that holds the JSON path and the failed keyword, never a value.
Valid events leave with ``properties`` and ``context`` coerced to lake types
(docs/CONTRACTS.md) and their ``schema_version``. Undeclared context keys are
kept as strings in ``context.extra`` (schemas/README.md).

The schema directory is read when the pipeline is built (``expand``) and its
parsed documents travel in the graph, so workers need no access to the
directory; validators are compiled in ``DoFn.setup()``.

Metrics (namespace ``eventlake``): ``validate.received``, ``validate.succeeded``,
``validate.dead_lettered``.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.dead_letter import dead_letter
from transforms.schemas import SchemaRegistry, SchemaViolation, UnknownEventType, read_documents

NAMESPACE = "eventlake"
STAGE = "validate"
EVENTS = "events"
DEAD_LETTERS = "dead_letters"


def validated(registry: SchemaRegistry, event: dict) -> dict:
    """The event with ``properties`` and ``context`` coerced and its ``schema_version``.

    Raises ``UnknownEventType`` or ``SchemaViolation`` (messages hold no values).
    """
    event_type = event["event_type"]
    return {
        **event,
        "properties": registry.validate(event_type, event["properties"]),
        "context": registry.validate_context(event["context"]),
        "schema_version": registry.schema_version(event_type),
    }


class ValidateEventsFn(beam.DoFn):
    def __init__(self, documents: dict):
        self.documents = documents
        self.registry = None
        self.received = Metrics.counter(NAMESPACE, "validate.received")
        self.succeeded = Metrics.counter(NAMESPACE, "validate.succeeded")
        self.dead_lettered = Metrics.counter(NAMESPACE, "validate.dead_lettered")

    def setup(self):
        self.registry = SchemaRegistry.from_documents(self.documents)

    def process(self, element):
        record, event = element
        self.received.inc()
        try:
            event = validated(self.registry, event)
        except (UnknownEventType, SchemaViolation) as exc:
            self.dead_lettered.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, dead_letter(STAGE, exc.reason, str(exc), retryable=False, record=record)
            )
            return
        self.succeeded.inc()
        yield record, event


class ValidateEvents(beam.PTransform):
    """``(record, event)`` -> ``(record, validated event)``; returns ``(events, dead_letters)``."""

    def __init__(self, schema_dir: str):
        super().__init__()
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        self._schema_dir = schema_dir

    def expand(self, events):
        documents = read_documents(self._schema_dir)
        SchemaRegistry.from_documents(documents)  # a bad directory fails here, naming the file
        results = events | "ValidateProperties" >> beam.ParDo(ValidateEventsFn(documents)).with_outputs(
            DEAD_LETTERS, main=EVENTS
        )
        return results[EVENTS], results[DEAD_LETTERS]

"""The events pipeline: Kinesis (or backfill files) -> validate -> enrich -> mask -> Parquet lake.

Runbook (one command per runner; ``make demo`` runs the first on the local stack):

Local streaming on Prism (the default runner of this module)::

    python -m pipelines.events --input_stream=eventlake-events --users_table=eventlake-users \\
        --output=./lake --dead_letter=./dead_letters --stop_when_idle_seconds=30

Production streaming on Flink (see README "Run on Flink")::

    python -m pipelines.events --runner=FlinkRunner --flink_master=jobmanager:8081 \\
        --environment_type=EXTERNAL --environment_config=localhost:50000 --checkpointing_interval=60000 \\
        --input_stream=events --users_table=users --output=s3://lake/prod \\
        --dead_letter=https://sqs.eu-west-1.amazonaws.com/123456789012/eventlake-dlq --setup_file=./setup.py

Backfill (batch) on Spark (see README "Run on Spark")::

    python -m pipelines.events --mode=backfill --runner=SparkRunner --spark_master_url=local[2] \\
        --input='s3://archive/events/2026-11-*.jsonl.gz' --users_table=users \\
        --output=s3://lake/prod --dead_letter=s3://lake/dead_letters

Every event read ends in the lake or the dead-letter output; at the end of a run
the pipeline prints its conservation line (read = rows written + dead letters).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.options import EventsOptions
from pipelines.preflight import PreflightError, check_events_pipeline
from transforms.backfill import ReadBackfillFiles
from transforms.core import ProcessEvents
from transforms.dead_letter_sinks import WriteDeadLetters, default_overflow
from transforms.garbage_collection import freeze_before_exit
from transforms.kinesis import ReadFromKinesis
from transforms.lake import WriteToLake

LOG = logging.getLogger("eventlake.pipelines.events")


class EventsOutput(NamedTuple):
    """What ``build_pipeline`` returns, for tests to assert on (in backfill mode ``rows`` holds ``RowBatch``es).

    ``dead_letters`` holds the core's and the lake writer's dead letters, ``dead_letter_files`` what writing each
    of them delivered, in the same order.
    """

    rows: beam.PCollection
    written_files: beam.PCollection
    dead_letters: tuple[beam.PCollection, beam.PCollection]
    dead_letter_files: tuple[beam.PCollection, beam.PCollection]


#: Records per element from each source: the backfill reader's lines and the Kinesis reader's records travel to the
#: core as batches (transforms.records), each record with its own event time.
RECORDS_PER_ELEMENT = 1000


def build_pipeline(p: beam.Pipeline, opts: EventsOptions) -> EventsOutput:
    """Wires source -> core -> sinks onto ``p``; no I/O happens here."""
    if opts.mode == "stream":
        records = p | "ReadKinesis" >> ReadFromKinesis(
            opts.input_stream,
            start_position=opts.start_position,
            stop_when_idle_seconds=opts.stop_when_idle_seconds,
            idle_watermark_seconds=opts.idle_watermark_seconds,  # 0: off
            records_per_element=RECORDS_PER_ELEMENT,
        )
    else:
        records = p | "ReadBackfill" >> ReadBackfillFiles(opts.input, batch_lines=RECORDS_PER_ELEMENT)

    rows, core_dead_letters = records | "ProcessEvents" >> ProcessEvents(
        opts.schema_dir,
        opts.users_table,
        pseudonymization_secret=opts.pseudonymization_secret,
    )
    written_files, write_dead_letters = rows | "WriteToLake" >> WriteToLake(
        opts.output,
        opts.schema_dir,
        window_seconds=opts.window_seconds,
        allowed_lateness_seconds=opts.allowed_lateness_seconds,
    )
    # Each stage's dead letters are written where that stage made them, not through a Flatten of both: the
    # FnApiRunner turns a Flatten into a buffer in the runner, and every dead letter of a backfill then
    # crossed it and waited for a stage of its own after the main one (1.4 s of a 500,000-event backfill
    # with 25,000 dead letters, docs/benchmarks.md stop 23). The sink takes any split of the letters.
    sink = dict(overflow=opts.dead_letter_overflow or default_overflow(opts.output), window_seconds=opts.window_seconds)
    delivered = (core_dead_letters | "WriteDeadLetters" >> WriteDeadLetters(opts.dead_letter, **sink),
                 write_dead_letters | "WriteLakeDeadLetters" >> WriteDeadLetters(opts.dead_letter, **sink))
    return EventsOutput(rows, written_files, (core_dead_letters, write_dead_letters), delivered)


def _validate(opts: EventsOptions) -> None:
    missing = [name for name in ("output", "dead_letter") if not getattr(opts, name)]
    if opts.mode == "stream" and not opts.input_stream:
        missing.append("input_stream")
    if opts.mode == "backfill" and not opts.input:
        missing.append("input")
    if missing:
        raise ValueError("missing option(s): " + ", ".join("--" + m for m in missing))
    if opts.window_seconds <= 0:
        raise ValueError(f"--window_seconds must be positive, got {opts.window_seconds}")
    if opts.idle_watermark_seconds is not None and opts.idle_watermark_seconds < 0:
        raise ValueError(f"--idle_watermark_seconds must be >= 0 (0: off), got {opts.idle_watermark_seconds}")
    if opts.allowed_lateness_seconds < 0:
        raise ValueError(f"--allowed_lateness_seconds must be >= 0, got {opts.allowed_lateness_seconds}")


def conservation(result) -> dict:
    """Reads the run's counters: events read, rows written, dead letters."""
    from runners.metrics import counter_totals

    totals = counter_totals(result)
    read = totals.get("kinesis.records_read", 0) + totals.get("backfill.lines_read", 0)
    rows = totals.get("lake.rows_written", 0)
    dead = totals.get("dead_letters.written", 0)
    return {"read": read, "rows_written": rows, "dead_letters": dead, "conserved": read == rows + dead}


def run(argv: Optional[list[str]] = None) -> dict:
    """Parses options, checks resources, runs the pipeline, returns the conservation summary."""
    from runners.profiles import apply_default_runner, executed_runner

    options = PipelineOptions(argv)
    opts = options.view_as(EventsOptions)
    _validate(opts)
    if not opts.skip_preflight:
        check_events_pipeline(opts)
    streaming = opts.mode == "stream"
    options.view_as(StandardOptions).streaming = streaming
    apply_default_runner(options, streaming=streaming)

    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, opts)
    result = pipeline.run()
    result.wait_until_finish()
    summary = conservation(result)
    summary["runner"] = executed_runner(result)
    LOG.info("events pipeline finished: %s", json.dumps(summary))
    print(json.dumps({"eventlake_run": summary}), flush=True)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        summary = run(argv)
    except (ValueError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    freeze_before_exit()
    return 0 if summary["conserved"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compaction: merge each lake partition's small files into files of a target size, each event once.

Runbook. Compact closed partitions (their day has ended), never today's: the
streaming pipeline keeps adding files to the current day (compaction leaves
files that arrive while it runs alone, so it is safe, just wasted work).

Local (Prism, the default runner here)::

    python -m pipelines.compact --output=./lake --older_than=1d

Chosen partitions, smaller files::

    python -m pipelines.compact --output=s3://lake/prod \\
        --partition=event_type=workout_completed/year=2026/month=11/day=26 --target_file_mb=128

Batch on Spark (see README "Run on Spark")::

    python -m pipelines.compact --runner=SparkRunner --spark_master_url=local[2] \\
        --output=s3://lake/prod --older_than=2026-11-27T00:00:00Z --setup_file=./setup.py

``--older_than`` takes a duration (``36h``, ``2d``: partitions whose day ended
that long ago) or an RFC 3339 time / ``YYYY-MM-DD`` (partitions whose day ended
by then). Without ``--partition`` or ``--older_than`` nothing is compacted
(an operator must say which partitions).

What happens to a partition, and why a crash is harmless: see
``transforms.compaction``. In short: merged files are written under new names
and read back (rows == distinct ids of the originals) before a manifest is
written and the originals removed; re-running the same command finishes any
interrupted partition. Readers may briefly see an event twice (dedupe on
``event_id``), never not at all. The run prints one JSON line per partition
and a total; the exit code is 1 if a partition could not be compacted safely.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import LakeOptions
from transforms.compaction import CompactPartitions, DiscoverPartitions, check_partition
from transforms.envelope import parse_rfc3339_ms

LOG = logging.getLogger("eventlake.pipelines.compact")
_DURATION = re.compile(r"^(\d+)([hd])$")


class CompactOptions(PipelineOptions):
    @property
    def output(self):
        return self.view_as(LakeOptions).output

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--partition", action="append", default=None,
                            help="event_type=<t>/year=<YYYY>/month=<MM>/day=<DD> (repeatable)")
        parser.add_argument("--older_than", default=None,
                            help="compact partitions whose day ended this long ago (36h, 2d) or by this time")
        parser.add_argument("--target_file_mb", type=float, default=256.0, help="size of the merged files")
        parser.add_argument("--compaction_staging_directory", default=None,
                            help="local directory for files being merged (default: the system temp directory)")


def ended_before(older_than: str, now: Optional[dt.datetime] = None) -> dt.datetime:
    """The cut-off moment of ``--older_than`` (module docstring)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    match = _DURATION.match(older_than.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return now - (dt.timedelta(hours=amount) if unit == "h" else dt.timedelta(days=amount))
    if re.match(r"^\d{4}-\d{2}-\d{2}$", older_than):
        return dt.datetime.fromisoformat(older_than).replace(tzinfo=dt.timezone.utc)
    epoch_ms = parse_rfc3339_ms(older_than)
    if epoch_ms is None:
        raise ValueError(f"--older_than must be a duration (36h, 2d), an RFC 3339 time or a date, got {older_than!r}")
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.timezone.utc)


def _validate(opts: CompactOptions) -> None:
    if not opts.output:
        raise ValueError("missing option: --output")
    if not opts.partition and not opts.older_than:
        raise ValueError("say which partitions: --partition=... (repeatable) or --older_than=...")
    if opts.partition and opts.older_than:
        raise ValueError("give --partition or --older_than, not both")
    for partition in opts.partition or []:
        check_partition(partition)
    if not 0 < opts.target_file_mb <= 1_048_576:
        raise ValueError(f"--target_file_mb must be in (0, 1048576], got {opts.target_file_mb}")


def build_pipeline(p: beam.Pipeline, opts: CompactOptions):
    """Partitions -> compaction reports; returns the reports PCollection."""
    if opts.partition:
        partitions = p | "Partitions" >> beam.Create(sorted({check_partition(x) for x in opts.partition}))
    else:
        cutoff = ended_before(opts.older_than)
        partitions = p | "DiscoverPartitions" >> DiscoverPartitions(
            opts.output, ended_before_ms=int(cutoff.timestamp() * 1000))
    return partitions | "CompactPartitions" >> CompactPartitions(
        opts.output, target_file_mb=opts.target_file_mb, staging_directory=opts.compaction_staging_directory)


class _Collect(beam.DoFn):
    """Prints each partition's report as it finishes (runs on the worker)."""

    def process(self, report):
        print(json.dumps({"eventlake_compaction": report}), flush=True)
        yield report


def run(argv: Optional[list[str]] = None) -> dict:
    """Parses options, runs the batch pipeline, returns the totals of the run's counters."""
    from runners.metrics import counter_totals
    from runners.profiles import apply_default_runner, executed_runner

    options = PipelineOptions(argv)
    opts = options.view_as(CompactOptions)
    _validate(opts)
    apply_default_runner(options, streaming=False)
    pipeline = beam.Pipeline(options=options)
    _ = build_pipeline(pipeline, opts) | "PrintReports" >> beam.ParDo(_Collect())
    result = pipeline.run()
    result.wait_until_finish()
    totals = {name: value for name, value in counter_totals(result).items() if name.startswith("compaction.")}
    summary = {"runner": executed_runner(result), **totals}
    print(json.dumps({"eventlake_compaction_run": summary}), flush=True)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a runner wraps CompactionError; its text names partitions only
        print(f"error: compaction failed ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

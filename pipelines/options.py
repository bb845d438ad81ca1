"""Command-line options of the events pipeline (SPEC "The events pipeline")."""
from __future__ import annotations

import os

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.kinesis import DEFAULT_IDLE_WATERMARK_SECONDS

DEFAULT_SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")


class LakeOptions(PipelineOptions):
    """``--output``, the lake root, shared by every eventlake pipeline.

    Beam parses the flags of every ``PipelineOptions`` subclass imported in the process with one parser, so two
    classes that both declare ``--output`` make every pipeline in that process fail with a conflict. One class owns
    the flag; the others read it through ``output`` below.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--output", help="lake root: a local path or s3://bucket/prefix")


class EventsOptions(PipelineOptions):
    @property
    def output(self):
        return self.view_as(LakeOptions).output

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--mode", choices=("stream", "backfill"), default="stream",
                            help="stream: read Kinesis; backfill: read --input files with the same transforms")
        parser.add_argument("--input_stream", help="Kinesis stream name (stream mode)")
        parser.add_argument("--input", help="backfill: glob of JSON Lines files of envelopes (gzip allowed)")
        parser.add_argument("--users_table", help="DynamoDB table of user attributes, keyed by user_id")
        parser.add_argument("--dead_letter",
                            help="dead-letter output: an SQS queue URL, or a local path or s3:// prefix (JSON Lines)")
        parser.add_argument("--dead_letter_overflow", default=None,
                            help="s3:// prefix for dead letters too large for SQS (default: next to the lake)")
        parser.add_argument("--schema_dir", default=DEFAULT_SCHEMA_DIR,
                            help="directory of JSON Schemas, one <event_type>.json each, plus _user.json")
        parser.add_argument("--window_seconds", type=int, default=60, help="fixed window length (event time)")
        parser.add_argument("--allowed_lateness_seconds", type=int, default=0,
                            help="how late an event may arrive and still be written (as a later pane)")
        parser.add_argument("--start_position", default="trim_horizon",
                            help="trim_horizon, latest, or at_timestamp=<RFC 3339>")
        parser.add_argument("--idle_watermark_seconds", type=float, default=DEFAULT_IDLE_WATERMARK_SECONDS,
                            help="a shard caught up and idle this long moves the watermark to now minus this, so "
                                 "the last window is written while the stream stays quiet (0 turns it off: the "
                                 "last window then waits for traffic or the end of the read)")
        parser.add_argument("--stop_when_idle_seconds", type=float, default=None,
                            help="end the stream after N idle seconds so all windows flush (demos, tests)")
        parser.add_argument("--pseudonymization_secret", default=None,
                            help="AWS Secrets Manager secret id holding the pseudonymization keys "
                                 "(default: EVENTLAKE_PSEUDONYMIZATION_KEYS in the workers' environment)")
        parser.add_argument("--skip_preflight", action="store_true",
                            help="do not check that the stream, table, queue and output exist before starting")

"""Every eventlake pipeline's options parse in one process.

Beam builds a single parser from every ``PipelineOptions`` subclass that has been imported, so one flag declared
by two classes breaks every pipeline run in that process (it did: ``--output`` in both the events and compaction
options failed 47 tests once the suite imported both).
"""
import subprocess
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.compact import CompactOptions
from pipelines import events
from pipelines.events import EventsOptions
from pipelines.options import LakeOptions


def test_events_and_compaction_options_share_the_lake_root():
    options = PipelineOptions(["--output=s3://lake/root", "--partition=event_type=a/year=2026/month=01/day=02",
                               "--dead_letter=/tmp/dl"])
    assert options.get_all_options()["output"] == "s3://lake/root"
    assert options.view_as(EventsOptions).output == "s3://lake/root"
    assert options.view_as(CompactOptions).output == "s3://lake/root"
    assert options.view_as(LakeOptions).output == "s3://lake/root"


def test_every_pipeline_module_imports_together_and_parses():
    """In a fresh interpreter, so the result does not depend on what other tests imported first."""
    code = (
        "import pipelines.events, pipelines.compact, pipelines.redrive\n"
        "from apache_beam.options.pipeline_options import PipelineOptions\n"
        "print(PipelineOptions(['--output=/x']).get_all_options()['output'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "/x"


def test_the_idle_watermark_advance_is_on_by_default_and_zero_turns_it_off():
    def source_config(*argv):
        options = PipelineOptions(["--input_stream=s", "--users_table=u", "--output=/x", "--dead_letter=/d", *argv])
        pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FlinkRunner"]))
        events.build_pipeline(pipeline, options.view_as(EventsOptions))
        reads = [t.transform for t in pipeline.transforms_stack[0].parts if t.full_label == "ReadKinesis"]
        return reads[0].source.config

    assert source_config().idle_watermark_seconds == 5.0
    assert source_config("--idle_watermark_seconds=12").idle_watermark_seconds == 12.0
    assert source_config("--idle_watermark_seconds=0").idle_watermark_seconds is None

"""Runner profiles for local runs, and "which runner actually ran".

Local streaming runs on ``--runner=PrismRunner`` with the Prism binary built by
``runners.prism``, never on ``DirectRunner``: the DirectRunner tries Prism, and
when Prism refuses a pipeline or cannot be started it silently falls back to the
FnApiRunner, whose batch semantics hold every window until the source ends.
``PrismRunner`` fails loudly instead. ``executed_runner(result)`` tells, from the
result object, which runner really executed a pipeline, and logs it.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from apache_beam.options.pipeline_options import (
    DebugOptions,
    PipelineOptions,
    PortableOptions,
    PrismRunnerOptions,
    StandardOptions,
)

from runners.prism import prism_location

LOG = logging.getLogger("eventlake.runners.profiles")

PRISM = "PrismRunner"
FN_API = "FnApiRunner"
BUNDLE_BASED_DIRECT = "BundleBasedDirectRunner"

_PRISM_JOB_ID = re.compile(r"^job-\d+")

# Beam shares one Prism job server per process, created with the options of the
# first pipeline that asked for one. If that pipeline had no --prism_location
# (e.g. a plain DirectRunner run, which tries to download Prism from GitHub and
# falls back), every later Prism run in the process reuses the broken server.
# Each of our runs therefore starts its own Prism server.
OWN_PRISM_SERVER = "disable_prism_server_singleton"

# Prism asks the SDK to split a splittable DoFn's bundle when it sees no progress for a tick. Beam 2.77's Python SDK
# then computes the split from the output byte counter's mean, which is NaN until the first output element has been
# processed all the way downstream (opcounters update the mean in update_collect), so a split request that lands
# during that first element fails the bundle and the job: "ValueError: cannot convert float NaN to integer" in
# bundle_processor._compute_split (seen in `make demo` and in the Kinesis tests). The Kinesis source declines
# runner-initiated splits anyway (it only self-checkpoints), so they are switched off.
NO_SDF_SPLIT = "prism_disable_sdf_split"


# Beam 2.77's PortableRunner (Prism, Flink, Spark job servers) passes --job_server_timeout (default 300 s) as the
# deadline of the job's state and message streams, although its help says the timeout "does not apply to the actual
# pipeline run time". So every portable run that lasts longer than 5 minutes ends in the driver with
# DEADLINE_EXCEEDED from wait_until_finish; with the LOOPBACK environment the SDK worker lives in the driver and the
# job dies with it (seen: a Prism stream bench at 300 ev/s stopped after ~5 minutes, 53,000 accepted events never
# written, "cannot schedule new futures after shutdown" as the interpreter exited). A streaming job or a large backfill
# runs for hours, so unless the user chose a timeout, the streams get one that never ends a job: 10 years.
JOB_STREAM_DEADLINE_S = 10 * 365 * 24 * 3600


def local_streaming_options(
    extra: Sequence[str] = (), *, streaming: bool = True, prism_log_level: str = "warn"
) -> PipelineOptions:
    """Options for a local run on Prism (``streaming`` for an unbounded source).

    Raises ``runners.prism.PrismUnavailable`` when Prism is not built: there is
    no silent fallback to a runner with other semantics.
    """
    if prism_log_level not in ("debug", "info", "warn", "error"):
        raise ValueError(f"prism_log_level must be debug, info, warn or error, got {prism_log_level!r}")
    args = [
        f"--runner={PRISM}",
        f"--prism_location={prism_location()}",
        f"--prism_log_level={prism_log_level}",
        "--environment_type=LOOPBACK",
        f"--experiments={OWN_PRISM_SERVER}",
        f"--experiments={NO_SDF_SPLIT}",
    ]
    if streaming:
        args.append("--streaming")
    return _job_streams_never_time_out(PipelineOptions([*args, *extra]))


def apply_default_runner(options: PipelineOptions, *, streaming: bool) -> PipelineOptions:
    """Makes Prism the runner when none was chosen (and points DirectRunner at our Prism).

    An explicit ``--runner`` (Flink, Spark, ...) is kept as given. A portable job's state stream gets a deadline
    that never ends a run (``JOB_STREAM_DEADLINE_S``) unless another ``--job_server_timeout`` than Beam's 300 s
    was given.
    """
    standard = options.view_as(StandardOptions)
    prism = options.view_as(PrismRunnerOptions)
    if standard.runner is None:
        standard.runner = PRISM
    runner = standard.runner.rsplit(".", 1)[-1]
    if runner in (PRISM, "DirectRunner", "SwitchingDirectRunner"):
        if not prism.prism_location:
            prism.prism_location = prism_location()
        debug = options.view_as(DebugOptions)
        for experiment in (OWN_PRISM_SERVER, NO_SDF_SPLIT):
            if not debug.lookup_experiment(experiment):
                debug.add_experiment(experiment)
    if streaming:
        standard.streaming = True
    _job_streams_never_time_out(options)
    LOG.info("configured runner: %s (streaming=%s)", runner, bool(standard.streaming))
    return options


def _job_streams_never_time_out(options: PipelineOptions) -> PipelineOptions:
    if "job_server_timeout" not in options.get_all_options(drop_default=True):
        options.view_as(PortableOptions).job_server_timeout = JOB_STREAM_DEADLINE_S
    return options


def executed_runner(result) -> str:
    """Name of the runner that actually executed the pipeline behind ``result``; logged."""
    name = _runner_of(result)
    LOG.info("pipeline executed on %s", name)
    return name


def _runner_of(result) -> str:
    module = type(result).__module__
    if module.endswith("portability.portable_runner"):
        job_id = str(getattr(result, "_job_id", ""))
        # Prism names its jobs job-001, job-002, ...; Flink's job server uses the job name and a UUID.
        return PRISM if _PRISM_JOB_ID.match(job_id) else "PortableRunner"
    if module.endswith("fn_api_runner.fn_runner"):
        return FN_API
    if module.endswith("direct.direct_runner"):
        return BUNDLE_BASED_DIRECT
    if "dataflow" in module:
        return "DataflowRunner"
    return type(result).__name__


def is_prism(result) -> bool:
    return _runner_of(result) == PRISM


__all__ = [
    "local_streaming_options",
    "apply_default_runner",
    "executed_runner",
    "is_prism",
    "PRISM",
    "FN_API",
    "BUNDLE_BASED_DIRECT",
]

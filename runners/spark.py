"""Spark for batch (backfill, compaction): the portable SparkRunner option profile.

Beam's SparkRunner is portable and Spark 3 only, and it does not run
self-checkpointing splittable DoFns in streaming, so the stream stays on Flink
and Spark takes bounded work. The job server is Beam's Spark 3 runner assembled
from Maven Central (``runners.job_server``), with Spark itself taken from the
``pyspark`` package's ``jars/`` (the runner declares Spark ``provided``)::

    python -m runners.spark job-server     # assemble (about a minute cold), print the jar

``spark_options(...)`` with ``spark_master_url="local[2]"`` runs an embedded local
Spark inside the job server; give ``spark://host:7077`` for a standalone cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from runners.job_server import JOB_SERVER_BEAM_VERSION, JobServerSpec, job_server_jar

LOG = logging.getLogger("eventlake.runners.spark")

ENVIRONMENT_TYPES = ("LOOPBACK", "EXTERNAL", "PROCESS", "DOCKER")


def pyspark_jars_dir() -> str:
    """Spark's runtime jars, shipped inside the pyspark package."""
    import pyspark

    return os.path.join(os.path.dirname(pyspark.__file__), "jars")


def spark_version() -> str:
    import pyspark

    return pyspark.__version__


def spark_job_server_spec() -> JobServerSpec:
    return JobServerSpec(
        name=f"beam-spark-3-job-server-{JOB_SERVER_BEAM_VERSION}-spark-{spark_version()}",
        main_class="org.apache.beam.runners.spark.SparkJobServerDriver",
        artifacts=(f"org.apache.beam:beam-runners-spark-3:{JOB_SERVER_BEAM_VERSION}",),
        engine_prefixes=("spark-",),
    )


def spark_job_server_jar() -> str:
    """The assembled Spark job server jar (resolved from Maven Central on first use)."""
    return job_server_jar(spark_job_server_spec(), provided_jars_dir=pyspark_jars_dir())


def spark_options(
    spark_master_url: str = "local[2]",
    *,
    environment_type: str = "LOOPBACK",
    environment_config: Optional[str] = None,
    job_server_jar: Optional[str] = None,
    extra: Sequence[str] = (),
):
    """Options for a batch run on Spark (``local[N]``, or ``spark://host:port``)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    if not (spark_master_url.startswith("local") or spark_master_url.startswith("spark://")):
        raise ValueError(f"spark_master_url must be local[N] or spark://host:port, got {spark_master_url!r}")
    if environment_type not in ENVIRONMENT_TYPES:
        raise ValueError(f"environment_type must be one of {ENVIRONMENT_TYPES}, got {environment_type!r}")
    if environment_type == "EXTERNAL" and not environment_config:
        raise ValueError("environment_type EXTERNAL needs environment_config (the worker pool host:port)")
    args = [
        "--runner=SparkRunner",
        f"--spark_master_url={spark_master_url}",
        "--spark_version=3",
        f"--spark_job_server_jar={job_server_jar or spark_job_server_jar()}",
        f"--environment_type={environment_type}",
    ]
    if environment_config:
        args.append(f"--environment_config={environment_config}")
    return PipelineOptions([*args, *extra])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.spark", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("job-server",))
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(spark_job_server_jar())
    return 0


if __name__ == "__main__":
    sys.exit(main())

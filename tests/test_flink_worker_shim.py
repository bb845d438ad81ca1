"""The EXTERNAL worker pool shim: workers get the pipeline options, so S3 works on them.

The pool runs as its own process with no AWS variables in its environment: the
only way its workers can reach the moto S3 is the ``--s3_*`` pipeline options
that the shim fetches from the runner's provision service. The runner is Prism
(a portable runner like Flink, same EXTERNAL protocol, a fraction of the start-up).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from runners.local import free_port, wait_until
from runners.processes import Child
from runners.worker_shim import pool_command


@pytest.fixture
def worker_pool(tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    pool = Child("worker-pool", pool_command(port), env=env, log_path=str(tmp_path / "pool.log"))

    def listening():
        result = subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True)
        return result.returncode == 0

    wait_until(listening, timeout=60, interval=0.2, what="the worker pool to listen")
    pool.address = f"localhost:{port}"
    yield pool
    pool.stop()


@pytest.mark.slow
def test_external_workers_write_to_s3_with_pipeline_options(stack, worker_pool):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from runners.prism import prism_location

    options = PipelineOptions([
        "--runner=PrismRunner",
        f"--prism_location={prism_location()}",
        "--environment_type=EXTERNAL",
        f"--environment_config={worker_pool.address}",
        f"--s3_endpoint_url={stack.endpoint}",
        "--s3_access_key_id=testing",
        "--s3_secret_access_key=testing",
        f"--s3_region_name={stack.config.region}",
    ])
    bucket = stack.config.bucket
    with beam.Pipeline(options=options) as pipeline:
        (
            pipeline
            | "Numbers" >> beam.Create([str(n) for n in range(50)])
            | "WriteToS3" >> beam.io.WriteToText(f"s3://{bucket}/shim/part", num_shards=2)
        )
    s3 = stack.client("s3")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="shim/")["Contents"]]
    assert len(keys) == 2
    lines = []
    for key in keys:
        lines.extend(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().split())
    assert sorted(lines, key=int) == [str(n) for n in range(50)]
    with open(worker_pool.log_path) as handle:
        assert "starting SDK worker" in handle.read()  # the shim ran, not a thread of the pool


def test_pool_command_validates_its_port():
    with pytest.raises(ValueError, match="port"):
        pool_command(0)

"""EXTERNAL worker pool whose workers get the pipeline options (so S3 works on workers).

Beam's plain worker pool (``apache_beam.runners.worker.worker_pool_main``) runs
each SDK harness in a thread without the job's pipeline options: the S3
filesystem then fails with "Must provide one of client or options". With
``--container_executable`` the pool instead starts one process per worker with
the runner's endpoints, as the Docker boot binary would. This module is that
executable: it asks the runner's provision service for the pipeline options and
starts ``sdk_worker_main`` with them. Run one pool beside each TaskManager, in an
environment where the project is installed (code is not staged as artifacts)::

    python -m runners.worker_shim pool --port 50000
    # pipeline: --environment_type=EXTERNAL --environment_config=localhost:50000
"""
from __future__ import annotations

import argparse
import logging
import os
import stat
import subprocess
import sys
from typing import Optional

LOG = logging.getLogger("eventlake.runners.worker_shim")

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def provision_info(provision_endpoint: str, worker_id: str):
    """The job's provision info (pipeline options, endpoints) from the runner."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(provision_endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        response = stub.GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", worker_id)], timeout=60
        )
    return response.info


def worker_environment(info, *, worker_id: str, control_endpoint: str, logging_endpoint: str,
                       semi_persistent_directory: str) -> dict:
    """Environment variables that ``sdk_worker_main`` reads (what Beam's boot binary sets)."""
    from google.protobuf import json_format

    control = info.control_endpoint.url or control_endpoint
    logs = info.logging_endpoint.url or logging_endpoint
    return dict(
        os.environ,
        WORKER_ID=worker_id,
        PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
        CONTROL_API_SERVICE_DESCRIPTOR=f'url: "{control}"',
        LOGGING_API_SERVICE_DESCRIPTOR=f'url: "{logs}"',
        SEMI_PERSISTENT_DIRECTORY=semi_persistent_directory,
    )


def run_worker(args: argparse.Namespace) -> int:
    info = provision_info(args.provision_endpoint, args.id)
    directory = os.path.join(os.environ.get("TMPDIR", "/tmp"), "eventlake-worker", args.id)
    os.makedirs(directory, exist_ok=True)
    env = worker_environment(info, worker_id=args.id, control_endpoint=args.control_endpoint,
                             logging_endpoint=args.logging_endpoint, semi_persistent_directory=directory)
    LOG.info("starting SDK worker %s", args.id)
    return subprocess.call([sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"], env=env)


def container_executable(directory: Optional[str] = None) -> str:
    """A one-line executable that runs this module with this interpreter (what the pool execs)."""
    directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "eventlake", "worker-shim")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "boot")
    script = (
        "#!/bin/sh\n"
        f'export PYTHONPATH="{_PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'exec "{sys.executable}" -m runners.worker_shim worker "$@"\n'
    )
    with open(path + ".tmp", "w") as handle:
        handle.write(script)
    os.chmod(path + ".tmp", stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(path + ".tmp", path)
    return path


def pool_command(port: int) -> list[str]:
    """The worker pool command line (what docs/runners.md tells operators to run)."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be a TCP port, got {port!r}")
    return [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
            f"--service_port={port}", f"--container_executable={container_executable()}"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.worker_shim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("pool", help="run an EXTERNAL worker pool whose workers get the pipeline options")
    pool.add_argument("--port", type=int, default=50000)
    worker = sub.add_parser("worker", help="(called by the pool) start one SDK worker")
    for name in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        worker.add_argument(f"--{name}", required=name in ("id", "provision_endpoint"), default="")
    worker.add_argument("--semi_persistent_directory", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "pool":
        os.execv(sys.executable, pool_command(args.port))
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())

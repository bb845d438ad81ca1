"""Flink for the stream: a real local Flink cluster and the FlinkRunner option profile.

The cluster is Flink's own distribution, taken from PyPI: the ``apache-flink``
wheel holds ``bin/`` and ``conf/``, ``apache-flink-libraries`` holds ``lib/``.
Both are unpacked into a cache outside the project's venv (PyFlink pins an old
apache-beam and pyarrow, so it is never installed), and the cluster runs with
its own conf, pid, log and checkpoint folders under a state directory::

    python -m runners.flink install           # download + unpack (~1 min cold), cached
    python -m runners.flink cluster up        # JobManager + TaskManager, waits for :8081
    python -m runners.flink cluster status    # JSON overview (task managers, slots, jobs)
    python -m runners.flink cluster down
    python -m runners.flink taskmanager kill|start   # fault drills
    python -m runners.flink job-server        # assemble the Beam job server jar, print its path

Flink 1.19 is the only Flink minor for which both the PyPI distribution and a Beam
runner whose dependencies resolve on Maven Central exist here (Beam Java runner
2.62.0, see ``runners.job_server``); the job server's Flink minor must equal the
cluster's. ``flink_options(...)`` builds the pipeline options for a run on it.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from typing import Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from runners.job_server import JOB_SERVER_BEAM_VERSION, JobServerSpec, cache_root, job_server_jar
from runners.local import wait_until

LOG = logging.getLogger("eventlake.runners.flink")

FLINK_VERSION = "1.19.3"
FLINK_MINOR = "1.19"
DOWNLOAD_TIMEOUT_SECONDS = 900
ENVIRONMENT_TYPES = ("LOOPBACK", "EXTERNAL", "PROCESS", "DOCKER")

FLINK_JOB_SERVER = JobServerSpec(
    name=f"beam-flink-{FLINK_MINOR}-job-server-{JOB_SERVER_BEAM_VERSION}",
    main_class="org.apache.beam.runners.flink.FlinkJobServerDriver",
    artifacts=(
        f"org.apache.beam:beam-runners-flink-{FLINK_MINOR}:{JOB_SERVER_BEAM_VERSION}",
        "org.slf4j:slf4j-simple:1.7.36",
    ),
)


class FlinkUnavailable(RuntimeError):
    """The Flink distribution or cluster could not be had."""


def flink_job_server_jar() -> str:
    """The assembled Flink job server jar (resolved from Maven Central on first use)."""
    return job_server_jar(FLINK_JOB_SERVER)


def flink_options(
    flink_master: str,
    *,
    parallelism: int,
    checkpointing_interval_ms: Optional[int],
    environment_type: str = "LOOPBACK",
    environment_config: Optional[str] = None,
    job_server_jar: Optional[str] = None,
    streaming: bool = True,
    extra: Sequence[str] = (),
) -> PipelineOptions:
    """Options for a run on a Flink cluster at ``flink_master`` (``host:port`` of its REST API).

    ``checkpointing_interval_ms=None`` leaves checkpointing off (batch, or a
    stream that may replay from its source's own position). ``EXTERNAL`` needs
    ``environment_config``: the worker pool address (``runners.worker_shim``).
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, got {parallelism!r}")
    if checkpointing_interval_ms is not None and checkpointing_interval_ms < 100:
        raise ValueError(f"checkpointing_interval_ms must be >= 100 or None, got {checkpointing_interval_ms!r}")
    if environment_type not in ENVIRONMENT_TYPES:
        raise ValueError(f"environment_type must be one of {ENVIRONMENT_TYPES}, got {environment_type!r}")
    if environment_type == "EXTERNAL" and not environment_config:
        raise ValueError("environment_type EXTERNAL needs environment_config (the worker pool host:port)")
    if not flink_master or flink_master.startswith("["):
        raise ValueError(f"flink_master must be a cluster's host:port, got {flink_master!r}")
    args = [
        "--runner=FlinkRunner",
        f"--flink_master={flink_master}",
        f"--flink_version={FLINK_MINOR}",
        f"--flink_job_server_jar={job_server_jar or flink_job_server_jar()}",
        f"--parallelism={parallelism}",
        f"--environment_type={environment_type}",
    ]
    if environment_config:
        args.append(f"--environment_config={environment_config}")
    if checkpointing_interval_ms is not None:
        args.append(f"--checkpointing_interval={checkpointing_interval_ms}")
    if streaming:
        args.append("--streaming")
    return PipelineOptions([*args, *extra])


def distribution_dir(version: str = FLINK_VERSION) -> str:
    return os.path.join(cache_root(), "flink", version)


def install(version: str = FLINK_VERSION, *, timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> str:
    """FLINK_HOME of the unpacked distribution (downloaded from PyPI on first use)."""
    root = distribution_dir(version)
    home = os.path.join(root, "home")
    if os.path.exists(os.path.join(home, "lib", f"flink-dist-{version}.jar")):
        return home
    os.makedirs(root, exist_ok=True)
    wheels = os.path.join(root, "downloads")
    started = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels,
             f"apache-flink=={version}", f"apache-flink-libraries=={version}"],
            check=True, timeout=timeout,
        )
    except subprocess.CalledProcessError as exc:
        raise FlinkUnavailable(f"pip could not download Flink {version} (exit code {exc.returncode})") from None
    except subprocess.TimeoutExpired:
        raise FlinkUnavailable(f"downloading Flink {version} took longer than {timeout:.0f}s") from None
    scratch = tempfile.mkdtemp(prefix=".home-", dir=root)
    try:
        _unpack(wheels, version, scratch)
        shutil.rmtree(home, ignore_errors=True)
        os.replace(scratch, home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)  # 230 MB that the unpacked home already holds
    LOG.info("Flink %s unpacked in %.0fs", version, time.monotonic() - started)
    return home


def _unpack(downloads: str, version: str, home: str) -> None:
    """bin/ and conf/ from apache-flink; lib/, opt/, plugins/ from apache-flink-libraries."""
    (flink_wheel,) = glob.glob(os.path.join(downloads, f"apache_flink-{version}-*.whl"))
    with zipfile.ZipFile(flink_wheel) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if len(parts) >= 3 and parts[0] == "pyflink" and parts[1] in ("bin", "conf") and parts[-1]:
                _extract(archive.open(member), os.path.join(home, *parts[1:]))
    libraries = glob.glob(os.path.join(downloads, f"apache[-_]flink[-_]libraries-{version}*"))
    if not libraries:
        raise FlinkUnavailable(f"apache-flink-libraries {version} was not downloaded")
    wanted = ("lib", "opt", "plugins", "bin")
    if libraries[0].endswith(".whl"):  # layout pyflink/lib/...
        with zipfile.ZipFile(libraries[0]) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) >= 3 and parts[0] == "pyflink" and parts[1] in wanted and parts[-1]:
                    _extract(archive.open(member), os.path.join(home, *parts[1:]))
    else:  # sdist: apache-flink-libraries-<v>/deps/lib/...
        with tarfile.open(libraries[0]) as archive:
            for member in archive:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 4 and parts[1] == "deps" and parts[2] in wanted:
                    _extract(archive.extractfile(member), os.path.join(home, *parts[2:]))
    for script in glob.glob(os.path.join(home, "bin", "*.sh")) + [os.path.join(home, "bin", "flink")]:
        os.chmod(script, 0o755)
    # The wheel's find-flink-home asks Python for pyflink's location; here FLINK_HOME is the folder itself.
    finder = os.path.join(home, "bin", "find_flink_home.py")
    if os.path.exists(finder):
        os.remove(finder)


def _extract(source, destination: str) -> None:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with source, open(destination, "wb") as target:
        shutil.copyfileobj(source, target)


class FlinkCluster:
    """A standalone session cluster (one JobManager, one TaskManager) on loopback.

    Sized for a 2-core, 24 GiB machine shared with other work: 1.6 GB for the
    JobManager, 3 GB and 2 slots for the TaskManager. Checkpoints and savepoints
    go to ``<state_dir>/checkpoints`` and ``<state_dir>/savepoints``.
    """

    def __init__(
        self,
        *,
        state_dir: Optional[str] = None,
        version: str = FLINK_VERSION,
        rest_port: int = 8081,
        rpc_port: int = 6123,
        task_slots: int = 2,
        jobmanager_memory: str = "1600m",
        taskmanager_memory: str = "3g",
        heartbeat_timeout_ms: int = 20_000,
    ):
        if task_slots < 1:
            raise ValueError(f"task_slots must be >= 1, got {task_slots!r}")
        for name, port in (("rest_port", rest_port), ("rpc_port", rpc_port)):
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port!r}")
        for name, size in (("jobmanager_memory", jobmanager_memory), ("taskmanager_memory", taskmanager_memory)):
            if not size[:-1].isdigit() or size[-1] not in "mg":
                raise ValueError(f"{name} must look like 1600m or 3g, got {size!r}")
        self.version = version
        self.state_dir = os.path.abspath(state_dir or os.path.join(distribution_dir(version), "cluster"))
        self.rest_port = rest_port
        self.rpc_port = rpc_port
        self.task_slots = task_slots
        self.jobmanager_memory = jobmanager_memory
        self.taskmanager_memory = taskmanager_memory
        self.heartbeat_timeout_ms = heartbeat_timeout_ms

    # -- locations -----------------------------------------------------------------------------------------------
    @property
    def master(self) -> str:
        """What ``--flink_master`` takes."""
        return f"localhost:{self.rest_port}"

    @property
    def rest_url(self) -> str:
        return f"http://localhost:{self.rest_port}"

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.state_dir, "checkpoints")

    @property
    def savepoint_dir(self) -> str:
        return os.path.join(self.state_dir, "savepoints")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.state_dir, "log")

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def up(self, *, timeout: float = 180.0) -> "FlinkCluster":
        """Starts JobManager and TaskManager and waits until the REST API shows all slots."""
        home = install(self.version)
        self._write_conf(home)
        if self.status() is not None:
            raise FlinkUnavailable(f"something already answers on {self.rest_url}: not starting a second cluster")
        self._script(home, "jobmanager.sh", "start")
        self._script(home, "taskmanager.sh", "start")
        wait_until(lambda: self.total_slots() >= self.task_slots, timeout=timeout,
                   interval=0.5, what=f"Flink at {self.rest_url} with {self.task_slots} slots")
        LOG.info("Flink %s up at %s (state in %s)", self.version, self.rest_url, self.state_dir)
        return self

    def down(self, *, timeout: float = 60.0) -> None:
        """Stops TaskManager and JobManager (SIGTERM, then SIGKILL after ``timeout``)."""
        home = install(self.version)
        for script, kind in (("taskmanager.sh", "taskexecutor"), ("jobmanager.sh", "standalonesession")):
            pids = self._pids(kind)
            if pids:
                self._script(home, script, "stop-all")
            self._await_exit(pids, timeout)
            self._clear_pid_file(kind)

    def status(self) -> Optional[dict]:
        """The REST API's ``/overview`` (task managers, slots, jobs), or None when down."""
        try:
            with urllib.request.urlopen(f"{self.rest_url}/overview", timeout=5) as response:
                return json.load(response)
        except OSError:
            return None

    def total_slots(self) -> int:
        overview = self.status() or {}
        return int(overview.get("slots-total", 0))

    def jobs(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.rest_url}/jobs/overview", timeout=5) as response:
            return json.load(response)["jobs"]

    def checkpoint_counts(self, job_id: str) -> dict:
        """Completed/failed/restored checkpoint counts of a job (Flink's ``/checkpoints``)."""
        with urllib.request.urlopen(f"{self.rest_url}/jobs/{job_id}/checkpoints", timeout=5) as response:
            return json.load(response)["counts"]

    def kill_taskmanager(self, *, timeout: float = 30.0) -> list[int]:
        """SIGKILLs the TaskManager (a crash, not a shutdown): its tasks fail and the job restarts."""
        pids = self._pids("taskexecutor")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._await_exit(pids, timeout)
        self._clear_pid_file("taskexecutor")
        return pids

    def start_taskmanager(self, *, timeout: float = 120.0) -> None:
        """Starts a fresh TaskManager and waits until its slots are registered."""
        home = install(self.version)
        self._script(home, "taskmanager.sh", "start")
        wait_until(lambda: self.total_slots() >= self.task_slots, timeout=timeout,
                   interval=0.5, what="the TaskManager to register its slots")

    # -- internals -----------------------------------------------------------------------------------------------
    def _conf(self) -> dict:
        return {
            "jobmanager.rpc.address": "localhost",
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "localhost",
            "jobmanager.memory.process.size": self.jobmanager_memory,
            "jobmanager.execution.failover-strategy": "region",
            "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost",
            "taskmanager.numberOfTaskSlots": self.task_slots,
            "taskmanager.memory.process.size": self.taskmanager_memory,
            "parallelism.default": self.task_slots,
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "rest.port": self.rest_port,
            "state.checkpoints.dir": f"file://{self.checkpoint_dir}",
            "state.savepoints.dir": f"file://{self.savepoint_dir}",
            # Keep the last checkpoints when a job is cancelled: a restart can resume from one.
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
            "state.checkpoints.num-retained": 3,
            # A killed TaskManager is noticed within seconds on loopback, not after the 50 s default.
            "heartbeat.interval": min(5_000, self.heartbeat_timeout_ms // 4),
            "heartbeat.timeout": self.heartbeat_timeout_ms,
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": 100,
            "restart-strategy.fixed-delay.delay": "2 s",
        }

    def _write_conf(self, home: str) -> None:
        conf_dir = os.path.join(self.state_dir, "conf")
        os.makedirs(conf_dir, exist_ok=True)
        for path in (self.checkpoint_dir, self.savepoint_dir, self.log_dir, self._pid_dir):
            os.makedirs(path, exist_ok=True)
        for name in os.listdir(os.path.join(home, "conf")):
            if name.startswith("log4j") or name.startswith("logback"):
                shutil.copy(os.path.join(home, "conf", name), os.path.join(conf_dir, name))
        java_opts = _default_java_opts(os.path.join(home, "conf", "config.yaml"))
        lines = [f"{key}: {value}" for key, value in self._conf().items()]
        if java_opts:
            lines.append(f"env.java.opts.all: {java_opts}")
        with open(os.path.join(conf_dir, "config.yaml"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
        with open(os.path.join(conf_dir, "workers"), "w") as handle:
            handle.write("localhost\n")
        with open(os.path.join(conf_dir, "masters"), "w") as handle:
            handle.write(f"localhost:{self.rest_port}\n")

    @property
    def _pid_dir(self) -> str:
        return os.path.join(self.state_dir, "pid")

    def _env(self) -> dict:
        return dict(
            os.environ,
            FLINK_CONF_DIR=os.path.join(self.state_dir, "conf"),
            FLINK_LOG_DIR=self.log_dir,
            FLINK_PID_DIR=self._pid_dir,
        )

    def _script(self, home: str, script: str, action: str) -> None:
        subprocess.run(
            [os.path.join(home, "bin", script), action],
            env=self._env(), check=True, timeout=120,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _pid_file(self, kind: str) -> str:
        # flink-daemon.sh names it after $USER, which is empty in some shells (CI): mirror it exactly.
        return os.path.join(self._pid_dir, f"flink-{os.environ.get('USER', '')}-{kind}.pid")

    def _pids(self, kind: str) -> list[int]:
        try:
            with open(self._pid_file(kind)) as handle:
                pids = [int(line) for line in handle.read().split() if line.strip().isdigit()]
        except OSError:
            return []
        return [pid for pid in pids if _alive(pid)]

    def _clear_pid_file(self, kind: str) -> None:
        try:
            os.remove(self._pid_file(kind))
        except OSError:
            pass

    def _await_exit(self, pids: list[int], timeout: float) -> None:
        try:
            wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=timeout, interval=0.2,
                       what="Flink processes to exit")
        except TimeoutError:
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10, interval=0.2,
                       what="Flink processes to die")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _default_java_opts(config_yaml: str) -> str:
    """The distribution's ``env.java.opts.all`` (Java 17 add-opens) so our conf keeps them."""
    try:
        with open(config_yaml) as handle:
            for line in handle:
                stripped = line.strip()
                if stripped.startswith("all: --add-"):
                    return stripped[len("all: "):]
    except OSError:
        pass
    return ""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.flink", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="download and unpack the Flink distribution")
    sub.add_parser("job-server", help="assemble the Beam Flink job server jar and print its path")
    cluster = sub.add_parser("cluster")
    cluster.add_argument("action", choices=("up", "down", "status"))
    taskmanager = sub.add_parser("taskmanager")
    taskmanager.add_argument("action", choices=("kill", "start"))
    for command in (cluster, taskmanager):
        command.add_argument("--state-dir", default=None)
        command.add_argument("--rest-port", type=int, default=8081)
        command.add_argument("--rpc-port", type=int, default=6123)
        command.add_argument("--task-slots", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.command == "install":
            print(install())
            return 0
        if args.command == "job-server":
            print(flink_job_server_jar())
            return 0
        flink = FlinkCluster(state_dir=args.state_dir, rest_port=args.rest_port, rpc_port=args.rpc_port,
                             task_slots=args.task_slots)
        if args.command == "cluster":
            if args.action == "up":
                flink.up()
                print(flink.rest_url)
            elif args.action == "down":
                flink.down()
            else:
                overview = flink.status()
                print(json.dumps(overview) if overview is not None else "down")
                return 0 if overview is not None else 3
        else:
            if args.action == "kill":
                print(" ".join(str(pid) for pid in flink.kill_taskmanager()))
            else:
                flink.start_taskmanager()
    except (FlinkUnavailable, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Beam portable job servers (Flink, Spark) assembled from Maven Central into a cache.

Beam's Python runners download a shaded ``beam-runners-<engine>-job-server`` jar
from Maven Central. The mirror this project reaches does not serve those jars for
any recent Beam version, but it does serve the unshaded runner artifacts and their
dependencies for some versions. So the job server is assembled instead: a tiny POM
naming the runner, ``mvn dependency:copy-dependencies`` into a per-version cache,
and a "pathing" jar whose manifest names the main class and every dependency.
``java -jar pathing.jar`` is exactly how Beam starts a job server, so the result
is passed as ``--flink_job_server_jar`` / ``--spark_job_server_jar``.

Newest Java runner versions whose whole dependency tree resolves here (checked
2026-11-26): 2.62.0 for ``beam-runners-flink-1.19`` and ``beam-runners-spark-3``
(2.70.0 of the runners is served, but ``beam-runners-java-job-service`` 2.70.0 is
not). Everything is bounded by timeouts and idempotent: a complete cache entry is
marked by its pathing jar, written last.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

LOG = logging.getLogger("eventlake.runners.job_server")

JOB_SERVER_BEAM_VERSION = "2.62.0"
MAVEN_TIMEOUT_SECONDS = 900

# Beam's POMs declare extra repositories (a Google mirror) that this machine
# cannot reach; every lookup there waits for a time-out. Mirror every repository
# but Central to an empty local folder: those lookups then fail at once, and
# Maven finds each artifact on Central.
_SETTINGS = """<settings>
  <mirrors>
    <mirror><id>only-central</id><mirrorOf>*,!central</mirrorOf><url>file://{empty}</url></mirror>
  </mirrors>
</settings>
"""


class JobServerUnavailable(RuntimeError):
    """The job server could not be assembled (Maven failed or timed out)."""


@dataclass(frozen=True)
class JobServerSpec:
    """What to resolve: Maven coordinates (``group:artifact:version``) and the main class."""

    name: str
    main_class: str
    artifacts: tuple[str, ...]
    # Jar-name prefixes of the runner's dependencies that the provided engine jars replace.
    engine_prefixes: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"job server name must be a plain directory name, got {self.name!r}")
        for coordinates in self.artifacts:
            if coordinates.count(":") != 2:
                raise ValueError(f"artifact must be group:artifact:version, got {coordinates!r}")


def cache_root() -> str:
    return os.environ.get("EVENTLAKE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "eventlake")


def _pom(spec: JobServerSpec) -> str:
    dependencies = "\n".join(
        "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version></dependency>".format(
            *coordinates.split(":")
        )
        for coordinates in spec.artifacts
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>eventlake.runners</groupId>
  <artifactId>{spec.name}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


def _manifest(main_class: str, class_path: Sequence[str]) -> bytes:
    """A jar manifest; lines are at most 72 bytes, continued with a leading space."""
    lines = ["Manifest-Version: 1.0", f"Main-Class: {main_class}", "Class-Path: " + " ".join(class_path)]
    out = []
    for line in lines:
        data = line.encode("utf-8")
        out.append(data[:72])
        data = data[72:]
        while data:
            out.append(b" " + data[:71])
            data = data[71:]
    return b"\r\n".join(out) + b"\r\n\r\n"


def write_pathing_jar(path: str, main_class: str, jars: Sequence[str]) -> str:
    """Writes a jar holding only a manifest; ``jars`` are relative to the jar's folder."""
    scratch = path + ".tmp"
    with zipfile.ZipFile(scratch, "w") as archive:
        archive.writestr("META-INF/MANIFEST.MF", _manifest(main_class, jars))
    os.replace(scratch, path)
    return path


def job_server_jar(
    spec: JobServerSpec,
    *,
    provided_jars_dir: Optional[str] = None,
    mvn: str = "mvn",
    timeout: float = MAVEN_TIMEOUT_SECONDS,
) -> str:
    """Path of the pathing jar for ``spec``, resolving it with Maven on first use.

    ``provided_jars_dir`` (e.g. pyspark's ``jars/``) is the engine's own runtime,
    which the runner declares as ``provided``. It goes after the runner's jars
    (Beam needs its newer Guava, Spark ships Guava 14), and runner jars named
    with ``spec.engine_prefixes`` (e.g. ``spark-sql-api`` 3.5.0) are left out.
    """
    target = os.path.join(cache_root(), "job-servers", spec.name)
    jar = os.path.join(target, f"{spec.name}.jar")
    if os.path.exists(jar):
        return jar
    mvn_binary = shutil.which(mvn)
    if mvn_binary is None:
        raise JobServerUnavailable(f"Maven ({mvn!r}) is not on PATH; it is needed to assemble the {spec.name} job server")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=os.path.dirname(target))
    started = time.monotonic()
    try:
        with open(os.path.join(scratch, "pom.xml"), "w") as handle:
            handle.write(_pom(spec))
        with open(os.path.join(scratch, "settings.xml"), "w") as handle:
            handle.write(_SETTINGS.format(empty=os.path.join(scratch, "no-repository")))
        LOG.info("resolving the %s job server from Maven Central (minutes when cold)", spec.name)
        command = [
            mvn_binary, "-B", "-q", "-s", "settings.xml", "-f", "pom.xml",
            "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies",
            "-DoutputDirectory=lib", "-DincludeScope=runtime",
        ]
        with open(os.path.join(scratch, "maven.log"), "wb") as log:
            subprocess.run(command, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    except subprocess.CalledProcessError as exc:
        raise JobServerUnavailable(
            f"Maven could not resolve the {spec.name} job server (exit code {exc.returncode}); see {scratch}/maven.log"
        ) from None
    except subprocess.TimeoutExpired:
        raise JobServerUnavailable(f"Maven did not resolve the {spec.name} job server within {timeout:.0f}s") from None
    provided = sorted(name for name in os.listdir(provided_jars_dir) if name.endswith(".jar")) if provided_jars_dir else []
    jars = sorted(
        f"lib/{name}" for name in os.listdir(os.path.join(target, "lib"))
        if name.endswith(".jar") and not (provided and name.startswith(spec.engine_prefixes or ("\0",)))
    )
    jars.extend(os.path.relpath(os.path.join(provided_jars_dir, name), target) for name in provided)
    write_pathing_jar(jar, spec.main_class, jars)
    LOG.info("%s job server ready in %.0fs (%d jars)", spec.name, time.monotonic() - started, len(jars))
    return jar

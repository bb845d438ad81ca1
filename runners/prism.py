"""Prism, Beam's local streaming runner, built from the Go module proxy.

Beam downloads Prism from GitHub releases, which this machine cannot reach, and
the DirectRunner then silently falls back to the FnApiRunner (batch semantics:
no window fires while the source runs). The Go SDK module holds Prism's source,
so the Go toolchain builds it from the module proxy, pinned to the installed
Beam version, into a per-version cache::

    python -m runners.prism build      # ~2 min cold, instant when cached
    python -m runners.prism location   # prints the binary's path

``prism_location()`` is what the runner profiles pass as ``--prism_location``.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

LOG = logging.getLogger("eventlake.runners.prism")

PRISM_PACKAGE = "github.com/apache/beam/sdks/v2/go/cmd/prism"
BUILD_TIMEOUT_SECONDS = 900


class PrismUnavailable(RuntimeError):
    """Prism is not built (or cannot be): the caller must not fall back silently."""


def beam_version() -> str:
    from apache_beam.version import __version__

    return __version__


def cache_dir(version: Optional[str] = None) -> str:
    root = os.environ.get("EVENTLAKE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "eventlake")
    return os.path.join(root, "prism", version or beam_version())


def prism_location(version: Optional[str] = None) -> str:
    """Path of the cached Prism binary for the installed Beam; raises if not built."""
    path = os.path.join(cache_dir(version), "prism")
    if not os.access(path, os.X_OK):
        raise PrismUnavailable(f"Prism {version or beam_version()} is not built: run `python -m runners.prism build`")
    return path


def build(version: Optional[str] = None, *, go: str = "go", timeout: float = BUILD_TIMEOUT_SECONDS) -> str:
    """Builds Prism with ``go install`` into the cache (idempotent) and returns its path."""
    version = version or beam_version()
    try:
        return prism_location(version)
    except PrismUnavailable:
        pass
    go_binary = shutil.which(go)
    if go_binary is None:
        raise PrismUnavailable(f"the Go toolchain ({go!r}) is not on PATH; it is needed to build Prism")
    target = cache_dir(version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Build into a scratch GOBIN beside the cache, then rename: a concurrent or
    # interrupted build never leaves a half-written binary at the final path.
    scratch = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(target))
    try:
        env = dict(os.environ, GOBIN=scratch, GOFLAGS=os.environ.get("GOFLAGS", "-mod=mod"))
        LOG.info("building Prism %s with %s (a few minutes when cold)", version, go_binary)
        subprocess.run(
            [go_binary, "install", f"{PRISM_PACKAGE}@v{version}"],
            env=env,
            cwd=scratch,
            check=True,
            timeout=timeout,
        )
        os.makedirs(target, exist_ok=True)
        os.replace(os.path.join(scratch, "prism"), os.path.join(target, "prism"))
    except subprocess.CalledProcessError as exc:
        raise PrismUnavailable(f"`go install {PRISM_PACKAGE}@v{version}` failed with exit code {exc.returncode}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return prism_location(version)


def register_with_beam(version: Optional[str] = None) -> str:
    """Puts our Prism where Beam looks for its downloaded release, and returns that path.

    A plain ``--runner=DirectRunner`` (and ``PrismRunner`` without
    ``--prism_location``) otherwise tries to download Prism from GitHub, which
    is not reachable here (and would be traffic off the machine in tests), then
    silently falls back to a non-streaming runner. Beam keeps the release zip
    and its extracted binary in ``PrismJobServer.BIN_CACHE``; with both present
    it uses them without any network access. Idempotent.
    """
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    version = version or beam_version()
    binary = prism_location(version)
    name = f"apache_beam-v{version}-prism-{platform.system().lower()}-{_go_arch()}"
    bin_cache = PrismJobServer.BIN_CACHE
    os.makedirs(bin_cache, exist_ok=True)
    extracted = os.path.join(bin_cache, name)
    archive = extracted + ".zip"
    if not (os.path.isfile(archive) and os.path.isfile(extracted)):
        for path, write in ((extracted, lambda tmp: shutil.copyfile(binary, tmp)),
                            (archive, lambda tmp: _zip_one(binary, name, tmp))):
            tmp = path + ".tmp"
            write(tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
    return extracted


def _zip_one(binary: str, member: str, target: str) -> None:
    import zipfile

    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(binary, member)


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.prism", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "location"))
    parser.add_argument("--version", default=None, help="Beam version (default: the installed one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.command == "build":
            path = build(args.version)
            register_with_beam(args.version)
        else:
            path = prism_location(args.version)
    except PrismUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prism, Beam's local streaming runner, built from the Go module proxy.

Beam downloads Prism from GitHub releases, which this machine cannot reach, and
the DirectRunner then silently falls back to the FnApiRunner (batch semantics:
no window fires while the source runs). The Go SDK module holds Prism's source,
so the Go toolchain builds it from the module proxy, pinned to the installed
Beam version, into a per-version cache::

    python -m runners.prism build      # ~2 min cold, instant when cached
    python -m runners.prism location   # prints the binary's path

The patches in ``runners/prism_patches/`` (each says what it fixes and which
test fails without it) are applied to that source before the build; the
cache directory is named by the Beam version and a digest of the patches, so
a changed patch builds a new binary.

``prism_location()`` is what the runner profiles pass as ``--prism_location``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

LOG = logging.getLogger("eventlake.runners.prism")

BEAM_GO_MODULE = "github.com/apache/beam/sdks/v2"
PRISM_PACKAGE = "./go/cmd/prism"  # inside BEAM_GO_MODULE
PATCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prism_patches")
BUILD_TIMEOUT_SECONDS = 900


class PrismUnavailable(RuntimeError):
    """Prism is not built (or cannot be): the caller must not fall back silently."""


def beam_version() -> str:
    from apache_beam.version import __version__

    return __version__


def patches() -> list[str]:
    """The patch files applied to Prism's source, in the order they are applied."""
    return sorted(os.path.join(PATCH_DIR, name) for name in os.listdir(PATCH_DIR) if name.endswith(".patch"))


def build_id(version: Optional[str] = None) -> str:
    """``<beam version>-<digest of the patches>``: names the cache and marks Beam's copy."""
    digest = hashlib.sha256()
    for path in patches():
        with open(path, "rb") as handle:
            digest.update(os.path.basename(path).encode() + b"\0" + handle.read())
    return f"{version or beam_version()}-{digest.hexdigest()[:12]}"


def cache_dir(version: Optional[str] = None) -> str:
    root = os.environ.get("EVENTLAKE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "eventlake")
    return os.path.join(os.path.abspath(root), "prism", build_id(version))


def prism_location(version: Optional[str] = None) -> str:
    """Path of the cached Prism binary for the installed Beam; raises if not built."""
    path = os.path.join(cache_dir(version), "prism")
    if not os.access(path, os.X_OK):
        raise PrismUnavailable(f"Prism {version or beam_version()} is not built: run `python -m runners.prism build`")
    return path


def build(version: Optional[str] = None, *, go: str = "go", timeout: float = BUILD_TIMEOUT_SECONDS) -> str:
    """Builds the patched Prism into the cache (idempotent) and returns its path."""
    version = version or beam_version()
    try:
        return prism_location(version)
    except PrismUnavailable:
        pass
    target = cache_dir(version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Build in a scratch directory beside the cache, then rename: a concurrent or
    # interrupted build never leaves a half-written binary at the final path.
    scratch = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(target))
    try:
        LOG.info("building Prism %s (a few minutes when cold)", build_id(version))
        source = patched_source(scratch, version, go=go, timeout=timeout)
        _run([_tool(go), "build", "-buildvcs=false", "-o", os.path.join(scratch, "prism"), PRISM_PACKAGE],
             cwd=source, timeout=timeout, what="go build")
        os.makedirs(target, exist_ok=True)
        os.replace(os.path.join(scratch, "prism"), os.path.join(target, "prism"))
    finally:
        remove_tree(scratch)
    return prism_location(version)


def patched_source(scratch: str, version: Optional[str] = None, *, go: str = "go",
                   timeout: float = BUILD_TIMEOUT_SECONDS) -> str:
    """Prism's source with ``patches()`` applied, in ``<scratch>/src``; returns that directory.

    The Beam Go module comes from the module proxy (``go mod download``); its
    ``go`` tree, ``go.mod`` and ``go.sum`` are copied out of the read-only
    module cache and made writable, then each patch is applied with ``git apply``.
    """
    version = version or beam_version()
    go_binary = _tool(go)
    git = _tool("git")
    listing = _run([go_binary, "mod", "download", "-json", f"{BEAM_GO_MODULE}@v{version}"], cwd=scratch,
                   timeout=timeout, what=f"go mod download {BEAM_GO_MODULE}@v{version}")
    module_dir = json.loads(listing.stdout or "{}").get("Dir")
    if not module_dir or not os.path.isdir(os.path.join(module_dir, "go")):
        raise PrismUnavailable(f"`go mod download {BEAM_GO_MODULE}@v{version}` gave no source directory")
    source = os.path.join(scratch, "src")
    os.makedirs(source)
    shutil.copytree(os.path.join(module_dir, "go"), os.path.join(source, "go"), copy_function=shutil.copyfile)
    for name in ("go.mod", "go.sum"):
        shutil.copyfile(os.path.join(module_dir, name), os.path.join(source, name))
    for directory, _, _ in os.walk(source):  # copytree kept the module cache's read-only directory modes
        os.chmod(directory, 0o755)
    for patch in patches():
        _run([git, "apply", "-p1", patch], cwd=source, timeout=60, what=f"git apply {os.path.basename(patch)}")
    return source


def remove_tree(path: str) -> None:
    """``rm -rf`` that also removes what sits in read-only directories."""
    def writable_then_retry(function, failed_path, _):
        try:
            os.chmod(os.path.dirname(failed_path), 0o755)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=writable_then_retry)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PrismUnavailable(f"{name!r} is not on PATH; it is needed to build Prism")
    return found


def _run(args: list[str], *, cwd: str, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Runs a build step; a failure or a timeout becomes ``PrismUnavailable`` with the step's own message."""
    env = dict(os.environ, GOFLAGS=os.environ.get("GOFLAGS", "-mod=mod"))
    try:
        return subprocess.run(args, env=env, cwd=cwd, check=True, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise PrismUnavailable(f"building Prism: `{what}` took longer than {timeout:.0f} s") from None
    except subprocess.CalledProcessError as exc:
        detail = _error_text(exc.stdout) or (exc.stderr or "").strip()[-2000:]
        raise PrismUnavailable(f"building Prism: `{what}` failed with exit code {exc.returncode}: {detail}") from None


def _error_text(stdout: Optional[str]) -> str:
    """The ``Error`` field that ``go mod download -json`` prints on stdout, if any."""
    try:
        return str(json.loads(stdout or "").get("Error") or "")
    except (ValueError, AttributeError):
        return ""


def register_with_beam(version: Optional[str] = None) -> str:
    """Puts our Prism where Beam looks for its downloaded release, and returns that path.

    A plain ``--runner=DirectRunner`` (and ``PrismRunner`` without
    ``--prism_location``) otherwise tries to download Prism from GitHub, which
    is not reachable here (and would be traffic off the machine in tests), then
    silently falls back to a non-streaming runner. Beam keeps the release zip
    and its extracted binary in ``PrismJobServer.BIN_CACHE``; with both present
    it uses them without any network access. A copy from another build (an
    unpatched one, or Beam's own download) is replaced: the build id is kept
    beside it. Idempotent.
    """
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    version = version or beam_version()
    binary = prism_location(version)
    name = f"apache_beam-v{version}-prism-{platform.system().lower()}-{_go_arch()}"
    bin_cache = PrismJobServer.BIN_CACHE
    os.makedirs(bin_cache, exist_ok=True)
    extracted = os.path.join(bin_cache, name)
    archive = extracted + ".zip"
    marker = extracted + ".eventlake-build"
    ours = build_id(version)
    if not (os.path.isfile(archive) and os.path.isfile(extracted) and _read(marker) == ours):
        for path, write in ((extracted, lambda tmp: shutil.copyfile(binary, tmp)),
                            (archive, lambda tmp: _zip_one(binary, name, tmp))):
            tmp = path + ".tmp"
            write(tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        with open(marker + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(ours)
        os.replace(marker + ".tmp", marker)
    return extracted


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


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

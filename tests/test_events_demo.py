"""``python -m runners.demo``: twice into the same lake, and stopped mid-run, it leaves nothing running."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from runners.local import wait_until
from tests.test_events_support import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _demo(lake: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "runners.demo", f"--lake={lake}", "--events=300", "--rate=600", "--users=50",
         "--window_seconds=2", "--seed=5", "--stop_when_idle_seconds=6", *extra],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": PROJECT_ROOT}, start_new_session=True)


def _number(report: str, label: str) -> int:
    return int(re.search(rf"{label}\s*: (\d+)", report).group(1))


def _port_closed(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def _processes_naming(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_two_runs_into_the_same_lake_each_report_only_their_own_events(tmp_path):
    lake = str(tmp_path / "lake")
    reports = []
    for _ in range(2):  # the same seed: the second run posts the same event ids again
        demo = _demo(lake)
        out, _ = demo.communicate(timeout=600)
        assert demo.returncode == 0, out[-3000:]
        reports.append(out)
    for out in reports:
        accepted = _number(out, "accepted by the ingress")
        rows, dead = _number(out, "rows in the lake"), _number(out, "dead letters")
        assert rows + dead == accepted  # not the first run's rows as well
        assert _number(out, "accepted but nowhere") == 0
        assert "conservation holds" in out


def test_sigterm_mid_run_stops_the_ingress_the_pipeline_and_the_stack(tmp_path):
    lake = str(tmp_path / "lake")
    demo = _demo(lake, "--events=200000", "--rate=500")
    lines = []
    try:
        for _ in range(200):  # bounded: the first lines come within seconds
            line = demo.stdout.readline()
            lines.append(line)
            if line.startswith("[3/5]") or not line:
                break
        assert lines[-1].startswith("[3/5]"), "".join(lines)
        moto = re.search(r"local stack up at (\S+);", "".join(lines)).group(1)
        ingress = re.search(r"ingress ready at (\S+)", "".join(lines)).group(1)
        assert _processes_naming(lake)  # the pipeline runs with --output=<lake>
        demo.send_signal(signal.SIGTERM)
        demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=30)
    assert demo.returncode == 130
    wait_until(lambda: not _processes_naming(lake), timeout=30, what="the pipeline to be gone")
    assert _port_closed(moto) and _port_closed(ingress)

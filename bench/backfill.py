"""Backfill throughput: ``pipelines.events --mode=backfill`` over generated JSON Lines.

The data is the load generator's seeded mix (``runners.loadgen``: several event
types, planted personal data, ~5% invalid events), stamped as the ingress stamps
it and spread over one hour of ``received_at``, written to several gzip files;
the users are seeded in the moto DynamoDB table. The pipeline runs as a child
process (as an operator would start it) so that its wall time and the peak
memory of its whole process tree (Prism, SDK workers) are measured, not this
process's. Usage::

    python -m bench.backfill [--events 500000] [--files 8] [--runner fnapi2] [--rounds 3]

Two yardsticks run on the same data (``bench.baseline``): the plain loop in
one process, and the same loop in two processes side by side, each on half of
the files: what this machine gives two perfectly split copies of the work
(``backfill_to_two_processes_ratio`` says how much of that the pipeline's two
workers reach).

The same run of the same code on the same data took 59-78 s here (the CPU-bound
phase alone moved by a fifth between runs), and the one-process loop 78-97 s,
so one pair says little. The pipeline and the loop therefore run ``rounds``
times, alternating; the figures are the medians (peak RSS: the maximum), the
headline ratio is the ratio of the two medians, and each round's pair and
ratio are kept in ``rounds_detail``. The two-process yardstick runs once,
after the rounds.

Runners (``RUNNERS``): ``fnapi2`` (FnApiRunner, two worker processes: uses both
cores), ``fnapi1`` (FnApiRunner, one process), ``prism`` (Prism, one LOOPBACK
SDK worker).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

from bench.machine import PeakMemory
from bench.rounds import check_rounds
from runners.loadgen import EventMix, write_backfill
from runners.local import LocalStack, StackConfig
from transforms.envelope import format_rfc3339_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DIR = os.path.join(ROOT, "schemas")
START_MS = 1_795_651_200_000  # 2026-11-26T00:00:00Z: one fixed hour, so runs are comparable
SPAN_MS = 3_600_000
BENCH_KEYS = "bench1=bench-secret-not-for-production"

FNAPI = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
RUNNERS = {
    "fnapi2": [f"--runner={FNAPI}", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    "fnapi1": [f"--runner={FNAPI}", "--direct_num_workers=1"],
    "prism": ["--runner=PrismRunner"],
}


def prepare(workdir: str, *, events: int, files: int, users: int = 2000, seed: int = 7) -> dict:
    """Writes ``files`` gzip JSON Lines files holding ``events`` envelopes; returns where and the users.

    Events whose ``received_at`` precede others land in earlier files, as an
    archive of the stream would be laid out.
    """
    if events < 1 or files < 1 or users < 1:
        raise ValueError(f"events, files and users must be >= 1, got {events}, {files}, {users}")
    mix = EventMix(SCHEMA_DIR, users=users, seed=seed)
    user_items = list(mix.users())
    os.makedirs(workdir, exist_ok=True)
    per_file = -(-events // files)

    def envelopes(first: int, last: int):
        for n in range(first, last):
            _, envelope = mix.next()
            received_at = START_MS + n * SPAN_MS // events
            envelope["received_at"] = format_rfc3339_ms(received_at)
            envelope["timestamp"] = format_rfc3339_ms(received_at - mix.rng.randint(0, 5000))
            yield envelope

    paths = []
    for index in range(files):
        first, last = index * per_file, min(events, (index + 1) * per_file)
        if first >= last:
            break
        path = os.path.join(workdir, f"events-{index:03d}.jsonl.gz")
        write_backfill(path, envelopes(first, last))
        paths.append(path)
    return {"pattern": os.path.join(workdir, "events-*.jsonl.gz"), "paths": paths, "events": events,
            "users": user_items}


def pipeline_env(stack: LocalStack) -> dict:
    return {**os.environ, **stack.env(), "EVENTLAKE_PSEUDONYMIZATION_KEYS": BENCH_KEYS,
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_pipeline(stack: LocalStack, pattern: str, lake: str, *, runner: str = "fnapi2",
                 timeout_s: float = 3600.0, log_path: Optional[str] = None) -> dict:
    """Runs the backfill as a child process; wall time, peak memory of its tree, its conservation line."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {sorted(RUNNERS)}, got {runner!r}")
    argv = [sys.executable, "-m", "pipelines.events", "--mode=backfill", f"--input={pattern}",
            f"--users_table={stack.config.users_table}", f"--output={lake}",
            f"--dead_letter={os.path.join(lake, '_dead_letters')}", f"--schema_dir={SCHEMA_DIR}",
            "--window_seconds=60", *RUNNERS[runner]]
    log_path = log_path or os.path.join(lake, "_pipeline.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=pipeline_env(stack), cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        with PeakMemory(proc.pid) as peak:
            out, _ = proc.communicate(timeout=timeout_s)
        seconds = time.monotonic() - started
    summary = {}
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith('{"eventlake_run"'):
            summary = json.loads(line)["eventlake_run"]
    if proc.returncode != 0 or not summary:
        raise RuntimeError(f"backfill pipeline exited with {proc.returncode}; see {log_path}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": peak.mb, **summary}


def _median_run(runs: list) -> tuple:
    """The median of the runs' ``seconds``, and the run closest to it (the one reported in full)."""
    seconds = statistics.median(run["seconds"] for run in runs)
    return seconds, min(runs, key=lambda run: abs(run["seconds"] - seconds))


def run(*, events: int = 500_000, files: int = 8, runner: str = "fnapi2", users: int = 2000, seed: int = 7,
        workdir: Optional[str] = None, stack: Optional[LocalStack] = None, with_baseline: bool = True,
        rounds: int = 1) -> dict:
    """Generates the data, seeds the users, runs the backfill (and the plain-Python baseline on the same data)
    ``rounds`` times, alternating; reports medians."""
    check_rounds(rounds)
    own_stack = stack is None
    stack = stack or LocalStack(StackConfig(users_table="bench-backfill-users", stream="bench-backfill",
                                            bucket="bench-backfill-lake", dead_letter_queue="bench-backfill-dlq"))
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="eventlake-bench-backfill-")
        workdir = tmp.name
    try:
        if own_stack:
            stack.start()
        generated_at = time.monotonic()
        data = prepare(os.path.join(workdir, "input"), events=events, files=files, users=users, seed=seed)
        stack.seed_users(data["users"])
        prepare_s = time.monotonic() - generated_at
        from bench import baseline

        pipelines, bases = [], []
        for index in range(rounds):
            lake = os.path.join(workdir, f"lake-{index}")
            pipelines.append(run_pipeline(stack, data["pattern"], lake, runner=runner))
            if with_baseline:
                bases.append(baseline.run_on(data["pattern"], os.path.join(workdir, f"baseline_lake-{index}"),
                                             stack=stack))
        seconds, pipeline = _median_run(pipelines)
        result = {
            "events": events, "files": len(data["paths"]), "runner": runner, "prepare_s": round(prepare_s, 1),
            "rounds": rounds,
            "backfill_seconds": round(seconds, 2),
            "backfill_events_per_s": round(events / seconds, 1),
            "backfill_peak_rss_mb": max(run["peak_rss_mb"] for run in pipelines),
            "backfill_run": pipeline,
            "conserved": all(run["conserved"] for run in pipelines),
        }
        if with_baseline:
            base_seconds, base_run = _median_run(bases)
            split = baseline.run_side_by_side(data["pattern"], os.path.join(workdir, "baseline_split_lake"),
                                              stack=stack, processes=2)
            result.update({
                "baseline_events_per_s": round(events / base_seconds, 1),
                "baseline_seconds": round(base_seconds, 2),
                "baseline_run": base_run,
                "backfill_to_baseline_ratio": round(base_seconds / seconds, 3),
                "baseline_two_processes_events_per_s": split["events_per_s"],
                "baseline_two_processes_run": split,
                "backfill_to_two_processes_ratio": round(events / seconds / split["events_per_s"], 3),
                "rounds_detail": [{"backfill_seconds": run["seconds"], "baseline_seconds": base["seconds"],
                                   "ratio": round(base["seconds"] / run["seconds"], 3)}
                                  for run, base in zip(pipelines, bases)],
            })
        return result
    finally:
        if own_stack:
            stack.stop()
        if tmp is not None:
            tmp.cleanup()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="fnapi2")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline/baseline pairs, alternating (medians)")
    parser.add_argument("--no_baseline", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(events=args.events, files=args.files, runner=args.runner, rounds=args.rounds,
                         with_baseline=not args.no_baseline), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

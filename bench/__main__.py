"""``make bench``: every benchmark in one run; writes bench/results/latest.json and prints a table.

Sizes are parameters (with the defaults a run took ~33 minutes on a 2-core
machine: three ingress and three backfill rounds, two stream runs of seven
minutes' warm-up and two measured ones each)::

    python -m bench [--ingress_rounds 3] [--backfill_events 500000] [--stream_rate 5250]
                    [--stream_steady_rate 2000] [--stream_duration 120] [--stream_warmup 420]
                    [--capacity_events 100000] [--only ingress,stream]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from bench.stream import STREAM_WARMUP_S

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PARTS = ("ingress", "backfill", "stream", "capacity")
#: Offered to the stream for the two measured minutes: 5 % over the 5,000 ev/s target, so that the headline says
#: whether the ingress, the emulator and the pipeline sustain the target together on this machine (on 2 cores they
#: are near its edge: docs/benchmarks.md). The sustained figure can only be at most what is offered, less the
#: schedule's and the delay growth's noise: offered exactly 5,000, it read 4,980-4,999 in runs that kept up, so it could
#: never show the target held. "Kept up" is judged at 5,250, so a stack that holds 5,000 but not 5,250 shows as
#: not keeping up: stricter than the target. The pipeline's own ceiling is the "capacity" part.
STREAM_RATE = 5250.0
#: A second run, offered a rate the stack sustains here with margin: freshness and memory away from the edge, where a
#: change shows that the target run's swings would hide. 0 skips it.
STREAM_STEADY_RATE = 2000.0
#: The steady run's figures, reported as ``steady_<key>``.
STEADY_KEYS = ("stream_events_per_s", "freshness_p50_s", "freshness_p95_s", "stream_memory_floor_growth_mb",
               "stream_memory_flat", "stream_memory_floor_growth_by_process_mb", "stream_memory_warmup_floor_growth_mb")

#: (key, unit, target) rows of the printed table, in order.
TABLE = [
    ("ingress_events_per_s", "ev/s", None),
    ("ingress_p50_ms", "ms", None),
    ("ingress_p99_ms", "ms", None),
    ("kinesis_put_limit_events_per_s", "ev/s", None),
    ("ingress_to_limit_ratio", "", ">= 0.8"),
    ("ingress_keepup_rate_events_per_s", "ev/s", None),
    ("ingress_keepup_p50_ms", "ms", None),
    ("ingress_keepup_p99_ms", "ms", "<= 50"),
    ("kinesis_keepup_p50_ms", "ms", None),
    ("kinesis_keepup_p99_ms", "ms", None),
    ("ingress_alone_keepup_p50_ms", "ms", None),
    ("ingress_alone_keepup_p99_ms", "ms", None),
    ("backfill_events", "events", None),
    ("backfill_events_per_s", "ev/s", None),
    ("baseline_events_per_s", "ev/s", None),
    ("backfill_to_baseline_ratio", "", ">= 1.4"),
    ("baseline_two_processes_events_per_s", "ev/s", None),
    ("backfill_to_two_processes_ratio", "", None),
    ("stream_events_per_s", "ev/s", ">= 5000"),
    ("end_to_end_events_per_s", "ev/s", None),
    ("delay_growth_s", "s", None),
    ("stream_kept_up", "", "true"),
    ("freshness_p50_s", "s", None),
    ("freshness_p95_s", "s", "<= window + 10"),
    ("stream_memory_growth_mb_per_min", "MiB/m", None),
    ("stream_memory_warmup_floor_growth_mb", "MiB", None),
    ("stream_memory_floor_growth_mb", "MiB", None),
    ("stream_memory_flat", "", "true"),
    ("steady_stream_offered_events_per_s", "ev/s", None),
    ("steady_stream_kept_up", "", None),
    ("steady_freshness_p95_s", "s", None),
    ("steady_stream_memory_warmup_floor_growth_mb", "MiB", None),
    ("steady_stream_memory_floor_growth_mb", "MiB", None),
    ("steady_stream_memory_flat", "", None),
    ("stream_capacity_events_per_s", "ev/s", None),
    ("peak_rss_mb", "MiB", None),
]


def run_all(*, parts=PARTS, ingress_duration_s: float = 20.0, ingress_rounds: int = 3,
            backfill_events: int = 500_000, backfill_files: int = 8, backfill_runner: str = "fnapi2",
            backfill_rounds: int = 3,
            stream_rate: float = STREAM_RATE, stream_steady_rate: float = STREAM_STEADY_RATE,
            stream_duration_s: float = 120.0, stream_warmup_s: float = STREAM_WARMUP_S, stream_window_s: int = 10,
            capacity_events: int = 100_000) -> dict:
    """Runs the chosen benchmarks; returns the flat headline figures plus each part's details."""
    from bench import machine

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {sorted(unknown)}; choose from {PARTS}")
    results: dict = {"machine": machine.machine(), "details": {}}
    started = time.monotonic()
    peaks = []
    if "ingress" in parts:
        from bench import ingress

        detail = ingress.run(duration_s=ingress_duration_s, rounds=ingress_rounds)
        results["details"]["ingress"] = detail
        results.update(ingress.summary(detail))
    if "backfill" in parts:
        from bench import backfill

        detail = backfill.run(events=backfill_events, files=backfill_files, runner=backfill_runner,
                              rounds=backfill_rounds)
        results["details"]["backfill"] = detail
        for key in ("backfill_events", "backfill_events_per_s", "baseline_events_per_s",
                    "backfill_to_baseline_ratio", "baseline_two_processes_events_per_s",
                    "backfill_to_two_processes_ratio", "backfill_peak_rss_mb"):
            results[key] = detail.get(key if key != "backfill_events" else "events")
        results["backfill_runner"] = detail["backfill_run"]["runner"]
        peaks.append(detail["backfill_peak_rss_mb"])
    if "stream" in parts:
        from bench import stream

        detail = stream.run(rate=stream_rate, duration_s=stream_duration_s, warmup_s=stream_warmup_s,
                            window_s=stream_window_s)
        results["details"]["stream"] = detail
        for key in ("stream_events_per_s", "end_to_end_events_per_s", "delay_growth_s", "freshness_p50_s",
                    "freshness_p95_s", "stream_peak_rss_mb",
                    "stream_memory_growth_mb_per_min", "stream_memory_floor_growth_mb", "stream_memory_flat",
                    "stream_memory_floor_growth_by_process_mb", "stream_memory_warmup_floor_growth_mb"):
            results[key] = detail[key]
        results["stream_kept_up"] = detail["kept_up"]
        results["stream_offered_events_per_s"] = stream_rate
        peaks.append(detail["stream_peak_rss_mb"])
        if stream_steady_rate:
            steady = stream.run(rate=stream_steady_rate, duration_s=stream_duration_s, warmup_s=stream_warmup_s,
                                window_s=stream_window_s)
            results["details"]["steady_stream"] = steady
            results.update({f"steady_{key}": steady[key] for key in STEADY_KEYS})
            results["steady_stream_kept_up"] = steady["kept_up"]
            results["steady_stream_offered_events_per_s"] = stream_steady_rate
            peaks.append(steady["stream_peak_rss_mb"])
    if "capacity" in parts:
        from bench import stream

        detail = stream.capacity(events=capacity_events, window_s=stream_window_s)
        results["details"]["capacity"] = detail
        results["stream_capacity_events_per_s"] = detail["stream_capacity_events_per_s"]
        peaks.append(detail["capacity_peak_rss_mb"])
    if peaks:
        results["peak_rss_mb"] = max(peaks)
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    return results


def table(results: dict) -> str:
    width = max(len(key) for key, _, _ in TABLE)
    lines = [f"{'figure':{width}s} {'value':>12s} {'unit':6s} target"]
    for key, unit, target in TABLE:
        if key in results:
            value = results[key]
            text = ("n/a" if value is None else f"{value:,.3f}".rstrip("0").rstrip(".") if isinstance(value, float)
                    else str(value))
            lines.append(f"{key:{width}s} {text:>12s} {unit:6s} {target or ''}")
    for run, key in (("stream", "stream_memory_floor_growth_by_process_mb"),
                     ("steady stream", "steady_stream_memory_floor_growth_by_process_mb")):
        by_process = results.get(key)
        if by_process:
            lines.append(f"{run}: memory floor growth by process (MiB): "
                         + ", ".join(f"{name} {'n/a' if growth is None else f'{growth:+.1f}'}"
                                     for name, growth in by_process.items()))
    m = results["machine"]
    lines.append(f"machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, Beam {m['beam']}, "
                 f"load {m['load_average_1_5_15']}, {m['measured_at']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--ingress_duration", type=float, default=20.0)
    parser.add_argument("--ingress_rounds", type=int, default=3,
                        help="Kinesis ceiling/ingress pairs, alternating; the figures are their medians")
    parser.add_argument("--backfill_events", type=int, default=500_000)
    parser.add_argument("--backfill_files", type=int, default=8)
    parser.add_argument("--backfill_runner", default="fnapi2")
    parser.add_argument("--backfill_rounds", type=int, default=3,
                        help="backfill/baseline pairs, alternating; the figures are their medians")
    parser.add_argument("--stream_rate", type=float, default=STREAM_RATE)
    parser.add_argument("--stream_steady_rate", type=float, default=STREAM_STEADY_RATE,
                        help="a second stream run at this rate (0: none)")
    parser.add_argument("--stream_duration", type=float, default=120.0)
    parser.add_argument("--stream_warmup", type=float, default=STREAM_WARMUP_S,
                        help="seconds of load at the same rate before the measured ones, in each stream run")
    parser.add_argument("--stream_window", type=int, default=10)
    parser.add_argument("--capacity_events", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "latest.json"))
    args = parser.parse_args(argv)
    results = run_all(parts=tuple(p for p in args.only.split(",") if p), ingress_duration_s=args.ingress_duration,
                      ingress_rounds=args.ingress_rounds,
                      backfill_events=args.backfill_events, backfill_files=args.backfill_files,
                      backfill_runner=args.backfill_runner, backfill_rounds=args.backfill_rounds,
                      stream_rate=args.stream_rate, stream_steady_rate=args.stream_steady_rate,
                      stream_duration_s=args.stream_duration, stream_warmup_s=args.stream_warmup,
                      stream_window_s=args.stream_window,
                      capacity_events=args.capacity_events)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(table(results))
    print(f"details: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

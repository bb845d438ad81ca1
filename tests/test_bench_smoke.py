"""The benchmarks still run: each bench function at tiny sizes returns its figures.

Not a performance test (no figure is compared with a target): it keeps
``make bench`` from rotting as the modules it drives change. Each bench talks to
real services on loopback (moto server, gunicorn, the pipeline on its runner).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import __main__ as bench_main
from bench import backfill, ingress, machine, stream
from runners.local import LocalStack, StackConfig

pytestmark = pytest.mark.slow


def test_machine_describes_cores_memory_and_versions():
    described = machine.machine()
    assert described["cores"] >= 1 and described["memory_gib"] > 0
    assert described["beam"].startswith("2.") and described["python"].startswith("3.")


def test_peak_memory_counts_the_process_tree():
    with machine.PeakMemory(os.getpid(), interval_s=0.05) as peak:
        peak.sample()
    assert peak.mb > 10


def test_memory_growth_is_the_fitted_slope_of_the_samples():
    peak = machine.PeakMemory()
    mib = 2**20
    # 100 MiB climbing 1 MiB every 6 s (10 MiB/min), with a garbage-collection dip that the fit shrugs off
    peak.samples = [(t, (100 + t / 6 - (5 if t == 30 else 0)) * mib) for t in range(0, 61, 3)]
    growth = peak.growth(0, 60)
    assert growth["first_mb"] == 100 and growth["last_mb"] == 110 and growth["samples"] == 21
    assert 9.5 < growth["growth_mb_per_min"] < 10.5
    assert peak.growth(0, 60)["mean_mb"] == pytest.approx(105, abs=0.5)
    # floors: the lowest of the first 7 samples (t=0: 100) and of the last 7 (t=42: 107)
    assert growth["first_third_floor_mb"] == 100 and growth["last_third_floor_mb"] == 107
    flat = machine.PeakMemory()
    flat.samples = [(t, 300 * mib) for t in range(10)]
    assert flat.growth(0, 9)["growth_mb_per_min"] == 0
    # a collection swing near the end tilts the slope; the floor stays where it was
    swing = machine.PeakMemory()
    swing.samples = [(t, (300 + (80 if t in (7, 8) else 0)) * mib) for t in range(10)]
    swung = swing.growth(0, 9)
    assert swung["growth_mb_per_min"] > 100 and swung["first_third_floor_mb"] == swung["last_third_floor_mb"] == 300
    with pytest.raises(ValueError, match="two memory samples"):
        flat.growth(100, 200)


def test_memory_floors_are_each_process_s_own_summed():
    # Two processes that collect on their own schedules: each dips to its floor once per third, at different
    # moments. The floor of their sum would depend on whether two dips met; the sum of their floors does not.
    mib = 2**20
    peak = machine.PeakMemory()
    for t in range(30):
        worker = 300 - (40 if t in (2, 12, 22) else 0)
        runner = 150 - (60 if t in (2, 15, 25) else 0)  # at t=2 both dip; in the last third they miss each other
        peak.samples.append((t, (worker + runner) * mib))
        peak.process_samples.append((t, {1: worker * mib, 2: runner * mib}))
    growth = peak.growth(0, 29)
    assert growth["first_third_floor_mb"] == growth["last_third_floor_mb"] == 260 + 90
    assert growth["first_third_tree_floor_mb"] == 350 and growth["last_third_tree_floor_mb"] == 390
    # a leak in one process raises the floor by what it holds
    leaky = machine.PeakMemory()
    for t in range(30):
        leaky.samples.append((t, (300 + t + 150) * mib))
        leaky.process_samples.append((t, {1: (300 + t) * mib, 2: 150 * mib}))
    leaky.names = {1: "pipelines.events", 2: "prism"}
    grown = leaky.growth(0, 29)
    assert grown["last_third_floor_mb"] - grown["first_third_floor_mb"] == 20
    # ... and each process's own floors say which one it was
    assert grown["processes"] == {"pipelines.events": [300, 320], "prism": [150, 150]}
    assert growth["processes"] == {"1": [260, 260], "2": [90, 90]}  # unnamed: by pid
    # a process that ran only in the last third has no first floor
    late = machine.PeakMemory()
    for t in range(30):
        late.samples.append((t, (300 + (50 if t >= 20 else 0)) * mib))
        late.process_samples.append((t, {1: 300 * mib, **({3: 50 * mib} if t >= 20 else {})}))
    assert late.growth(0, 29)["processes"] == {"1": [300, 300], "3": [None, 50]}


def test_memory_is_told_apart_by_process_name():
    # a child that waits on its stdin: ``python -m json.tool`` is named by its module
    child = subprocess.Popen([sys.executable, "-m", "json.tool"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    # a "-m" of the program's own (gunicorn's umask, say) is not the interpreter's
    program = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-m", "007"],
                               stdin=subprocess.PIPE)
    try:
        with machine.PeakMemory(os.getpid(), interval_s=0.05) as peak:
            peak.sample()
    finally:
        child.communicate(b"{}", timeout=30)
        program.communicate(b"", timeout=30)
    assert peak.names[child.pid] == "json.tool"
    assert peak.names[program.pid] == os.path.basename(sys.executable)
    assert peak.names[os.getpid()] == machine.process_name(os.getpid())
    assert machine.process_name(2**22 + 1) == str(2**22 + 1)  # above pid_max: gone, named by its pid


def test_ingress_bench_returns_its_figures(moto_server):
    stack = LocalStack(StackConfig(stream="smoke-ingress", users_table="smoke-ingress-users",
                                   dead_letter_queue="smoke-ingress-dlq", bucket="smoke-ingress-lake"),
                       server=moto_server).start()
    results = ingress.run(duration_s=2, clients=2, batch=10, workers=1, threads=4, shards=1, kinesis_loop_s=1,
                          keepup_s=2, discard=True, stack=stack, rounds=2)
    for key in ("ingress_events_per_s", "ingress_p50_ms", "ingress_p99_ms", "kinesis_put_limit_events_per_s",
                "ingress_to_limit_ratio", "ingress_keepup_p50_ms", "ingress_keepup_p99_ms", "kinesis_keepup_p99_ms",
                "ingress_alone_keepup_p99_ms", "ingress_discard_events_per_s"):
        assert key in results, key
    assert results["kinesis_keepup"]["calls"] > 0
    assert results["kinesis"]["statuses"].get("202", 0) > 0
    assert results["keepup"]["failed_requests"] == 0
    # two alternating rounds: the headline figures are their medians, each pair is kept
    rounds = results["rounds_detail"]
    assert len(rounds) == 2 and all(r["ingress_events_per_s"] > 0 and r["ratio"] > 0 for r in rounds)
    # (for an even count, the lower of the two middle ones)
    assert results["kinesis_put_limit_events_per_s"] == min(r["kinesis_put_limit_events_per_s"] for r in rounds)
    assert results["ingress_events_per_s"] == min(r["ingress_events_per_s"] for r in rounds)


def test_the_ingress_figures_are_the_median_round_s():
    loads = [{"events_per_s": rate, "latency_p99_ms": rate / 100} for rate in (300.0, 100.0, 200.0)]
    assert ingress._median_round(loads) == {"events_per_s": 200.0, "latency_p99_ms": 2.0}
    assert ingress._median_round(loads[:1]) == loads[0]
    with pytest.raises(ValueError, match="rounds"):
        ingress.run(rounds=0)


def test_backfill_and_baseline_process_every_event(moto_server, tmp_path):
    stack = LocalStack(StackConfig(stream="smoke-backfill", users_table="smoke-backfill-users",
                                   dead_letter_queue="smoke-backfill-dlq", bucket="smoke-backfill-lake"),
                       server=moto_server).start()
    results = backfill.run(events=400, files=2, runner="fnapi1", users=50, workdir=str(tmp_path), stack=stack,
                           rounds=2)
    assert [sorted(pair) for pair in results["rounds_detail"]] == [["backfill_seconds", "baseline_seconds", "ratio"]] * 2
    assert results["conserved"]
    for key in ("backfill_events_per_s", "baseline_events_per_s", "backfill_to_baseline_ratio",
                "baseline_two_processes_events_per_s", "backfill_to_two_processes_ratio", "backfill_peak_rss_mb"):
        assert results[key] > 0, key
    pipeline, base, split = results["backfill_run"], results["baseline_run"], results["baseline_two_processes_run"]
    assert pipeline["read"] == base["read"] == split["read"] == 400
    assert pipeline["conserved"] and base["conserved"] and split["conserved"]
    # the same work on the same data
    assert pipeline["rows_written"] == base["rows_written"] == split["rows_written"]


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_backfill_rounds_must_be_a_positive_integer(rounds):
    with pytest.raises(ValueError, match="rounds"):
        backfill.run(events=10, rounds=rounds)


def test_stream_bench_sees_every_event_land(tmp_path):
    results = stream.run(rate=200, duration_s=2, warmup_s=3, window_s=2, batch=50, clients=2, shards=1, users=50,
                         workdir=str(tmp_path), drain_timeout_s=120)
    assert results["accepted"] == 400
    assert results["landed"] == results["accepted"]
    for key in ("stream_events_per_s", "end_to_end_events_per_s", "freshness_p50_s", "freshness_p95_s",
                "stream_peak_rss_mb"):
        assert results[key] > 0, key
    assert results["end_to_end_events_per_s"] <= results["stream_events_per_s"]
    assert results["memory"]["samples"] >= 2 and isinstance(results["stream_memory_flat"], bool)
    # the warm-up's memory is kept beside: its 2 s after the first second of events, sampled every 0.5 s
    assert results["warmup_memory"]["samples"] >= 2
    assert isinstance(results["stream_memory_warmup_floor_growth_mb"], float)
    assert set(results["stream_memory_floor_growth_by_process_mb"]) >= {"pipelines.events", "prism"}
    assert results["freshness_p95_every_15s"] and all(f > 0 for f in results["freshness_p95_every_15s"])


def _landing(rate: float, seconds: float, delay_at) -> tuple:
    """Events posted at ``rate`` for ``seconds``; each lands ``delay_at(posted)`` later, at a window's end."""
    accepted, seen = {}, {}
    for n in range(int(rate * seconds)):
        posted = 1000.0 + n / rate
        accepted[n] = posted
        seen[n] = (posted + delay_at(posted - 1000.0)) // 10 * 10 + 10  # rows become readable when a 10 s window ends
    return accepted, seen


def test_a_pipeline_that_keeps_up_sustains_the_posted_rate_however_long_its_delay():
    accepted, seen = _landing(5000, 120, lambda t: 12.0)
    growth = stream._delay_growth(accepted, seen, edge_s=30)
    assert growth == 0.0
    assert 5000 * 0.98 < len(accepted) / (120 + growth) <= 5000
    end_to_end = len(accepted) / (max(seen.values()) - min(accepted.values()))
    assert end_to_end < 4700  # the end-to-end rate counts the delay once


def test_a_pipeline_that_falls_behind_sustains_the_rate_it_drains_at():
    # drains at 4,000 of 5,000 ev/s posted: the backlog's delay grows by a quarter of the time elapsed
    accepted, seen = _landing(5000, 120, lambda t: 12.0 + t / 4)
    growth = stream._delay_growth(accepted, seen, edge_s=30)
    assert 4000 * 0.95 < len(accepted) / (120 + growth) < 4000 * 1.05


def test_steady_bodies_are_the_schedule_of_batches_with_their_event_ids():
    import json

    from runners.loadgen import EventMix

    mix = EventMix(os.path.join(stream.ROOT, "schemas"), users=20, seed=5, invalid_rate=0.0)
    bodies = stream.steady_bodies(mix, rate=100, duration_s=3, batch=50)
    assert len(bodies) == 6
    for ids, body in bodies:
        assert ids == [event["event_id"] for event in json.loads(body)["events"]]
    assert len({event_id for ids, _ in bodies for event_id in ids}) == 300


def test_freshness_trend_shows_a_pipeline_falling_behind():
    posted = {f"e{n}": n * 1.0 for n in range(60)}  # one event a second for a minute
    steady = {e: t + 5.0 for e, t in posted.items()}
    behind = {e: t + 5.0 + t / 2 for e, t in posted.items() if e != "e59"}  # delay grows; the last never lands
    assert stream._freshness_trend(posted, steady, slice_s=15.0) == [5.0, 5.0, 5.0, 5.0]
    assert stream._freshness_trend(posted, behind, slice_s=15.0) == [11.5, 19.0, 26.5, 33.5]
    assert stream._freshness_trend({"lost": 0.0}, {}, slice_s=15.0) == [None]
    assert stream._freshness_trend({}, {}, slice_s=15.0) == []


def test_capacity_bench_drains_a_backlog_put_before_the_pipeline_starts(tmp_path):
    results = stream.capacity(events=600, window_s=2, spread_s=20, shards=1, users=50, workdir=str(tmp_path),
                              timeout_s=180)
    assert results["landed"] == 600
    assert results["stream_capacity_events_per_s"] > 0
    assert 0 < results["first_row_s"] <= results["drain_s"]


def test_table_prints_the_figures_it_has():
    text = bench_main.table({"machine": machine.machine(), "ingress_to_limit_ratio": 0.85, "peak_rss_mb": 512.0})
    assert "ingress_to_limit_ratio" in text and "0.85" in text and "peak_rss_mb" in text
    assert "stream_events_per_s" not in text


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="nonsense"):
        bench_main.run_all(parts=("nonsense",))

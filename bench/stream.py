"""Streaming throughput and freshness: HTTP ingress -> Kinesis -> pipelines.events on Prism -> lake.

Events are posted at a steady rate (``rate`` events/s in batches of ``batch``,
paced on a schedule from ``clients`` threads) through gunicorn to the moto
Kinesis stream; the events pipeline runs in streaming mode on Prism as a child
process and writes ``window_s`` windows to a local lake. A poller reads every
new Parquet file's ``event_id`` column with pyarrow and records, per event id,
when it first became readable. Freshness of an event = that moment minus the
moment its 202 arrived. Only the events of the ``duration`` seconds after the
warm-up are measured; posting goes on at the same rate, in the same schedule
with no pause, for one more window (+10 s) so that the measured windows close
under load, as they would in production. Every request body is built before the
pipeline starts (``steady_bodies``), so the load generator's own work neither
pauses the schedule nor takes the cores during the measurement. A first second
of events is posted and awaited in the lake (the runner has started); then the
warm-up, the measured load and the tail are posted as one schedule, with no
pause: ``warmup_s`` at the same rate, so that neither the filling of caches and
heaps nor the first windows are measured: seven minutes by default, as the
worker's heap takes minutes to reach its working size (``STREAM_WARMUP_S``).
Until stop 26 the bench paused after the warm-up until all of it had landed:
the measured load then started on a drained pipeline, with no window open, and
its first third's memory floor was that of an idle pipeline (at 5,250 ev/s:
367 MiB, against 458 MiB in the last third, which made memory look like it grew
by 25 %).

``stream_events_per_s`` is the sustained rate: events that landed, divided by
the posting time plus how much their delay grew from the first 30 s of the
load to the last (``delay_growth_s``, see ``_delay_growth``): the posted rate
when the pipeline keeps up, the rate it really drained at when it falls behind.
``end_to_end_events_per_s`` (what ``stream_events_per_s`` was until stop 25)
divides by the time from the first 202 to the last row readable instead, which
also counts one delay (a window and more), so at 5,000 ev/s offered for two
minutes it stays under ~4,500 however fast the pipeline is. ``offered_events_per_s``
is what was posted; the pipeline kept up (``kept_up``) when every accepted event
landed with freshness p95 <= window + 10 s.

Memory of the pipeline's process tree (the SDK worker and Prism) is sampled every
half second over the measured load. "Memory flat" (``stream_memory_flat``) is
judged on the floor of its last third against its first third
(``stream_memory_floor_growth_mb``): garbage collection swings memory up by tens
of MiB at a time, a leak raises the floor. A third's floor is the sum of each
process's lowest sample in it (``bench.machine.PeakMemory.growth``: Prism and the
SDK worker collect on their own schedules, and the lowest sample of their sum
depended on whether two dips met). The least-squares slope
(``stream_memory_growth_mb_per_min``) is reported beside it.

``capacity`` measures the pipeline's own ceiling, which ``run`` does not reach on
a machine where the ingress and the emulator share the cores with the pipeline:
a backlog is put straight on Kinesis before the pipeline starts, and
``stream_capacity_events_per_s`` is how fast rows then land (see its docstring).
Usage::

    python -m bench.stream [--rate 1000] [--duration 120] [--warmup 420] [--window 10] [--capacity_events 100000]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import pyarrow.parquet as pq
import requests

from bench.backfill import BENCH_KEYS, SCHEMA_DIR
from bench.ingress import WRITE_KEY, _percentile, _start_gunicorn, _stop
from bench.machine import PeakMemory
from runners.loadgen import EventMix
from runners.local import LocalStack, StackConfig, free_port, wait_until
from runners.processes import Child
from ingress.publisher import KinesisPublisher
from transforms.envelope import format_rfc3339_ms, partition_key, stamp, to_wire, utc_now_ms, validate_event

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds of load at the measured rate before the measured ones: ``run``'s default and ``make bench``'s. The SDK
#: worker's heap grows to its working size over a load's first minutes and then stays there (stop 27, /proc every
#: 0.5 s: at 2,000 ev/s over a 21-minute run its floor went 256 -> 282 MiB in the first 5 minutes and stayed within
#: 282-293 MiB for the 16 after; at 5,250 over 8 minutes, 278 -> 322-332 MiB in the first 7; docs/benchmarks.md).
#: With a minute's warm-up, "memory flat" judged the end of that ramp in some runs and the plateau in others. How
#: much the floor rose over the warm-up is reported beside (``stream_memory_warmup_floor_growth_mb``).
STREAM_WARMUP_S = 420.0
#: Memory is flat when its floor in the last third of the measured load is at most this share above the first third's.
FLAT_MEMORY_SHARE = 0.05


class LakeWatcher:
    """Polls a local lake for new Parquet files; remembers when each event id became readable."""

    def __init__(self, lake: str, *, interval_s: float = 0.25):
        self.root = os.path.join(lake, "events")
        self.interval_s = interval_s
        self.seen_at: dict[str, float] = {}
        self._files: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll(self) -> int:
        """Reads files not read before; returns how many ids were new."""
        new = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                if not name.endswith(".parquet") or path in self._files:
                    continue
                try:
                    ids = pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist()
                except OSError:
                    continue  # being published: read it on the next poll
                now = time.time()
                self._files.add(path)
                for event_id in ids:
                    if event_id not in self.seen_at:
                        self.seen_at[event_id] = now
                        new += 1
        return new

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "LakeWatcher":
        self._thread = threading.Thread(target=self._run, name="lake-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def steady_bodies(mix: EventMix, *, rate: float, duration_s: float, batch: int) -> list:
    """The request bodies of ``rate`` events/s for ``duration_s`` in batches of ``batch``: ``(event ids, body)``.

    Built before any posting starts, so that making events (about a core for tens of seconds at 5,000 ev/s) never
    pauses a schedule or competes with the measured system.
    """
    bodies = []
    for _ in range(max(1, int(rate * duration_s / batch))):
        events = [mix.valid() for _ in range(batch)]
        for event in events:
            event.pop("timestamp", None)  # client time is irrelevant here; received_at is the event time
        bodies.append(([e["event_id"] for e in events], json.dumps({"events": events}).encode()))
    return bodies


def post_steadily(url: str, bodies: list, *, rate: float, batch: int, clients: int) -> dict:
    """Posts ``bodies`` (from :func:`steady_bodies`) at ``rate`` events/s on a fixed schedule; event id -> time
    of its 202. ``schedule_start`` is when the first body was due (monotonic clock); the counts and latencies
    are over every body posted."""
    batches = len(bodies)
    headers = {"Authorization": f"Bearer {WRITE_KEY}", "Content-Type": "application/json"}
    accepted_at: dict[str, float] = {}
    lock = threading.Lock()
    latencies: list[float] = []
    behind = [0.0]
    failures = [0]
    next_index = [0]
    start = time.monotonic() + 0.5

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= batches:
                return
            due = start + index * batch / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the schedule itself: nothing to await
            else:
                with lock:
                    behind[0] = max(behind[0], -delay)
            ids, body = bodies[index]
            sent = time.monotonic()
            for _ in range(10):  # bounded: 429/503 are retried as a client would
                resp = session.post(url, data=body, headers=headers, timeout=60)
                if resp.status_code not in (429, 503):
                    break
                time.sleep(float(resp.headers.get("Retry-After", "1")))
            now = time.time()
            with lock:
                latencies.append(time.monotonic() - sent)
                if resp.status_code == 202 and not resp.json().get("rejected"):
                    accepted_at.update(dict.fromkeys(ids, now))
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(batches * batch / rate + 300)
    posting_s = time.monotonic() - start
    latencies.sort()
    return {"accepted_at": accepted_at, "posting_s": posting_s, "schedule_start": start,
            "failed_requests": failures[0], "max_behind_schedule_s": round(behind[0], 2),
            "post_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
            "post_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1)}


@contextlib.contextmanager
def _workdir(workdir: Optional[str], prefix: str) -> Iterator[str]:
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


@contextlib.contextmanager
def _stack(name: str, shards: int, mix: EventMix) -> Iterator[LocalStack]:
    """A local stack of its own with the mix's users in DynamoDB; stopped on the way out."""
    stack = LocalStack(StackConfig(stream=name, shards=shards, users_table=f"{name}-users",
                                   dead_letter_queue=f"{name}-dlq", bucket=f"{name}-lake"))
    try:
        stack.start()
        stack.seed_users(mix.users())
        yield stack
    finally:
        stack.stop()


def _env(stack: LocalStack) -> dict:
    return {**os.environ, **stack.env(), "EVENTLAKE_WRITE_KEYS": WRITE_KEY, "EVENTLAKE_RATE_LIMIT_RPS": "0",
            "EVENTLAKE_PSEUDONYMIZATION_KEYS": BENCH_KEYS}


def _start_pipeline(stack: LocalStack, workdir: str, window_s: int) -> Child:
    """``pipelines.events`` in streaming mode on Prism, as a child process writing to ``workdir``/lake.

    No idle stop: the bench stops it once it has measured. After a warm-up batch and silence, the source's idle
    advance (default 5 s) lets the warm-up window close.
    """
    return Child.python("pipeline", [
        "pipelines.events", "--mode=stream", f"--input_stream={stack.config.stream}",
        f"--users_table={stack.config.users_table}", f"--output={os.path.join(workdir, 'lake')}",
        f"--dead_letter={os.path.join(workdir, 'dead_letters')}", f"--schema_dir={SCHEMA_DIR}",
        f"--window_seconds={window_s}",
    ], env=_env(stack), log_path=os.path.join(workdir, "pipeline.log"), cwd=ROOT)


def run(*, rate: float = 1000.0, duration_s: float = 120.0, window_s: int = 10, batch: int = 100,
        clients: int = 8, shards: int = 2, users: int = 2000, workers: int = 1, threads: int = 16,
        warmup_s: float = STREAM_WARMUP_S, workdir: Optional[str] = None, drain_timeout_s: float = 180.0) -> dict:
    """One streaming measurement on its own local stack; see the module docstring."""
    if rate <= 0 or duration_s <= 0 or warmup_s <= 0 or window_s < 1 or not 1 <= batch <= 500 or clients < 1:
        raise ValueError(f"invalid stream bench settings: rate={rate}, duration_s={duration_s}, "
                         f"warmup_s={warmup_s}, window_s={window_s}, batch={batch}, clients={clients}")
    mix = EventMix(SCHEMA_DIR, users=users, seed=11, invalid_rate=0.0)
    warm_bodies = steady_bodies(mix, rate=rate, duration_s=warmup_s, batch=batch)
    measured_bodies = steady_bodies(mix, rate=rate, duration_s=duration_s, batch=batch)
    # Load goes on (unmeasured) for a window and more, in the same schedule with no pause, as real traffic would:
    # on an idle stream the last window waits for the source's idle watermark, which is not what is measured here.
    tail_bodies = steady_bodies(mix, rate=rate, duration_s=window_s + 10, batch=batch)
    measured_ids = [event_id for ids, _ in measured_bodies for event_id in ids]
    first_second = max(1, min(len(warm_bodies) - 1, math.ceil(rate / batch)))  # bodies posted to see the runner up
    gunicorn = pipeline = None
    with _workdir(workdir, "eventlake-bench-stream-") as workdir, _stack("bench-stream", shards, mix) as stack:
        try:
            port = free_port()
            gunicorn = _start_gunicorn(_env(stack), port, workers, threads)
            url = f"http://127.0.0.1:{port}/v1/events"
            pipeline = _start_pipeline(stack, workdir, window_s)
            with PeakMemory(pipeline.proc.pid) as peak, LakeWatcher(os.path.join(workdir, "lake")) as watcher:
                probe = post_steadily(url, warm_bodies[:first_second], rate=rate, batch=batch, clients=clients)
                wait_until(lambda: not pipeline.running() or all(i in watcher.seen_at for i in probe["accepted_at"]),
                           timeout=drain_timeout_s + warmup_s, interval=0.25, what="the first events in the lake")
                if not pipeline.running():
                    raise RuntimeError(f"the streaming pipeline exited early: {pipeline.tail()[-2000:]}")
                load = post_steadily(url, warm_bodies[first_second:] + measured_bodies + tail_bodies, rate=rate,
                                     batch=batch, clients=clients)
                measured_from = load["schedule_start"] + (len(warm_bodies) - first_second) * batch / rate
                measured_until = measured_from + duration_s
                accepted = {i: load["accepted_at"][i] for i in measured_ids if i in load["accepted_at"]}
                try:
                    wait_until(lambda: all(i in watcher.seen_at for i in accepted), timeout=drain_timeout_s,
                               interval=0.5, what="every accepted event in the lake")
                except TimeoutError:
                    pass  # reported below as landed < accepted
                watcher.poll()
        finally:
            if pipeline is not None:
                pipeline.stop()
            if gunicorn is not None:
                _stop(gunicorn)
    fresh = sorted(watcher.seen_at[i] - t for i, t in accepted.items() if i in watcher.seen_at)
    landed = len(fresh)
    p95 = _percentile(fresh, 0.95)
    # end to end: from the first 202 to the last of those events readable in the lake
    span = (max(watcher.seen_at[i] for i in accepted if i in watcher.seen_at) - min(accepted.values())
            if landed else 0.0)
    # the measured part's posting: from its first 202 to its last, plus one batch's share of the schedule
    posting_s = (max(accepted.values()) - min(accepted.values()) + batch / rate) if accepted else 0.0
    delay_growth = _delay_growth(accepted, watcher.seen_at, edge_s=window_s * math.ceil(30 / window_s))
    end_to_end = round(landed / span, 1) if span > 0 else 0.0
    memory = peak.growth(measured_from, measured_until)
    try:
        warming = peak.growth(load["schedule_start"], measured_from)
    except ValueError:  # a warm-up shorter than two memory samples
        warming = None
    trend = _freshness_trend(accepted, watcher.seen_at, slice_s=15.0)
    curve = [round(mb / 2**20) for t, mb in _every(peak.samples, measured_from, measured_until, 30.0)]
    return {
        "settings": {"rate": rate, "duration_s": duration_s, "window_s": window_s, "batch": batch,
                     "clients": clients, "shards": shards, "gunicorn_workers": workers},
        "accepted": len(accepted), "landed": landed, "failed_requests": load["failed_requests"],
        "posting_s": round(posting_s, 1), "max_behind_schedule_s": load["max_behind_schedule_s"],
        "post_p50_ms": load["post_p50_ms"], "post_p99_ms": load["post_p99_ms"],
        # sustained: the rate the lake took the events at, its steady delay taken out (see _delay_growth); when
        # some never landed, the end-to-end rate instead
        "stream_events_per_s": (round(landed / (posting_s + delay_growth), 1)
                                if landed == len(accepted) and posting_s + delay_growth > 0 else end_to_end),
        "end_to_end_events_per_s": end_to_end,
        "delay_growth_s": round(delay_growth, 2),
        "offered_events_per_s": round(len(accepted) / posting_s, 1) if posting_s > 0 else 0.0,
        "freshness_p50_s": round(_percentile(fresh, 0.5), 2),
        "freshness_p95_s": round(p95, 2),
        "freshness_max_s": round(fresh[-1], 2) if fresh else None,
        "freshness_p95_every_15s": trend,
        "kept_up": landed == len(accepted) and p95 <= window_s + 10,
        "stream_peak_rss_mb": peak.mb,
        "memory": memory, "memory_every_30s_mb": curve,
        "warmup_memory": warming,
        # what the floor rose by from the warm-up's first third to the measured load's first third: the heap
        # growing to its working size, before "flat" is judged
        "stream_memory_warmup_floor_growth_mb": (round(memory["first_third_floor_mb"]
                                                       - warming["first_third_floor_mb"], 1) if warming else None),
        "stream_memory_growth_mb_per_min": memory["growth_mb_per_min"],
        "stream_memory_floor_growth_mb": round(memory["last_third_floor_mb"] - memory["first_third_floor_mb"], 1),
        "stream_memory_tree_floor_growth_mb": round(memory["last_third_tree_floor_mb"]
                                                    - memory["first_third_tree_floor_mb"], 1),
        # None for a process that ran in one third only (started late, or ended): no two floors to compare
        "stream_memory_floor_growth_by_process_mb": {name: round(last - first, 1) if None not in (first, last) else None
                                                     for name, (first, last) in memory["processes"].items()},
        # flat: what is held after collections grew by a small share of it over the measured load
        "stream_memory_flat": memory["last_third_floor_mb"] <= (1 + FLAT_MEMORY_SHARE) * memory["first_third_floor_mb"],
    }


def _delay_growth(accepted: dict, seen_at: dict, *, edge_s: float) -> float:
    """How much longer the last events posted took to land than the first, floored at 0: the slope of the median
    delay from the first ``edge_s`` of the load to the last (edges of whole windows, so both hold the same mix of
    early and late places in a window), times the posting time.

    A pipeline that keeps up lands events with a steady delay, so the lake takes them at the rate they were
    posted, however long that delay is: the time from the first 202 to the last row (the end-to-end rate) also
    counts the delay once, which over two minutes would put 5,000 ev/s out of reach of any pipeline that waits for
    windows. One that falls behind lands them later and later: the delay grows by the backlog's drain time, and
    ``landed / (posting + growth)`` is the rate it really drained at.
    """
    if not accepted:
        return 0.0
    start, end = min(accepted.values()), max(accepted.values())
    edges = []
    for inside in (lambda t: t < start + edge_s, lambda t: t > end - edge_s):
        landed = [(t, seen_at[i] - t) for i, t in accepted.items() if inside(t) and i in seen_at]
        if not landed:
            return 0.0
        edges.append((_percentile(sorted(t for t, _ in landed), 0.5),
                      _percentile(sorted(delay for _, delay in landed), 0.5)))
    (first_at, first_delay), (last_at, last_delay) = edges
    if last_at <= first_at:
        return 0.0
    return max(0.0, (last_delay - first_delay) / (last_at - first_at) * (end - start))


def _freshness_trend(accepted: dict, seen_at: dict, *, slice_s: float) -> list:
    """Freshness p95 of the events posted in each ``slice_s`` of the load, in order (``None``: none landed).

    Steady values mean a constant delay; a rising series means the pipeline fell behind the offered rate.
    """
    if not accepted:
        return []
    start = min(accepted.values())
    slices: dict = {}
    for event_id, posted in accepted.items():
        slices.setdefault(int((posted - start) // slice_s), []).append(
            seen_at[event_id] - posted if event_id in seen_at else None)
    trend = []
    for index in range(max(slices) + 1):
        landed = sorted(f for f in slices.get(index, []) if f is not None)
        trend.append(round(_percentile(landed, 0.95), 1) if landed else None)
    return trend


def _every(samples: list, since: float, until: float, step_s: float) -> list:
    """The first sample at or after each ``step_s`` mark from ``since`` to ``until``."""
    picked, mark = [], since
    for t, value in samples:
        if mark <= t <= until:
            picked.append((t, value))
            mark += step_s * (1 + int((t - mark) // step_s))
    return picked


def fill_backlog(stack: LocalStack, mix: EventMix, *, events: int, spread_s: float, putters: int = 4) -> set:
    """Puts ``events`` valid envelopes straight on the stream with the ingress's publisher, as the ingress would
    have, received over the past ``spread_s`` seconds in order; returns their ids. Batches of 500 from ``putters``
    threads."""
    now = utc_now_ms()
    ids = set()

    def batches() -> Iterator[list]:
        batch = []
        for n in range(events):
            event = mix.valid()
            event.pop("timestamp", None)
            received_at_ms = now - int(spread_s * 1000) + int(n * spread_s * 1000) // events
            record = stamp(validate_event(event), received_at=format_rfc3339_ms(received_at_ms), caller_ip=None)
            ids.add(record["event_id"])
            batch.append((to_wire(record), partition_key(record)))
            if len(batch) == 500 or n == events - 1:
                yield batch
                batch = []

    publisher = KinesisPublisher(stack.config.stream, client_factory=lambda: stack.client("kinesis"))
    try:
        with ThreadPoolExecutor(putters, thread_name_prefix="backlog") as pool:
            list(pool.map(publisher.publish, batches()))  # puts start while later batches are still being made
    finally:
        publisher.close()
    return ids


def capacity(*, events: int = 100_000, window_s: int = 10, spread_s: float = 600.0, shards: int = 2,
             users: int = 2000, workdir: Optional[str] = None, timeout_s: float = 600.0) -> dict:
    """The streaming pipeline's own ceiling on this machine, the input not being the limit.

    ``events`` records are put on Kinesis before the pipeline starts (a restart after downtime), with event
    times spread over the past ``spread_s`` seconds, so ``window_s`` windows close one after another as the
    backlog is read rather than all at the end. ``stream_capacity_events_per_s`` is the rate at which rows
    became readable between the 10th and the 90th percentile of their landing times: the runner's start-up
    and the wait for the last window are left out. ``drain_s`` is from the start of the pipeline process to
    the last row readable.
    """
    if events < 10 or window_s < 1 or spread_s <= 0:
        raise ValueError(f"invalid capacity settings: events={events}, window_s={window_s}, spread_s={spread_s}")
    mix = EventMix(SCHEMA_DIR, users=users, seed=13, invalid_rate=0.0)
    pipeline = None
    with _workdir(workdir, "eventlake-bench-capacity-") as workdir, _stack("bench-capacity", shards, mix) as stack:
        filled = time.monotonic()
        ids = fill_backlog(stack, mix, events=events, spread_s=spread_s)
        fill_s = time.monotonic() - filled
        try:
            started = time.time()
            pipeline = _start_pipeline(stack, workdir, window_s)
            with PeakMemory(pipeline.proc.pid) as peak, LakeWatcher(os.path.join(workdir, "lake")) as watcher:
                wait_until(lambda: not pipeline.running() or ids <= watcher.seen_at.keys(), timeout=timeout_s,
                           interval=0.25, what="the whole backlog in the lake")
                watcher.poll()
                if not ids <= watcher.seen_at.keys():
                    raise RuntimeError(f"the streaming pipeline exited early: {pipeline.tail()[-2000:]}")
        finally:
            if pipeline is not None:
                pipeline.stop()
    landed = sorted(watcher.seen_at[i] for i in ids)
    p10, p90 = landed[len(landed) // 10], landed[len(landed) * 9 // 10]
    return {
        "settings": {"events": events, "window_s": window_s, "spread_s": spread_s, "shards": shards},
        "fill_s": round(fill_s, 1), "landed": len(landed),
        "first_row_s": round(landed[0] - started, 1), "drain_s": round(landed[-1] - started, 1),
        "stream_capacity_events_per_s": round((len(landed) * 8 // 10) / (p90 - p10), 1) if p90 > p10 else None,
        "capacity_peak_rss_mb": peak.mb,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=STREAM_WARMUP_S,
                        help="seconds posted at the same rate, not measured")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--capacity_events", type=int, default=0,
                        help="also measure the pipeline's ceiling on a backlog of this many events (0: skip)")
    args = parser.parse_args(argv)
    results = {"steady": run(rate=args.rate, duration_s=args.duration, window_s=args.window, clients=args.clients,
                             shards=args.shards, warmup_s=args.warmup)}
    if args.capacity_events:
        results["capacity"] = capacity(events=args.capacity_events, window_s=args.window, shards=args.shards)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

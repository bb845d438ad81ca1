"""``make demo``: the whole system on the embedded local stack, end to end.

1. AWS on loopback (moto server): stream, users table, dead-letter queue, bucket.
2. The ingress (``python -m ingress``) with a demo write key.
3. The streaming events pipeline on the local streaming runner, lake in ``./lake``.
4. A load generator posting a realistic mix over HTTP (some events invalid).
5. Waits for the windows to close (the source stops after it has been idle),
   prints what arrived where and a DuckDB query over the lake, and exits 0 only
   if every accepted event is in the lake or in the dead-letter queue.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import signal
import sys
import time
from typing import Optional

import requests

from runners.loadgen import EventMix
from runners.local import LocalStack, StackConfig, free_port, wait_until
from runners.processes import Child
from transforms.envelope import utc_now_ms

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITE_KEY = "demo-write-key"


def post_load(url: str, mix: EventMix, *, events: int, batch: int, clients: int, rate: float) -> dict:
    """Posts ``events`` in batches from ``clients`` threads; returns what the ingress accepted."""
    accepted_ids: set[str] = set()
    expected_dead: dict[str, str] = {}
    rejected_by_ingress = collections.Counter()
    batches = []
    for start in range(0, events, batch):
        body = []
        for _ in range(min(batch, events - start)):
            reason, event = mix.next()
            if mix.rng.random() < 0.01:  # no identity: the ingress itself rejects it
                event.pop("user_id", None)
                event.pop("anonymous_id", None)
                reason = "rejected"
            body.append((reason, event))
        batches.append(body)

    session_headers = {"Authorization": f"Bearer {WRITE_KEY}", "Content-Type": "application/json"}
    interval = batch / rate if rate else 0.0

    def send(body):
        payload = json.dumps({"events": [event for _, event in body]})
        for attempt in range(20):  # bounded: 429/503 are retried as a real client would
            resp = requests.post(url, data=payload, headers=session_headers, timeout=30)
            if resp.status_code in (429, 503):
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            return body, resp
        return body, resp

    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(clients)
    try:
        futures = []
        for i, body in enumerate(batches):
            if interval:
                delay = started + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            futures.append(pool.submit(send, body))
        for future in concurrent.futures.as_completed(futures):
            body, resp = future.result()
            if resp.status_code not in (202, 400):
                raise RuntimeError(f"ingress answered {resp.status_code}")
            answer = resp.json()
            rejected = {item["index"]: item["reason"] for item in answer.get("rejected", [])}
            for index, (reason, event) in enumerate(body):
                if index in rejected:
                    rejected_by_ingress[rejected[index]] += 1
                    continue
                accepted_ids.add(event["event_id"])
                if reason:
                    expected_dead[event["event_id"]] = reason
    finally:
        # On Ctrl-C or a failure, queued batches are dropped rather than posted before exiting.
        pool.shutdown(wait=True, cancel_futures=True)
    return {
        "accepted_ids": accepted_ids,
        "expected_dead": expected_dead,
        "rejected_by_ingress": dict(rejected_by_ingress),
        "seconds": time.monotonic() - started,
    }


def drain_dead_letters(stack: LocalStack) -> list[dict]:
    """Reads every dead letter in the queue (pointers to S3 resolved)."""
    from transforms.dead_letter_sinks import read_queue_records

    return list(read_queue_records(stack.queue_url, sqs=stack.client("sqs"), s3=stack.client("s3")))


def summarize(lake: str, accepted: set[str], dead_letters: list[dict], since_ms: int = 0) -> tuple[bool, str]:
    """What arrived where, for this run only: rows it accepted and processed at or after ``since_ms``.

    The lake may hold earlier runs (the same ``./lake``, even the same ``--seed``):
    they are neither counted nor queried.
    """
    import duckdb
    import pyarrow.dataset as ds

    lines = []
    dataset = ds.dataset(os.path.join(lake, "events"), format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["event_id", "event_type", "year", "month", "day", "processed_at"],
                             filter=ds.field("processed_at") >= _as_timestamp(since_ms))
    ids = table.column("event_id").to_pylist()
    this_run = [i for i, event_id in enumerate(ids) if event_id in accepted]
    partitions = collections.Counter()
    types = table.column("event_type").to_pylist()
    years, months, days = (table.column(c).to_pylist() for c in ("year", "month", "day"))
    for i in this_run:
        partitions[f"event_type={types[i]}/year={years[i]}/month={months[i]:02d}/day={days[i]:02d}"] += 1
    lake_ids = {ids[i] for i in this_run}

    dead_ids, reasons = set(), collections.Counter()
    for record in dead_letters:
        reasons[(record["failure"]["stage"], record["failure"]["reason"])] += 1
        try:
            dead_ids.add(json.loads(record["payload"]).get("event_id"))
        except (ValueError, AttributeError):
            pass
    missing = accepted - lake_ids - dead_ids

    lines.append(f"accepted by the ingress : {len(accepted)}")
    lines.append(f"rows in the lake        : {len(this_run)} ({len(lake_ids)} distinct event ids)")
    lines.append("rows per lake partition :")
    for part, count in sorted(partitions.items()):
        lines.append(f"  {count:7d}  events/{part}")
    lines.append(f"dead letters            : {len(dead_letters)}")
    for (stage, reason), count in sorted(reasons.items()):
        lines.append(f"  {count:7d}  {stage}/{reason}")
    lines.append(f"accepted but nowhere    : {len(missing)}")

    query = (
        "SELECT event_type, count(*) AS events, count(DISTINCT user_id) AS users, "
        "round(avg(CASE WHEN user_found THEN 1 ELSE 0 END), 2) AS enriched_share "
        f"FROM read_parquet('{lake}/events/**/*.parquet', hive_partitioning=true, union_by_name=true) "
        f"WHERE processed_at >= epoch_ms({since_ms}) "
        "GROUP BY event_type ORDER BY events DESC"
    )
    lines.append("")
    lines.append("sample query (DuckDB):")
    lines.append("  " + query)
    result = duckdb.sql(query)
    lines.append(str(result))
    return not missing, "\n".join(lines)


def _as_timestamp(epoch_ms: int):
    import datetime as dt

    import pyarrow as pa

    return pa.scalar(dt.datetime.fromtimestamp(epoch_ms / 1000, dt.timezone.utc), pa.timestamp("ms", tz="UTC"))


def _stop_on_sigterm() -> None:
    """SIGTERM (e.g. ``kill``, a CI timeout) unwinds like Ctrl-C, so every child and the stack are stopped."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default=os.path.join(os.getcwd(), "lake"))
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second posted")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--window_seconds", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--stop_when_idle_seconds", type=float, default=15.0,
                        help="the stream ends once Kinesis has been idle this long after the last event")
    parser.add_argument("--schema_dir", default=os.path.join(PROJECT_ROOT, "schemas"))
    args = parser.parse_args(argv)

    lake = os.path.abspath(args.lake)
    logs = os.path.join(lake, "_demo_logs")
    os.makedirs(logs, exist_ok=True)
    mix = EventMix(args.schema_dir, users=args.users, seed=args.seed)
    children: list[Child] = []
    print(f"eventlake demo: lake at {lake}, logs in {logs}", flush=True)
    _stop_on_sigterm()
    started_ms = utc_now_ms()
    stack = LocalStack(StackConfig(shards=args.shards))
    try:
        stack.start()  # inside the try: a failed provisioning still stops the moto server it started
        try:
            seeded = stack.seed_users(mix.users())
            print(f"[1/5] local stack up at {stack.endpoint}; {seeded} users in DynamoDB", flush=True)
            env = {**os.environ, **stack.env(), "EVENTLAKE_WRITE_KEYS": WRITE_KEY,
                   "EVENTLAKE_PSEUDONYMIZATION_KEYS": os.environ.get("EVENTLAKE_PSEUDONYMIZATION_KEYS",
                                                                       "demo1=demo-secret-not-for-production")}
            port = free_port()
            ingress = Child.python("ingress", ["ingress", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, log_path=os.path.join(logs, "ingress.log"), cwd=PROJECT_ROOT)
            children.append(ingress)
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: requests.get(base + "/readyz", timeout=2).status_code == 200,
                       timeout=60, what="the ingress")
            print(f"[2/5] ingress ready at {base}", flush=True)

            pipeline = Child.python("pipeline", [
                "pipelines.events", "--mode=stream", f"--input_stream={stack.config.stream}",
                f"--users_table={stack.config.users_table}", f"--output={lake}",
                f"--dead_letter={stack.queue_url}", f"--dead_letter_overflow=s3://{stack.config.bucket}/dead_letters",
                f"--schema_dir={args.schema_dir}", f"--window_seconds={args.window_seconds}",
                f"--stop_when_idle_seconds={args.stop_when_idle_seconds}",
            ], env=env, log_path=os.path.join(logs, "pipeline.log"), cwd=PROJECT_ROOT)
            children.append(pipeline)
            print("[3/5] streaming pipeline started", flush=True)

            load = post_load(base + "/v1/events", mix, events=args.events, batch=100, clients=8, rate=args.rate)
            print(f"[4/5] posted {args.events} events in {load['seconds']:.1f}s: "
                  f"{len(load['accepted_ids'])} accepted, rejected by the ingress: "
                  f"{load['rejected_by_ingress'] or 0}", flush=True)

            print("      waiting for the windows to close and the pipeline to drain ...", flush=True)
            code = pipeline.wait(timeout=600)
            if code != 0:
                print(pipeline.tail(), file=sys.stderr)
                print(f"the pipeline exited with {code}; see {pipeline.log_path}", file=sys.stderr)
                return 1
            dead = drain_dead_letters(stack)
            ok, report = summarize(lake, load["accepted_ids"], dead, since_ms=started_ms)
            print("[5/5] what arrived where", flush=True)
            print(report, flush=True)
            print("conservation holds: every accepted event is in the lake or the dead-letter queue" if ok
                  else "CONSERVATION BROKEN: some accepted events are missing", flush=True)
            return 0 if ok else 1
        finally:
            for child in reversed(children):
                child.stop()
    finally:
        stack.stop()


def _main_interruptible() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: the ingress, the pipeline, Prism and the moto server were stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main_interruptible())

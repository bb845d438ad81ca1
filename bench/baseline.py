"""The yardstick for the backfill: the same work as a plain single-process Python loop, no Beam.

Reads the same JSON Lines files and does what ``pipelines.events`` does with the
project's own pure functions: parse (``transforms.parse.to_event``), validate
(``SchemaRegistry``), enrich (``DynamoDBUserLookup``: BatchGetItem against the
same moto DynamoDB, with a per-process cache of answers like the pipeline's),
mask (``PersonalDataMasker``), stamp, and write one Parquet file per event type,
day and 60 s window with ``rows_to_table`` and pyarrow (zstd, as the lake does).
Dead letters are built with ``transforms.dead_letter`` and written as JSON Lines.
What this loop does not do, and the pipeline does, is the cost of distribution:
serializing elements between stages and processes, grouping, counters.
"""
from __future__ import annotations

import argparse
import collections
import gc
import gzip
import glob
import json
import os
import sys
import time
from typing import Optional

import pyarrow.parquet as pq

from runners.local import LocalStack
from transforms.dead_letter import dead_letter, to_json
from transforms.dynamodb_users import DynamoDBUserLookup
from transforms.envelope import InvalidEvent, received_at_of, utc_now_ms
from transforms.garbage_collection import tune_for_batches
from transforms.mask import PersonalDataMasker
from transforms.parquet_rows import rows_to_table
from transforms.parse import ParseFailure, to_event
from transforms.pseudonymization_keys import load_keys
from transforms.records import SourceRecord
from transforms.schemas import SchemaRegistry, SchemaViolation, UnknownEventType
from transforms.version import PIPELINE_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DIR = os.path.join(ROOT, "schemas")
WINDOW_MS = 60_000
CHUNK = 2_000  # events per enrichment round trip (the pipeline buffers up to 2,000 too)


class BaselineLoop:
    """parse -> validate -> enrich -> mask -> rows, one chunk of records at a time."""

    def __init__(self, registry: SchemaRegistry, lookup: DynamoDBUserLookup, masker: PersonalDataMasker):
        self.registry = registry
        self.lookup = lookup
        self.masker = masker
        self.cache: dict[str, Optional[dict]] = {}
        self.partitions: dict[tuple, list[dict]] = collections.defaultdict(list)
        self.dead_letters: list[dict] = []
        self.read = 0

    def chunk(self, records: list[SourceRecord]) -> None:
        valid = []
        for record in records:
            self.read += 1
            element_ms = received_at_of(record.data) or utc_now_ms()
            try:
                event = to_event(record, element_ms)
                event["properties"] = self.registry.validate(event["event_type"], event["properties"])
                event["context"] = self.registry.validate_context(event["context"])
                event["schema_version"] = self.registry.schema_version(event["event_type"])
            except (ParseFailure, InvalidEvent) as exc:
                self.dead_letters.append(dead_letter("parse", exc.reason, str(exc), retryable=False, record=record))
                continue
            except (UnknownEventType, SchemaViolation) as exc:
                self.dead_letters.append(dead_letter("validate", exc.reason, str(exc), retryable=False,
                                                     record=record))
                continue
            valid.append((record, event))
        wanted = {event["user_id"] for _, event in valid if event.get("user_id")} - self.cache.keys()
        if wanted:
            result = self.lookup.lookup(wanted)
            self.cache.update(result.users)
            self.cache.update(dict.fromkeys(result.missing))
        for record, event in valid:
            key = event.get("user_id")
            if key and key not in self.cache:
                self.dead_letters.append(dead_letter("enrich", "enrichment_unavailable", "lookup unavailable",
                                                     retryable=True, record=record))
                continue
            user = self.cache.get(key) if key else None
            row = self.masker.mask(dict(event, user=user, user_found=user is not None))
            row["processed_at"] = utc_now_ms()
            row["pipeline_version"] = PIPELINE_VERSION
            received = row["received_at"]
            self.partitions[(row["event_type"], received // 86_400_000, received // WINDOW_MS)].append(row)

    def write(self, lake: str) -> int:
        """One zstd Parquet file per event type, day and window; returns rows written."""
        import datetime as dt

        written = 0
        for (event_type, day, window), rows in sorted(self.partitions.items()):
            table, rejected = rows_to_table(rows, self.registry.lake_schema(event_type))
            for problem in rejected:
                self.dead_letters.append({"stage": "write", "column": problem.column, "problem": problem.problem})
            date = dt.datetime.fromtimestamp(day * 86_400, dt.timezone.utc)
            folder = os.path.join(lake, "events", f"event_type={event_type}", f"year={date:%Y}",
                                  f"month={date:%m}", f"day={date:%d}")
            os.makedirs(folder, exist_ok=True)
            pq.write_table(table, os.path.join(folder, f"{window}.parquet"), compression="zstd")
            written += table.num_rows
        return written


def _records(pattern):
    paths = sorted(glob.glob(pattern)) if isinstance(pattern, str) else list(pattern)
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            for line_no, line in enumerate(handle, start=1):
                data = line.rstrip(b"\r\n")
                if data.strip():
                    yield SourceRecord(data, "backfill", path, str(line_no))


def run_on(pattern, lake: str, *, stack: LocalStack, schema_dir: str = SCHEMA_DIR) -> dict:
    """Runs the loop over the files matching ``pattern`` (a glob, or a list of paths); figures and conservation."""
    environ = dict(os.environ)
    os.environ.update(stack.env())
    os.environ.setdefault("EVENTLAKE_PSEUDONYMIZATION_KEYS", "bench1=bench-secret-not-for-production")
    previous = gc.get_threshold()
    tune_for_batches()  # as the pipeline's workers do: the same work, the same collector
    try:
        return _run_on(pattern, lake, stack=stack, schema_dir=schema_dir)
    finally:
        gc.set_threshold(*previous)
        os.environ.clear()  # the stack's settings were for this run only (a caller's process goes on)
        os.environ.update(environ)


def _run_on(pattern, lake: str, *, stack: LocalStack, schema_dir: str) -> dict:
    started = time.monotonic()
    registry = SchemaRegistry.load(schema_dir)
    lookup = DynamoDBUserLookup(stack.config.users_table, user_schema=registry.user_schema,
                                endpoint_url=stack.endpoint, region_name=stack.config.region)
    lookup.setup()
    try:
        loop = BaselineLoop(registry, lookup, PersonalDataMasker(registry, load_keys(None), shared_users=True))
        batch: list[SourceRecord] = []
        for record in _records(pattern):
            batch.append(record)
            if len(batch) >= CHUNK:
                loop.chunk(batch)
                batch = []
        if batch:
            loop.chunk(batch)
        rows = loop.write(lake)
        os.makedirs(lake, exist_ok=True)
        with open(os.path.join(lake, "dead_letters.jsonl"), "w", encoding="utf-8") as handle:
            for letter in loop.dead_letters:
                handle.write(to_json(letter) if "schema" in letter else json.dumps(letter))
                handle.write("\n")
    finally:
        lookup.teardown()
    seconds = time.monotonic() - started
    return {"read": loop.read, "rows_written": rows, "dead_letters": len(loop.dead_letters),
            "conserved": loop.read == rows + len(loop.dead_letters), "seconds": round(seconds, 2),
            "events_per_s": round(loop.read / seconds, 1)}


def _run_part(paths: list, lake: str, stack: LocalStack, results) -> None:
    try:
        results.put(run_on(paths, lake, stack=stack))
    except BaseException as exc:  # noqa: BLE001 - the parent must hear of it instead of waiting
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_side_by_side(pattern: str, lake: str, *, stack: LocalStack, processes: int = 2) -> dict:
    """The loop in ``processes`` processes at once, each on its share of the files: what this machine gives
    two perfectly split copies of the same work, with nothing shared but the emulator (the parallel ceiling
    the pipeline's workers are compared with). Wall time from the first start to the last end."""
    import multiprocessing

    paths = sorted(glob.glob(pattern))
    if len(paths) < processes:
        raise ValueError(f"need at least {processes} files to split, got {len(paths)}")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    started = time.monotonic()
    workers = [context.Process(target=_run_part, args=(paths[index::processes], os.path.join(lake, f"part-{index}"),
                                                      stack, results)) for index in range(processes)]
    for worker in workers:
        worker.start()
    try:
        parts = [results.get(timeout=3600) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    failed = [part["error"] for part in parts if "error" in part]
    if failed:
        raise RuntimeError(f"a baseline process failed: {failed[0]}")
    seconds = time.monotonic() - started
    read = sum(part["read"] for part in parts)
    return {"processes": processes, "read": read, "rows_written": sum(part["rows_written"] for part in parts),
            "dead_letters": sum(part["dead_letters"] for part in parts),
            "conserved": all(part["conserved"] for part in parts), "seconds": round(seconds, 2),
            "events_per_s": round(read / seconds, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob of JSON Lines files (as bench.backfill writes)")
    parser.add_argument("--lake", required=True)
    args = parser.parse_args(argv)
    from runners.local import StackConfig

    with LocalStack(StackConfig()) as stack:
        print(json.dumps(run_on(args.input, args.lake, stack=stack), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

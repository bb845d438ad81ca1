"""Compaction: target-sized files, each event once, crash at every step then re-run, local and S3 on moto."""
from __future__ import annotations

import collections
import datetime as dt
import json
import math
import os
import random

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import compact
from transforms.compaction import CompactionError, PartitionCompactor, check_partition
from transforms.lake import partition_path
from transforms.object_store import ObjectStore
from transforms.schemas import SchemaRegistry, default_schema_dir

PARTITION = "event_type=app_opened/year=2026/month=11/day=26"
DAY_MS = int(dt.datetime(2026, 11, 26, tzinfo=dt.timezone.utc).timestamp() * 1000)
SCHEMA = SchemaRegistry.load(default_schema_dir()).lake_schema("app_opened")
FN_API = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def make_rows(events: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{
        "event_id": f"ev-{i:05d}", "user_id": f"u-{rng.randrange(50)}", "anonymous_id": None,
        "event_time": DAY_MS + i, "received_at": DAY_MS + i * 10, "processed_at": DAY_MS + 3_600_000 + i,
        "properties": {"cold_start": rng.random() < 0.5, "source": "launcher", "launch_ms": rng.randrange(2000)},
        "context": {"locale": "en-GB", "app_version": "4.2.0"}, "user": None, "user_found": False,
        "schema_version": "1", "pipeline_version": "test",
    } for i in range(events)]


def write_partition(store: ObjectStore, output: str, files: int = 200, rows_per_file: int = 20,
                    duplicate_share: float = 0.05, seed: int = 5) -> dict:
    """``files`` small files; ``duplicate_share`` of the rows repeat an id of another file.

    Returns event_id -> the first processed_at (the row compaction must keep).
    """
    rng = random.Random(seed)
    total = files * rows_per_file
    duplicates = int(total * duplicate_share)
    rows = make_rows(total - duplicates, seed)
    for _ in range(duplicates):  # the same event processed again, earlier or later
        original = dict(rng.choice(rows[: total - duplicates]))
        original["processed_at"] += rng.choice([-60_000, 60_000])
        original["properties"] = {**original["properties"], "source": "other"}
        rows.append(original)
    rng.shuffle(rows)
    folder = partition_path(output, "app_opened", "2026-11-26")
    for index in range(files):
        chunk = rows[index * rows_per_file:(index + 1) * rows_per_file]
        path = store.staging_file(".parquet")
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), path, compression="zstd")
        store.put_file(path, f"{folder}/2026112610{index:04d}-p0-{index:08x}.parquet")
    first = {}
    for row in rows:
        if row["event_id"] not in first or row["processed_at"] < first[row["event_id"]]:
            first[row["event_id"]] = row["processed_at"]
    return first


def local_files(output: str) -> list[str]:
    folder = partition_path(output, "app_opened", "2026-11-26")
    return sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))


def input_bytes(output: str) -> int:
    folder = partition_path(output, "app_opened", "2026-11-26")
    return sum(os.path.getsize(os.path.join(folder, n)) for n in local_files(output))


def readers_see(root: str, filesystem=None) -> dict[str, list]:
    """What a reader sees: event_id -> processed_at values (pyarrow dataset, and DuckDB for a local lake)."""
    dataset = ds.dataset(root, format="parquet", partitioning="hive", filesystem=filesystem)
    table = dataset.to_table(columns=["event_id", "processed_at", "event_type", "day"])
    seen = collections.defaultdict(list)
    for event_id, at in zip(table.column("event_id").to_pylist(), table.column("processed_at").to_pylist()):
        seen[event_id].append(int(at.timestamp() * 1000))
    if filesystem is None:
        count, distinct = duckdb.sql(
            f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{root}/**/*.parquet', "
            "hive_partitioning=true) WHERE event_type = 'app_opened' AND day = 26").fetchall()[0]
        assert count == sum(len(v) for v in seen.values()) and distinct == len(seen)
    return seen


def assert_each_event_once_with_first_processed_at(seen: dict, first: dict) -> None:
    assert set(seen) == set(first)
    assert all(len(values) == 1 for values in seen.values())
    assert {event_id: values[0] for event_id, values in seen.items()} == first


def expected_file_count(output: str, first: dict, target_bytes: int, rows_in: int) -> int:
    return max(1, math.ceil(input_bytes(output) * len(first) / rows_in / target_bytes))


# -- the pipeline --------------------------------------------------------------------------------


def test_200_small_files_with_5_percent_duplicates_become_the_target_number_of_files(tmp_path):
    output = str(tmp_path / "lake")
    first = write_partition(ObjectStore(), output)
    assert len(local_files(output)) == 200 and len(first) == 3800
    target_mb = input_bytes(output) / 3 / 1024 / 1024  # the kept 95% need 3 files of this size
    expected = expected_file_count(output, first, int(target_mb * 1024 * 1024), 4000)
    assert expected == 3

    summary = compact.run([FN_API, f"--output={output}", f"--partition={PARTITION}",
                           f"--target_file_mb={target_mb}"])

    assert summary["runner"] == "FnApiRunner"
    assert summary["compaction.files_in"] == 200 and summary["compaction.files_out"] == 3
    assert summary["compaction.duplicates_dropped"] == 200 and summary["compaction.rows_out"] == 3800
    files = local_files(output)
    assert len(files) == 3 and all(name.startswith("compacted-") for name in files)
    assert_each_event_once_with_first_processed_at(readers_see(os.path.join(output, "events")), first)
    merged = pq.read_table(os.path.join(partition_path(output, "app_opened", "2026-11-26"), files[0]))
    assert merged.schema.equals(SCHEMA)  # the schema is kept, partition columns stay out of the files
    assert not os.path.exists(os.path.join(output, "_compaction", "events", PARTITION, "manifest.json"))


def test_a_second_run_over_a_compacted_partition_changes_nothing(tmp_path):
    output = str(tmp_path / "lake")
    first = write_partition(ObjectStore(), output, files=10, rows_per_file=10)
    compactor = PartitionCompactor(output, target_file_mb=64)
    assert compactor.compact(PARTITION)["files_out"] == 1
    before = local_files(output)
    assert compactor.compact(PARTITION) == {"partition": PARTITION, "action": "skipped", "files_in": 1}
    assert local_files(output) == before
    assert_each_event_once_with_first_processed_at(readers_see(os.path.join(output, "events")), first)


def test_older_than_selects_closed_days_only(tmp_path):
    output = str(tmp_path / "lake")
    store = ObjectStore()
    write_partition(store, output, files=3, rows_per_file=5)
    today = partition_path(output, "app_opened", "2026-11-27")
    for index in range(2):
        path = store.staging_file(".parquet")
        pq.write_table(pa.Table.from_pylist(make_rows(3, seed=index), schema=SCHEMA), path)
        store.put_file(path, f"{today}/f{index}.parquet")

    summary = compact.run([FN_API, f"--output={output}", "--older_than=2026-11-27T06:00:00Z"])

    assert summary["compaction.partitions"] == 1 and summary["compaction.files_in"] == 3
    assert sorted(os.listdir(today)) == ["f0.parquet", "f1.parquet"]
    assert compact.ended_before("2d", dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc)).day == 26


@pytest.mark.parametrize("argv, word", [
    (["--output=/tmp/x"], "--partition"),
    (["--output=/tmp/x", "--partition=year=2026"], "partition"),
    (["--output=/tmp/x", f"--partition={PARTITION}", "--target_file_mb=0"], "target_file_mb"),
    (["--output=/tmp/x", "--older_than=last week"], "older_than"),
])
def test_bad_options_are_named(argv, word):
    with pytest.raises(ValueError, match=word):
        compact.run([FN_API, *argv])


def test_bad_configuration_is_rejected_by_name():
    with pytest.raises(ValueError, match="target_file_mb"):
        PartitionCompactor("/tmp/lake", target_file_mb=-1)
    with pytest.raises(ValueError, match="partition"):
        check_partition("event_type=X/year=2026")


# -- crashes -------------------------------------------------------------------------------------


class Crash(Exception):
    """Stands for the process being killed."""


def crash_at(step: str, nth: int, check) -> callable:
    """An ``on_step`` hook that checks what readers see at each step, and dies at the nth ``step``."""
    counts = collections.Counter()

    def hook(name, detail):
        check()
        counts[name] += 1
        if name == step and counts[name] == nth:
            raise Crash(name)

    return hook


CRASH_POINTS = [("outputs_written", 1), ("verified", 1), ("manifest_written", 1), ("input_deleted", 1),
                ("input_deleted", 37), ("input_deleted", 40)]


@pytest.mark.parametrize("step, nth", CRASH_POINTS)
def test_a_crash_at_any_step_then_a_rerun_ends_correct_and_readers_never_miss_an_event(tmp_path, step, nth):
    output = str(tmp_path / "lake")
    first = write_partition(ObjectStore(), output, files=40, rows_per_file=25)
    root = os.path.join(output, "events")

    def every_event_visible():
        assert set(readers_see(root)) == set(first)

    target_mb = input_bytes(output) / 2 / 1024 / 1024
    crashing = PartitionCompactor(output, target_file_mb=target_mb, on_step=crash_at(step, nth, every_event_visible))
    with pytest.raises(Crash):
        crashing.compact(PARTITION)
    every_event_visible()

    report = PartitionCompactor(output, target_file_mb=target_mb,
                                on_step=lambda name, detail: every_event_visible()).compact(PARTITION)

    assert report["action"] == ("resumed" if step in ("manifest_written", "input_deleted") else "compacted")
    assert_each_event_once_with_first_processed_at(readers_see(root), first)
    assert len(local_files(output)) == 2
    assert not os.path.exists(os.path.join(output, "_compaction", "events", PARTITION, "manifest.json"))


def test_outputs_that_do_not_read_back_right_are_removed_and_the_inputs_kept(tmp_path, monkeypatch):
    output = str(tmp_path / "lake")
    first = write_partition(ObjectStore(), output, files=5, rows_per_file=10)
    before = local_files(output)
    real_put = ObjectStore.put_file

    def lossy_put(self, local_path, uri):  # a broken writer: the published file loses its last row
        table = pq.read_table(local_path)
        pq.write_table(table.slice(0, table.num_rows - 1), local_path)
        real_put(self, local_path, uri)

    monkeypatch.setattr(ObjectStore, "put_file", lossy_put)
    with pytest.raises(CompactionError, match="inputs kept"):
        PartitionCompactor(output, target_file_mb=64).compact(PARTITION)
    assert local_files(output) == before
    assert set(readers_see(os.path.join(output, "events"))) == set(first)


# -- S3 on moto ----------------------------------------------------------------------------------


def s3_filesystem(stack) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                             endpoint_override=stack.endpoint, scheme="http")


def s3_files(stack) -> list[str]:
    prefix = f"lake/events/{PARTITION}/"
    listing = stack.client("s3").list_objects_v2(Bucket=stack.config.bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix):] for item in listing.get("Contents", []))


@pytest.mark.parametrize("step, nth", [("manifest_written", 1), ("input_deleted", 20), ("outputs_written", 1)])
def test_s3_partition_compacts_through_a_crash_and_readers_see_every_event(stack, step, nth):
    output = f"s3://{stack.config.bucket}/lake"
    store = ObjectStore(client=stack.client("s3"))
    first = write_partition(store, output, files=30, rows_per_file=20)
    filesystem = s3_filesystem(stack)
    root = f"{stack.config.bucket}/lake/events"

    def every_event_visible():
        assert set(readers_see(root, filesystem)) == set(first)

    crashing = PartitionCompactor(output, target_file_mb=64, store=store,
                                  on_step=crash_at(step, nth, every_event_visible))
    with pytest.raises(Crash):
        crashing.compact(PARTITION)
    every_event_visible()

    summary = compact.run([FN_API, f"--output={output}", f"--partition={PARTITION}", "--target_file_mb=64"])

    assert summary["compaction.files_out"] == 1
    assert len(s3_files(stack)) == 1
    assert_each_event_once_with_first_processed_at(readers_see(root, filesystem), first)
    manifest = stack.client("s3").list_objects_v2(Bucket=stack.config.bucket, Prefix="lake/_compaction/")
    assert manifest.get("KeyCount", 0) == 0

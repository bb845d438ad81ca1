"""WriteToLake: write rows, read them back with pyarrow datasets and DuckDB (local and S3 on moto)."""
from __future__ import annotations

import datetime as dt
import glob
import io
import json
import os

import apache_beam as beam
import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindows, TimestampedValue

from runners.metrics import counter_totals
from transforms.lake import WriteToLake
from transforms.records import RowBatch
from transforms.schemas import SchemaRegistry, default_schema_dir

SCHEMA_DIR = default_schema_dir()
# 2027-01-15T23:58:00Z: two minutes before midnight, so 4 minutes of rows span two days.
BASE_MS = int(dt.datetime(2027, 1, 15, 23, 58, tzinfo=dt.timezone.utc).timestamp() * 1000)
UTC = dt.timezone.utc


def workout_row(i: int, received_at: int) -> dict:
    return {
        "event_type": "workout_completed",
        "event_id": f"w-{i:05d}",
        "user_id": f"u{i % 7}",
        "anonymous_id": None,
        "event_time": received_at - 1500,
        "received_at": received_at,
        "processed_at": received_at + 20,
        "properties": {
            "workout_id": f"wk{i}",
            "workout_type": "strength",
            "started_at": received_at - 3_600_000,
            "duration_s": 3600 + i,
            "calories_kcal": 410.5,
            "exercises": [{"name": "squat", "sets": 3, "reps": 10, "weight_kg": 60.0},
                          {"name": "plank", "duration_s": 90}],
        },
        "context": {"ip": "203.0.113.0", "locale": "de-CH", "screen_width": 1170, "extra": {"campaign": "spring"}},
        "user": {"email": "k1:pseudonym", "profile": {"country": "CH", "height_cm": 180},
                 "subscription": {"plan": "premium", "since": 1_700_000_000_000}, "devices": ["k1:d1"]},
        "user_found": True,
        "schema_version": "1",
        "pipeline_version": "test",
    }


def screen_row(i: int, received_at: int) -> dict:
    return {
        "event_type": "screen_viewed", "event_id": f"s-{i:05d}", "user_id": None, "anonymous_id": f"a{i}",
        "event_time": None, "received_at": received_at, "processed_at": received_at + 5,
        "properties": {"screen_name": "home", "duration_ms": i}, "context": {}, "user": None,
        "user_found": False, "schema_version": "1", "pipeline_version": "test",
    }


def mixed_rows(n: int) -> list[dict]:
    """Rows every 2.4 s over 4 minutes across midnight: 2 types, 2 days, 4 one-minute windows."""
    step = 240_000 // n
    return [(workout_row if i % 3 else screen_row)(i, BASE_MS + i * step) for i in range(n)]


def _row_batch(rows: list[dict]) -> TimestampedValue:
    """Rows as ProcessEvents emits a backfill's: one RowBatch, each row stamped with its received_at."""
    micros = tuple(row["received_at"] * 1000 for row in rows)
    return TimestampedValue(RowBatch(tuple(rows), micros), min(micros) / 1e6)


def run_bounded(rows: list[dict], output: str, *, batch_rows: int = 0, **kwargs):
    """WriteToLake over ``rows``, one per element or (``batch_rows``) in RowBatches of that many."""
    p = TestPipeline()
    if batch_rows:
        elements = (p | "Create" >> beam.Create([rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)])
                    | "Stamp" >> beam.Map(_row_batch))
    else:
        elements = (p | "Create" >> beam.Create(rows)
                    | "Stamp" >> beam.Map(lambda row: TimestampedValue(row, row["received_at"] / 1000)
                                          if isinstance(row.get("received_at"), int) else row))
    files, dead = elements | "Lake" >> WriteToLake(output, SCHEMA_DIR, **kwargs)
    result = p.run()
    result.wait_until_finish()
    return counter_totals(result), files, dead


def parquet_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "events", "**", "*.parquet"), recursive=True))


def lake_schema(event_type: str):
    return SchemaRegistry.load(SCHEMA_DIR).lake_schema(event_type)


# -- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"output": "ftp://x/y"},
    {"window_seconds": 0},
    {"allowed_lateness_seconds": -1},
    {"compression": "zip"},
    {"row_group_size": 0},
    {"temp_directory": "s3://bucket/tmp"},
])
def test_bad_configuration_is_refused(tmp_path, kwargs):
    args = {"output": str(tmp_path / "lake"), "schema_dir": SCHEMA_DIR, **kwargs}
    with pytest.raises(ValueError):
        WriteToLake(args.pop("output"), args.pop("schema_dir"), **args)


def test_bundle_writes_of_a_stream_are_refused(tmp_path):
    p = TestPipeline()
    stream = p | TestStream().advance_watermark_to_infinity()
    with pytest.raises(ValueError, match="bounded input"):
        _ = stream | WriteToLake(str(tmp_path / "lake"), SCHEMA_DIR, gather_windows=False)


def test_temp_directory_inside_the_table_is_refused(tmp_path):
    out = tmp_path / "lake"
    with pytest.raises(ValueError, match="outside the table"):
        WriteToLake(str(out), SCHEMA_DIR, temp_directory=str(out / "events" / "_tmp"))


# -- local lake -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gather", [False, True], ids=["bundle_writes", "gathered_windows"])
def test_every_row_lands_in_its_hive_partition(tmp_path, gather):
    out = str(tmp_path / "lake")
    rows = mixed_rows(100)
    totals, _, _ = run_bounded(rows, out, gather_windows=gather)

    files = parquet_files(out)
    assert files
    for path in files:  # partition columns live only in the path
        names = pq.read_schema(path).names
        assert names == lake_schema(os.path.basename(path.split("event_type=")[1].split("/")[0])).names
        assert not {"event_type", "year", "month", "day"} & set(names)
    # nothing but the table's files under events/, the staging folder is outside it and empty
    assert all(f.endswith(".parquet") for f in glob.glob(os.path.join(out, "events", "**", "*"), recursive=True)
               if os.path.isfile(f))
    assert not glob.glob(os.path.join(out, "_temporary", "*"))

    dataset = ds.dataset(os.path.join(out, "events"), format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["event_id", "event_type", "year", "month", "day", "received_at"])
    got = table.to_pylist()
    assert sorted(r["event_id"] for r in got) == sorted(r["event_id"] for r in rows)
    for r in got:
        received = r["received_at"].astimezone(UTC)
        assert (r["year"], r["month"], r["day"]) == (received.year, received.month, received.day)
        assert r["event_id"][0] == ("w" if r["event_type"] == "workout_completed" else "s")

    con = duckdb.connect()
    by_partition = con.execute(
        f"SELECT event_type, year, month, day, count(*) FROM read_parquet('{out}/events/**/*.parquet', "
        "hive_partitioning=true, union_by_name=true) GROUP BY ALL ORDER BY ALL").fetchall()
    expected = {}
    for row in rows:
        day = dt.datetime.fromtimestamp(row["received_at"] / 1000, UTC)
        key = (row["event_type"], day.year, day.month, day.day)
        expected[key] = expected.get(key, 0) + 1
    assert [(t, int(y), int(m), int(d), n) for t, y, m, d, n in by_partition] == sorted(
        (k + (v,) for k, v in expected.items()))
    assert {(k[1], k[2], k[3]) for k in expected} == {(2027, 1, 15), (2027, 1, 16)}

    assert totals["lake.rows_written"] == 100
    assert totals["lake.files_written"] == len(files)


class _InItsWindow(beam.DoFn):
    """Whether a file descriptor travels in the window it names."""

    def process(self, descriptor, window=beam.DoFn.WindowParam):
        start = dt.datetime.fromtimestamp(window.start.micros / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        end = dt.datetime.fromtimestamp(window.end.micros / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        yield descriptor["window"] == f"{start}/{end}"


@pytest.mark.parametrize("gather", [False, True], ids=["bundle_writes", "gathered_windows"])
def test_written_file_descriptors_account_for_every_row(tmp_path, gather):
    out = str(tmp_path / "lake")
    p = TestPipeline()
    files, _ = (p | beam.Create(mixed_rows(50))
                | beam.Map(lambda r: TimestampedValue(r, r["received_at"] / 1000))
                | WriteToLake(out, SCHEMA_DIR, gather_windows=gather))
    in_window = files | "InItsWindow" >> beam.ParDo(_InItsWindow()) | "Global" >> beam.WindowInto(GlobalWindows())
    assert_that(in_window | "DistinctInWindow" >> beam.Distinct(), equal_to([True]), label="InTheRowsWindows")
    files = files | "Unwindow" >> beam.WindowInto(GlobalWindows())
    total = files | "Rows" >> beam.Map(lambda f: f["rows"]) | beam.CombineGlobally(sum).without_defaults()
    assert_that(total, equal_to([50]), label="AllRows")
    described = files | "Described" >> beam.Map(lambda f: (
        os.path.exists(f["path"]), f"event_type={f['event_type']}" in f["path"],
        "year={}/month={}/day={}".format(*f["date"].split("-")) in f["path"],
        f["window"].count("/") == 1 and f["pane"] == 0))
    assert_that(described | beam.Distinct(), equal_to([(True, True, True, True)]), label="Descriptors")
    p.run().wait_until_finish()


@pytest.mark.parametrize("gather", [False, True], ids=["bundle_writes", "gathered_windows"])
@pytest.mark.parametrize("max_buffered_rows, batch_rows, max_open_files", [
    (50_000, 0, 256), (1, 0, 256), (7, 0, 256), (50_000, 7, 256), (5, 13, 256), (50_000, 0, 1), (7, 13, 3)])
def test_every_file_holds_only_rows_of_its_window_and_day(tmp_path, max_buffered_rows, batch_rows, max_open_files,
                                                           gather):
    """Rows travel in Arrow chunks per bundle (flushed every max_buffered_rows): each file's window must contain
    the event time of every row in it, and its day partition their received_at day; also when the rows come in
    RowBatches that span windows and days."""
    out = str(tmp_path / "lake")
    rows = mixed_rows(60)
    totals, _, _ = run_bounded(rows, out, max_buffered_rows=max_buffered_rows, batch_rows=batch_rows,
                               max_open_files=max_open_files, gather_windows=gather)
    assert totals["lake.rows_written"] == 60
    assert not glob.glob(os.path.join(out, "_temporary", "*"))  # staging removed after the commit
    seen = []
    for path in parquet_files(out):
        start, end = os.path.basename(path).split("-")[:2]
        window = [dt.datetime.strptime(t, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) for t in (start, end)]
        assert window[1] - window[0] == dt.timedelta(seconds=60)
        day = "/".join(part.split("=")[1] for part in path.split(os.sep) if part.split("=")[0] in ("year", "month", "day"))
        for stored in pq.read_table(path, columns=["event_id", "received_at"]).to_pylist():
            assert window[0] <= stored["received_at"] < window[1], path
            assert stored["received_at"].strftime("%Y/%m/%d") == day, path
            seen.append(stored["event_id"])
    assert sorted(seen) == sorted(r["event_id"] for r in rows)


def test_nested_struct_list_and_timestamp_columns_round_trip(tmp_path):
    out = str(tmp_path / "lake")
    row = workout_row(1, BASE_MS)
    run_bounded([row], out)
    (path,) = parquet_files(out)
    (stored,) = pq.read_table(path).to_pylist()

    def ts(ms):
        return dt.datetime.fromtimestamp(ms / 1000, UTC)

    assert stored["received_at"] == ts(row["received_at"]) and stored["event_time"] == ts(row["event_time"])
    assert stored["properties"]["started_at"] == ts(row["properties"]["started_at"])
    assert stored["properties"]["exercises"] == [
        {"name": "squat", "sets": 3, "reps": 10, "weight_kg": 60.0, "duration_s": None},
        {"name": "plank", "sets": None, "reps": None, "weight_kg": None, "duration_s": 90}]
    assert stored["properties"]["completed_at"] is None
    assert stored["context"]["extra"] == [("campaign", "spring")]
    assert stored["user"]["subscription"] == {"plan": "premium", "status": None, "since": ts(1_700_000_000_000)}
    assert stored["user"]["devices"] == ["k1:d1"]
    assert stored["user_found"] is True
    schema = pq.read_schema(path)
    assert str(schema.field("received_at").type) == "timestamp[ms, tz=UTC]"


def test_rows_that_do_not_fit_become_write_dead_letters(tmp_path):
    out = str(tmp_path / "lake")
    good = [workout_row(i, BASE_MS + i) for i in range(5)]
    wrong_type = workout_row(90, BASE_MS)
    wrong_type["properties"]["duration_s"] = "an hour and someone@example.com"
    undeclared = workout_row(91, BASE_MS)
    undeclared["user"]["profile"]["someone@example.com"] = "x"
    unknown = screen_row(92, BASE_MS) | {"event_type": "not_registered"}
    no_time = screen_row(93, BASE_MS) | {"received_at": None}

    p = TestPipeline()
    files, dead = (p | beam.Create(good + [wrong_type, undeclared, unknown, no_time])
                   | beam.Map(lambda r: TimestampedValue(r, BASE_MS / 1000))
                   | WriteToLake(out, SCHEMA_DIR))
    reasons = dead | "Reasons" >> beam.Map(lambda d: (d["failure"]["stage"], d["failure"]["reason"],
                                                      json.loads(d["payload"])["event_id"]))
    assert_that(reasons, equal_to([
        ("write", "row_schema_mismatch", "w-00090"), ("write", "row_schema_mismatch", "w-00091"),
        ("write", "unknown_event_type", "s-00092"), ("write", "invalid_received_at", "s-00093")]))
    messages = dead | "Messages" >> beam.Map(lambda d: "example.com" in d["failure"]["message"])
    assert_that(messages, equal_to([False] * 4), label="NoPersonalData")
    result = p.run()
    result.wait_until_finish()
    totals = counter_totals(result)
    assert totals["lake.rows_written"] == 5 and totals["lake.dead_lettered"] == 4
    stored = ds.dataset(os.path.join(out, "events"), partitioning="hive").to_table(columns=["event_id"])
    assert sorted(stored.column("event_id").to_pylist()) == [r["event_id"] for r in good]


@pytest.mark.parametrize("gather", [False, True], ids=["bundle_writes", "gathered_windows"])
def test_large_groups_split_into_bounded_files_and_row_groups(tmp_path, gather):
    out = str(tmp_path / "lake")
    rows = [workout_row(i, BASE_MS + i) for i in range(100)]  # one window, one partition
    totals, _, _ = run_bounded(rows, out, max_rows_per_file=40, row_group_size=15, gather_windows=gather)
    files = parquet_files(out)
    sizes = sorted(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert sizes == [20, 40, 40]
    for f in files:
        groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(f).num_row_groups)]
        assert sum(groups) == pq.ParquetFile(f).metadata.num_rows
        assert groups[:-1] == [15] * (len(groups) - 1) and groups[-1] <= 15  # full row groups, one short at the end
    ids = ds.dataset(os.path.join(out, "events"), partitioning="hive").to_table(columns=["event_id"])
    assert sorted(ids.column("event_id").to_pylist()) == sorted(r["event_id"] for r in rows)
    assert totals["lake.files_written"] == 3


def _stage_one_bundle(fn, rows: list[dict]) -> list:
    """Drives a bundle-writing DoFn over ``rows`` as a runner would; returns its staged-file descriptors."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp

    fn.start_bundle()
    out = []
    for row in rows:
        out.extend(fn.process(row, Timestamp(micros=row["received_at"] * 1000), GlobalWindow(), None) or ())
    out.extend(fn.finish_bundle() or ())
    return [value.value for value in out]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bundle_writes_are_staged_until_committed_and_abandoned_attempts_leave_nothing(tmp_path, request, where):
    """A bounded input's files are written where its rows are made: a bundle's files must stay out of the table
    until the runner has committed the bundle (a failed attempt, retried with other splits or other lookup answers,
    would otherwise leave its rows in the table twice); a retried commit is harmless; the staging is removed."""
    from transforms.lake import _CommitFileFn, _RemoveStagingFn, _StageBundleFilesFn
    from transforms.object_store import ObjectStore
    from transforms.schemas import read_documents

    if where == "s3":
        stack = request.getfixturevalue("stack")
        out = f"s3://{stack.config.bucket}/lake"
        staging_root, local_staging = f"{out}/_temporary/run1", str(tmp_path / "staging")
        s3 = stack.client("s3")

        def table_files():
            listed = s3.list_objects_v2(Bucket=stack.config.bucket, Prefix="lake/").get("Contents", [])
            return sorted(o["Key"] for o in listed if o["Key"].startswith("lake/events/"))

        def staged_files():
            listed = s3.list_objects_v2(Bucket=stack.config.bucket, Prefix="lake/_temporary/").get("Contents", [])
            return [o["Key"] for o in listed]
    else:
        out = str(tmp_path / "lake")
        staging_root = local_staging = str(tmp_path / "lake" / "_temporary" / "run1")

        def table_files():
            return parquet_files(out)

        def staged_files():
            return glob.glob(os.path.join(staging_root, "*"))

    def stager():
        fn = _StageBundleFilesFn(read_documents(SCHEMA_DIR), out, staging_root, window_seconds=60,
                                 row_group_size=50_000, max_rows_per_file=1_000_000, max_buffered_rows=50_000,
                                 max_open_files=256, compression="zstd", local_staging=local_staging)
        fn.setup()
        return fn

    rows = mixed_rows(40)
    abandoned = _stage_one_bundle(stager(), rows[:25])  # an attempt whose bundle then failed: never committed
    retried = _stage_one_bundle(stager(), rows)
    assert abandoned and retried and len(staged_files()) == len(abandoned) + len(retried)
    assert table_files() == []  # staged only: nothing is visible before the commit
    assert sum(d["rows"] for d in retried) == 40

    commit = _CommitFileFn(local_staging)
    commit.setup()
    published = [d for descriptor in retried for d in commit.process(descriptor)]
    again = [d for descriptor in retried for d in commit.process(descriptor)]  # a retried commit
    assert published == again and all("staged" not in d for d in published)
    assert table_files() == sorted(
        (d["path"] if where == "local" else d["path"].split("/", 3)[3]) for d in published)
    store = ObjectStore(local_staging)
    assert sorted(store.exists(d["path"]) for d in published) == [True] * len(published)

    list(_RemoveStagingFn(staging_root, local_staging).process(len(published)))
    assert staged_files() == []  # the abandoned attempt's files are gone with the staging folder
    if where == "local":
        stored = ds.dataset(os.path.join(out, "events"), partitioning="hive").to_table(columns=["event_id"])
        assert sorted(stored.column("event_id").to_pylist()) == sorted(r["event_id"] for r in rows)


def test_a_rerun_rewrites_the_same_file_names(tmp_path):
    out = str(tmp_path / "lake")
    rows = mixed_rows(30)
    run_bounded(rows, out)
    first = parquet_files(out)
    run_bounded(rows, out)
    assert parquet_files(out) == first  # content-derived names: a retry adds no duplicate


def test_several_panes_of_one_window_overwrite_nothing(tmp_path):
    out = str(tmp_path / "lake")
    start_s = BASE_MS // 1000 - (BASE_MS // 1000) % 60
    on_time = [workout_row(i, (start_s + 5 + i) * 1000) for i in range(6)]
    late_1 = [workout_row(100 + i, (start_s + 10 + i) * 1000) for i in range(3)]
    late_2 = [workout_row(200 + i, (start_s + 20 + i) * 1000) for i in range(2)]
    stream = (
        TestStream()
        .advance_watermark_to(start_s)
        .add_elements([TimestampedValue(r, r["received_at"] / 1000) for r in on_time])
        .advance_watermark_to(start_s + 70)  # the window closes: on-time pane
        .add_elements([TimestampedValue(r, r["received_at"] / 1000) for r in late_1])
        .advance_watermark_to(start_s + 80)  # late pane 1
        .add_elements([TimestampedValue(r, r["received_at"] / 1000) for r in late_2])
        .advance_watermark_to_infinity()  # late pane 2
    )
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    p = TestPipeline(options=options)
    files, _ = p | stream | WriteToLake(out, SCHEMA_DIR, window_seconds=60, allowed_lateness_seconds=300)
    assert_that(files | beam.Map(lambda f: (f["pane"], f["rows"])), equal_to([(0, 6), (1, 3), (2, 2)]))
    p.run().wait_until_finish()

    paths = parquet_files(out)
    assert len(paths) == 3 and len({os.path.basename(x).split("-")[2] for x in paths}) == 3
    stored = ds.dataset(os.path.join(out, "events"), partitioning="hive").to_table(columns=["event_id"])
    assert sorted(stored.column("event_id").to_pylist()) == sorted(r["event_id"] for r in on_time + late_1 + late_2)


# -- S3 lake on moto -------------------------------------------------------------------------------------

@pytest.mark.parametrize("gather", [False, True], ids=["bundle_writes", "gathered_windows"])
def test_s3_lake_holds_the_same_rows(stack, tmp_path, gather):
    out = f"s3://{stack.config.bucket}/lake"
    rows = mixed_rows(60)
    totals, _, _ = run_bounded(rows, out, temp_directory=str(tmp_path / "staging"), gather_windows=gather)
    s3 = stack.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.config.bucket, Prefix="lake/")["Contents"]]
    assert keys and all(k.startswith("lake/events/event_type=") and k.endswith(".parquet") for k in keys)
    ids = []
    for key in keys:
        parts = dict(p.split("=") for p in key.split("/")[2:6])
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=stack.config.bucket, Key=key)["Body"].read()))
        assert table.schema.names == lake_schema(parts["event_type"]).names
        for r in table.to_pylist():
            received = r["received_at"].astimezone(UTC)
            assert (parts["year"], parts["month"], parts["day"]) == (
                f"{received.year:04d}", f"{received.month:02d}", f"{received.day:02d}")
            ids.append(r["event_id"])
    assert sorted(ids) == sorted(r["event_id"] for r in rows)
    assert totals["lake.rows_written"] == 60
    assert not os.listdir(tmp_path / "staging")


def test_a_dead_letter_keeps_a_row_whose_keys_json_cannot_have():
    """A row that is rejected for its keys (bytes, tuples) must still become a dead letter, not fail the bundle."""
    import json

    from transforms.lake import write_dead_letter

    letter = write_dead_letter({b"k": 1, "n": [{(1, 2): 3}]}, "row_schema_mismatch", "keys", "app_opened")
    assert json.loads(letter["payload"]) == {"b'k'": 1, "n": [{"(1, 2)": 3}]}
    assert letter["failure"]["reason"] == "row_schema_mismatch"

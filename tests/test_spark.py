"""Spark for batch: a Beam pipeline on the portable SparkRunner (embedded local Spark), and
pyspark reading a Hive-partitioned Parquet lake with partition discovery and nested fields."""
from __future__ import annotations

import json
import os

import pytest

from runners.spark import spark_job_server_jar, spark_options


@pytest.mark.slow
def test_batch_pipeline_runs_on_spark_runner(tmp_path):
    import apache_beam as beam

    output = str(tmp_path / "out" / "squares")
    options = spark_options("local[2]", job_server_jar=spark_job_server_jar())
    with beam.Pipeline(options=options) as pipeline:
        (
            pipeline
            | "Numbers" >> beam.Create(list(range(100)))
            | "Square" >> beam.Map(lambda n: json.dumps({"n": n, "square": n * n}))
            | "WriteSquares" >> beam.io.WriteToText(output, file_name_suffix=".jsonl", num_shards=3)
        )
    files = sorted(name for name in os.listdir(tmp_path / "out") if name.endswith(".jsonl"))
    assert len(files) == 3
    rows = []
    for name in files:
        with open(tmp_path / "out" / name) as handle:
            rows.extend(json.loads(line) for line in handle)
    assert sorted(rows, key=lambda row: row["n"]) == [{"n": n, "square": n * n} for n in range(100)]


def _write_lake(root):
    """Two event types over two days, Hive-style: event_type=<t>/year=<y>/month=<m>/day=<d>/part.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("event_id", pa.string()),
        ("received_at", pa.timestamp("ms", tz="UTC")),
        ("context", pa.struct([("page", pa.struct([("url", pa.string()), ("title", pa.string())])),
                               ("locale", pa.string())])),
        ("properties", pa.struct([("amount", pa.float64()), ("items", pa.int64())])),
    ])
    expected = []
    for event_type, day, count in (("page_view", 1, 3), ("page_view", 2, 2), ("purchase", 2, 4)):
        rows = []
        for i in range(count):
            event_id = f"{event_type}-{day}-{i}"
            rows.append({
                "event_id": event_id,
                "received_at": 1_767_225_600_000 + (day - 1) * 86_400_000 + i * 1000,
                "context": {"page": {"url": f"https://shop.example/{i}", "title": f"t{i}"}, "locale": "en-GB"},
                "properties": {"amount": 10.0 * (i + 1) if event_type == "purchase" else None, "items": i},
            })
            expected.append((event_type, day, event_id, rows[-1]))
        folder = os.path.join(root, f"event_type={event_type}", "year=2026", "month=01", f"day={day:02d}")
        os.makedirs(folder)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, "part-0.parquet"))
    return expected


@pytest.fixture(scope="module", autouse=True)
def spark_on_loopback():
    """Spark binds to the host's first non-loopback address unless told otherwise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        yield


@pytest.fixture(scope="module")
def spark(spark_on_loopback):
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("eventlake-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.mark.slow
def test_pyspark_reads_hive_partitioned_lake_with_nested_fields(spark, tmp_path):
    root = str(tmp_path / "lake")
    expected = _write_lake(root)
    frame = spark.read.parquet(root)

    # Partition discovery: the folder names became typed columns.
    types = dict(frame.dtypes)
    assert types["event_type"] == "string"
    assert types["year"] == types["month"] == types["day"] == "int"
    assert frame.count() == len(expected)

    counts = {(row["event_type"], row["day"]): row["count"]
              for row in frame.groupBy("event_type", "day").count().collect()}
    assert counts == {("page_view", 1): 3, ("page_view", 2): 2, ("purchase", 2): 4}

    # Partition pruning plus a nested struct field, filtered and projected.
    purchases = (
        frame.where("event_type = 'purchase' AND day = 2 AND properties.amount >= 20")
        .select("event_id", "properties.amount", "context.page.url")
        .orderBy("event_id")
        .collect()
    )
    assert [(row["event_id"], row["amount"], row["url"]) for row in purchases] == [
        (event_id, row["properties"]["amount"], row["context"]["page"]["url"])
        for event_type, day, event_id, row in sorted(expected, key=lambda item: item[2])
        if event_type == "purchase" and row["properties"]["amount"] >= 20
    ]
    plan = frame.where("event_type = 'purchase'")._jdf.queryExecution().executedPlan().toString()
    assert "PartitionFilters: [isnotnull(event_type" in plan


def test_spark_options_validate_their_arguments():
    with pytest.raises(ValueError, match="spark_master_url"):
        spark_options("yarn", job_server_jar="x.jar")
    with pytest.raises(ValueError, match="EXTERNAL"):
        spark_options("local[2]", environment_type="EXTERNAL", job_server_jar="x.jar")

"""Compaction of lake partitions: many small Parquet files -> few files of a target size, each event once.

``PartitionCompactor.compact(partition)`` does one partition
(``event_type=<t>/year=<Y>/month=<M>/day=<D>`` under ``<output>/events``);
``CompactPartitions`` runs it for a PCollection of partitions in a Beam batch
pipeline, ``DiscoverPartitions`` lists a lake's partitions (optionally only
those whose day ended before a cut-off).

Per partition, in an order that keeps every event readable at every moment
and lets a re-run finish whatever a crash interrupted:

1. If ``<output>/_compaction/events/<partition>/manifest.json`` exists, a
   previous run crashed after verifying its outputs: check that they are still
   there with their row counts, delete the inputs it lists that remain, delete
   the manifest. Done.
2. List the partition's ``*.parquet`` files (the inputs; files that arrive
   later are not touched). Fewer than two: nothing to do.
3. Read ``event_id`` and ``processed_at`` of every input; the row kept for an
   id is the one with the first ``processed_at`` (ties: the first file in name
   order).
4. Write the kept rows (schema: the inputs' schemas unified, so additive
   evolution keeps every column) into ``ceil(kept bytes / target)`` files of
   about equal row counts, named ``compacted-<time>-<run id>-<n>.parquet``,
   each published whole (local rename or one S3 upload).
5. Verify by reading the outputs back: rows == distinct ids of the inputs,
   the same ids, no id twice, the planned schema. On a mismatch the outputs
   are deleted and the inputs kept (``CompactionError``).
6. Write the manifest (inputs and outputs), delete the inputs, delete the
   manifest.

A crash before 6 leaves extra files in the partition holding events that are
also in the inputs: readers see duplicates (SPEC: they dedupe on
``event_id``), never a gap, and a re-run takes them as inputs too. A crash
during 6 is finished by step 1. Nothing is deleted before the outputs were
read back.

The manifest lies outside the table (``<output>/_compaction``) so Spark, DuckDB
and pyarrow never take it for data. S3 access uses boto3 with the standard
``AWS_*`` settings (``AWS_ENDPOINT_URL`` included); inputs on S3 are copied
to a local staging directory while a partition is compacted.

Metrics (namespace ``eventlake``): ``compaction.partitions``,
``compaction.files_in``, ``compaction.files_out``, ``compaction.rows_out``,
``compaction.duplicates_dropped``, ``compaction.resumed``.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from typing import Callable, Iterator, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from transforms.lake import TABLE
from transforms.object_store import ObjectStore, join, parse_uri

NAMESPACE = "eventlake"
MANIFEST_SCHEMA = "eventlake/compaction/1"
COMPACTION_DIRECTORY = "_compaction"
PARTITION_RE = re.compile(r"^event_type=[a-z][a-z0-9_]{0,63}/year=\d{4}/month=\d{2}/day=\d{2}$")
_NEVER = float("inf")


class CompactionError(RuntimeError):
    """A partition could not be compacted safely; its inputs are kept. Names the partition, never data."""


def check_partition(partition: str) -> str:
    """``event_type=<t>/year=<YYYY>/month=<MM>/day=<DD>``, or ValueError naming it."""
    text = partition.strip("/") if isinstance(partition, str) else partition
    if not isinstance(text, str) or not PARTITION_RE.match(text):
        raise ValueError(f"partition must look like event_type=<t>/year=<YYYY>/month=<MM>/day=<DD>, got {partition!r}")
    return text


def partition_day(partition: str) -> dt.date:
    values = dict(part.split("=", 1) for part in partition.split("/"))
    return dt.date(int(values["year"]), int(values["month"]), int(values["day"]))


# -- files: local or S3 ----------------------------------------------------------------------------


class _Files:
    """The few whole-file operations compaction needs, on a local path or ``s3://`` prefix."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def list(self, prefix: str) -> dict[str, int]:
        """Direct children of ``prefix``: name -> size."""
        where = parse_uri(prefix)
        if where.scheme == "s3":
            found = {}
            paginator = self.store.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=where.bucket, Prefix=where.key + "/", Delimiter="/"):
                for item in page.get("Contents") or []:
                    found[item["Key"].rsplit("/", 1)[-1]] = item["Size"]
            return found
        try:
            names = os.listdir(where.key)
        except FileNotFoundError:
            return {}
        return {name: os.path.getsize(os.path.join(where.key, name)) for name in names
                if os.path.isfile(os.path.join(where.key, name))}

    def walk(self, prefix: str) -> Iterator[str]:
        """Every file under ``prefix``, as a path relative to it."""
        where = parse_uri(prefix)
        if where.scheme == "s3":
            paginator = self.store.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=where.bucket, Prefix=where.key + "/"):
                for item in page.get("Contents") or []:
                    yield item["Key"][len(where.key) + 1:]
            return
        for directory, _, names in os.walk(where.key):
            for name in names:
                yield os.path.relpath(os.path.join(directory, name), where.key).replace(os.sep, "/")

    def local_copy(self, uri: str, staging: str) -> str:
        """A local path holding ``uri``'s bytes (the file itself when it is local)."""
        where = parse_uri(uri)
        if where.scheme != "s3":
            return where.key
        path = os.path.join(staging, uuid.uuid4().hex + ".parquet")
        self.store.client.download_file(where.bucket, where.key, path)
        return path

    def exists(self, uri: str) -> bool:
        where = parse_uri(uri)
        if where.scheme == "s3":
            try:
                self.store.client.head_object(Bucket=where.bucket, Key=where.key)
                return True
            except Exception as exc:  # noqa: BLE001 - botocore's ClientError
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return os.path.exists(where.key)

    def delete(self, uri: str) -> None:
        """Deletes a file; one already gone is fine (deletes are repeated after a crash)."""
        where = parse_uri(uri)
        if where.scheme == "s3":
            self.store.client.delete_object(Bucket=where.bucket, Key=where.key)
            return
        try:
            os.remove(where.key)
        except FileNotFoundError:
            pass


# -- one partition ---------------------------------------------------------------------------------


class PartitionCompactor:
    """Compacts partitions of one lake (module docstring).

    ``on_step(step, detail)`` is called after each durable step
    (``outputs_written``, ``verified``, ``manifest_written``, ``input_deleted``,
    ``done``): operators can log progress, tests inject crashes there.
    """

    def __init__(self, output: str, *, target_file_mb: float = 256, compression: str = "zstd",
                 store: Optional[ObjectStore] = None, staging_directory: Optional[str] = None,
                 on_step: Optional[Callable[[str, dict], None]] = None):
        location = parse_uri(output)
        if isinstance(target_file_mb, bool) or not isinstance(target_file_mb, (int, float)) \
                or not 0 < target_file_mb <= 1_048_576:
            raise ValueError(f"target_file_mb must be a number in (0, 1048576], got {target_file_mb!r}")
        self.output = output.rstrip("/") if location.scheme == "s3" else location.key
        self.target_bytes = int(target_file_mb * 1024 * 1024) or 1
        self.compression = compression
        self.store = store or ObjectStore(staging_directory)
        self.files = _Files(self.store)
        self.staging_directory = staging_directory
        self.on_step = on_step or (lambda step, detail: None)

    def partition_uri(self, partition: str) -> str:
        return join(self.output, TABLE, partition)

    def manifest_uri(self, partition: str) -> str:
        return join(self.output, COMPACTION_DIRECTORY, TABLE, partition, "manifest.json")

    def compact(self, partition: str) -> dict:
        """Compacts one partition; returns what it did (counts and file names, no data)."""
        partition = check_partition(partition)
        manifest_uri = self.manifest_uri(partition)
        if self.files.exists(manifest_uri):
            return self._finish(partition, json.loads(self.store.get_bytes(manifest_uri)), resumed=True)
        folder = self.partition_uri(partition)
        listed = self.files.list(folder)
        inputs = sorted(name for name in listed if name.endswith(".parquet") and not name.startswith((".", "_")))
        if len(inputs) < 2:
            return {"partition": partition, "action": "skipped", "files_in": len(inputs)}
        staging = tempfile.mkdtemp(prefix="eventlake-compaction-", dir=self.staging_directory)
        try:
            manifest = self._merge(partition, folder, inputs, sum(listed[n] for n in inputs), staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.store.put_bytes(json.dumps(manifest, indent=1).encode("utf-8"), manifest_uri)
        self.on_step("manifest_written", {"partition": partition})
        return self._finish(partition, manifest, resumed=False)

    def _merge(self, partition: str, folder: str, inputs: list[str], input_bytes: int, staging: str) -> dict:
        paths = [self.files.local_copy(join(folder, name), staging) for name in inputs]
        schema = pa.unify_schemas([pq.read_schema(path) for path in paths])
        # 3. the kept row of each event_id: the first processed_at, then the first file and row
        winners: dict[str, tuple] = {}
        total_rows = 0
        for file_index, path in enumerate(paths):
            ids = pq.read_table(path, columns=["event_id", "processed_at"])
            event_ids = ids.column("event_id").to_pylist()
            processed = ids.column("processed_at").cast(pa.int64()).to_pylist()
            total_rows += len(event_ids)
            for row_index, (event_id, at) in enumerate(zip(event_ids, processed)):
                candidate = (_NEVER if at is None else at, file_index, row_index)
                if event_id not in winners or candidate < winners[event_id]:
                    winners[event_id] = candidate
        kept = len(winners)
        # 4. about target-sized files of equal row counts
        kept_bytes = input_bytes * kept / max(total_rows, 1)
        file_count = max(1, math.ceil(kept_bytes / self.target_bytes))
        rows_per_file = max(1, math.ceil(kept / file_count))
        keep_rows: list[list[int]] = [[] for _ in paths]
        for _, file_index, row_index in winners.values():
            keep_rows[file_index].append(row_index)
        run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        outputs: list[dict] = []
        writer, written_path, written_rows = None, None, 0

        def publish():
            nonlocal writer, written_path, written_rows
            writer.close()
            name = f"compacted-{run_id}-{len(outputs):04d}.parquet"
            self.store.put_file(written_path, join(folder, name))
            outputs.append({"name": name, "rows": written_rows})
            writer, written_path, written_rows = None, None, 0

        try:
            for path, rows in zip(paths, keep_rows):
                if not rows:
                    continue
                table = _conform(pq.read_table(path), schema).take(sorted(rows))
                offset = 0
                while offset < table.num_rows:
                    if writer is None:
                        written_path = os.path.join(staging, uuid.uuid4().hex + ".parquet")
                        writer = pq.ParquetWriter(written_path, schema, compression=self.compression)
                    take = min(table.num_rows - offset, rows_per_file - written_rows)
                    writer.write_table(table.slice(offset, take))
                    written_rows += take
                    offset += take
                    if written_rows >= rows_per_file:
                        publish()
            if writer is not None:
                publish()
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        self.on_step("outputs_written", {"partition": partition, "outputs": [o["name"] for o in outputs]})
        # 5. read back before anything is deleted
        self._verify(partition, folder, outputs, set(winners), schema, staging)
        self.on_step("verified", {"partition": partition})
        return {"schema": MANIFEST_SCHEMA, "partition": partition, "inputs": inputs, "outputs": outputs,
                "rows_in": total_rows, "rows_out": kept, "duplicates_dropped": total_rows - kept}

    def _verify(self, partition, folder, outputs, expected_ids: set, schema: pa.Schema, staging: str) -> None:
        seen: set = set()
        rows = 0
        problem = None
        for output in outputs:
            table = pq.read_table(self.files.local_copy(join(folder, output["name"]), staging))
            if not table.schema.equals(schema):
                problem = "a merged file's schema differs from the inputs'"
                break
            ids = table.column("event_id").to_pylist()
            rows += len(ids)
            seen.update(ids)
            if len(ids) != output["rows"]:
                problem = "a merged file holds another number of rows than written"
                break
        if problem is None and not (rows == len(expected_ids) == len(seen) and seen == expected_ids):
            problem = "the merged files do not hold each event id of the inputs exactly once"
        if problem:
            for output in outputs:
                self.files.delete(join(folder, output["name"]))
            raise CompactionError(f"partition {partition}: {problem}; merged files removed, inputs kept")

    def _finish(self, partition: str, manifest: dict, *, resumed: bool) -> dict:
        """Step 6 (or step 1 after a crash): delete the inputs once the outputs are known to be there."""
        folder = self.partition_uri(partition)
        present = self.files.list(folder)
        for output in manifest["outputs"]:
            if output["name"] not in present:
                raise CompactionError(f"partition {partition}: the manifest names a merged file that is missing "
                                      f"({output['name']}); inputs kept, manifest kept for inspection")
        if resumed:
            staging = tempfile.mkdtemp(prefix="eventlake-compaction-", dir=self.staging_directory)
            try:
                for output in manifest["outputs"]:
                    path = self.files.local_copy(join(folder, output["name"]), staging)
                    if pq.read_metadata(path).num_rows != output["rows"]:
                        raise CompactionError(f"partition {partition}: a merged file named in the manifest has "
                                              f"another row count ({output['name']}); inputs kept")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        outputs = {output["name"] for output in manifest["outputs"]}
        for name in manifest["inputs"]:
            if name in present and name not in outputs:
                self.files.delete(join(folder, name))
                self.on_step("input_deleted", {"partition": partition, "input": name})
        self.files.delete(self.manifest_uri(partition))
        self.on_step("done", {"partition": partition})
        return {"partition": partition, "action": "resumed" if resumed else "compacted",
                "files_in": len(manifest["inputs"]), "files_out": len(manifest["outputs"]),
                "rows_in": manifest["rows_in"], "rows_out": manifest["rows_out"],
                "duplicates_dropped": manifest["duplicates_dropped"], "outputs": sorted(outputs)}

    def partitions(self, *, ended_before: Optional[dt.datetime] = None) -> list[str]:
        """The lake's partitions (with a file), optionally only those whose day ended before a moment."""
        found = set()
        for relative in self.files.walk(join(self.output, TABLE)):
            folder = relative.rsplit("/", 1)[0] if "/" in relative else ""
            if PARTITION_RE.match(folder):
                found.add(folder)
        if ended_before is not None:
            cutoff = ended_before.astimezone(dt.timezone.utc).date()
            found = {p for p in found if partition_day(p) < cutoff}
        return sorted(found)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order; a column an older file lacks is null."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            columns.append(column if column.type.equals(field.type) else column.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# -- Beam ------------------------------------------------------------------------------------------


class _CompactPartitionFn(beam.DoFn):
    def __init__(self, output: str, target_file_mb: float, staging_directory: Optional[str]):
        self.output = output
        self.target_file_mb = target_file_mb
        self.staging_directory = staging_directory
        self.partitions = Metrics.counter(NAMESPACE, "compaction.partitions")
        self.files_in = Metrics.counter(NAMESPACE, "compaction.files_in")
        self.files_out = Metrics.counter(NAMESPACE, "compaction.files_out")
        self.rows_out = Metrics.counter(NAMESPACE, "compaction.rows_out")
        self.duplicates = Metrics.counter(NAMESPACE, "compaction.duplicates_dropped")
        self.resumed = Metrics.counter(NAMESPACE, "compaction.resumed")

    def setup(self):
        self.compactor = PartitionCompactor(self.output, target_file_mb=self.target_file_mb,
                                            staging_directory=self.staging_directory)

    def process(self, partition: str):
        report = self.compactor.compact(partition)
        if report["action"] != "skipped":
            self.partitions.inc()
            self.files_in.inc(report["files_in"])
            self.files_out.inc(report["files_out"])
            self.rows_out.inc(report["rows_out"])
            self.duplicates.inc(report["duplicates_dropped"])
            if report["action"] == "resumed":
                self.resumed.inc()
        yield report


class _ListPartitionsFn(beam.DoFn):
    def __init__(self, ended_before_ms: Optional[int]):
        self.ended_before_ms = ended_before_ms

    def process(self, output: str):
        moment = (None if self.ended_before_ms is None
                  else dt.datetime.fromtimestamp(self.ended_before_ms / 1000, dt.timezone.utc))
        yield from PartitionCompactor(output).partitions(ended_before=moment)


class DiscoverPartitions(beam.PTransform):
    """PBegin -> the lake's partitions (``event_type=.../day=DD``), listed on a worker."""

    def __init__(self, output: str, *, ended_before_ms: Optional[int] = None):
        super().__init__()
        parse_uri(output)
        if ended_before_ms is not None and (isinstance(ended_before_ms, bool) or not isinstance(ended_before_ms, int)):
            raise ValueError(f"ended_before_ms must be epoch milliseconds, got {ended_before_ms!r}")
        self.output = output
        self.ended_before_ms = ended_before_ms

    def expand(self, pbegin):
        return (pbegin
                | "LakeRoot" >> beam.Create([self.output])
                | "ListPartitions" >> beam.ParDo(_ListPartitionsFn(self.ended_before_ms)))


class CompactPartitions(beam.PTransform):
    """Partitions -> one report dict each (module docstring); partitions are spread over workers."""

    def __init__(self, output: str, *, target_file_mb: float = 256, staging_directory: Optional[str] = None):
        super().__init__()
        PartitionCompactor(output, target_file_mb=target_file_mb)  # validates; no I/O
        self.output = output
        self.target_file_mb = target_file_mb
        self.staging_directory = staging_directory

    def expand(self, partitions):
        return (partitions
                | "CheckPartitions" >> beam.Map(check_partition)
                | "SpreadPartitions" >> beam.Reshuffle()
                | "CompactPartition" >> beam.ParDo(_CompactPartitionFn(
                    self.output, self.target_file_mb, self.staging_directory)))

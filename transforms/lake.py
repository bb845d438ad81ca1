"""WriteToLake: lake rows -> windowed, Hive-partitioned Parquet files (SPEC "Lake layout").

``<output>/events/event_type=<t>/year=<YYYY>/month=<MM>/day=<DD>/<file>.parquet``

Rows (docs/CONTRACTS.md; element timestamp = ``received_at``) are put in fixed
event-time windows that fire when the watermark passes their end and once more
for every late chunk within ``allowed_lateness_seconds`` (discarding: each pane
holds only its new rows), grouped by partition ``(event_type, day of
received_at in UTC)``:

* where the rows are made, each bundle's rows (single, or ``RowBatch``es of
  them) are converted to Arrow with the event type's lake schema, in chunks per
  partition and window (at most ``row_group_size`` rows; ``max_buffered_rows``
  rows held at once), so the shuffle moves a few Arrow chunks (IPC, zstd
  compressed) instead of every row;
* each window's partition is written by one DoFn call, in row groups of at most
  ``row_group_size`` rows, streamed to a staged local file, at most
  ``max_rows_per_file`` rows a file (bounded memory for large groups);
* named ``<window start>-<window end>-p<pane>-<hash>.parquet``, the hash over
  the file's sorted ``event_id``s: unique per window, pane and content, and a
  retried bundle rewrites the same name instead of adding a duplicate;
* published whole: a local file is staged under ``temp_directory`` (default
  ``<output>/_temporary``, outside the table ``<output>/events``) and renamed
  into place; on S3 the staged file is uploaded as one object (boto3, with
  the standard ``AWS_*`` settings, ``AWS_ENDPOINT_URL`` included).

Rows that cannot be written are dead letters of stage ``write`` (never
retryable: the same row fails the same way), reasons ``unknown_event_type``
(no schema), ``invalid_received_at`` (no partition day) and
``row_schema_mismatch`` (a value of the wrong type, or a struct field the
schema does not declare, which Arrow would silently drop). The original bytes
are gone at this stage, so the payload is the row as JSON (timestamps as epoch
ms, as in the row) and the source is ``{"stream": "eventlake:lake",
"shard_id": <event type>, "sequence_number": ""}``: such letters are for
inspection and repair, not for a plain re-drive onto the stream.

Known limit: rows later than the allowed lateness are dropped by the runner's
GroupByKey (Beam's late-data rule) and do not appear in ``lake.rows_written``,
so conservation shows them; choose the lateness from the source's disorder.

Returns ``(written_files, dead_letters)``: written-file descriptors
``{"path", "rows", "event_type", "date", "window", "pane"}`` (in the rows'
windows) and dead-letter records (in the global window). Metrics (namespace
``eventlake``): ``lake.rows_written``, ``lake.files_written``, ``lake.dead_lettered``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import Optional, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger as beam_trigger
from apache_beam.transforms import window as beam_window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.dead_letter import dead_letter
from transforms.envelope import EVENT_TYPE_RE
from transforms.object_store import ObjectStore, join, parse_uri
from transforms.parquet_rows import rows_to_table
from transforms.records import RowBatch, SourceRecord
from transforms.schemas import SchemaRegistry, read_documents

NAMESPACE = "eventlake"
STAGE = "write"
FILES = "files"
CHUNKS = "chunks"
DEAD_LETTERS = "dead_letters"
TABLE = "events"
LAKE_SOURCE = "eventlake:lake"
COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_DAY_MS = 86_400_000


def _utc(epoch_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.timezone.utc)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def partition_path(output: str, event_type: str, day: str) -> str:
    """The Hive partition folder of ``event_type`` on ``day`` (``YYYY-MM-DD``)."""
    year, month, date = day.split("-")
    return join(output, TABLE, f"event_type={event_type}", f"year={year}", f"month={month}", f"day={date}")


def write_dead_letter(row, reason: str, message: str, event_type: str = "") -> dict:
    """A stage-``write`` dead letter carrying the row as JSON (see the module docstring)."""
    data = json.dumps(row, default=str, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    source = SourceRecord(data, LAKE_SOURCE, event_type, "")
    return dead_letter(STAGE, reason, message, retryable=False, record=source)


# Chunks cross the shuffle (and the runner's memory) zstd-compressed: 158 bytes a row instead of 502 on
# the bench's rows, for ~4 us a row of (de)compression in the workers (docs/benchmarks.md, stop 15).
_SHUFFLE_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


def _table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_SHUFFLE_IPC) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _ipc_to_table(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()


class _PartitionChunksFn(beam.DoFn):
    """Rows -> ``((event_type, day), Arrow IPC chunk)``, one chunk per partition, fixed window and flush.

    Why: the GroupByKey that gathers a window's partition crosses processes
    (and the runner), and a row crossing it one by one costs a coder round trip
    and the runner's per-element grouping, more than the row's whole processing.
    Rows are therefore converted to Arrow here, where they are produced, with
    the event type's lake schema; a chunk is emitted when it holds
    ``chunk_rows`` rows, when the DoFn holds ``max_buffered_rows`` in all, and at
    the end of the bundle. Rows that cannot be placed or do not fit the schema
    become dead letters here, so everything after the shuffle is Arrow.

    The rows of a chunk share one fixed window of ``window_seconds`` (computed
    here on the grid ``FixedWindows`` uses) and the chunk carries their earliest
    timestamp, so windowing the chunks afterwards puts each in its rows' window;
    assigning windows row by row measured 4 % of a backfill.
    """

    def __init__(self, documents: dict, *, window_seconds: int, chunk_rows: int, max_buffered_rows: int):
        self.documents = documents
        self.window_micros = window_seconds * 1_000_000
        self.chunk_rows = chunk_rows
        self.max_buffered_rows = max_buffered_rows
        self.dead_lettered = Metrics.counter(NAMESPACE, "lake.dead_lettered")

    def setup(self):
        self.registry = SchemaRegistry.from_documents(self.documents)
        self.event_types = frozenset(self.registry.event_types())

    def start_bundle(self):
        self.groups: dict = {}  # (event_type, day, fixed window, input window) -> [min timestamp, rows]
        self.buffered = 0

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam):
        if isinstance(element, RowBatch):
            for row, micros in element.timestamped():
                yield from self._place(row, Timestamp(micros=micros), window, pane)
        else:
            yield from self._place(element, timestamp, window, pane)

    def _place(self, row, timestamp, window, pane):
        """Adds one row to its chunk (emitting chunks that are full), or dead-letters it."""
        event_type = row.get("event_type") if isinstance(row, dict) else None
        if event_type not in self.event_types:
            self.dead_lettered.inc()
            known = isinstance(event_type, str) and EVENT_TYPE_RE.match(event_type) is not None
            letter = write_dead_letter(row, "unknown_event_type", "lake row has no lake schema for its event type",
                                       event_type if known else "")
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, timestamp, (window,), pane))
            return
        received_at = row.get("received_at")
        if isinstance(received_at, bool) or not isinstance(received_at, int) or not 0 <= received_at <= _MAX_MS:
            self.dead_lettered.inc()
            letter = write_dead_letter(row, "invalid_received_at", "lake row has no valid received_at to partition by",
                                       event_type)
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, timestamp, (window,), pane))
            return
        key = (event_type, received_at // _DAY_MS, timestamp.micros // self.window_micros, window)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = [timestamp, []]
        elif timestamp < group[0]:
            group[0] = timestamp
        group[1].append(row)
        self.buffered += 1
        if len(group[1]) >= self.chunk_rows:
            yield from self._emit(key)
        elif self.buffered >= self.max_buffered_rows:
            for held in list(self.groups):
                yield from self._emit(held)

    def finish_bundle(self):
        for key in list(self.groups):
            yield from self._emit(key)

    def _emit(self, key):
        event_type, day_number, _, window = key
        day = _utc(day_number * _DAY_MS).strftime("%Y-%m-%d")
        timestamp, rows = self.groups.pop(key)
        self.buffered -= len(rows)
        table, rejected = rows_to_table(rows, self.registry.lake_schema(event_type))
        for problem in rejected:
            self.dead_lettered.inc()
            where = f" in {problem.column}" if problem.column else ""
            letter = write_dead_letter(
                problem.row, "row_schema_mismatch",
                f"lake row does not fit the {event_type} lake schema: {problem.problem}{where}", event_type)
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, timestamp, (window,)))
        if table.num_rows:
            yield WindowedValue(((event_type, day), _table_to_ipc(table)), timestamp, (window,))


class _StagedFile:
    """One Parquet file being written: a local staging file plus the ids it holds."""

    def __init__(self, store: ObjectStore, schema: pa.Schema, compression: str):
        self.path = store.staging_file(".parquet")
        self.writer = pq.ParquetWriter(self.path, schema, compression=compression)
        self.ids: list[str] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.ids.extend(str(i) for i in table.column("event_id").to_pylist())
        self.rows += table.num_rows

    def close(self) -> str:
        """Closes the writer; returns the content hash that names the file."""
        self.writer.close()
        return hashlib.sha256("\n".join(sorted(self.ids)).encode("utf-8")).hexdigest()[:24]

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)


class _WritePartitionFn(beam.DoFn):
    """((event_type, day), Arrow chunks) of one window and pane -> Parquet files in the lake."""

    def __init__(self, output: str, documents: dict, *, compression: str, row_group_size: int,
                 max_rows_per_file: int, staging_directory: Optional[str]):
        self.output = output
        self.documents = documents
        self.compression = compression
        self.row_group_size = row_group_size
        self.max_rows_per_file = max_rows_per_file
        self.staging_directory = staging_directory
        self.rows_written = Metrics.counter(NAMESPACE, "lake.rows_written")
        self.files_written = Metrics.counter(NAMESPACE, "lake.files_written")

    def setup(self):
        self.registry = SchemaRegistry.from_documents(self.documents)
        self.store = ObjectStore(self.staging_directory)

    def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        (event_type, day), chunks = element
        schema = self.registry.lake_schema(event_type)
        start, end = _window_bounds(window)
        context = {
            "event_type": event_type, "date": day, "pane": pane.index if pane is not None else 0,
            "window": f"{_rfc3339(start)}/{_rfc3339(end)}" if start else "global",
            "prefix": f"{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}" if start else "global",
        }
        staged: Optional[_StagedFile] = None
        pending: list[pa.Table] = []
        pending_rows = 0
        try:
            for chunk in chunks:
                table = _ipc_to_table(chunk)
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= self.row_group_size:
                    staged, pending, published = self._write(staged, pending, schema, context, final=False)
                    pending_rows = sum(table.num_rows for table in pending)
                    yield from published
            if pending:
                staged, _, published = self._write(staged, pending, schema, context, final=True)
                yield from published
            if staged is not None:
                yield self._publish(staged, context)
                staged = None
        finally:
            if staged is not None:
                staged.discard()

    def _write(self, staged, tables, schema, context, *, final: bool):
        """Appends ``tables`` in row groups of ``row_group_size`` rows (fewer only at the end of a file or of the
        group); returns the staged file, the rows kept for the next row group, and the files published."""
        published = []
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        offset = 0
        while offset < table.num_rows:
            if staged is None:
                staged = _StagedFile(self.store, schema, self.compression)
            take = min(table.num_rows - offset, self.max_rows_per_file - staged.rows, self.row_group_size)
            if take < self.row_group_size and take == table.num_rows - offset and not final:
                return staged, [table.slice(offset)], published  # a short row group: wait for more rows
            staged.write(table.slice(offset, take))
            offset += take
            if staged.rows >= self.max_rows_per_file:
                published.append(self._publish(staged, context))
                staged = None
        return staged, [], published

    def _publish(self, staged: _StagedFile, context: dict) -> dict:
        digest = staged.close()
        name = f"{context['prefix']}-p{context['pane']}-{digest}.parquet"
        uri = join(partition_path(self.output, context["event_type"], context["date"]), name)
        self.store.put_file(staged.path, uri)
        self.rows_written.inc(staged.rows)
        self.files_written.inc()
        return {"path": uri, "rows": staged.rows, "event_type": context["event_type"], "date": context["date"],
                "window": context["window"], "pane": context["pane"]}


def _window_bounds(window):
    if isinstance(window, beam_window.IntervalWindow):
        return _utc(window.start.micros // 1000), _utc(window.end.micros // 1000)
    return None, None


class WriteToLake(beam.PTransform):
    """Lake rows -> Parquet files per SPEC "Lake layout"; returns ``(written_files, dead_letters)``."""

    def __init__(
        self,
        output: str,
        schema_dir: str,
        *,
        window_seconds: int = 60,
        allowed_lateness_seconds: int = 0,
        compression: str = "zstd",
        row_group_size: int = 50_000,
        max_rows_per_file: int = 1_000_000,
        max_buffered_rows: int = 50_000,
        temp_directory: Optional[str] = None,
    ):
        super().__init__()
        location = parse_uri(output)  # ValueError names a bad one
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        for name, value, low in (("window_seconds", window_seconds, 1),
                                 ("allowed_lateness_seconds", allowed_lateness_seconds, 0),
                                 ("row_group_size", row_group_size, 1),
                                 ("max_rows_per_file", max_rows_per_file, 1),
                                 ("max_buffered_rows", max_buffered_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        table_root = join(output, TABLE)
        if temp_directory is None:
            temp_directory = join(location.key, "_temporary") if location.scheme == "file" else None
        elif parse_uri(temp_directory).scheme != "file":
            raise ValueError(f"temp_directory must be a local directory, got {temp_directory!r}")
        else:
            temp_directory = parse_uri(temp_directory).key
            if location.scheme == "file" and (temp_directory + "/").startswith(parse_uri(table_root).key + "/"):
                raise ValueError(f"temp_directory must lie outside the table {table_root!r}, got {temp_directory!r}")
        self.output = output.rstrip("/") if location.scheme == "s3" else location.key
        self.schema_dir = schema_dir
        self.window_seconds = window_seconds
        self.allowed_lateness_seconds = allowed_lateness_seconds
        self.compression = compression
        self.row_group_size = row_group_size
        self.max_rows_per_file = max_rows_per_file
        self.max_buffered_rows = max_buffered_rows
        self.temp_directory = temp_directory

    def expand(self, rows):
        documents = read_documents(self.schema_dir)
        SchemaRegistry.from_documents(documents)  # a bad directory fails here, naming the file
        chunked = rows | "ChunkPartitions" >> beam.ParDo(_PartitionChunksFn(
            documents, window_seconds=self.window_seconds, chunk_rows=self.row_group_size,
            max_buffered_rows=self.max_buffered_rows,
        )).with_output_types(Tuple[Tuple[str, str], bytes]).with_outputs(DEAD_LETTERS, main=CHUNKS)
        written = (
            chunked[CHUNKS]
            | "WindowChunks" >> beam.WindowInto(
                beam_window.FixedWindows(self.window_seconds),
                # Beam's default trigger: fires when the watermark passes the window's end, then once
                # per late chunk within the allowed lateness (= AfterWatermark(late=AfterCount(1))), and
                # runners recognise it and group without the generic trigger driver (much faster).
                trigger=beam_trigger.DefaultTrigger(),
                allowed_lateness=self.allowed_lateness_seconds,
                accumulation_mode=beam_trigger.AccumulationMode.DISCARDING)
            | "GroupByPartition" >> beam.GroupByKey()
            | "WriteParquetFiles" >> beam.ParDo(_WritePartitionFn(
                self.output, documents, compression=self.compression, row_group_size=self.row_group_size,
                max_rows_per_file=self.max_rows_per_file, staging_directory=self.temp_directory,
            ))
        )
        dead_letters = chunked[DEAD_LETTERS] | "UnwindowLakeDeadLetters" >> beam.WindowInto(
            beam_window.GlobalWindows())
        return written, dead_letters

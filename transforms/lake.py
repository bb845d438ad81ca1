"""WriteToLake: lake rows -> windowed, Hive-partitioned Parquet files (SPEC "Lake layout").

``<output>/events/event_type=<t>/year=<YYYY>/month=<MM>/day=<DD>/<file>.parquet``

Rows (docs/CONTRACTS.md; element timestamp = ``received_at``) are put in fixed
event-time windows of ``window_seconds`` and partitions ``(event_type, day of
received_at in UTC)``, converted to Arrow with the event type's lake schema
where they are made (single rows, or ``RowBatch``es of them), and written in
one of two ways (``gather_windows``; by default the first for unbounded input,
the second for bounded):

* **gathered windows** (the stream): each bundle's rows become Arrow chunks
  per partition and window (at most ``row_group_size`` rows;
  ``max_buffered_rows`` rows held at once), a GroupByKey gathers each window's
  partition (the shuffle moves a few IPC chunks, zstd compressed, instead of
  every row), which fires when the watermark passes the window's end and once
  more for every late chunk within ``allowed_lateness_seconds`` (discarding:
  each pane holds only its new rows), and one DoFn call writes it: one file
  per window, partition and pane (more only past ``max_rows_per_file``);
* **bundle writes** (backfills): each bundle writes its own files per
  partition and window (pane ``p0``) without moving the rows anywhere, stages
  them, and a commit step publishes them once the runner has committed the
  bundle (WriteFiles-style; ``_StageBundleFilesFn``). Files per window and
  partition: one per bundle that held its rows (on an archive laid out in
  time order, as the stream's archive is, most windows fall in one bundle).

Either way files are written in row groups of at most ``row_group_size`` rows,
streamed to a staged local file, at most ``max_rows_per_file`` rows a file;
named ``<window start>-<window end>-p<pane>-<hash>.parquet``, the hash over the
file's sorted ``event_id``s: unique per window, pane and content, so a retried
write of the same rows replaces itself; and published whole: a local file is
staged under ``temp_directory`` (default ``<output>/_temporary``, outside the
table ``<output>/events``) and renamed into place; on S3 the file is uploaded
as one object (boto3, with the standard ``AWS_*`` settings,
``AWS_ENDPOINT_URL`` included), for bundle writes first under
``<output>/_temporary/<run>/`` and then copied to its name. A run's staging
folder is removed when all its files are committed.

Rows that cannot be written are dead letters of stage ``write`` (never
retryable: the same row fails the same way), reasons ``unknown_event_type``
(no schema), ``invalid_received_at`` (no partition day) and
``row_schema_mismatch`` (a value of the wrong type, or a struct field the
schema does not declare, which Arrow would silently drop). The original bytes
are gone at this stage, so the payload is the row as JSON (timestamps as epoch
ms, as in the row) and the source is ``{"stream": "eventlake:lake",
"shard_id": <event type>, "sequence_number": ""}``: such letters are for
inspection and repair, not for a plain re-drive onto the stream.

Known limit: with gathered windows, rows later than the allowed lateness are dropped by the runner's
GroupByKey (Beam's late-data rule) and do not appear in ``lake.rows_written``,
so conservation shows them; choose the lateness from the source's disorder.

Returns ``(written_files, dead_letters)``: written-file descriptors
``{"path", "rows", "event_type", "date", "window", "pane"}`` (in the rows'
windows) and dead-letter records (in the global window). Metrics (namespace
``eventlake``): ``lake.rows_written``, ``lake.files_written``, ``lake.dead_lettered``.
"""
from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import os
import uuid
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
LOG = logging.getLogger("eventlake.lake")


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
    try:
        text = json.dumps(row, default=str, ensure_ascii=False, separators=(",", ":"))
    except TypeError:  # keys JSON cannot have (bytes, tuples): kept as their text, like other odd values
        text = json.dumps(_text_keys(row), default=str, ensure_ascii=False, separators=(",", ":"))
    source = SourceRecord(text.encode("utf-8"), LAKE_SOURCE, event_type, "")
    return dead_letter(STAGE, reason, message, retryable=False, record=source)


def _text_keys(value):
    """``value`` with every dict key that JSON cannot have turned into its text (``str``), however deep."""
    if isinstance(value, dict):
        return {key if isinstance(key, (str, int, float, bool)) or key is None else str(key): _text_keys(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text_keys(item) for item in value]
    return value


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
        self.groups: dict = {}  # (event_type, day, fixed window, input window) -> [min micros, rows]
        self.buffered = 0

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam):
        """Adds each row to its chunk (emitting chunks that are full), or dead-letters it.

        Rows are placed by their integer micros; a ``Timestamp`` is made only for
        what is emitted (a chunk, a dead letter), not per row.
        """
        pairs = element.timestamped() if isinstance(element, RowBatch) else ((element, timestamp.micros),)
        groups, event_types, window_micros = self.groups, self.event_types, self.window_micros
        for row, micros in pairs:
            event_type = row.get("event_type") if isinstance(row, dict) else None
            if event_type not in event_types:
                known = isinstance(event_type, str) and EVENT_TYPE_RE.match(event_type) is not None
                yield self._unplaced(row, "unknown_event_type", "lake row has no lake schema for its event type",
                                     event_type if known else "", micros, window, pane)
                continue
            received_at = row.get("received_at")
            if isinstance(received_at, bool) or not isinstance(received_at, int) or not 0 <= received_at <= _MAX_MS:
                yield self._unplaced(row, "invalid_received_at", "lake row has no valid received_at to partition by",
                                     event_type, micros, window, pane)
                continue
            key = (event_type, received_at // _DAY_MS, micros // window_micros, window)
            group = groups.get(key)
            if group is None:
                group = groups[key] = [micros, []]
            elif micros < group[0]:
                group[0] = micros
            group[1].append(row)
            self.buffered += 1
            if len(group[1]) >= self.chunk_rows:
                yield from self._emit(key)
            elif self.buffered >= self.max_buffered_rows:
                for held in list(groups):
                    yield from self._emit(held)

    def _unplaced(self, row, reason: str, message: str, event_type: str, micros: int, window, pane):
        """A row that cannot be placed in a partition, as a dead letter in its own time, window and pane."""
        self.dead_lettered.inc()
        letter = write_dead_letter(row, reason, message, event_type)
        return beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, Timestamp(micros=micros), (window,), pane))

    def finish_bundle(self):
        for key in list(self.groups):
            yield from self._emit(key)

    def _emit(self, key):
        event_type, day_number, _, window = key
        day = _utc(day_number * _DAY_MS).strftime("%Y-%m-%d")
        micros, rows = self.groups.pop(key)
        timestamp = Timestamp(micros=micros)
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
            yield from self._chunk_ready(key, day, timestamp, table)

    def _chunk_ready(self, key, day: str, timestamp, table: pa.Table):
        """Emits a chunk for the shuffle that gathers each window's partition."""
        event_type, _, _, window = key
        yield WindowedValue(((event_type, day), _table_to_ipc(table)), timestamp, (window,))


class _StagedFile:
    """One Parquet file being written: a local staging file plus the ids it holds."""

    def __init__(self, store: ObjectStore, schema: pa.Schema, compression: str):
        self.path = store.staging_file(".parquet")
        self.writer = pq.ParquetWriter(self.path, schema, compression=compression)
        self.ids: list[str] = []
        self.rows = 0
        self.digest: Optional[str] = None

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.ids.extend(str(i) for i in table.column("event_id").to_pylist())
        self.rows += table.num_rows

    def close(self) -> None:
        """Closes the writer and keeps the content hash that names the file (``digest``)."""
        self.writer.close()
        self.digest = hashlib.sha256("\n".join(sorted(self.ids)).encode("utf-8")).hexdigest()[:24]
        self.ids = []

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)


class _PartitionFiles:
    """The Parquet files of one partition, window and pane being written.

    Arrow tables are added as they come; they are written in row groups of
    ``row_group_size`` rows (shorter only at the end of a file, at the end, or
    when :meth:`spill` is asked to free memory), at most ``max_rows_per_file``
    rows a file. Closed files wait in :attr:`closed` until taken.
    """

    def __init__(self, store: ObjectStore, schema: pa.Schema, *, compression: str, row_group_size: int,
                 max_rows_per_file: int):
        self.store = store
        self.schema = schema
        self.compression = compression
        self.row_group_size = row_group_size
        self.max_rows_per_file = max_rows_per_file
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.current: Optional[_StagedFile] = None
        self.closed: list[_StagedFile] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.row_group_size:
            self._write(final=False)

    def spill(self) -> None:
        """Writes what is pending now, as a short row group if need be."""
        if self.pending:
            self._write(final=True)

    def close_file(self) -> None:
        """Writes what is pending and closes the open file (the next rows start a new one)."""
        self.spill()
        if self.current is not None:
            self._close_current()

    def take_closed(self) -> list[_StagedFile]:
        closed, self.closed = self.closed, []
        return closed

    def discard(self) -> None:
        for staged in ([self.current] if self.current is not None else []) + self.closed:
            staged.discard()
        self.current, self.closed, self.pending, self.pending_rows = None, [], [], 0

    def _write(self, *, final: bool) -> None:
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.pending_rows = [], 0
        offset = 0
        while offset < table.num_rows:
            if self.current is None:
                self.current = _StagedFile(self.store, self.schema, self.compression)
            take = min(table.num_rows - offset, self.max_rows_per_file - self.current.rows, self.row_group_size)
            if take < self.row_group_size and take == table.num_rows - offset and not final:
                self.pending, self.pending_rows = [table.slice(offset)], take  # a short row group: wait for more
                return
            self.current.write(table.slice(offset, take))
            offset += take
            if self.current.rows >= self.max_rows_per_file:
                self._close_current()

    def _close_current(self) -> None:
        self.current.close()
        self.closed.append(self.current)
        self.current = None


def _file_context(event_type: str, day: str, start: Optional[dt.datetime], end: Optional[dt.datetime],
                  pane: int) -> dict:
    return {
        "event_type": event_type, "date": day, "pane": pane,
        "window": f"{_rfc3339(start)}/{_rfc3339(end)}" if start else "global",
        "prefix": f"{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}" if start else "global",
    }


def _file_uri(output: str, staged: _StagedFile, context: dict) -> str:
    """The file's place in the table: named by its window, pane and content (a rewrite of the same rows replaces
    itself)."""
    name = f"{context['prefix']}-p{context['pane']}-{staged.digest}.parquet"
    return join(partition_path(output, context["event_type"], context["date"]), name)


def _descriptor(uri: str, rows: int, context: dict) -> dict:
    return {"path": uri, "rows": rows, "event_type": context["event_type"], "date": context["date"],
            "window": context["window"], "pane": context["pane"]}


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
        context = _file_context(event_type, day, *_window_bounds(window), pane.index if pane is not None else 0)
        files = _PartitionFiles(self.store, self.registry.lake_schema(event_type), compression=self.compression,
                                row_group_size=self.row_group_size, max_rows_per_file=self.max_rows_per_file)
        try:
            for chunk in chunks:
                files.add(_ipc_to_table(chunk))
                yield from self._publish(files.take_closed(), context)  # full files go out as they fill
            files.close_file()
            yield from self._publish(files.take_closed(), context)
        finally:
            files.discard()

    def _publish(self, closed: list, context: dict):
        for staged in closed:
            uri = _file_uri(self.output, staged, context)
            self.store.put_file(staged.path, uri)
            self.rows_written.inc(staged.rows)
            self.files_written.inc()
            yield _descriptor(uri, staged.rows, context)


class _StageBundleFilesFn(_PartitionChunksFn):
    """Bounded input: rows -> Parquet files per partition and window, written where the rows are made.

    Why: gathering every window's partition in a GroupByKey moves every row
    through the runner's shuffle (one Python process on the local runners, a
    disk and network shuffle on Spark) only to write it; a batch engine writes
    each task's rows where they are (Spark's own writer does). Each bundle
    therefore writes its own files per partition and window (``p0``: a bounded
    input has one pane), as Arrow chunks fill row groups, with at most
    ``max_open_files`` groups open at once (the least recently used is closed
    first; its partition's later rows start another file, so input far from
    time order makes more, smaller files) and at most ``max_buffered_rows``
    rows pending in Arrow (the largest groups are spilled as short row
    groups), on top of the ``max_buffered_rows`` rows the chunker holds.

    Files are *staged*, never published here: a bundle that fails and is
    retried, possibly split differently or with other lookup answers, must
    leave nothing in the table. Finished files go to the run's staging folder
    (``staging_root``: a folder of the local temporary directory, or
    ``<output>/_temporary/<run>`` on S3) and their descriptors, with where they
    are staged, are emitted; :class:`_CommitFileFn` publishes them after the
    runner has committed the bundle (Beam's WriteFiles does the same).
    """

    def __init__(self, documents: dict, output: str, staging_root: str, *, window_seconds: int,
                 row_group_size: int, max_rows_per_file: int, max_buffered_rows: int, max_open_files: int,
                 compression: str, local_staging: Optional[str]):
        super().__init__(documents, window_seconds=window_seconds, chunk_rows=row_group_size,
                         max_buffered_rows=max_buffered_rows)
        self.output = output
        self.staging_root = staging_root
        self.row_group_size = row_group_size
        self.max_rows_per_file = max_rows_per_file
        self.max_open_files = max_open_files
        self.compression = compression
        self.local_staging = local_staging

    def setup(self):
        super().setup()
        self.store = ObjectStore(self.local_staging)

    def start_bundle(self):
        super().start_bundle()
        self.open: collections.OrderedDict = collections.OrderedDict()  # (type, day, window index) -> _Group
        self.pending_rows = 0

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam):
        try:
            yield from super().process(element, timestamp, window, pane)
        except BaseException:
            self._discard_open()
            raise

    def _discard_open(self) -> None:
        """A failed bundle: closes and removes every file it was writing (staged ones go with the staging folder)."""
        for group in self.open.values():
            group.files.discard()
        self.open.clear()
        self.pending_rows = 0

    def _chunk_ready(self, key, day: str, timestamp, table: pa.Table):
        """Adds a chunk to its partition and window's files; stages the files it fills."""
        event_type, _, window_index, _ = key
        name = (event_type, day, window_index)
        group = self.open.get(name)
        if group is None:
            start = Timestamp(micros=window_index * self.window_micros)
            window = beam_window.IntervalWindow(start, Timestamp(micros=start.micros + self.window_micros))
            files = _PartitionFiles(self.store, self.registry.lake_schema(event_type), compression=self.compression,
                                    row_group_size=self.row_group_size, max_rows_per_file=self.max_rows_per_file)
            group = self.open[name] = _Group(files, _file_context(event_type, day, *_window_bounds(window), 0),
                                             window, timestamp)
            while len(self.open) > self.max_open_files:
                yield from self._close(next(iter(self.open)))
        else:
            self.open.move_to_end(name)
            group.timestamp = min(group.timestamp, timestamp)
        before = group.files.pending_rows
        group.files.add(table)
        self.pending_rows += group.files.pending_rows - before
        if self.pending_rows > self.max_buffered_rows:
            for held in sorted(self.open.values(), key=lambda g: g.files.pending_rows, reverse=True):
                self.pending_rows -= held.files.pending_rows
                held.files.spill()
                if self.pending_rows <= self.max_buffered_rows // 2:
                    break
        yield from self._stage_closed(group)

    def _close(self, name):
        """Closes a group's open file and stages what it wrote."""
        group = self.open.pop(name)
        self.pending_rows -= group.files.pending_rows
        try:
            group.files.close_file()
        except BaseException:
            group.files.discard()
            raise
        yield from self._stage_closed(group)

    def _stage_closed(self, group: "_Group"):
        closed = group.files.take_closed()
        try:
            while closed:
                yield self._stage(closed[0], group)
                closed.pop(0)
        finally:
            for staged in closed:  # a failed upload: the rest never reach the staging folder
                staged.discard()

    def _stage(self, staged: _StagedFile, group: "_Group") -> WindowedValue:
        """Moves a finished file to the run's staging folder; its descriptor says where it is and where it goes."""
        at = join(self.staging_root, os.path.basename(staged.path))
        if at != staged.path:
            self.store.put_file(staged.path, at)
        descriptor = _descriptor(_file_uri(self.output, staged, group.context), staged.rows, group.context)
        return WindowedValue({**descriptor, "staged": at}, group.timestamp, (group.window,))

    def finish_bundle(self):
        try:
            yield from super().finish_bundle()  # the last chunks (and their dead letters)
            for name in list(self.open):
                yield from self._close(name)
        except BaseException:
            self._discard_open()
            raise


class _Group:
    """One partition and window of a bundle being written by :class:`_StageBundleFilesFn`."""

    __slots__ = ("files", "context", "window", "timestamp")

    def __init__(self, files: _PartitionFiles, context: dict, window, timestamp):
        self.files, self.context, self.window, self.timestamp = files, context, window, timestamp


class _CommitFileFn(beam.DoFn):
    """A staged file's descriptor -> the file published under its name in the table (after its bundle committed).

    Idempotent: a retried commit finds the file already moved and reports it again.
    """

    def __init__(self, local_staging: Optional[str]):
        self.local_staging = local_staging
        self.rows_written = Metrics.counter(NAMESPACE, "lake.rows_written")
        self.files_written = Metrics.counter(NAMESPACE, "lake.files_written")

    def setup(self):
        self.store = ObjectStore(self.local_staging)

    def process(self, descriptor):
        descriptor = dict(descriptor)
        staged = descriptor.pop("staged")
        self.store.move(staged, descriptor["path"])
        self.rows_written.inc(descriptor["rows"])
        self.files_written.inc()
        yield descriptor


class _RemoveStagingFn(beam.DoFn):
    """Once every file is committed: removes the run's staging folder (what failed bundle attempts left there).

    What cannot be removed is logged, not raised: every file is already published, and nothing in the staging
    folder is visible to readers of the table.
    """

    def __init__(self, staging_root: str, local_staging: Optional[str]):
        self.staging_root = staging_root
        self.local_staging = local_staging

    def process(self, _):
        left = ObjectStore(self.local_staging).delete_tree(self.staging_root)
        if left:
            LOG.warning("%d staged files could not be removed from %s; delete them by hand", left, self.staging_root)
        return ()


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
        gather_windows: Optional[bool] = None,
        max_open_files: int = 256,
    ):
        super().__init__()
        location = parse_uri(output)  # ValueError names a bad one
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        for name, value, low in (("window_seconds", window_seconds, 1),
                                 ("allowed_lateness_seconds", allowed_lateness_seconds, 0),
                                 ("row_group_size", row_group_size, 1),
                                 ("max_rows_per_file", max_rows_per_file, 1),
                                 ("max_buffered_rows", max_buffered_rows, 1),
                                 ("max_open_files", max_open_files, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if gather_windows not in (None, True, False):
            raise ValueError(f"gather_windows must be None, True or False, got {gather_windows!r}")
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
        self.gather_windows = gather_windows
        self.max_open_files = max_open_files
        self.run_id = uuid.uuid4().hex  # the staging folder of this pipeline's bounded writes

    def expand(self, rows):
        documents = read_documents(self.schema_dir)
        SchemaRegistry.from_documents(documents)  # a bad directory fails here, naming the file
        gather = self.gather_windows if self.gather_windows is not None else not rows.is_bounded
        if not gather and not rows.is_bounded:
            raise ValueError("gather_windows=False needs bounded input: a stream's files appear when the watermark "
                             "passes their window, which only the gathered writes wait for")
        if gather:
            chunked = rows | "ChunkPartitions" >> beam.ParDo(_PartitionChunksFn(
                documents, window_seconds=self.window_seconds, chunk_rows=self.row_group_size,
                max_buffered_rows=self.max_buffered_rows,
            )).with_output_types(Tuple[Tuple[str, str], bytes]).with_outputs(DEAD_LETTERS, main=CHUNKS)
            written = self._gathered_writes(chunked[CHUNKS], documents)
        else:
            chunked, written = self._bundle_writes(rows, documents)
        dead_letters = chunked[DEAD_LETTERS] | "UnwindowLakeDeadLetters" >> beam.WindowInto(
            beam_window.GlobalWindows())
        return written, dead_letters

    def _gathered_writes(self, chunks, documents):
        """Chunks -> one write per window, partition and pane, after a GroupByKey (unbounded input)."""
        return (
            chunks
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

    def _bundle_writes(self, rows, documents):
        """Rows -> files written by each bundle, staged, then committed after a shuffle of their descriptors
        (bounded input); the staging folder is removed once all are committed."""
        if parse_uri(self.output).scheme == "file":
            staging_root = local_staging = os.path.join(self.temp_directory, self.run_id)
        else:
            staging_root, local_staging = join(self.output, "_temporary", self.run_id), self.temp_directory
        staged = rows | "StageParquetFiles" >> beam.ParDo(_StageBundleFilesFn(
            documents, self.output, staging_root, window_seconds=self.window_seconds,
            row_group_size=self.row_group_size, max_rows_per_file=self.max_rows_per_file,
            max_buffered_rows=self.max_buffered_rows, max_open_files=self.max_open_files,
            compression=self.compression, local_staging=local_staging,
        )).with_outputs(DEAD_LETTERS, main=FILES)
        written = (staged[FILES]
                   | "AfterCommittedBundles" >> beam.Reshuffle()
                   | "CommitFiles" >> beam.ParDo(_CommitFileFn(local_staging))
                   # in the rows' windows, as the gathered writes' descriptors (a shuffle restores the
                   # input's windowing, the global window of a backfill)
                   | "WindowFiles" >> beam.WindowInto(beam_window.FixedWindows(self.window_seconds)))
        _ = (written
             | "Unwindow" >> beam.WindowInto(beam_window.GlobalWindows())
             | "CountCommitted" >> beam.combiners.Count.Globally()
             | "RemoveStaging" >> beam.ParDo(_RemoveStagingFn(staging_root, local_staging)))
        return staged, written

"""Dead-letter sinks: where the records of ``transforms.dead_letter`` end up.

``WriteDeadLetters(uri)`` picks the sink from the URI:

* an SQS queue URL (``https://sqs.<region>.amazonaws.com/<account>/<queue>``,
  any ``http(s)://host[:port]/<account>/<queue>`` such as moto's, or
  ``sqs://<queue name>``, resolved with GetQueueUrl) -> one message per record,
  sent with SendMessageBatch (10 entries and at most 256 KiB a call). Entries
  SQS fails are retried with backoff; if some still fail, the bundle raises and
  the runner retries it: a dead letter is never dropped (a retried bundle may
  send a record twice; re-drive is idempotent on ``event_id``).
  A record over the message size limit is stored in S3 and the queue gets a
  pointer message instead (see :data:`POINTER_SCHEMA`).
* a local path or ``s3://`` prefix -> JSON Lines files, one record a line,
  ``<prefix>/date=<YYYY-MM-DD>/<window start>-<window end>-<hash>.jsonl``.
  Records are windowed in fixed windows of event time and each bundle writes
  its own files, named by the hash of their content (a retried bundle rewrites
  the same names): nothing overwrites anything, and as no GroupByKey is
  involved no record can be dropped as late.

Pointer message (the body of the SQS message for an oversized record)::

    {"schema": "eventlake/dead_letter_pointer/1",
     "location": "s3://<bucket>/<prefix>/<YYYY>/<MM>/<DD>/<sha256>.json",
     "bytes": <size of the stored record>, "sha256": "<hex digest of the stored bytes>",
     "failure": {...the record's failure...}, "source": {...the record's source...}}

The stored object is the record exactly as ``transforms.dead_letter.to_json``
serializes it. ``record_from_message`` / ``read_queue_records`` resolve pointers
(checking size and sha256). Re-drive reads ``location``, checks ``sha256`` and handles the
record as if it had come in the message; it deletes the object after the
message. ``failure`` and ``source`` hold no personal data (SPEC), so the
pointer lets an operator filter by reason without fetching the object.

The overflow prefix is ``overflow=`` when given, else the environment's
``EVENTLAKE_DEAD_LETTER_OVERFLOW``, else ``s3://$EVENTLAKE_BUCKET/dead_letter_overflow``;
the pipeline passes ``default_overflow(output)`` (``<output>/dead_letter_overflow``,
outside the table) when the lake is on S3. Without any, an oversized record
fails the bundle with a message saying so rather than being lost.

Every record delivered (message or JSON Lines line) counts in the Beam counter
``dead_letters.written`` (namespace ``eventlake``); ``dead_letters.overflowed``
counts the records stored in S3, ``dead_letters.retried_entries`` the entries retried.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
from typing import Callable, Optional
from urllib.parse import urlparse

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window
from apache_beam.utils.windowed_value import WindowedValue

from transforms import aws
from transforms.dead_letter import to_json
from transforms.object_store import ObjectStore, join, parse_uri

LOG = logging.getLogger("eventlake.transforms.dead_letter_sinks")
NAMESPACE = "eventlake"
POINTER_SCHEMA = "eventlake/dead_letter_pointer/1"
SQS_MAX_ENTRIES = 10
SQS_MAX_BYTES = 262_144  # per message and per SendMessageBatch call (the classic limit, safe everywhere)
OVERFLOW_DIRECTORY = "dead_letter_overflow"
_AWS_SQS_HOST = re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_QUEUE_PATH = re.compile(r"^/[^/]+/[A-Za-z0-9_-]{1,80}(\.fifo)?$")
# Characters SQS accepts in a message body; anything else goes out \u-escaped.
_SQS_INVALID = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class DeadLetterDeliveryError(RuntimeError):
    """Dead letters the target did not take after retries; the bundle must be retried."""


def is_queue_uri(uri: str) -> bool:
    """True for an SQS queue URL or ``sqs://name``; False for a path or ``s3://`` prefix."""
    if uri.startswith("sqs://"):
        return True
    if uri.startswith(("http://", "https://")):
        parsed = urlparse(uri)
        return bool(parsed.hostname) and bool(_QUEUE_PATH.match(parsed.path))
    return False


def default_overflow(output: str) -> Optional[str]:
    """``<output>/dead_letter_overflow`` for a lake on S3; None for a local lake."""
    return join(output, OVERFLOW_DIRECTORY) if output.startswith("s3://") else None


def _overflow_from_environment() -> Optional[str]:
    explicit = os.environ.get("EVENTLAKE_DEAD_LETTER_OVERFLOW")
    if explicit:
        return explicit
    bucket = os.environ.get("EVENTLAKE_BUCKET")
    return f"s3://{bucket}/{OVERFLOW_DIRECTORY}" if bucket else None


def sqs_body(record: dict) -> str:
    """The message body: ``to_json`` of the record, \\u-escaped if SQS would refuse a character."""
    body = to_json(record)
    if _SQS_INVALID.search(body):
        body = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    return body


def _attributes(record: dict) -> dict:
    failure = record.get("failure") or {}
    return {
        name: {"DataType": "String", "StringValue": str(failure[name])}
        for name in ("stage", "reason") if failure.get(name)
    }


def _message_size(body: str, attributes: dict) -> int:
    """Size as SQS counts it: the body plus each attribute's name, type and value."""
    size = len(body.encode("utf-8"))
    for name, attr in attributes.items():
        size += len(name.encode()) + len(attr["DataType"].encode()) + len(attr["StringValue"].encode())
    return size


class SqsDeadLetterWriter:
    """Sends dead-letter records to one queue; not a Beam object, so tests can hand it any client.

    ``client`` is an SQS client, ``overflow_store``/``overflow`` where oversized
    records go. ``sleep`` and the backoff figures are parameters so that tests
    need not wait.
    """

    def __init__(
        self,
        client,
        queue_url: str,
        *,
        overflow: Optional[str] = None,
        overflow_store: Optional[ObjectStore] = None,
        max_message_bytes: int = SQS_MAX_BYTES,
        max_batch_bytes: int = SQS_MAX_BYTES,
        max_attempts: int = 6,
        backoff_seconds: float = 0.2,
        max_backoff_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        if not 0 < max_message_bytes <= max_batch_bytes:
            raise ValueError(f"max_message_bytes must be in (0, max_batch_bytes], got {max_message_bytes!r}")
        if overflow is not None and parse_uri(overflow).scheme != "s3":
            raise ValueError(f"overflow must be an s3:// prefix, got {overflow!r}")
        self.client = client
        self.queue_url = queue_url
        self.overflow = overflow
        self.overflow_store = overflow_store or ObjectStore()
        self.max_message_bytes = max_message_bytes
        self.max_batch_bytes = max_batch_bytes
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.sleep = sleep
        self.overflowed = 0
        self.retried_entries = 0

    # -- entries ---------------------------------------------------------------------------------

    def _entry(self, record: dict) -> tuple[dict, int]:
        body = sqs_body(record)
        attributes = _attributes(record)
        size = _message_size(body, attributes)
        if size > self.max_message_bytes:
            body = self._store_overflow(record)
            size = _message_size(body, attributes)
            if size > self.max_message_bytes:  # failure/source are bounded; this is a bug, not data
                raise DeadLetterDeliveryError("a dead-letter pointer message is over the SQS size limit")
        entry = {"MessageBody": body}
        if attributes:
            entry["MessageAttributes"] = attributes
        return entry, size

    def _store_overflow(self, record: dict) -> str:
        if not self.overflow:
            raise DeadLetterDeliveryError(
                "a dead letter is over the SQS message size limit and no overflow location is configured "
                "(set overflow= or EVENTLAKE_DEAD_LETTER_OVERFLOW)")
        data = to_json(record).encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        today = dt.datetime.now(dt.timezone.utc)
        location = join(self.overflow, today.strftime("%Y/%m/%d"), f"{digest}.json")
        self.overflow_store.put_bytes(data, location)
        self.overflowed += 1
        return json.dumps({
            "schema": POINTER_SCHEMA,
            "location": location,
            "bytes": len(data),
            "sha256": digest,
            "failure": record.get("failure"),
            "source": record.get("source"),
        }, separators=(",", ":"))

    def _batches(self, entries: list[tuple[dict, int]]):
        batch, size = [], 0
        for entry, entry_size in entries:
            if batch and (len(batch) == SQS_MAX_ENTRIES or size + entry_size > self.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(entry)
            size += entry_size
        if batch:
            yield batch

    # -- sending ---------------------------------------------------------------------------------

    def send(self, records: list[dict]) -> int:
        """Sends every record (in order of batches); returns how many; raises DeadLetterDeliveryError."""
        entries = [self._entry(record) for record in records]
        for batch in self._batches(entries):
            self._send_batch(batch)
        return len(entries)

    def _send_batch(self, batch: list[dict]) -> None:
        pending = {str(index): entry for index, entry in enumerate(batch)}
        codes: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.retried_entries += len(pending)
                self.sleep(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 2)))
            try:
                response = self.client.send_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": entry_id, **entry} for entry_id, entry in pending.items()],
                )
            except Exception as exc:  # noqa: BLE001 - transport/service errors: retried like failed entries
                codes = [type(exc).__name__]
                LOG.warning("SendMessageBatch failed (%s), attempt %d of %d",
                            type(exc).__name__, attempt, self.max_attempts)
                continue
            failed = response.get("Failed") or []
            codes = sorted({str(item.get("Code", "unknown")) for item in failed})
            pending = {item["Id"]: pending[item["Id"]] for item in failed if item.get("Id") in pending}
            if not pending:
                return
            LOG.warning("SQS refused %d dead-letter entries (%s), attempt %d of %d",
                        len(pending), ",".join(codes), attempt, self.max_attempts)
        raise DeadLetterDeliveryError(
            f"{len(pending)} dead letters not accepted by SQS after {self.max_attempts} attempts "
            f"(codes: {','.join(codes) or 'none'})")


def resolve_queue(client, uri: str) -> str:
    """The queue URL of ``uri`` (``sqs://name`` asks GetQueueUrl)."""
    if uri.startswith("sqs://"):
        return client.get_queue_url(QueueName=uri[len("sqs://"):].strip("/"))["QueueUrl"]
    return uri


def sqs_client_for(uri: str):
    """An SQS client for the queue: region from an AWS queue URL, endpoint from a non-AWS one.

    ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_SQS``) wins when set.
    """
    from botocore.config import Config

    kwargs = {"config": Config(retries={"mode": "standard", "max_attempts": 8})}
    parsed = urlparse(uri) if uri.startswith(("http://", "https://")) else None
    if parsed is not None:
        match = _AWS_SQS_HOST.match(parsed.hostname or "")
        if match:
            kwargs["region_name"] = match.group(1)
        elif not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_SQS")):
            kwargs["endpoint_url"] = f"{parsed.scheme}://{parsed.netloc}"
    if "region_name" not in kwargs and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        kwargs["region_name"] = "us-east-1"
    return aws.client("sqs", **kwargs)


class CorruptPointer(ValueError):
    """A pointer message whose stored object is missing its promised bytes (size or sha256 differ)."""


def record_from_message(body: str, store: ObjectStore) -> dict:
    """The dead-letter record of a queue message body: the record itself, or the one a pointer names."""
    message = json.loads(body)
    if not isinstance(message, dict) or message.get("schema") != POINTER_SCHEMA:
        return message
    data = store.get_bytes(message["location"])
    if len(data) != message.get("bytes") or hashlib.sha256(data).hexdigest() != message.get("sha256"):
        raise CorruptPointer("a dead-letter pointer's stored object does not match its size and sha256")
    return json.loads(data)


def read_queue_records(queue_url: str, *, sqs=None, s3=None, delete: bool = False,
                       visibility_timeout: int = 300, empty_polls: int = 2, max_records: int = 1_000_000):
    """Yields the dead-letter records in a queue (pointers resolved), for demos, checks and re-drive.

    Messages stay invisible for ``visibility_timeout`` seconds while the drain
    runs, so each is seen once; ``delete=True`` deletes each after it was
    yielded (and its overflow object is kept: re-drive removes it after the
    payload is safely back). Stops after ``empty_polls`` empty one-second long
    polls or ``max_records`` records.
    """
    sqs = sqs or sqs_client_for(queue_url)
    store = ObjectStore(client=s3)
    seen, empty = 0, 0
    while empty < empty_polls and seen < max_records:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
            VisibilityTimeout=visibility_timeout).get("Messages", [])
        if not messages:
            empty += 1
            continue
        empty = 0
        for message in messages:
            yield record_from_message(message["Body"], store)
            seen += 1
            if delete:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


class _SendToQueueFn(beam.DoFn):
    """Buffers a bundle's dead letters and sends them in SQS batches."""

    FLUSH_RECORDS = 100

    def __init__(self, uri: str, overflow: Optional[str]):
        self.uri = uri
        self.overflow = overflow
        self.writer: Optional[SqsDeadLetterWriter] = None
        self.written = Metrics.counter(NAMESPACE, "dead_letters.written")
        self.overflowed = Metrics.counter(NAMESPACE, "dead_letters.overflowed")
        self.retried = Metrics.counter(NAMESPACE, "dead_letters.retried_entries")

    def setup(self):
        client = sqs_client_for(self.uri)
        self.writer = SqsDeadLetterWriter(
            client, resolve_queue(client, self.uri), overflow=self.overflow or _overflow_from_environment())

    def start_bundle(self):
        self.buffer: list[tuple[dict, beam_window.BoundedWindow, object]] = []

    def process(self, record: dict, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        self.buffer.append((record, window, timestamp))
        if len(self.buffer) >= self.FLUSH_RECORDS:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        if not self.buffer:
            return
        buffered, self.buffer = self.buffer, []
        writer = self.writer
        before_overflow, before_retried = writer.overflowed, writer.retried_entries
        sent = writer.send([record for record, _, _ in buffered])
        self.written.inc(sent)
        self.overflowed.inc(writer.overflowed - before_overflow)
        self.retried.inc(writer.retried_entries - before_retried)
        _, last_window, last_timestamp = buffered[-1]
        yield WindowedValue({"target": self.uri, "records": sent}, last_timestamp, [last_window])

    def teardown(self):
        self.writer = None


class _WriteJsonLinesFn(beam.DoFn):
    """Writes a bundle's dead letters of each window to JSON Lines files (see the module docstring)."""

    FLUSH_RECORDS = 10_000
    FLUSH_BYTES = 32 * 1024 * 1024

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.store: Optional[ObjectStore] = None
        self.written = Metrics.counter(NAMESPACE, "dead_letters.written")
        self.files = Metrics.counter(NAMESPACE, "dead_letters.files_written")

    def setup(self):
        self.store = ObjectStore()

    def start_bundle(self):
        self.buffers: dict = {}

    def process(self, record: dict, window=beam.DoFn.WindowParam):
        lines, size = self.buffers.setdefault(window, ([], [0]))
        line = to_json(record)
        lines.append(line)
        size[0] += len(line) + 1
        if len(lines) >= self.FLUSH_RECORDS or size[0] >= self.FLUSH_BYTES:
            del self.buffers[window]
            yield self._write(window, lines)

    def finish_bundle(self):
        buffers, self.buffers = self.buffers, {}
        for window, (lines, _) in buffers.items():
            yield self._write(window, lines)

    def _write(self, window, lines: list[str]) -> WindowedValue:
        data = ("\n".join(lines) + "\n").encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()[:24]
        start, end = _window_bounds(window)
        name = f"{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}-{digest}.jsonl"
        uri = join(self.prefix, f"date={start:%Y-%m-%d}", name)
        self.store.put_bytes(data, uri)
        self.written.inc(len(lines))
        self.files.inc()
        return WindowedValue({"target": uri, "records": len(lines)}, window.max_timestamp(), [window])


def _window_bounds(window) -> tuple[dt.datetime, dt.datetime]:
    if isinstance(window, beam_window.IntervalWindow):
        try:
            return (dt.datetime.fromtimestamp(window.start.micros / 1e6, dt.timezone.utc),
                    dt.datetime.fromtimestamp(window.end.micros / 1e6, dt.timezone.utc))
        except (OverflowError, OSError, ValueError):  # an element without a real timestamp
            pass
    now = dt.datetime.now(dt.timezone.utc)  # no real window: name files by the hour they were written
    hour = now.replace(minute=0, second=0, microsecond=0)
    return hour, hour + dt.timedelta(hours=1)


class WriteDeadLetters(beam.PTransform):
    """Dead-letter records -> an SQS queue or JSON Lines files, chosen by ``uri`` (module docstring).

    Returns a PCollection of delivery descriptors ``{"target": queue URL or file URI, "records": n}``.
    """

    def __init__(self, uri: str, *, overflow: Optional[str] = None, window_seconds: int = 60):
        super().__init__()
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"dead-letter uri must be a queue URL, path or s3:// prefix, got {uri!r}")
        if isinstance(window_seconds, bool) or not isinstance(window_seconds, int) or window_seconds <= 0:
            raise ValueError(f"window_seconds must be a positive integer, got {window_seconds!r}")
        if overflow is not None and (not isinstance(overflow, str) or not overflow.startswith("s3://")):
            raise ValueError(f"overflow must be an s3:// prefix, got {overflow!r}")
        self.to_queue = is_queue_uri(uri)
        if not self.to_queue:
            parse_uri(uri)  # raises ValueError naming a bad one
        self.uri = uri
        self.overflow = overflow
        self.window_seconds = window_seconds

    def expand(self, dead_letters):
        if self.to_queue:
            return dead_letters | "SendToQueue" >> beam.ParDo(_SendToQueueFn(self.uri, self.overflow))
        return (
            dead_letters
            | "WindowDeadLetters" >> beam.WindowInto(beam_window.FixedWindows(self.window_seconds))
            | "WriteJsonLines" >> beam.ParDo(_WriteJsonLinesFn(self.uri))
        )

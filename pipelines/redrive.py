"""Re-drive: put dead-lettered payloads back on the stream, then delete the dead letters.

Runbook. ``--dead_letter`` takes what the events pipeline's ``--dead_letter``
took: an SQS queue URL (or ``sqs://name``), or a local path / ``s3://`` prefix of
JSON Lines files. As SPEC.md says, a plain run re-drives; ``--summary`` and
``--dry_run`` change nothing.

1. Look (changes nothing; queue messages are made visible again at the end)::

       python -m pipelines.redrive --dead_letter=$EVENTLAKE_DEAD_LETTER_QUEUE_URL --summary

   prints, per stage and reason: how many, how many are re-drivable, the
   oldest and newest ``failed_at``.
2. Fix the cause (e.g. restore the users table), then select and preview::

       python -m pipelines.redrive --dead_letter=... --reason=enrichment_unavailable \\
           --since=2026-11-26T00:00:00Z --until=2026-11-27T00:00:00Z --limit=10000 --dry_run

   lists what would be re-driven (source positions, never payloads).
3. Re-drive the same selection (``--execute`` may be given; it is the default)::

       python -m pipelines.redrive --dead_letter=... --reason=enrichment_unavailable \\
           [--stream=$EVENTLAKE_STREAM]

Which stream: ``--stream``, else ``EVENTLAKE_STREAM``, else the stream each
dead letter was read from (its ``source.stream``). Dead letters with no Kinesis
source (a backfill's lines, the lake writer's rows) need ``--stream``; without
it they stay where they are and are counted as ``no_stream``.

What a re-drive does: each selected payload (``decode_payload``) is put on
the stream with ``PutRecords`` (up to 500 records / 5 MiB a call; partition key
the payload's ``user_id``, else ``anonymous_id``, else a hash of the payload);
failed entries are retried with backoff; a dead letter is deleted only after
Kinesis acknowledged its record (queue: the message, then its S3 overflow
object; files: the file is rewritten without the re-driven lines, atomically).
Entries still refused stay where they were and the exit code is 1.

Selection: ``--reason``/``--stage`` (repeatable or comma-separated),
``--since``/``--until`` on ``failed_at`` (RFC 3339; since inclusive, until
exclusive), ``--limit`` (at most N re-driven). Dead letters marked
``retryable: false`` (``invalid_json``, ``schema_violation``, the lake's
``write`` rows, ...) would fail the same way again and are skipped, and counted
as skipped, unless their reason or stage is named explicitly.

A pointer message whose S3 object is gone was re-driven already (only re-drive
deletes those objects, after the acknowledgement; SQS keeps a message deleted
with a stale receipt handle): its message is deleted and counted as
``already_redriven``.

Crash safety: a run killed at any point loses nothing. A record Kinesis has
acknowledged but whose dead letter was not yet deleted is re-driven again by
the next run: an at-least-once duplicate with the same ``event_id``, which
readers and compaction (``pipelines.compact``) dedupe. Queue messages a killed
run held become visible again after ``--visibility_timeout`` seconds (default
900; choose it longer than a run takes to scan the queue).

Not a Beam pipeline on purpose: deleting each dead letter after its own
acknowledgement needs the SQS receipt handle of the same receive, which a
distributed runner cannot hand from one step to another; one process drains
a queue at the rate Kinesis takes it (1,000 records/s per shard).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Callable, Iterable, Optional

from transforms.backfill import BACKFILL_STREAM
from transforms.dead_letter_store import (
    DeadLetterStoreError,
    OverflowObjectMissing,
    StoredDeadLetter,
    open_dead_letters,
)
from transforms.envelope import parse_rfc3339_ms

LOG = logging.getLogger("eventlake.pipelines.redrive")

MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024
MAX_PARTITION_KEY_CHARS = 256
_STREAM_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")


# -- selection -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which dead letters an operator asked for (module docstring, "Selection")."""

    reasons: frozenset = frozenset()
    stages: frozenset = frozenset()
    since_ms: Optional[int] = None
    until_ms: Optional[int] = None
    limit: Optional[int] = None

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if self.since_ms is not None and self.until_ms is not None and self.since_ms >= self.until_ms:
            raise ValueError("since must be before until")

    def matches(self, letter: StoredDeadLetter) -> bool:
        failure = letter.failure
        if self.reasons and failure.get("reason") not in self.reasons:
            return False
        if self.stages and failure.get("stage") not in self.stages:
            return False
        if self.since_ms is not None or self.until_ms is not None:
            failed_at = parse_rfc3339_ms(failure.get("failed_at"))
            if failed_at is None:
                return False
            if self.since_ms is not None and failed_at < self.since_ms:
                return False
            if self.until_ms is not None and failed_at >= self.until_ms:
                return False
        return True

    def redrivable(self, letter: StoredDeadLetter) -> bool:
        """Retryable, or named explicitly by reason or stage."""
        failure = letter.failure
        return (failure.get("retryable") is True or failure.get("reason") in self.reasons
                or failure.get("stage") in self.stages)


# -- Kinesis ---------------------------------------------------------------------------------------


def partition_key_of(payload: bytes) -> str:
    """``user_id``, else ``anonymous_id`` of the payload (as the ingress keys it), else a hash."""
    try:
        event = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        event = None
    if isinstance(event, dict):
        for name in ("user_id", "anonymous_id"):
            value = event.get(name)
            if isinstance(value, str) and 0 < len(value) <= MAX_PARTITION_KEY_CHARS:
                return value
    return "redrive-" + hashlib.sha256(payload).hexdigest()[:32]


class KinesisRepublisher:
    """``PutRecords`` in batches within the Kinesis limits, retrying failed entries with backoff."""

    RETRYABLE_CALL_ERRORS = frozenset({
        "ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException",
        "InternalFailure", "ServiceUnavailable", "KMSThrottlingException",
    })

    def __init__(self, client, stream: str, *, max_attempts: int = 8, backoff_seconds: float = 0.1,
                 max_backoff_seconds: float = 5.0, sleep: Callable[[float], None] = time.sleep):
        if not stream:
            raise ValueError("stream is required (--stream or EVENTLAKE_STREAM)")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        self.client = client
        self.stream = stream
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.sleep = sleep
        self.retried_entries = 0

    def put(self, records: list[tuple[bytes, str]]) -> list[bool]:
        """Puts ``(data, partition_key)`` records (one call's worth); True where Kinesis acknowledged."""
        acknowledged = [False] * len(records)
        pending = [i for i, (data, key) in enumerate(records)
                   if len(data) + len(key.encode("utf-8")) <= MAX_BYTES_PER_RECORD]
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            if attempt > 1:
                self.retried_entries += len(pending)
                self.sleep(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 2)))
            try:
                response = self.client.put_records(StreamName=self.stream, Records=[
                    {"Data": records[i][0], "PartitionKey": records[i][1]} for i in pending])
            except Exception as exc:  # noqa: BLE001 - decided by code below; no payload in the message
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
                if code not in self.RETRYABLE_CALL_ERRORS and not _is_connection_error(exc):
                    raise
                LOG.warning("PutRecords failed (%s), attempt %d of %d", code, attempt, self.max_attempts)
                continue
            still = []
            for i, entry in zip(pending, response["Records"]):
                if entry.get("SequenceNumber") and not entry.get("ErrorCode"):
                    acknowledged[i] = True
                else:
                    still.append(i)
            pending = still
        return acknowledged


def _is_connection_error(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError, ReadTimeoutError

    return isinstance(exc, (BotoConnectionError, ReadTimeoutError))


# -- the run ---------------------------------------------------------------------------------------


class _Group:
    __slots__ = ("count", "redrivable", "oldest", "newest")

    def __init__(self):
        self.count, self.redrivable, self.oldest, self.newest = 0, 0, None, None

    def add(self, letter: StoredDeadLetter, redrivable: bool) -> None:
        self.count += 1
        self.redrivable += int(redrivable)
        failed_at = letter.failure.get("failed_at")
        moment = parse_rfc3339_ms(failed_at)
        if moment is not None:
            if self.oldest is None or moment < self.oldest[0]:
                self.oldest = (moment, failed_at)
            if self.newest is None or moment > self.newest[0]:
                self.newest = (moment, failed_at)


def source_stream(letter: StoredDeadLetter) -> Optional[str]:
    """The Kinesis stream a dead letter was read from, if its source is one (not a backfill file or the lake)."""
    stream = letter.source.get("stream") if isinstance(letter.source, dict) else None
    if isinstance(stream, str) and stream != BACKFILL_STREAM and _STREAM_NAME.match(stream):
        return stream
    return None


class Redrive:
    """One re-drive run over a dead-letter store: ``summary``, ``dry_run`` or ``execute``.

    ``publisher_for(stream)`` gives the publisher of a stream; ``stream`` overrides each letter's own
    (:func:`source_stream`).
    """

    ACTIONS = ("summary", "dry_run", "execute")

    def __init__(self, store, selection: Selection, *, action: str = "summary",
                 publisher_for: Optional[Callable[[str], KinesisRepublisher]] = None,
                 stream: Optional[str] = None, out=None, batch_records: int = MAX_RECORDS_PER_CALL):
        if action not in self.ACTIONS:
            raise ValueError(f"action must be one of {self.ACTIONS}, got {action!r}")
        if isinstance(batch_records, bool) or not isinstance(batch_records, int) \
                or not 1 <= batch_records <= MAX_RECORDS_PER_CALL:
            raise ValueError(f"batch_records must be 1..{MAX_RECORDS_PER_CALL}, got {batch_records!r}")
        self.batch_records = batch_records
        if action == "execute" and publisher_for is None:
            raise ValueError("execute needs a publisher")
        self.store = store
        self.selection = selection
        self.action = action
        self.publisher_for = publisher_for
        self.publishers: dict[str, KinesisRepublisher] = {}
        self.stream = stream
        self.out = out
        self.groups: dict[tuple[str, str], _Group] = collections.defaultdict(_Group)
        self.counts = collections.Counter()

    def run(self) -> dict:
        held: list[StoredDeadLetter] = []  # looked at and left alone: released at the end
        batches: dict[str, list[tuple[StoredDeadLetter, bytes, str]]] = collections.defaultdict(list)
        batch_bytes: collections.Counter = collections.Counter()
        try:
            for letter in self.store.scan():
                self.counts["scanned"] += 1
                if self._limit_reached():
                    held.append(letter)
                    break
                if not self.selection.matches(letter):
                    held.append(letter)
                    continue
                redrivable = self.selection.redrivable(letter)
                self.groups[(str(letter.failure.get("stage")), str(letter.failure.get("reason")))].add(
                    letter, redrivable)
                self.counts["selected"] += 1
                if not redrivable:
                    self.counts["skipped_not_redrivable"] += 1
                    held.append(letter)
                    continue
                stream = self.stream or source_stream(letter)
                if stream is None:
                    self.counts["no_stream"] += 1
                    held.append(letter)
                    continue
                if self.action != "execute":
                    self.counts["would_redrive"] += 1
                    if self.action == "dry_run":
                        self._say(f"would re-drive {_position(letter)} to={stream}")
                    held.append(letter)
                    continue
                try:
                    payload = letter.payload()
                except OverflowObjectMissing:
                    LOG.warning("a pointer's overflow object is gone: already re-driven, deleting its message")
                    self.counts["already_redriven"] += 1
                    self.store.delete([letter])
                    continue
                except (DeadLetterStoreError, ValueError, KeyError, TypeError) as exc:
                    LOG.warning("a dead letter's payload cannot be read (%s); left in place", type(exc).__name__)
                    self.counts["unreadable"] += 1
                    held.append(letter)
                    continue
                key = partition_key_of(payload)
                size = len(payload) + len(key.encode("utf-8"))
                batch = batches[stream]
                if batch and (len(batch) == self.batch_records or batch_bytes[stream] + size > MAX_BYTES_PER_CALL):
                    held.extend(self._flush(stream, batch))
                    batches[stream], batch_bytes[stream] = [], 0
                batches[stream].append((letter, payload, key))
                batch_bytes[stream] += size
                self.counts["queued"] += 1
            for stream, batch in batches.items():
                if batch:
                    held.extend(self._flush(stream, batch))
        finally:
            if held:
                self.store.release(held)
        return self.report()

    def _limit_reached(self) -> bool:
        limit = self.selection.limit
        done = self.counts["queued"] if self.action == "execute" else self.counts["would_redrive"]
        return limit is not None and done >= limit

    def _flush(self, stream: str, batch) -> list[StoredDeadLetter]:
        """Publishes one batch to ``stream`` and deletes what Kinesis acknowledged; returns the letters left alone."""
        if stream not in self.publishers:
            self.publishers[stream] = self.publisher_for(stream)
        acknowledged = self.publishers[stream].put([(payload, key) for _, payload, key in batch])
        done = [letter for (letter, _, _), ok in zip(batch, acknowledged) if ok]
        failed = [letter for (letter, _, _), ok in zip(batch, acknowledged) if not ok]
        self.counts["redriven"] += len(done)
        self.counts["failed"] += len(failed)
        if done:
            self.counts["deleted"] += self.store.delete(done)
        LOG.info("re-drove %d dead letters (%d refused by Kinesis)", len(done), len(failed))
        return failed

    def report(self) -> dict:
        groups = [{
            "stage": stage, "reason": reason, "count": group.count, "redrivable": group.redrivable,
            "oldest_failed_at": group.oldest[1] if group.oldest else None,
            "newest_failed_at": group.newest[1] if group.newest else None,
        } for (stage, reason), group in sorted(self.groups.items())]
        keys = ("scanned", "selected", "skipped_not_redrivable", "no_stream", "would_redrive", "unreadable",
                "already_redriven", "redriven", "failed", "deleted")
        return {"action": self.action, "dead_letter": self.store.describe(), "groups": groups,
                **{key: self.counts[key] for key in keys}}

    def _say(self, line: str) -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)


def _position(letter: StoredDeadLetter) -> str:
    """Where a dead letter came from: stage, reason and source position (no payload)."""
    source, failure = letter.source, letter.failure
    return (f"{failure.get('stage')}/{failure.get('reason')} failed_at={failure.get('failed_at')} "
            f"stream={source.get('stream')} shard={source.get('shard_id')} "
            f"sequence={source.get('sequence_number')}")


def format_report(report: dict) -> str:
    lines = [f"dead letters in {report['dead_letter']} ({report['action']}): "
             f"{report['scanned']} scanned, {report['selected']} selected"]
    lines.append(f"  {'count':>7}  {'redrivable':>10}  {'oldest failed_at':<26}{'newest failed_at':<26}stage/reason")
    for group in report["groups"]:
        lines.append(f"  {group['count']:7d}  {group['redrivable']:10d}  {group['oldest_failed_at'] or '-':<26}"
                     f"{group['newest_failed_at'] or '-':<26}{group['stage']}/{group['reason']}")
    if report["skipped_not_redrivable"]:
        lines.append(f"  {report['skipped_not_redrivable']} selected dead letters are not retryable and were skipped "
                     "(name their --reason or --stage to re-drive them anyway)")
    if report["no_stream"]:
        lines.append(f"  {report['no_stream']} selected dead letters were not read from Kinesis (backfill lines, lake "
                     "rows) and were left in place: name the stream with --stream to re-drive them")
    if report["action"] == "execute":
        lines.append(f"  re-driven {report['redriven']}, dead letters deleted {report['deleted']}, "
                     f"refused by Kinesis {report['failed']}, unreadable {report['unreadable']}")
    else:
        lines.append(f"  would re-drive {report['would_redrive']} (nothing changed; run without --dry_run/--summary to re-drive)")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------


def _names(values: Optional[list[str]]) -> frozenset:
    return frozenset(name.strip() for value in values or [] for name in value.split(",") if name.strip())


def _moment(text: Optional[str], flag: str) -> Optional[int]:
    if text is None:
        return None
    value = parse_rfc3339_ms(text)
    if value is None:
        raise ValueError(f"{flag} must be an RFC 3339 time with an offset, got {text!r}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.redrive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dead_letter", required=True, help="SQS queue URL, sqs://name, local path or s3:// prefix")
    parser.add_argument("--stream", default=os.environ.get("EVENTLAKE_STREAM"),
                        help="Kinesis stream to re-drive to (default: EVENTLAKE_STREAM, else the stream each dead "
                             "letter was read from)")
    parser.add_argument("--reason", action="append", help="select by failure reason (repeatable, comma-separated)")
    parser.add_argument("--stage", action="append", help="select by failure stage (repeatable, comma-separated)")
    parser.add_argument("--since", help="select failed_at >= this RFC 3339 time")
    parser.add_argument("--until", help="select failed_at < this RFC 3339 time")
    parser.add_argument("--limit", type=int, help="re-drive at most N dead letters")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--summary", action="store_true", help="count by stage and reason; change nothing")
    action.add_argument("--dry_run", action="store_true", help="list what would be re-driven; change nothing")
    action.add_argument("--execute", action="store_true",
                        help="re-drive the selection and delete its dead letters (the default)")
    parser.add_argument("--visibility_timeout", type=int, default=900,
                        help="seconds queue messages stay hidden while a run holds them")
    parser.add_argument("--batch_records", type=int, default=MAX_RECORDS_PER_CALL,
                        help="records per PutRecords call (1..500); dead letters are deleted per call")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def run(argv: Optional[list[str]] = None, *, kinesis=None, sqs=None, s3=None, out=sys.stdout,
        sleep: Callable[[float], None] = time.sleep) -> dict:
    """Runs one re-drive from command-line arguments; returns the report (clients and sleep: for tests)."""
    args = parse_args(argv)
    selection = Selection(_names(args.reason), _names(args.stage), _moment(args.since, "--since"),
                          _moment(args.until, "--until"), args.limit)
    action = "summary" if args.summary else "dry_run" if args.dry_run else "execute"
    if args.stream is not None and not _STREAM_NAME.match(args.stream):
        raise ValueError(f"--stream must be a Kinesis stream name, got {args.stream!r}")
    publisher_for = None
    if action == "execute":
        if kinesis is None:
            import boto3

            kinesis = boto3.client("kinesis")
        publisher_for = lambda stream: KinesisRepublisher(kinesis, stream, sleep=sleep)  # noqa: E731
    store = open_dead_letters(args.dead_letter, sqs=sqs, s3=s3, visibility_timeout=args.visibility_timeout)
    report = Redrive(store, selection, action=action, publisher_for=publisher_for, stream=args.stream or None,
                     out=out, batch_records=args.batch_records).run()
    print(json.dumps({"eventlake_redrive": report}) if args.json else format_report(report), file=out, flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        report = run(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if report["failed"] or report["unreadable"] or report["no_stream"] else 0


if __name__ == "__main__":
    sys.exit(main())

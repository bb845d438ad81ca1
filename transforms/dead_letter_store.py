"""Where dead letters rest, read back for operators: an SQS queue or JSON Lines files.

Re-drive (``pipelines.redrive``) needs three things from a dead-letter output
that the sinks (``transforms.dead_letter_sinks``) only write: list the
records, release the ones it leaves alone, and delete a record once its
payload is safely back on the stream. ``open_dead_letters(uri)`` picks the
store from the same URIs the events pipeline's ``--dead_letter`` takes:

* ``QueueDeadLetters``: an SQS queue (URL or ``sqs://name``). Messages are
  received with a visibility timeout long enough for the whole run, so each is
  seen once; ``release`` makes the ones not acted on visible again at once.
  ``delete`` removes the message first and then its S3 overflow object (a
  crash between the two leaves an orphan object, never a pointer to nothing).
  Pointer messages are summarized from the ``failure`` they carry, and their
  object is fetched (and its sha256 checked) only when the payload is needed.
* ``JsonLinesDeadLetters``: the ``*.jsonl`` files under a local path or an
  ``s3://`` prefix. ``delete`` rewrites each file without the deleted lines
  (one atomic whole-object write, ``ObjectStore.put_bytes``), and removes a
  file left empty. A crash before the rewrite leaves the lines in place (they
  are re-driven again: an at-least-once duplicate the lake dedupes).

Nothing here logs or raises with a payload: only counts, file names and codes.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from typing import Iterator, NamedTuple, Optional

from transforms.dead_letter import decode_payload
from transforms.dead_letter_sinks import (
    POINTER_SCHEMA,
    is_queue_uri,
    record_from_message,
    resolve_queue,
    sqs_client_for,
)
from transforms.object_store import ObjectStore, parse_uri

LOG = logging.getLogger("eventlake.transforms.dead_letter_store")
SQS_MAX_BATCH = 10
NOT_A_DEAD_LETTER = {"stage": "unknown", "reason": "not_a_dead_letter", "retryable": False}


class DeadLetterStoreError(RuntimeError):
    """A dead letter could not be read or deleted (the message says which, never what it holds)."""


class OverflowObjectMissing(DeadLetterStoreError):
    """A pointer message whose S3 object is gone.

    Only re-drive deletes overflow objects, after Kinesis acknowledged the
    payload and after asking SQS to delete the message; SQS silently keeps a
    message deleted with a stale receipt handle (it was received again
    meanwhile). Such a pointer is a dead letter already re-driven.
    """


class StoredDeadLetter:
    """One dead letter as stored: its ``failure`` and ``source`` at once, its record on demand.

    ``handle`` says where it lives (a receipt handle and overflow location, or
    a file and line number); only the store that yielded it understands it.
    """

    __slots__ = ("failure", "source", "handle", "_record", "_load")

    def __init__(self, failure: dict, source: dict, handle, *, record: Optional[dict] = None, load=None):
        self.failure = failure or {}
        self.source = source or {}
        self.handle = handle
        self._record = record
        self._load = load

    @property
    def record(self) -> dict:
        if self._record is None:
            self._record = self._load()
        return self._record

    def payload(self) -> bytes:
        """The original bytes (``transforms.dead_letter.decode_payload``)."""
        return decode_payload(self.record)


def open_dead_letters(uri: str, *, sqs=None, s3=None, visibility_timeout: int = 900):
    """The store behind a ``--dead_letter`` URI."""
    if is_queue_uri(uri):
        return QueueDeadLetters(uri, sqs=sqs, s3=s3, visibility_timeout=visibility_timeout)
    return JsonLinesDeadLetters(uri, s3=s3)


# -- SQS -------------------------------------------------------------------------------------------


class _QueueHandle(NamedTuple):
    receipt_handle: str
    overflow: Optional[str]  # the S3 object of a pointer message


class QueueDeadLetters:
    """Dead letters in an SQS queue (module docstring)."""

    def __init__(self, uri: str, *, sqs=None, s3=None, visibility_timeout: int = 900,
                 empty_polls: int = 2, wait_seconds: int = 1, max_messages: int = 10_000_000):
        if isinstance(visibility_timeout, bool) or not isinstance(visibility_timeout, int) \
                or not 0 < visibility_timeout <= 43_200:
            raise ValueError(f"visibility_timeout must be 1..43200 seconds, got {visibility_timeout!r}")
        if isinstance(empty_polls, bool) or not isinstance(empty_polls, int) or empty_polls < 1:
            raise ValueError(f"empty_polls must be a positive integer, got {empty_polls!r}")
        self.sqs = sqs or sqs_client_for(uri)
        self.queue_url = resolve_queue(self.sqs, uri)
        self.store = ObjectStore(client=s3)
        self.visibility_timeout = visibility_timeout
        self.empty_polls = empty_polls
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages

    def scan(self) -> Iterator[StoredDeadLetter]:
        """Every message in the queue, each once (they stay invisible until released or deleted)."""
        empty, seen = 0, 0
        message_ids: set[str] = set()
        while empty < self.empty_polls and seen < self.max_messages:
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=SQS_MAX_BATCH, WaitTimeSeconds=self.wait_seconds,
                VisibilityTimeout=self.visibility_timeout).get("Messages", [])
            if not messages:
                empty += 1
                continue
            empty = 0
            again = [m for m in messages if m.get("MessageId") in message_ids]
            if again:  # held longer than the visibility timeout: this run keeps its first sighting
                LOG.warning("%d queue messages were received twice in one scan; raise the visibility timeout",
                            len(again))
            messages = [m for m in messages if m.get("MessageId") not in message_ids]
            if not messages:  # only messages this scan holds already: it has gone round the queue
                empty += 1
                continue
            message_ids.update(m.get("MessageId") for m in messages)
            letters = [self._letter(message) for message in messages]
            for index, letter in enumerate(letters):
                seen += 1
                try:
                    yield letter
                except GeneratorExit:  # the caller stopped early: the rest of this receive goes back
                    self.release(letters[index + 1:])
                    raise

    def _letter(self, message: dict) -> StoredDeadLetter:
        body = message["Body"]
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        handle = _QueueHandle(message["ReceiptHandle"], None)
        if not isinstance(parsed, dict):  # not ours: shown in the summary, never re-driven by default

            def unreadable():
                raise DeadLetterStoreError("a queue message is not a dead-letter record (not a JSON object)")

            return StoredDeadLetter(NOT_A_DEAD_LETTER, {}, handle, load=unreadable)
        if parsed.get("schema") == POINTER_SCHEMA:
            handle = handle._replace(overflow=parsed.get("location"))
            return StoredDeadLetter(parsed.get("failure"), parsed.get("source"), handle,
                                    load=lambda: self._resolve(body))
        return StoredDeadLetter(parsed.get("failure"), parsed.get("source"), handle, record=parsed)

    def _resolve(self, body: str) -> dict:
        try:
            return record_from_message(body, self.store)
        except FileNotFoundError:
            raise OverflowObjectMissing("a pointer's overflow object is gone") from None
        except Exception as exc:  # noqa: BLE001 - botocore's NoSuchKey is generated per client
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise OverflowObjectMissing("a pointer's overflow object is gone") from None
            raise

    def delete(self, letters: list[StoredDeadLetter]) -> int:
        """Deletes the messages, then their overflow objects; returns how many messages went."""
        deleted = 0
        for start in range(0, len(letters), SQS_MAX_BATCH):
            chunk = letters[start:start + SQS_MAX_BATCH]
            response = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": letter.handle.receipt_handle} for i, letter in enumerate(chunk)])
            failed = {item["Id"] for item in response.get("Failed") or []}
            if failed:
                # The message comes back after its visibility timeout and is re-driven again (a duplicate).
                LOG.warning("SQS did not delete %d re-driven dead letters; they will be re-driven again",
                            len(failed))
            for i, letter in enumerate(chunk):
                if str(i) in failed:
                    continue
                deleted += 1
                if letter.handle.overflow:
                    _delete_object(self.store, letter.handle.overflow)
        return deleted

    def release(self, letters: list[StoredDeadLetter]) -> None:
        """Makes messages visible again at once (the ones a run looked at but left alone)."""
        for start in range(0, len(letters), SQS_MAX_BATCH):
            chunk = letters[start:start + SQS_MAX_BATCH]
            self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": letter.handle.receipt_handle, "VisibilityTimeout": 0}
                for i, letter in enumerate(chunk)])

    def describe(self) -> str:
        return f"queue {self.queue_url}"


# -- JSON Lines ------------------------------------------------------------------------------------


class _LineHandle(NamedTuple):
    uri: str
    line: int  # 1-based among the file's non-empty lines, for messages
    text: bytes  # the line itself: deletes match content, so a file rewritten meanwhile is still right


class JsonLinesDeadLetters:
    """Dead letters in ``*.jsonl`` files under a local path or ``s3://`` prefix (module docstring)."""

    def __init__(self, prefix: str, *, s3=None):
        self.location = parse_uri(prefix)  # ValueError names a bad one
        self.prefix = prefix.rstrip("/") if self.location.scheme == "s3" else self.location.key
        self.store = ObjectStore(client=s3)

    def files(self) -> list[str]:
        """The JSON Lines files, sorted (their names start with the window, so oldest first)."""
        if self.location.scheme == "s3":
            return sorted(f"s3://{self.location.bucket}/{key}" for key in _list_keys(
                self.store.client, self.location.bucket, self.location.key) if key.endswith(".jsonl"))
        found = []
        for directory, subdirectories, names in os.walk(self.location.key):
            subdirectories[:] = [d for d in subdirectories if not d.startswith((".", "_"))]
            found.extend(os.path.join(directory, n) for n in names if n.endswith(".jsonl") and not n.startswith("."))
        return sorted(found)

    def scan(self) -> Iterator[StoredDeadLetter]:
        for uri in self.files():
            for index, line in enumerate(_lines(self.store.get_bytes(uri))):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DeadLetterStoreError(f"line {index + 1} of {uri} is not JSON") from None
                if not isinstance(record, dict):
                    raise DeadLetterStoreError(f"line {index + 1} of {uri} is not a dead-letter record")
                yield StoredDeadLetter(record.get("failure"), record.get("source"), _LineHandle(uri, index + 1, line),
                                       record=record)

    def delete(self, letters: list[StoredDeadLetter]) -> int:
        """Rewrites each file without the given lines (removing a file left empty); returns lines removed."""
        by_file: dict[str, collections.Counter] = {}
        for letter in letters:
            by_file.setdefault(letter.handle.uri, collections.Counter())[letter.handle.text] += 1
        removed = 0
        for uri, drop in by_file.items():
            try:
                lines = _lines(self.store.get_bytes(uri))
            except FileNotFoundError:
                continue  # another run removed it already
            kept = []
            for line in lines:
                if drop[line] > 0:
                    drop[line] -= 1
                else:
                    kept.append(line)
            if kept:
                self.store.put_bytes(b"\n".join(kept) + b"\n", uri)
            else:
                _delete_object(self.store, uri)
            removed += len(lines) - len(kept)
        return removed

    def release(self, letters: list[StoredDeadLetter]) -> None:
        """Nothing to release: reading a file changes nothing."""

    def describe(self) -> str:
        return f"JSON Lines files under {self.prefix}"


def _lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


def _list_keys(client, bucket: str, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=(prefix + "/") if prefix else ""):
        for item in page.get("Contents") or []:
            yield item["Key"]


def _delete_object(store: ObjectStore, uri: str) -> None:
    """Deletes an object or local file; one already gone is fine (deletes are repeated after a crash)."""
    where = parse_uri(uri)
    if where.scheme == "s3":
        store.client.delete_object(Bucket=where.bucket, Key=where.key)
        return
    try:
        os.remove(where.key)
    except FileNotFoundError:
        pass

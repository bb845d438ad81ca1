"""Putting accepted events on Kinesis: micro-batched, retried, acknowledged.

Requests hand their records to :meth:`KinesisPublisher.publish` and wait. A few
sender threads drain one shared queue into ``PutRecords`` calls within the
Kinesis limits (500 records, 5 MiB per call), so concurrent requests share
calls.

Calls are coalesced: a call that is not full starts only when no other call of
the process is in flight, or when the latest one has been in flight for
``hold_s`` (200 ms by default, so one slow call does not hold back the rest).
Records that arrive meanwhile leave together once it returns. More calls run in
parallel when a full call's worth is waiting, and a retry after its backoff
starts when it is due, so the senders still add throughput under a backlog or
partial throttling. Every call costs a connection, signing and a round trip on
top of its records: with four senders always sending, the bench's calls carried
230 records on average and the ingress reached 0.75-0.83 of the emulator's
PutRecords ceiling; coalesced, they carry ~490 and it reached 0.81-0.91.

Only the failed entries of a partial failure are put again, with
exponential backoff and full jitter, bounded in attempts and time. ``publish``
returns once Kinesis acknowledged every record of the request, or raises
:class:`PublishFailed`; then none of the request counts as accepted (records of
it that did reach the stream are at-least-once duplicates the lake dedupes by
``event_id``). Entries of a request that already failed are not sent.
"""
from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import weakref
from typing import Callable, Optional, Sequence

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ingress.metrics import IngressMetrics

log = logging.getLogger("ingress.publisher")

MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024
RETRYABLE_CALL_ERRORS = {
    "ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException",
    "Throttling", "InternalFailure", "InternalServerError", "ServiceUnavailable", "KMSThrottlingException",
    "RequestTimeout", "RequestTimeoutException",
}


class PublishFailed(Exception):
    """Kinesis did not acknowledge every record in time; answer 503 with ``retry_after``."""

    def __init__(self, reason: str, retry_after: int = 2):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Submission:
    """One request's records: done when all are acknowledged or one has failed."""

    __slots__ = ("remaining", "failed", "reason", "deadline", "done", "_lock")

    def __init__(self, count: int, deadline: float):
        self.remaining = count
        self.failed = False
        self.reason = ""
        self.deadline = deadline
        self.done = threading.Event()
        self._lock = threading.Lock()

    def ack(self) -> None:
        with self._lock:
            self.remaining -= 1
            if self.remaining <= 0:
                self.done.set()

    def fail(self, reason: str) -> None:
        with self._lock:
            if not self.failed:
                self.failed, self.reason = True, reason
            self.done.set()


class _Entry:
    __slots__ = ("submission", "data", "partition_key", "size")

    def __init__(self, submission: _Submission, data: bytes, partition_key: str):
        self.submission = submission
        self.data = data
        self.partition_key = partition_key
        self.size = len(data) + len(partition_key.encode("utf-8"))


def default_kinesis_client(*, timeout_s: float, pool: int):
    """A boto3 Kinesis client that does not retry by itself (the publisher does).

    botocore's parameter validation is off: it walked every record of every call (4 % of the ingress's CPU under
    load) to check what the ingress already bounds (record size here, partition key = a validated 1-128 character
    identity); Kinesis itself still refuses a bad request.
    """
    return boto3.client("kinesis", config=Config(
        parameter_validation=False,
        retries={"total_max_attempts": 1},
        connect_timeout=min(2.0, timeout_s),
        read_timeout=min(10.0, max(1.0, timeout_s)),
        max_pool_connections=pool,
    ))


class KinesisPublisher:
    """See the module docstring. Threads and the client start on first use, per process."""

    def __init__(self, stream: str, *, client_factory: Optional[Callable[[], object]] = None,
                 max_attempts: int = 5, timeout_s: float = 10.0, senders: int = 4,
                 metrics: Optional[IngressMetrics] = None, backoff_base_s: float = 0.05,
                 backoff_cap_s: float = 1.0, ready_cache_s: float = 2.0, hold_s: float = 0.2):
        if not stream:
            raise ValueError("stream is required")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if senders < 1:
            raise ValueError(f"senders must be >= 1, got {senders}")
        if hold_s < 0:
            raise ValueError(f"hold_s must be >= 0, got {hold_s}")
        self.hold_s = hold_s
        self.stream = stream
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.senders = senders
        self.metrics = metrics or IngressMetrics()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.ready_cache_s = ready_cache_s
        self._client_factory = client_factory or (
            lambda: default_kinesis_client(timeout_s=timeout_s, pool=senders + 2))
        self._closing = False
        self._ready_at = 0.0
        self._ready = False
        self._fresh_process_state()
        _PUBLISHERS.add(self)  # weakly: a publisher no one holds is not kept for the fork handler

    def _fresh_process_state(self) -> None:
        """What belongs to one process: its client, sender threads, queue and the counts the senders keep.

        A forked child (gunicorn ``--preload`` with a publisher started in the master) has none of its parent's
        threads: it starts from this, not from a copy of the parent's state at the instant of the fork, where the
        condition's lock could be held by a sender that no longer exists, and ``_busy``/``_in_flight`` would count
        calls no thread of the child will ever finish (close() would wait for them, new records would be held
        behind them). The parent's queued records are its requests'; nobody in the child waits for them.
        """
        self._client = None
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._busy = 0  # senders holding a batch (close() waits for them)
        self._in_flight = 0  # of those, the ones in a call rather than in a retry's backoff
        self._call_started = 0.0  # when the latest call went into flight
        self._threads: list[threading.Thread] = []

    # -- request side ------------------------------------------------------
    def publish(self, records: Sequence[tuple[bytes, str]]) -> None:
        """Put ``(data, partition_key)`` records; returns when all are acknowledged."""
        if not records:
            return
        started = time.monotonic()
        submission = _Submission(len(records), started + self.timeout_s)
        entries = [_Entry(submission, data, key) for data, key in records]
        if any(entry.size > MAX_BYTES_PER_RECORD for entry in entries):
            raise ValueError("a record exceeds the Kinesis record limit")
        self._start()
        with self._cond:
            if self._closing:
                raise PublishFailed("shutting_down", retry_after=1)
            self._queue.extend(entries)
            self._queued_bytes += sum(entry.size for entry in entries)
            self._cond.notify()
        # The senders bound every entry by the deadline; the margin covers one last call.
        finished = submission.done.wait(self.timeout_s + 15.0)
        if not finished:
            submission.fail("timeout")
        self.metrics.publish_seconds.observe(time.monotonic() - started)
        if submission.failed:
            raise PublishFailed(submission.reason)

    # -- sender side -------------------------------------------------------
    def _start(self) -> None:
        """Starts this process's sender threads, once (a forked child has none: ``_fresh_process_state``)."""
        if self._threads:
            return
        with self._cond:
            if self._threads:
                return
            self._threads = [threading.Thread(target=self._run, name=f"kinesis-sender-{i}", daemon=True)
                             for i in range(self.senders)]
            for thread in self._threads:
                thread.start()

    def warm(self) -> None:
        """Start this process's sender threads and Kinesis client now rather than on the first request (the
        client loads botocore's service model: ~0.1 s of CPU that the first requests of a worker waited for)."""
        self._start()
        self.client()

    def client(self):
        """The Kinesis client of this process (a forked worker makes its own: ``_fresh_process_state``)."""
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _pop(self) -> _Entry:
        entry = self._queue.popleft()
        self._queued_bytes -= entry.size
        return entry

    def _hold_left(self, now: float) -> float:
        """How long waiting records are still held back (module docstring); 0 when a sender may take them now: no
        call in flight, a full call's worth waiting, the latest call in flight for ``hold_s``, or closing."""
        if (not self._in_flight or self._closing or len(self._queue) >= MAX_RECORDS_PER_CALL
                or self._queued_bytes >= MAX_BYTES_PER_CALL):
            return 0.0
        return max(0.0, self._call_started + self.hold_s - now)

    def _enter_flight(self) -> None:
        self._in_flight += 1
        self._call_started = time.monotonic()

    def _take_batch(self) -> list[_Entry]:
        batch, size = [], 0
        now = time.monotonic()
        while self._queue and len(batch) < MAX_RECORDS_PER_CALL:
            entry = self._queue[0]
            if entry.submission.failed:
                self._pop()
                continue
            if now >= entry.submission.deadline:
                self._pop()
                entry.submission.fail("timeout")
                continue
            if size + entry.size > MAX_BYTES_PER_CALL:
                break
            batch.append(self._pop())
            size += entry.size
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._queue:
                        if self._closing:
                            return
                        self._cond.wait()
                        continue
                    held = self._hold_left(time.monotonic())
                    if not held:
                        break
                    self._cond.wait(held)
                batch = self._take_batch()
                self._busy += 1
                self._enter_flight()
                if self._queue and not self._hold_left(time.monotonic()):
                    self._cond.notify()  # a full call's worth is still waiting: another sender may take it
            try:
                if batch:
                    self._send(batch)
            except Exception as exc:  # noqa: BLE001 - a sender must never die with entries unanswered
                log.error("publisher error", extra={"fields": {"error_type": type(exc).__name__}})
                for entry in batch:
                    entry.submission.fail("publisher_error")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _back_off(self, delay: float) -> None:
        """Sleep before a retry out of flight: records of other requests need not wait for this one's backoff."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
        try:
            time.sleep(delay)
        finally:
            with self._cond:
                self._enter_flight()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * (2 ** (attempt - 1))))

    def _send(self, batch: list[_Entry]) -> None:
        pending = batch
        attempt = 0
        while pending:
            pending = [entry for entry in pending if not entry.submission.failed]
            if not pending:
                return
            attempt += 1
            failed, retryable, reason = self._put(pending)
            if not failed:
                return
            delay = self._backoff(attempt)
            deadline = min(entry.submission.deadline for entry in failed)
            if not retryable or attempt >= self.max_attempts or time.monotonic() + delay >= deadline:
                log.warning("records not acknowledged", extra={"fields": {
                    "records": len(failed), "attempts": attempt, "reason": reason}})
                for entry in failed:
                    entry.submission.fail(reason)
                return
            self.metrics.kinesis_retries.inc(len(failed))
            self._back_off(delay)
            pending = failed

    def _put(self, entries: list[_Entry]) -> tuple[list[_Entry], bool, str]:
        """One PutRecords call: (entries to put again, whether retrying may help, reason)."""
        try:
            response = self.client().put_records(
                StreamName=self.stream,
                Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e in entries],
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            retryable = code in RETRYABLE_CALL_ERRORS or status >= 500
            self.metrics.kinesis_calls.labels("throttled" if "Throughput" in code or "Throttl" in code
                                              else "error").inc()
            return entries, retryable, "kinesis_throttled" if "Throughput" in code else "kinesis_error"
        except (BotoCoreError, OSError) as exc:
            self.metrics.kinesis_calls.labels("unreachable").inc()
            log.warning("kinesis call failed", extra={"fields": {"error_type": type(exc).__name__}})
            return entries, True, "kinesis_unavailable"
        results = response.get("Records") or []
        if len(results) != len(entries):  # not a valid answer: nothing can be trusted as acknowledged
            self.metrics.kinesis_calls.labels("error").inc()
            return entries, True, "kinesis_error"
        failed = []
        for entry, result in zip(entries, results):
            if result.get("ErrorCode") or not result.get("SequenceNumber"):
                failed.append(entry)
            else:
                entry.submission.ack()
        self.metrics.kinesis_calls.labels("partial" if failed else "ok").inc()
        return failed, True, "kinesis_throttled"

    # -- lifecycle ---------------------------------------------------------
    def ready(self) -> bool:
        """Whether the stream takes records (ACTIVE or UPDATING); cached briefly."""
        now = time.monotonic()
        if now - self._ready_at < self.ready_cache_s:
            return self._ready
        try:
            summary = self.client().describe_stream_summary(StreamName=self.stream)
            status = summary["StreamDescriptionSummary"]["StreamStatus"]
            self._ready = status in ("ACTIVE", "UPDATING")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            log.warning("stream not usable", extra={"fields": {"error_type": type(exc).__name__}})
            self._ready = False
        self._ready_at = time.monotonic()
        return self._ready

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking records and wait for the queued ones; True when drained."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            drained = not self._queue and not self._busy
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return drained


#: Every live publisher of this process, for the fork handler below (registered once: handlers cannot be removed).
_PUBLISHERS: "weakref.WeakSet[KinesisPublisher]" = weakref.WeakSet()


def _fresh_after_fork() -> None:
    """In a forked child, before anything else runs in it: every publisher starts over (``_fresh_process_state``)."""
    for publisher in list(_PUBLISHERS):
        publisher._fresh_process_state()


os.register_at_fork(after_in_child=_fresh_after_fork)


class DiscardPublisher:
    """BENCHMARK ONLY (``EVENTLAKE_PUBLISHER=discard``): acknowledges and throws records away.

    Measures the ingress's own cost without Kinesis. Never use it in production:
    every event it "accepts" is lost.
    """

    stream = "discard"

    def __init__(self, metrics: Optional[IngressMetrics] = None):
        self.metrics = metrics or IngressMetrics()
        self.discarded = 0

    def publish(self, records: Sequence[tuple[bytes, str]]) -> None:
        started = time.monotonic()
        self.discarded += sum(len(data) for data, _ in records)
        self.metrics.publish_seconds.observe(time.monotonic() - started)

    def warm(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def close(self, timeout: float = 30.0) -> bool:
        return True

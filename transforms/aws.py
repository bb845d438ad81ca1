"""AWS clients for the pipeline's workers: one boto3 session per process, shared by every client.

Why one session: a session loads botocore's endpoint and service models anew
(~9 MB and a model load a session), and workers build clients in every DoFn
``setup`` and every Kinesis reader. On Prism a reader, with its client, is
rebuilt whenever a read resumes on another DoFn instance (Beam's reader cache
is per instance): a session per client grew the stream's worker by ~1 GB in
three minutes at 2,000 ev/s (docs/benchmarks.md, stop 16).

Why not boto3's default session: building clients on a session is not
thread-safe (the SDK harness runs ``setup`` on several threads), so ours is
used under a lock; clients themselves are thread-safe. And its responses'
epoch timestamps (every Kinesis record's ``ApproximateArrivalTimestamp``) are
read by :func:`epoch_timestamp`: botocore's own parser builds a ``dateutil``
local time zone per value, which measured a tenth of the streaming pipeline's
CPU.

Endpoint, region and credentials come from the standard ``AWS_*`` settings
(``AWS_ENDPOINT_URL`` included) unless the caller passes them. Static
credentials are read once per process; refreshable ones (roles) refresh.
"""
from __future__ import annotations

import datetime as dt
import os
import threading

_SESSION = None
_LOCK = threading.Lock()


def client(service: str, **kwargs):
    """A boto3 client for ``service`` from the process's shared session (``kwargs`` as ``Session.client``)."""
    with _LOCK:
        return _session().client(service, **kwargs)


def _session():
    """The process's one session (the caller holds ``_LOCK``)."""
    global _SESSION
    if _SESSION is None:
        import boto3
        import botocore.session

        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=epoch_timestamp)
        _SESSION = boto3.session.Session(botocore_session=core)
    return _SESSION


def _forget_session_after_fork() -> None:
    """A forked child starts without the parent's session and lock (another thread may have held the lock)."""
    global _SESSION, _LOCK
    _SESSION, _LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_session_after_fork)


def epoch_timestamp(value) -> dt.datetime:
    """A response timestamp as an aware UTC datetime: epoch seconds directly, anything else as botocore parses it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)

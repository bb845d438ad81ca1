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

Why one Kinesis client too (:func:`shared_client`): a client costs ~35 ms of CPU and ~1,000 objects in
reference cycles (its operation models and methods), and the stream built one per Kinesis reader, i.e. whenever
a read resumed on another DoFn instance: 15-25 % of the resumes on Prism, ~0.5 a second at 2,000 ev/s. Those
clients lived on in the readers parked in the other instances' caches (up to 60 s) and then as garbage that only
the rare full collections (``transforms.garbage_collection``) free (docs/benchmarks.md, stop 24).

Endpoint, region and credentials come from the standard ``AWS_*`` settings
(``AWS_ENDPOINT_URL`` included) unless the caller passes them. Static
credentials are read once per process; refreshable ones (roles) refresh.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading

_SESSION = None
_LOCK = threading.Lock()
_SHARED: dict = {}


def client(service: str, **kwargs):
    """A boto3 client for ``service`` from the process's shared session (``kwargs`` as ``Session.client``)."""
    with _LOCK:
        return _session().client(service, **kwargs)


def shared_client(service: str, *, endpoint_url=None, region_name=None, **config):
    """The process's one client for ``service`` at ``endpoint_url`` in ``region_name`` with these
    ``botocore.config.Config`` settings (``config``: plain values and dicts of them), built on first use.

    For owners that come and go often (Kinesis readers): they use it and never close it.
    """
    key = (service, endpoint_url, region_name, json.dumps(config, sort_keys=True))  # TypeError for other values
    found = _SHARED.get(key)  # built already: no lock to wait for while another client is being built
    if found is not None:
        return found
    with _LOCK:
        found = _SHARED.get(key)
        if found is None:
            from botocore.config import Config

            found = _SHARED[key] = _session().client(service, endpoint_url=endpoint_url, region_name=region_name,
                                                     config=Config(**config) if config else None)
        return found


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
    """A forked child starts without the parent's session, clients and lock (another thread may have held the lock;
    a client's connections are the parent's)."""
    global _SESSION, _LOCK, _SHARED
    _SESSION, _LOCK, _SHARED = None, threading.Lock(), {}


os.register_at_fork(after_in_child=_forget_session_after_fork)


def epoch_timestamp(value) -> dt.datetime:
    """A response timestamp as an aware UTC datetime: epoch seconds directly, anything else as botocore parses it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)

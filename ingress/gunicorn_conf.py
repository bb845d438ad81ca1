"""Production server settings for gunicorn.

Command line::

    gunicorn -c python:ingress.gunicorn_conf 'ingress:create_app()'

Each worker process builds its own app (no ``--preload``), with its own
publisher threads, Kinesis client, rate-limit buckets and metrics registry.
Requests mostly wait on Kinesis, so the gthread worker with many threads per
process lets concurrent requests share PutRecords calls.

Graceful shutdown: on SIGTERM gunicorn stops accepting connections and gives
in-flight requests ``graceful_timeout`` seconds to finish (a request ends only
once Kinesis acknowledged or refused its events); ``worker_exit`` then flushes
the publisher. Settings (environment): ``GUNICORN_BIND`` (default
127.0.0.1:8080), ``GUNICORN_WORKERS`` (default: CPU count), ``GUNICORN_THREADS``
(16), ``GUNICORN_GRACEFUL_TIMEOUT`` (30).

Start-up (``post_worker_init``): each worker warms its publisher (sender
threads, Kinesis client), then freezes its heap with ``gc.freeze()``. Flask,
botocore's service model and pydantic leave ~86,000 long-lived objects; every
full collection walked them all, ~85 ms with the worker's GIL held (on the
2-core bench machine), and under load such a pause landed in the middle of
whichever requests were in flight: it was the keep-up p99. Frozen objects are
never collected; they live as long as the worker anyway.

Gunicorn's access log is off: its format holds client addresses. The app logs
every request as a JSON line without them.
"""
import gc
import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count()))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
timeout = max(60, graceful_timeout + 30)
keepalive = 5
accesslog = None
loglevel = "info"
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def _state(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("eventlake") if app is not None else None


def post_worker_init(worker):
    """Warm the worker's publisher, then take what start-up built out of the garbage collector's work."""
    state = _state(worker)
    if state is not None:
        state.publisher.warm()
    gc.collect()
    gc.freeze()
    worker.log.info("worker warmed: publisher started, %d start-up objects frozen", gc.get_freeze_count())


def worker_exit(server, worker):
    """Flush the worker's publisher after its last request."""
    state = _state(worker)
    if state is not None:
        drained = state.publisher.close(timeout=graceful_timeout)
        server.log.info("publisher flushed" if drained else "publisher not fully flushed")

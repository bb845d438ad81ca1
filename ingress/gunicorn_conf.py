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

Gunicorn's access log is off: its format holds client addresses. The app logs
every request as a JSON line without them.
"""
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


def worker_exit(server, worker):
    """Flush the worker's publisher after its last request."""
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("eventlake") if app is not None else None
    if state is not None:
        drained = state.publisher.close(timeout=graceful_timeout)
        server.log.info("publisher flushed" if drained else "publisher not fully flushed")

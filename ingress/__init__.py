"""The HTTP ingress: a Flask app that validates events and puts them on Kinesis.

Development: ``python -m ingress --host 127.0.0.1 --port 8080``.
Production:  ``gunicorn -c python:ingress.gunicorn_conf 'ingress:create_app()'``
(see :mod:`ingress.gunicorn_conf`). Settings come from the environment
(:mod:`ingress.config`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Optional, Union

from flask import Flask
from flask_cors import CORS

from ingress import api, health
from ingress.auth import WriteKeys
from ingress.config import ConfigError, IngressConfig
from ingress.errors import register_error_handlers
from ingress.logs import configure_logging
from ingress.metrics import IngressMetrics
from ingress.publisher import DiscardPublisher, KinesisPublisher
from ingress.ratelimit import RateLimiter

__all__ = ["create_app", "IngressConfig", "ConfigError"]
log = logging.getLogger("ingress")


@dataclasses.dataclass
class IngressState:
    """What the request handlers share: config, keys, limiter, publisher, metrics."""

    config: IngressConfig
    write_keys: WriteKeys
    rate_limiter: RateLimiter
    metrics: IngressMetrics
    publisher: object


def create_app(config: Union[IngressConfig, Mapping[str, str], None] = None, *,
               publisher: Optional[object] = None) -> Flask:
    """The ingress app.

    ``config``: an :class:`IngressConfig`, or environment-style settings laid
    over ``os.environ``, or None for the environment alone. ``publisher``
    replaces the Kinesis publisher (tests wrap the real client with it).
    """
    if config is None:
        config = IngressConfig.from_env()
    elif not isinstance(config, IngressConfig):
        config = IngressConfig.from_env({**os.environ, **config})
    configure_logging()

    metrics = IngressMetrics()
    if publisher is None:
        if config.publisher == "discard":
            log.warning("BENCHMARK-ONLY publisher: events are discarded, not stored",
                        extra={"fields": {"publisher": "discard"}})
            publisher = DiscardPublisher(metrics)
        else:
            publisher = KinesisPublisher(
                config.stream, max_attempts=config.publish_max_attempts, timeout_s=config.publish_timeout_s,
                senders=config.publish_senders, metrics=metrics, ready_cache_s=config.ready_cache_s)
    else:
        metrics = getattr(publisher, "metrics", metrics)
    if not config.auth:
        log.warning("authentication is off (EVENTLAKE_AUTH=off)", extra={"fields": {"auth": "off"}})

    app = Flask(__name__)
    app.json.sort_keys = False
    app.extensions["eventlake"] = IngressState(
        config=config,
        write_keys=WriteKeys(config.write_keys, enabled=config.auth),
        rate_limiter=RateLimiter(config.rate_limit_rps, config.rate_limit_burst),
        metrics=metrics,
        publisher=publisher,
    )
    if config.cors_origins:
        CORS(app, resources={r"/v1/*": {"origins": list(config.cors_origins)}},
             methods=["POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type", "Content-Encoding",
                                                         "X-Write-Key"],
             expose_headers=["Retry-After"], max_age=600)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.before_request(api.mark_start)
    app.after_request(api.log_request)
    register_error_handlers(app)
    log.info("ingress ready to serve", extra={"fields": {
        "auth": config.auth, "keys": len(config.write_keys), "cors_origins": len(config.cors_origins),
        "publisher": type(publisher).__name__}})
    return app


def shutdown(app: Flask, timeout: float = 30.0) -> bool:
    """Flush the app's publisher (graceful shutdown); True when nothing was left behind."""
    return app.extensions["eventlake"].publisher.close(timeout)

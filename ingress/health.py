"""Operations endpoints: liveness, readiness (the stream is usable), metrics, the API description."""
from __future__ import annotations

import json
import os

from flask import Blueprint, Response, current_app, jsonify

from ingress.metrics import CONTENT_TYPE

bp = Blueprint("health", __name__)
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    publisher = current_app.extensions["eventlake"].publisher
    if publisher.ready():
        return jsonify({"status": "ready"})
    response = jsonify({"status": "not_ready", "error": "stream_unavailable",
                        "message": "the Kinesis stream is not usable"})
    response.status_code = 503
    response.headers["Retry-After"] = "5"
    return response


@bp.get("/metrics")
def metrics():
    return Response(current_app.extensions["eventlake"].metrics.exposition(), content_type=CONTENT_TYPE)


_OPENAPI: dict = {}


@bp.get("/openapi.json")
def openapi():
    if not _OPENAPI:
        with open(OPENAPI_PATH, encoding="utf-8") as handle:
            _OPENAPI.update(json.load(handle))
    return jsonify(_OPENAPI)

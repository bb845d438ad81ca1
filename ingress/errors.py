"""JSON errors: every answer of the ingress is JSON, including failures.

Handlers are registered once on the app. Messages are fixed texts or name a
field and a rule; they never echo anything the client sent.
"""
from __future__ import annotations

import logging
from typing import Optional

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("ingress.errors")


class ApiError(Exception):
    """A refusal with an HTTP status and a machine-readable ``code``."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: Optional[int] = None,
                 body: Optional[dict] = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body or {}


def error_response(status: int, code: str, message: str, *, retry_after: Optional[int] = None,
                   body: Optional[dict] = None):
    response = jsonify({**(body or {}), "error": code, "message": message})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        body = exc.body
        if exc.status == 400:  # SPEC: a 400 has the shape of a 202
            body = {"accepted": 0, "rejected": [], **body}
        return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after, body=body)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response = error_response(exc.code or 500, code, exc.name or "error")
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Only the type: exception text may hold request values.
        log.error("unhandled error", extra={"fields": {"error_type": type(exc).__name__}})
        return error_response(500, "internal_error", "internal error")

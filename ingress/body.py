"""Reading a request body within bounds, before anything trusts it.

The declared ``Content-Length`` is checked before a byte is read; a chunked body
is read at most one byte past the limit; gzip is inflated incrementally and
stops one byte past the limit (a gzip bomb costs the server at most the limit).
The result is decoded as strict UTF-8 JSON without NaN/Infinity.
"""
from __future__ import annotations

import zlib
from typing import Any, Optional

from ingress.errors import ApiError
from transforms.envelope import strict_json

_READ_CHUNK = 64 * 1024
_JSON_TYPES = ("application/json",)
_ENCODINGS = ("", "identity", "gzip", "x-gzip")


def check_content_type(content_type: Optional[str], content_encoding: Optional[str]) -> str:
    """The body's encoding (``gzip`` or ``identity``); 415 for anything else."""
    mime, _, params = (content_type or "").partition(";")
    if mime.strip().lower() not in _JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, "unsupported_media_type", "the only supported charset is utf-8")
    encoding = (content_encoding or "").strip().lower()
    if encoding not in _ENCODINGS:
        raise ApiError(415, "unsupported_content_encoding", "Content-Encoding must be gzip or identity")
    return "gzip" if encoding in ("gzip", "x-gzip") else "identity"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")


def read_limited(stream, content_length: Optional[int], limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413)."""
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    want = limit + 1 if content_length is None else content_length
    parts, size = [], 0
    while size < want:
        chunk = stream.read(min(_READ_CHUNK, want - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    if size > limit:
        raise _too_large(limit)
    return b"".join(parts)


def inflate_limited(data: bytes, limit: int) -> bytes:
    """Gunzip ``data`` (concatenated members allowed), at most ``limit`` bytes out."""
    out, size = [], 0
    remaining = data
    while remaining:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(remaining, limit + 1 - size)
            out.append(chunk)
            size += len(chunk)
            if size > limit or inflater.unconsumed_tail:
                raise _too_large(limit)
            if not inflater.eof:
                raise ApiError(400, "invalid_gzip", "the gzip body is truncated")
        except zlib.error:
            raise ApiError(400, "invalid_gzip", "the body is not valid gzip") from None
        remaining = inflater.unused_data
    return b"".join(out)


def parse_json(data: bytes) -> Any:
    """Strict UTF-8 JSON; 400 ``invalid_utf8`` / ``invalid_json`` / ``too_deep``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_utf8", "the body is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return strict_json(text)
    except RecursionError:
        raise ApiError(400, "too_deep", "the body nests too deeply") from None
    except ValueError:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None

"""Write-key authentication: Bearer, Segment-style Basic, or ``X-Write-Key``.

Every configured key is compared in constant time (no early exit), so timing
tells nothing about which key or how much of it matched. The caller is then
known by the key's position only: the key itself never leaves this module.
"""
from __future__ import annotations

import base64
import binascii
import hmac
from typing import Mapping, Optional, Sequence


class WriteKeys:
    """The configured write keys; ``identify`` maps request headers to a key id."""

    def __init__(self, keys: Sequence[str], *, enabled: bool = True):
        if enabled and not keys:
            raise ValueError("write keys are required when authentication is enabled")
        self._keys = [key.encode("utf-8") for key in keys]
        self.enabled = enabled

    def identify(self, headers: Mapping[str, str]) -> Optional[str]:
        """A stable, non-secret id of the caller's key (``key-<n>``), or None."""
        if not self.enabled:
            return "anonymous"
        presented = presented_key(headers)
        if presented is None:
            return None
        match = None
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(presented, key) and match is None:
                match = f"key-{index}"
        return match


def presented_key(headers: Mapping[str, str]) -> Optional[bytes]:
    """The key a request presents, from whichever supported header carries it."""
    authorization = (headers.get("Authorization") or "").strip()
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials.encode("utf-8", "surrogateescape")
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        if sep and user and not password:
            return user
        return None
    header_key = (headers.get("X-Write-Key") or "").strip()
    if header_key:
        return header_key.encode("utf-8", "surrogateescape")
    return None

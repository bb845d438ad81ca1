"""Masking functions for personal data (SPEC "Schemas and masking"), pure and total.

Each function takes any value a client could send and returns a safe result
without raising: a masking function that raised on odd input would turn a
privacy guarantee into an availability problem. Work is linear in the input:
``truncate_ip`` looks at no more than :data:`MAX_IP_TEXT` characters, and the
free-text scrubber uses only patterns whose every attempt is bounded in length
or cannot backtrack, so a megabyte of near-misses costs a megabyte of work.

Markers are plain strings so they fit the lake's string columns:
:data:`REDACTED`, :data:`EMAIL_MARKER`, :data:`IP_MARKER`.
"""
from __future__ import annotations

import base64
import decimal
import hmac
import ipaddress
import json
import math
import re
from typing import Any, Optional, Protocol

REDACTED = "[redacted]"
EMAIL_MARKER = "[email]"
IP_MARKER = "[ip]"

# The longest text that can hold an address: "[" + IPv6 with embedded IPv4 (45) + "%" + zone + "]:65535".
MAX_IP_TEXT = 100
IPV4_PREFIX = 24
IPV6_PREFIX = 48
_DOTTED_QUAD = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})", re.ASCII)


class PseudonymizationKey(Protocol):
    """What :func:`pseudonymize` needs of a key (``transforms.pseudonymization_keys``)."""

    id: str
    secret: bytes


# -- truncate_ip ------------------------------------------------------------------------------

def _strip_decoration(text: str) -> str:
    """``[v6]:port``, ``[v6]``, ``v4:port`` and ``%zone`` removed; what is left may still be garbage."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return ""
        rest = text[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return ""
        text = text[1:end]
    elif text.count(":") == 1:  # IPv6 has at least two colons: one colon is "v4:port"
        host, _, port = text.partition(":")
        if not port.isdigit():
            return ""
        text = host
    zone = text.find("%")
    return text if zone < 0 else text[:zone]


def truncate_ip(value: Any) -> Optional[str]:
    """The address's network: IPv4 to /24 (``a.b.c.0``), IPv6 to /48, IPv4-mapped IPv6 as IPv4.

    Brackets, a port and a zone id are accepted and dropped. Anything that is
    not an address (None, empty, non-strings, garbage, overlong text) is None:
    there is nothing safe to keep of it.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_IP_TEXT:
        return None
    text = _strip_decoration(value)
    if not text or not text.isascii():
        return None
    dotted = _DOTTED_QUAD.fullmatch(text)
    if dotted is not None:  # the common case, without ipaddress's objects (a tenth of the masking time)
        octets = dotted.groups()
        if all(len(octet) == 1 or (octet[0] != "0" and int(octet) <= 255) for octet in octets):
            return f"{octets[0]}.{octets[1]}.{octets[2]}.0"
        return None  # an octet over 255 or with a leading zero: ipaddress refuses it too
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False).network_address)
        address = mapped
    return str(ipaddress.IPv4Network((address, IPV4_PREFIX), strict=False).network_address)


# -- pseudonymize and redact --------------------------------------------------------------------

def canonical_text(value: Any) -> str:
    """The text a value is pseudonymized as: the same identity gives the same text.

    Strings are themselves; integral numbers (``42``, ``42.0``, ``Decimal('42')``)
    are their integer digits; other numbers their shortest repr; booleans
    ``true``/``false``; objects and arrays canonical JSON (sorted keys, no spaces).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, decimal.Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return str(int(value))
        return canonical_text(float(value))
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {canonical_text(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=repr)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return canonical_text(value)


def pseudonymize(value: Any, key: PseudonymizationKey) -> Optional[str]:
    """``"<key id>:<base64url HMAC-SHA256>"`` of the value's canonical text; None stays None.

    Deterministic per key version, so pseudonyms join across events and tables
    until the key rotates; the id prefix says which version made it.
    """
    if value is None:
        return None
    digest = hmac.digest(key.secret, canonical_text(value).encode("utf-8", "surrogatepass"), "sha256")
    return f"{key.id}:{base64.urlsafe_b64encode(digest).rstrip(b'=').decode('ascii')}"


def redact(value: Any) -> Optional[str]:
    """The redaction marker; None stays None (an absent value hides nothing)."""
    return None if value is None else REDACTED


# -- scrub_free_text -----------------------------------------------------------------------------

# Runs of the characters an e-mail address is made of (RFC 5322 atoms, plus Unicode letters for
# SMTPUTF8) that hold an "@". The lookbehind lets an attempt start only where a run starts, and the
# classes before "@" exclude "@", so an attempt reads its run once and backs off at most once.
_E = r"\w.!#$%&'*+/=?^`{|}~\-"
_EMAIL_RUN = re.compile(rf"(?<![{_E}@])[{_E}]*@[{_E}@]*")
# Inside a run that holds "@": something before it and a dotted domain after it.
# "[^@]@" fixes where an attempt starts; the domain classes exclude "." and "@",
# so each attempt ends at the next "@" without backtracking.
_EMAIL_IN_RUN = re.compile(r"[^@]@[\w-]+(?:\.[\w-]+)+")
_RUN_TRAILER = re.compile(r"[.!?'`,;=|~-]+$")

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])"
_IPV4 = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}"
# Every attempt is at most 15 characters long.
_IPV4_IN_TEXT = re.compile(rf"(?<![0-9]){_IPV4}(?![0-9])")

# Runs of what IPv6 text is made of that hold two colons, matched the same way.
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f:.])[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")
_H = r"[0-9A-Fa-f]{1,4}"
# Every form of RFC 4291 text (longest-ending forms first); each attempt is at most 45 characters.
# The lookahead refuses a match that the next group would extend, so "1::2:3" is one address.
_IPV6_IN_RUN = re.compile(
    r"(?<![0-9A-Za-z_])(?:"
    rf"(?:{_H}:){{6}}{_IPV4}"
    rf"|(?:{_H}:){{1,5}}:(?:{_H}:){{0,4}}{_IPV4}"
    rf"|::(?:{_H}:){{0,5}}{_IPV4}"
    rf"|(?:{_H}:){{7}}{_H}"
    rf"|(?:{_H}:){{1,6}}:{_H}"
    rf"|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
    rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}"
    rf"|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}"
    rf"|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}"
    rf"|:(?::{_H}){{1,7}}"
    rf"|(?:{_H}:){{1,7}}:"
    r")(?![0-9A-Za-z_]|[:.][0-9A-Fa-f])"
)


def _scrub_email_run(match: re.Match) -> str:
    run = match.group()
    if not _EMAIL_IN_RUN.search(run):
        return run
    trailer = _RUN_TRAILER.search(run)  # sentence punctuation after an address stays
    return EMAIL_MARKER + (trailer.group() if trailer else "")


def _scrub_ipv6_run(match: re.Match) -> str:
    run = match.group()
    # A run glued to a word ("std::", "Data::Dumper") does not start or end an address there:
    # "_" stands for that word so the pattern's lookarounds see it.
    text, start, end = match.string, match.start(), match.end()
    left = "_" if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_") else ""
    right = "_" if end < len(text) and (text[end].isalnum() or text[end] == "_") else ""
    scrubbed = _IPV6_IN_RUN.sub(IP_MARKER, left + run + right)
    return scrubbed[len(left):len(scrubbed) - len(right)]


def scrub_free_text(text: Any) -> Any:
    """Every e-mail address in ``text`` replaced by ``[email]``, every IP address by ``[ip]``.

    Non-strings are returned unchanged. Errs on the side of privacy: a run of
    address characters that holds an e-mail is replaced whole, and any dotted
    quad is an IPv4 address (so is a four-part version number such as 1.2.3.4).
    """
    if not isinstance(text, str) or not text:
        return text
    if "@" in text:
        text = _EMAIL_RUN.sub(_scrub_email_run, text)
    if ":" in text:
        text = _HEX_RUN.sub(_scrub_ipv6_run, text)
    if "." in text:
        text = _IPV4_IN_TEXT.sub(IP_MARKER, text)
    return text

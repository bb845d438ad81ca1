"""Pseudonymization keys: where they come from and how they are kept out of sight.

Keys are read on the worker, in ``DoFn.setup()``, from one of two places:

* AWS Secrets Manager, when a secret id is given (``--pseudonymization_secret``
  or ``EVENTLAKE_PSEUDONYMIZATION_SECRET_ID``). The secret string holds the same
  ``id=secret,...`` text, or a JSON object ``{"k2": "...", "k1": "..."}``;
* the environment variable ``EVENTLAKE_PSEUDONYMIZATION_KEYS``: ``id=secret``
  pairs separated by commas.

The first key is the current one (it makes new pseudonyms); the others are
kept so that a reader can tell which version made an old pseudonym. A key
ring refuses to be pickled and never shows a secret in its repr, and no error
raised here quotes a secret: a misplaced ``=`` could make any part of the text
secret material, so errors name entries by position only.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Mapping, Optional

KEYS_ENV = "EVENTLAKE_PSEUDONYMIZATION_KEYS"
SECRET_ID_ENV = "EVENTLAKE_PSEUDONYMIZATION_SECRET_ID"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MIN_SECRET_BYTES = 16


class KeyConfigurationError(ValueError):
    """Keys are missing or malformed. The message never holds secret material."""


class PseudonymizationKey:
    """One key version: its public ``id`` and its ``secret`` bytes."""

    __slots__ = ("id", "secret")

    def __init__(self, key_id: str, secret: bytes):
        self.id = key_id
        self.secret = secret

    def __repr__(self) -> str:
        return f"PseudonymizationKey(id={self.id!r}, secret=<hidden>)"

    def __reduce__(self):
        raise TypeError("pseudonymization keys are not picklable: load them in DoFn.setup()")


class KeyRing:
    """The key versions in order; the first is current."""

    def __init__(self, keys: list[PseudonymizationKey], *, source: str = "key ring"):
        if not keys:
            raise KeyConfigurationError(f"{source}: no key")
        ids = [key.id for key in keys]
        if len(set(ids)) != len(ids):
            raise KeyConfigurationError(f"{source}: two keys have the same id")
        self._keys = {key.id: key for key in keys}

    @property
    def current(self) -> PseudonymizationKey:
        return next(iter(self._keys.values()))

    def get(self, key_id: str) -> Optional[PseudonymizationKey]:
        return self._keys.get(key_id)

    def ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[PseudonymizationKey]:
        return iter(self._keys.values())

    def __repr__(self) -> str:
        return f"KeyRing(ids={list(self._keys)})"

    def __reduce__(self):
        raise TypeError("pseudonymization keys are not picklable: load them in DoFn.setup()")


def _key(key_id: str, secret: str, where: str) -> PseudonymizationKey:
    if not KEY_ID_RE.match(key_id):
        raise KeyConfigurationError(f"{where}: the key id must be 1 to 32 of A-Z a-z 0-9 _ . -")
    material = secret.encode("utf-8")
    if len(material) < MIN_SECRET_BYTES:
        raise KeyConfigurationError(f"{where}: the secret must be at least {MIN_SECRET_BYTES} bytes")
    return PseudonymizationKey(key_id, material)


def parse_keys(text: str, *, source: str = KEYS_ENV) -> KeyRing:
    """A key ring from ``id=secret,id2=secret2`` (whitespace around entries ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise KeyConfigurationError(f"{source} is empty")
    keys = []
    for position, entry in enumerate(text.split(","), start=1):
        key_id, sep, secret = entry.strip().partition("=")
        if not sep:
            raise KeyConfigurationError(f"{source}: entry {position} is not id=secret")
        keys.append(_key(key_id.strip(), secret, f"{source}: entry {position}"))
    return KeyRing(keys, source=source)


def parse_secret_string(text: str, *, source: str) -> KeyRing:
    """A Secrets Manager secret string: a JSON object of id -> secret (in order), or ``id=secret`` text."""
    stripped = text.strip() if isinstance(text, str) else ""
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except ValueError:
            raise KeyConfigurationError(f"{source}: the secret looks like JSON but does not parse") from None
        if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
            raise KeyConfigurationError(f"{source}: the secret must map key ids to secret strings")
        return KeyRing([_key(str(key_id), secret, f"{source}: entry {position}")
                        for position, (key_id, secret) in enumerate(document.items(), start=1)], source=source)
    return parse_keys(stripped, source=source)


def fetch_secret_keys(secret_id: str, *, client=None) -> KeyRing:
    """The key ring held in a Secrets Manager secret (``AWS_ENDPOINT_URL`` honoured by boto3)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        import boto3

        client = boto3.client("secretsmanager")
    source = f"secret {secret_id!r}"
    try:
        response = client.get_secret_value(SecretId=secret_id)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "unknown")
        raise KeyConfigurationError(f"{source}: Secrets Manager refused ({code})") from None
    except BotoCoreError as exc:
        raise KeyConfigurationError(f"{source}: Secrets Manager unreachable ({type(exc).__name__})") from None
    text = response.get("SecretString")
    if text is None:
        raise KeyConfigurationError(f"{source}: the secret has no SecretString")
    return parse_secret_string(text, source=source)


def load_keys(secret_id: Optional[str] = None, *, environ: Optional[Mapping[str, str]] = None,
              client=None) -> Optional[KeyRing]:
    """The configured key ring, or None when none is configured.

    A secret id (the argument, else ``EVENTLAKE_PSEUDONYMIZATION_SECRET_ID``)
    wins over ``EVENTLAKE_PSEUDONYMIZATION_KEYS``. Call it on the worker only.
    """
    environ = os.environ if environ is None else environ
    secret_id = secret_id or environ.get(SECRET_ID_ENV) or None
    if secret_id:
        return fetch_secret_keys(secret_id, client=client)
    text = environ.get(KEYS_ENV)
    if text is None or not text.strip():
        return None
    return parse_keys(text)


def require_keys(keys: Optional[KeyRing], *, why: str) -> KeyRing:
    """``keys``, or the error that says how to configure them."""
    if keys is None:
        raise KeyConfigurationError(
            f"no pseudonymization key is configured, but {why}: set {KEYS_ENV} (id=secret,...) in the workers' "
            f"environment, or give a Secrets Manager secret id (--pseudonymization_secret or {SECRET_ID_ENV})")
    return keys

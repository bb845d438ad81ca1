"""Mask stage: personal data masked as the schemas declare (SPEC "Schemas and masking").

For each ``(record, event)`` (docs/CONTRACTS.md), in one pass over
``properties``, ``context`` and ``user``:

1. fields with ``x-pii`` get their action (``pseudonymize``, ``redact``,
   ``truncate_ip``: a string or null; ``drop``: the field is removed), at any
   depth, array items included. Event types use their own schema, ``user`` uses
   ``_user.json``, ``context`` the context schema;
2. ``context.ip`` is truncated whatever the schemas say (a stronger declared
   action, ``redact``/``pseudonymize``/``drop``, is kept);
3. every other string anywhere (and the keys of undeclared objects such as
   ``context.extra``) is scrubbed of e-mail and IP addresses. The outputs of
   step 1 are not scrubbed: a pseudonym or a truncated address is the point.

An event that cannot be masked is a dead letter of stage ``mask`` (reason
``masking_failed``, or ``unknown_event_type``), never passed through. Keys are
loaded in ``DoFn.setup()`` (``transforms.pseudonymization_keys``); setup fails
with a clear error when a schema pseudonymizes and no key is configured.

Metrics (namespace ``eventlake``): ``mask.received``, ``mask.succeeded``,
``mask.dead_lettered``.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.dead_letter import dead_letter
from transforms.enrich import copied
from transforms.pii import pseudonymize, redact, scrub_free_text, truncate_ip
from transforms.pseudonymization_keys import KeyRing, load_keys, require_keys
from transforms.schemas import SchemaRegistry, UnknownEventType, pii_paths, read_documents

NAMESPACE = "eventlake"
STAGE = "mask"
EVENTS = "events"
DEAD_LETTERS = "dead_letters"
MASKING_FAILED = "masking_failed"
_STRONGER_THAN_TRUNCATION = ("redact", "pseudonymize", "drop")
# How many users, and for how long since last used, a masker given shared users remembers masked: the join
# hands every event of a user the same cached dict, and masking it was half of all the masking
# (docs/benchmarks.md, stop 22).
USER_MEMO_SIZE = 4096
USER_MEMO_SECONDS = 60.0

_log = logging.getLogger(__name__)


def context_schema_with_ip_truncated(context_schema: dict) -> dict:
    """The context schema with the built-in rule: ``ip`` is at least truncated."""
    node = copy.deepcopy(context_schema)
    properties = node.setdefault("properties", {})
    ip = properties.setdefault("ip", {"type": "string"})
    if ip.get("x-pii") not in _STRONGER_THAN_TRUNCATION:
        ip["x-pii"] = "truncate_ip"
    return node


def schemas_pseudonymize(registry: SchemaRegistry) -> bool:
    """Whether any schema of the registry asks for pseudonymization (and so needs a key)."""
    documents = [registry.properties_schema(t) for t in registry.event_types()]
    documents += [registry.user_schema, registry.context_schema]
    return any(action == "pseudonymize" for document in documents for _, action in pii_paths(document))


class PersonalDataMasker:
    """Masks one event by the registry's schemas; plain Python, no I/O."""

    def __init__(self, registry: SchemaRegistry, keys: Optional[KeyRing], *, shared_users: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        """``shared_users``: the caller hands the same user dict to many events and never changes it (the
        enrichment join's cache does), so each user's masked value is kept and reused; see :meth:`_masked_user`.
        """
        if schemas_pseudonymize(registry):
            keys = require_keys(keys, why="a schema declares x-pii 'pseudonymize'")
        self._registry = registry
        self._key = keys.current if keys is not None else None
        self._context = context_schema_with_ip_truncated(registry.context_schema)
        self._shared_users = shared_users
        self._clock = clock
        self._users: dict = {}  # id(user) -> (user, its snapshot, masked user, last used), least recently used first

    def mask(self, event: dict) -> dict:
        """A new event with ``properties``, ``context`` and ``user`` masked; the input is not changed.

        Every dict and list under those three fields is built anew (only immutable values are shared), so a
        caller may mask a cached value without copying it first. With ``shared_users``, the masked ``user`` is
        built once and shared by the events that carry that same user object (:meth:`_masked_user`): treat it
        as read-only.
        """
        properties_schema = self._registry.properties_schema(event["event_type"])
        return {
            **event,
            "properties": self._masked(properties_schema, event["properties"]),
            "context": self._masked(self._context, event.get("context")),
            "user": self._masked_user(event.get("user")),
        }

    def _masked_user(self, user: Any) -> Any:
        """The user masked; with ``shared_users``, once per user object while it stays unchanged.

        Why: the enrichment join gives every event of a user the same cached dict, and its masked value depends
        on nothing else (this masker's schemas and key are fixed). The memo is keyed by the object and checked
        against a snapshot of its content, so a user changed in place is masked again (a change ``==`` cannot
        see, such as ``true`` to ``1``, would not be: callers promise not to change users). It holds at most
        :data:`USER_MEMO_SIZE` users, none unused for more than :data:`USER_MEMO_SECONDS`, so users the join
        has let go do not stay in memory here.
        """
        if not self._shared_users or not isinstance(user, dict):
            return self._masked(self._registry.user_schema, user)
        users, now = self._users, self._clock()
        memo = users.pop(id(user), None)
        if memo is None or memo[1] != user:  # an entry holds its user, so no other object can have its id
            masked = self._masked(self._registry.user_schema, user)
            snapshot = copied(user)
            if len(users) >= USER_MEMO_SIZE:
                del users[next(iter(users))]
        else:
            masked, snapshot = memo[2], memo[1]
        while users:
            oldest = next(iter(users.values()))
            if now - oldest[3] <= USER_MEMO_SECONDS:
                break
            del users[id(oldest[0])]
        users[id(user)] = (user, snapshot, masked, now)
        return masked

    def _act(self, action: str, value: Any) -> Optional[str]:
        if action == "pseudonymize":
            return pseudonymize(value, self._key)
        if action == "redact":
            return redact(value)
        if action == "truncate_ip":
            return truncate_ip(value)
        raise ValueError(f"unknown x-pii action {action!r}")  # schemas.py admits none other

    def _masked(self, node: Optional[dict], value: Any) -> Any:
        if value is None:
            return None
        if node is not None:
            action = node.get("x-pii")
            if action is not None:
                return self._act(action, value)
            if isinstance(value, dict) and "properties" in node:
                declared = node["properties"]
                masked = {}
                for name, item in value.items():
                    sub = declared.get(name)
                    if sub is None:  # not declared: the name itself is data
                        masked[scrub_free_text(name)] = self._masked(None, item)
                    elif sub.get("x-pii") != "drop":
                        masked[name] = self._masked(sub, item)
                return masked
            if isinstance(value, list) and "items" in node:
                return [self._masked(node["items"], item) for item in value]
        if isinstance(value, str):
            return scrub_free_text(value)
        if isinstance(value, dict):
            return {scrub_free_text(name): self._masked(None, item) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._masked(None, item) for item in value]
        return value


class MaskingFailure(ValueError):
    """An event that cannot be masked; ``reason`` is the dead-letter code, the message holds no value."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def mask_event(masker: PersonalDataMasker, event: dict) -> dict:
    """``masker.mask(event)``; any failure is a :class:`MaskingFailure`, never a pass-through."""
    try:
        return masker.mask(event)
    except UnknownEventType as exc:
        raise MaskingFailure(exc.reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the exception's text may quote the value
        raise MaskingFailure(MASKING_FAILED, f"masking failed ({type(exc).__name__})") from None


def load_masker(registry: SchemaRegistry, keys_secret_id: Optional[str], *,
                shared_users: bool = False) -> PersonalDataMasker:
    """A masker with the keys of ``keys_secret_id`` (or the environment's); for ``DoFn.setup()``."""
    keys = load_keys(keys_secret_id)
    masker = PersonalDataMasker(registry, keys, shared_users=shared_users)
    if keys is not None:
        _log.info("masking with pseudonymization key %s (%d version(s) loaded)", keys.current.id, len(keys))
    return masker


class MaskPersonalDataFn(beam.DoFn):
    """Masks events; keys exist only between ``setup()`` and the end of the worker."""

    def __init__(self, documents: dict, keys_secret_id: Optional[str]):
        self._documents = documents
        self._keys_secret_id = keys_secret_id
        self._masker: Optional[PersonalDataMasker] = None
        self.received = Metrics.counter(NAMESPACE, "mask.received")
        self.succeeded = Metrics.counter(NAMESPACE, "mask.succeeded")
        self.dead_lettered = Metrics.counter(NAMESPACE, "mask.dead_lettered")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masker"] = None  # never ship loaded keys, whoever pickles this
        return state

    def setup(self):
        self._masker = load_masker(SchemaRegistry.from_documents(self._documents), self._keys_secret_id)

    def teardown(self):
        self._masker = None

    def process(self, element):
        record, event = element
        self.received.inc()
        try:
            masked = mask_event(self._masker, event)
        except MaskingFailure as exc:
            yield self._dead_letter(record, exc.reason, str(exc))
            return
        self.succeeded.inc()
        yield record, masked

    def _dead_letter(self, record, reason: str, message: str):
        self.dead_lettered.inc()
        return beam.pvalue.TaggedOutput(
            DEAD_LETTERS, dead_letter(STAGE, reason, message, retryable=False, record=record))


class MaskPersonalData(beam.PTransform):
    """``(record, event)`` -> ``(record, masked event)``; returns ``(events, dead_letters)``.

    ``keys_secret_id`` names a Secrets Manager secret holding the keys (else
    ``EVENTLAKE_PSEUDONYMIZATION_SECRET_ID`` or ``EVENTLAKE_PSEUDONYMIZATION_KEYS``
    in the workers' environment). Only the id travels in the graph.
    """

    def __init__(self, schema_dir: str, *, keys_secret_id: Optional[str] = None):
        super().__init__()
        if not isinstance(schema_dir, str) or not schema_dir:
            raise ValueError(f"schema_dir must be a directory path, got {schema_dir!r}")
        if keys_secret_id is not None and (not isinstance(keys_secret_id, str) or not keys_secret_id.strip()):
            raise ValueError(f"keys_secret_id must be a Secrets Manager secret id or None, got {keys_secret_id!r}")
        self._schema_dir = schema_dir
        self._keys_secret_id = keys_secret_id

    def expand(self, events):
        documents = read_documents(self._schema_dir)
        SchemaRegistry.from_documents(documents)  # a bad directory fails here, naming the file
        results = events | "MaskFields" >> beam.ParDo(
            MaskPersonalDataFn(documents, self._keys_secret_id)).with_outputs(DEAD_LETTERS, main=EVENTS)
        return results[EVENTS], results[DEAD_LETTERS]

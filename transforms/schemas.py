"""The schema registry: event schemas, their validation and their lake types.

A schema directory holds one JSON Schema (draft 2020-12) per event type,
``<event_type>.json``, describing ``properties``; ``_user.json`` describing the
user attributes joined from DynamoDB; and optionally ``_context.json``
describing the envelope's ``context`` (a built-in default is used otherwise).
``schemas/README.md`` documents the rules; in short:

* Only a subset of JSON Schema is accepted, the part that maps onto a Parquet
  type and that jsonschema and fastjsonschema treat the same: ``type`` (one
  type, or one type and ``"null"``), ``properties``, ``required``, ``items``,
  ``enum``, ``const``, ``minimum``/``maximum`` (and exclusive ones),
  ``minLength``/``maxLength``, ``pattern``, ``minItems``/``maxItems``,
  ``format: date-time``, plus annotations and ``x-pii``. Anything else is
  refused at load time, so a schema never means more than the lake can store.
* Every object declares ``additionalProperties: false``: the lake struct is
  fixed, so an undeclared field could only be dropped silently; it is rejected
  (``schema_violation``) instead. Context keys are the exception: undeclared
  context keys are kept as strings in ``context.extra`` (``map<string,string>``).
* Each file has a top-level ``"version"`` (an integer >= 1); it is the event's
  ``schema_version``. The evolution check requires it to grow on any change.

Validation runs on fastjsonschema's compiled code (the fast path); when an
event fails, jsonschema explains where, as a JSON path and the keyword, never
the value. Loading does I/O; importing this module does not.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

import fastjsonschema
import jsonschema
import pyarrow as pa

from transforms.envelope import EVENT_TYPE_RE, parse_rfc3339_ms

USER_FILE = "_user.json"
CONTEXT_FILE = "_context.json"
CONTEXT_EXTRA = "extra"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
PII_ACTIONS = ("pseudonymize", "redact", "truncate_ip", "drop")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

TIMESTAMP = pa.timestamp("ms", tz="UTC")
CONTEXT_EXTRA_TYPE = pa.map_(pa.string(), pa.string())
SCALAR_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}

_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "deprecated", "x-pii"}
_ROOT_ONLY = {"$schema", "$id", "version"}
_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format", "enum", "const"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"},
    "boolean": {"const"},
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
}

# The built-in context when a schema directory has no _context.json.
DEFAULT_CONTEXT_SCHEMA = {
    "$schema": DRAFT_2020_12,
    "title": "context",
    "version": 1,
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ip": {"type": "string", "x-pii": "truncate_ip"},
        **{name: {"type": "string"} for name in (
            "user_agent", "locale", "timezone", "app_version", "os_name", "os_version", "device_model")},
    },
}


class SchemaViolation(ValueError):
    """An instance does not match its schema. ``path`` and ``keyword`` hold no values."""

    reason = "schema_violation"

    def __init__(self, path: str, keyword: str):
        super().__init__(f"{path} fails '{keyword}'")
        self.path = path
        self.keyword = keyword


class UnknownEventType(KeyError):
    """No schema is registered for the event type."""

    reason = "unknown_event_type"

    def __str__(self) -> str:  # the name is client data: it stays out of messages
        return "no schema is registered for the event type"


def _is_date_time(value: Any) -> bool:
    return not isinstance(value, str) or parse_rfc3339_ms(value) is not None


# One definition of date-time for both engines (and for coercion below).
_FORMAT_CHECKER = jsonschema.FormatChecker(formats=())
_FORMAT_CHECKER.checks("date-time")(_is_date_time)


def _node_type(node: dict) -> tuple[str, bool]:
    """(the JSON type, whether null is allowed) of a checked schema node."""
    kind = node["type"]
    if isinstance(kind, list):
        return next(k for k in kind if k != "null"), True
    return kind, False


def _check_node(node: Any, where: str, *, root: bool = False) -> None:
    """Refuses what the lake cannot store or the engines would read differently."""
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a schema must be an object")
    kind = node.get("type")
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        if len(kind) != 2 or len(rest) != 1:
            raise ValueError(f"{where}: 'type' may list one type and \"null\", got {kind!r}")
        kind = rest[0]
    if kind not in _KEYWORDS:
        raise ValueError(f"{where}: 'type' must be one of {sorted(_KEYWORDS)}, got {kind!r}")
    allowed = _KEYWORDS[kind] | _ANNOTATIONS | {"type"} | (_ROOT_ONLY if root else set())
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise ValueError(f"{where}: unsupported keyword(s) {unknown} for type {kind!r}")
    pii = node.get("x-pii")
    if pii is not None:
        if pii not in PII_ACTIONS:
            raise ValueError(f"{where}: x-pii must be one of {list(PII_ACTIONS)}, got {pii!r}")
        if kind in ("object", "array") or root:
            raise ValueError(f"{where}: x-pii belongs on scalar fields (or array items), not on a {kind}")
        if pii == "truncate_ip" and kind != "string":
            raise ValueError(f"{where}: x-pii 'truncate_ip' needs a string field")
    fmt = node.get("format")
    if fmt is not None and fmt != "date-time":
        raise ValueError(f"{where}: only format 'date-time' is supported, got {fmt!r}")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise ValueError(f"{where}: 'enum' must be a non-empty list")
    if kind == "object":
        if node.get("additionalProperties") is not False:
            raise ValueError(f"{where}: objects must declare \"additionalProperties\": false")
        props = node.get("properties")
        if not isinstance(props, dict) or not props:
            raise ValueError(f"{where}: an object needs at least one declared property")
        required = node.get("required", [])
        if not isinstance(required, list) or any(name not in props for name in required):
            raise ValueError(f"{where}: 'required' must list declared properties")
        for name, sub in props.items():
            _check_node(sub, f"{where}.{name}")
        if all(sub.get("x-pii") == "drop" for sub in props.values()):
            raise ValueError(f"{where}: every property is dropped, nothing is left for the lake")
    elif kind == "array":
        if "items" not in node:
            raise ValueError(f"{where}: an array needs 'items'")
        if isinstance(node["items"], dict) and node["items"].get("x-pii") == "drop":
            raise ValueError(f"{where}[]: x-pii 'drop' belongs on the array field, not its items")
        _check_node(node["items"], f"{where}[]")
    if root:
        version = node.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{where}: top-level 'version' must be an integer >= 1, got {version!r}")
        if kind != "object":
            raise ValueError(f"{where}: the top level must be an object schema")
        if node.get("$schema", DRAFT_2020_12) != DRAFT_2020_12:
            raise ValueError(f"{where}: '$schema' must be {DRAFT_2020_12}")


def arrow_type(node: dict) -> Optional[pa.DataType]:
    """The lake type of a schema node; None when ``x-pii: drop`` keeps it out of the lake."""
    pii = node.get("x-pii")
    if pii == "drop":
        return None
    if pii is not None:
        return pa.string()
    kind, _ = _node_type(node)
    if kind == "object":
        fields = []
        for name, sub in node["properties"].items():
            sub_type = arrow_type(sub)
            if sub_type is not None:
                fields.append(pa.field(name, sub_type))
        return pa.struct(fields)
    if kind == "array":
        return pa.list_(arrow_type(node["items"]))
    if kind == "string" and node.get("format") == "date-time":
        return TIMESTAMP
    return SCALAR_TYPES[kind]


def pii_paths(node: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """(path, action) of every ``x-pii`` field; ``"[]"`` in a path stands for array items."""
    if "x-pii" in node:
        yield prefix, node["x-pii"]
        return
    kind, _ = _node_type(node)
    if kind == "object":
        for name, sub in node["properties"].items():
            yield from pii_paths(sub, prefix + (name,))
    elif kind == "array":
        yield from pii_paths(node["items"], prefix + ("[]",))


def _path_text(root: str, parts) -> str:
    text = root
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _coerce(node: dict, value: Any, path: str) -> Any:
    """A valid instance converted to its lake representation (see docs/CONTRACTS.md)."""
    if value is None:
        return None
    kind, _ = _node_type(node)
    if kind == "integer":
        number = int(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise SchemaViolation(path, "int64")
        return number
    if kind == "number":
        try:
            return float(value)
        except OverflowError:
            raise SchemaViolation(path, "float64") from None
    if kind == "string" and node.get("format") == "date-time":
        millis = parse_rfc3339_ms(value)
        if millis is None:
            raise SchemaViolation(path, "format")
        return millis
    if kind == "object":
        props = node["properties"]
        return {name: _coerce(props[name], item, f"{path}.{name}") for name, item in value.items() if name in props}
    if kind == "array":
        items = node["items"]
        return [_coerce(items, item, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


class _CompiledSchema:
    """One schema with its two validators: fastjsonschema for speed, jsonschema to explain."""

    def __init__(self, document: dict, root: str, engine: str):
        self.document = document
        self.root = root
        self.explainer = jsonschema.Draft202012Validator(document, format_checker=_FORMAT_CHECKER)
        if engine == "fastjsonschema":
            # fastjsonschema implements draft 7; the subset _check_node admits reads the same in both.
            draft7 = {key: value for key, value in document.items() if key not in ("$schema", "$id")}
            self.is_valid: Callable[[Any], bool] = self._fast(fastjsonschema.compile(
                draft7, formats={"date-time": _is_date_time}, use_default=False))
        elif engine == "jsonschema":
            self.is_valid = self.explainer.is_valid
        else:
            raise ValueError(f"unknown validation engine {engine!r}")

    @staticmethod
    def _fast(check: Callable[[Any], Any]) -> Callable[[Any], bool]:
        def is_valid(instance: Any) -> bool:
            try:
                check(instance)
            except fastjsonschema.JsonSchemaValueException:
                return False
            return True

        return is_valid

    def validate(self, instance: Any) -> Any:
        """The coerced instance; raises :class:`SchemaViolation` naming path and keyword."""
        if not self.is_valid(instance):
            error = jsonschema.exceptions.best_match(self.explainer.iter_errors(instance))
            if error is None:  # the engines disagree: report it without guessing a path
                raise SchemaViolation(self.root, "unknown")
            raise SchemaViolation(_path_text(self.root, error.absolute_path), str(error.validator))
        return _coerce(self.document, instance, self.root)


class SchemaRegistry:
    """The schemas of one directory, checked, compiled and mapped to lake types.

    Build it with :meth:`load` (reads a directory) or :meth:`from_documents`
    (from ``documents``, the parsed files: small, plain data to ship to workers).
    """

    def __init__(self, documents: dict[str, dict], *, engine: str = "fastjsonschema"):
        documents = copy.deepcopy(documents)
        events, special = {}, {}
        for name, document in sorted(documents.items()):
            if name in (USER_FILE, CONTEXT_FILE):
                special[name] = document
            elif name.endswith(".json") and EVENT_TYPE_RE.match(name[: -len(".json")]):
                events[name[: -len(".json")]] = document
            else:
                raise ValueError(f"{name}: not an event type name (^[a-z][a-z0-9_]{{0,63}}$.json), "
                                 f"{USER_FILE} or {CONTEXT_FILE}")
        if not events:
            raise ValueError("the schema directory has no event type schema")
        if USER_FILE not in special:
            raise ValueError(f"the schema directory has no {USER_FILE}")
        special.setdefault(CONTEXT_FILE, copy.deepcopy(DEFAULT_CONTEXT_SCHEMA))
        for name, document in {**{f"{t}.json": d for t, d in events.items()}, **special}.items():
            _check_node(document, name, root=True)
        if CONTEXT_EXTRA in special[CONTEXT_FILE]["properties"]:
            raise ValueError(f"{CONTEXT_FILE}: '{CONTEXT_EXTRA}' is reserved for undeclared context keys")
        self.documents = documents
        self.engine = engine
        self._events = {t: _CompiledSchema(d, "properties", engine) for t, d in events.items()}
        self._user = _CompiledSchema(special[USER_FILE], "user", engine)
        self._context = _CompiledSchema(special[CONTEXT_FILE], "context", engine)
        self._lake = {t: self._lake_schema(t) for t in events}

    @classmethod
    def load(cls, schema_dir: str, *, engine: str = "fastjsonschema") -> "SchemaRegistry":
        """Reads and checks every ``*.json`` of ``schema_dir``; ValueError names a bad file."""
        return cls(read_documents(schema_dir), engine=engine)

    @classmethod
    def from_documents(cls, documents: dict[str, dict], **kwargs) -> "SchemaRegistry":
        return cls(documents, **kwargs)

    # -- the interface of docs/CONTRACTS.md ---------------------------------------------------

    def event_types(self) -> tuple[str, ...]:
        return tuple(self._events)

    def properties_schema(self, event_type: str) -> dict:
        return self._compiled(event_type).document

    @property
    def user_schema(self) -> dict:
        return self._user.document

    @property
    def context_schema(self) -> dict:
        return self._context.document

    def schema_version(self, event_type: str) -> str:
        return str(self._compiled(event_type).document["version"])

    def validate(self, event_type: str, properties: Any) -> dict:
        """``properties`` coerced to lake types; raises SchemaViolation or UnknownEventType."""
        return self._compiled(event_type).validate(properties)

    def lake_schema(self, event_type: str) -> pa.Schema:
        self._compiled(event_type)
        return self._lake[event_type]

    # -- context and user ------------------------------------------------------------------------

    def validate_context(self, context: Any) -> dict:
        """Declared keys validated and coerced; undeclared ones kept as strings in ``extra``."""
        declared = self._context.document["properties"]
        known = {key: value for key, value in context.items() if key in declared}
        extra = {key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
                 for key, value in context.items() if key not in declared}
        coerced = self._context.validate(known)
        if extra:
            coerced[CONTEXT_EXTRA] = extra
        return coerced

    def user_type(self) -> pa.StructType:
        return arrow_type(self._user.document)

    def context_type(self) -> pa.StructType:
        struct = arrow_type(self._context.document)
        return pa.struct(list(struct) + [pa.field(CONTEXT_EXTRA, CONTEXT_EXTRA_TYPE)])

    # -- internals -------------------------------------------------------------------------------

    def _compiled(self, event_type: str) -> _CompiledSchema:
        try:
            return self._events[event_type]
        except KeyError:
            raise UnknownEventType(event_type) from None

    def _lake_schema(self, event_type: str) -> pa.Schema:
        """SPEC "Lake layout": its columns in its order; partition columns are not stored."""
        return pa.schema([
            pa.field("event_id", pa.string()),
            pa.field("user_id", pa.string()),
            pa.field("anonymous_id", pa.string()),
            pa.field("event_time", TIMESTAMP),
            pa.field("received_at", TIMESTAMP),
            pa.field("processed_at", TIMESTAMP),
            pa.field("properties", arrow_type(self._events[event_type].document)),
            pa.field("context", self.context_type()),
            pa.field("user", self.user_type()),
            pa.field("user_found", pa.bool_()),
            pa.field("schema_version", pa.string()),
            pa.field("pipeline_version", pa.string()),
        ])


def read_documents(schema_dir: str) -> dict[str, dict]:
    """The parsed ``*.json`` files of a directory; ValueError names the file that is not JSON."""
    if not os.path.isdir(schema_dir):
        raise ValueError(f"schema directory {schema_dir!r} does not exist")
    documents = {}
    for name in sorted(os.listdir(schema_dir)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(schema_dir, name)
        try:
            with open(path, encoding="utf-8") as handle:
                documents[name] = json.load(handle)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name}: not valid JSON ({type(exc).__name__})") from None
    return documents


def default_schema_dir() -> str:
    """The project's own ``schemas/`` (SPEC: the default of ``--schema_dir``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")

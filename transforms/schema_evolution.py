"""The additive-only check: ``python -m transforms.schema_evolution OLD_DIR NEW_DIR``.

Lake files written under an old schema must stay readable next to new ones, and
events valid before must stay valid. So a schema may only gain optional fields
and the directory only new event types. Everything else is listed, one line per
change, and the command exits 1 (2 when a directory does not load):

removed event type or field, changed type (incl. a nullable field made
non-null), a field made required or a new required field, a narrowed or new
``enum``/``const``, a tightened bound (``minimum``, ``maxLength``, ``maxItems``,
...), a new or changed ``pattern``/``format``, a changed ``x-pii`` (it changes
the lake type or content), and a schema that changed without a higher
``version``. ``_user.json`` and ``_context.json`` are checked the same way.
"""
from __future__ import annotations

import sys
from typing import Iterator, Optional

from transforms.schemas import CONTEXT_FILE, DEFAULT_CONTEXT_SCHEMA, USER_FILE, SchemaRegistry, read_documents

_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems")  # raising one narrows
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems")  # lowering one narrows


def _types(node: dict) -> tuple[str, bool]:
    kind = node["type"]
    if isinstance(kind, list):
        return next(k for k in kind if k != "null"), True
    return kind, False


def _compare(old: dict, new: dict, path: str) -> Iterator[str]:
    old_kind, old_null = _types(old)
    new_kind, new_null = _types(new)
    if old_kind != new_kind:
        yield f"{path}: type changed from {old_kind} to {new_kind}"
        return
    if old_null and not new_null:
        yield f"{path}: no longer accepts null"
    if old.get("x-pii") != new.get("x-pii"):
        yield f"{path}: x-pii changed from {old.get('x-pii')} to {new.get('x-pii')}"
    for keyword in ("format", "pattern"):
        if old.get(keyword) != new.get(keyword) and new.get(keyword) is not None:
            yield f"{path}: {keyword} added or changed"
    if "enum" in new:
        removed = [v for v in old.get("enum", [])if v not in new["enum"]]
        if "enum" not in old:
            yield f"{path}: enum added"
        elif removed:
            yield f"{path}: enum narrowed ({len(removed)} value(s) removed)"
    if "const" in new and old.get("const", object()) != new["const"]:
        yield f"{path}: const added or changed"
    for keyword in _LOWER_BOUNDS:
        if keyword in new and (keyword not in old or new[keyword] > old[keyword]):
            yield f"{path}: {keyword} tightened"
    for keyword in _UPPER_BOUNDS:
        if keyword in new and (keyword not in old or new[keyword] < old[keyword]):
            yield f"{path}: {keyword} tightened"
    if old_kind == "object":
        old_props, new_props = old["properties"], new["properties"]
        old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
        for name, sub in old_props.items():
            if name not in new_props:
                yield f"{path}.{name}: field removed"
            else:
                if name in new_required and name not in old_required:
                    yield f"{path}.{name}: field made required"
                yield from _compare(sub, new_props[name], f"{path}.{name}")
        for name in new_props:
            if name not in old_props and name in new_required:
                yield f"{path}.{name}: new field is required"
    elif old_kind == "array":
        yield from _compare(old["items"], new["items"], f"{path}[]")


def _without_annotations(node):
    if isinstance(node, dict):
        return {k: _without_annotations(v) for k, v in node.items()
                if k not in ("title", "description", "$comment", "examples", "version")}
    if isinstance(node, list):
        return [_without_annotations(v) for v in node]
    return node


def non_additive_changes(old_docs: dict[str, dict], new_docs: dict[str, dict]) -> list[str]:
    """Every change from ``old_docs`` to ``new_docs`` that is not additive (both already load)."""
    old_docs = {CONTEXT_FILE: DEFAULT_CONTEXT_SCHEMA, **old_docs}
    new_docs = {CONTEXT_FILE: DEFAULT_CONTEXT_SCHEMA, **new_docs}
    changes = []
    for name, old in sorted(old_docs.items()):
        label = name[: -len(".json")]
        new: Optional[dict] = new_docs.get(name)
        if new is None:
            changes.append(f"{label}: event type removed")
            continue
        found = list(_compare(old, new, label))
        changes.extend(found)
        if _without_annotations(old) != _without_annotations(new) and new["version"] <= old["version"]:
            changes.append(f"{label}: schema changed but version stayed {new['version']} (was {old['version']})")
        elif new["version"] < old["version"]:
            changes.append(f"{label}: version went down from {old['version']} to {new['version']}")
    return changes


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m transforms.schema_evolution OLD_DIR NEW_DIR", file=sys.stderr)
        return 2
    loaded = []
    for label, directory in zip(("old", "new"), args):
        try:
            documents = read_documents(directory)
            SchemaRegistry.from_documents(documents)
        except ValueError as exc:
            print(f"{label} schema directory does not load: {exc}", file=sys.stderr)
            return 2
        loaded.append(documents)
    changes = non_additive_changes(*loaded)
    for change in changes:
        print(change)
    if changes:
        print(f"{len(changes)} non-additive change(s): schemas may only gain optional fields and new event types",
              file=sys.stderr)
        return 1
    added = sorted(set(loaded[1]) - set(loaded[0]))
    print(f"additive only ({len(added)} new schema file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

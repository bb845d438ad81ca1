"""Lake rows -> Arrow tables typed by the lake schema, rejecting what does not fit.

``pyarrow`` would silently drop a struct field the schema does not declare; a
row carrying one is rejected here instead (its data would otherwise vanish),
as is a row whose values Arrow cannot convert. Rejections name the column and
the kind of problem, never a value (Arrow's own messages quote values, so they
are not passed on).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import pyarrow as pa

PARTITION_COLUMNS = ("event_type",)  # in the rows, not in the files (year/month/day come from received_at)


class Rejected(NamedTuple):
    row: dict
    column: str
    problem: str  # "undeclared_field" | "type_mismatch" | "not_a_row"


def _join(head: str, tail: str) -> str:
    return f"{head}.{tail}" if tail else head


def _undeclared(value: Any, arrow_type: pa.DataType) -> Optional[str]:
    """Where ``value`` holds a key ``arrow_type`` does not declare: the dotted path of the
    struct holding it (declared names only: the key itself may be data), "" for this level."""
    if value is None:
        return None
    if pa.types.is_struct(arrow_type):
        if not isinstance(value, dict):
            return None  # a type problem; conversion reports it
        names = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
        for key, item in value.items():
            if key not in names:
                return ""
            inner = _undeclared(item, names[key])
            if inner is not None:
                return _join(key, inner)
        return None
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        if isinstance(value, (list, tuple)):
            for item in value:
                inner = _undeclared(item, arrow_type.value_type)
                if inner is not None:
                    return _join("[]", inner)
    return None


def check_row(row: Any, schema: pa.Schema) -> Optional[Rejected]:
    """Why ``row`` cannot be stored under ``schema``, or None when it can."""
    if not isinstance(row, dict):
        return Rejected({"value": row}, "", "not_a_row")
    for field in schema:
        path = _undeclared(row.get(field.name), field.type)
        if path is not None:
            return Rejected(row, _join(field.name, path), "undeclared_field")
    for field in schema:
        try:
            pa.array([row.get(field.name)], type=field.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return Rejected(row, field.name, "type_mismatch")
    return None


def rows_to_table(rows: Sequence[dict], schema: pa.Schema) -> tuple[pa.Table, list[Rejected]]:
    """The rows that fit as one table, and the rows that do not (with why)."""
    rejected = []
    good = []
    for row in rows:
        if not isinstance(row, dict):
            rejected.append(Rejected({"value": row}, "", "not_a_row"))
            continue
        path = next((_join(field.name, p) for field in schema
                     if (p := _undeclared(row.get(field.name), field.type)) is not None), None)
        if path is not None:
            rejected.append(Rejected(row, path, "undeclared_field"))
        else:
            good.append(row)
    try:
        return pa.Table.from_pylist(good, schema=schema), rejected
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    # Some row does not convert: find which, one by one (rare, so the slow path is fine).
    tables = []
    for row in good:
        problem = check_row(row, schema)
        if problem is None:
            try:
                tables.append(pa.Table.from_pylist([row], schema=schema))
                continue
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                problem = Rejected(row, "", "type_mismatch")
        rejected.append(problem)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table, rejected

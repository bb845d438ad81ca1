"""The shared envelope's own rules: nesting depth at and past the limit, wire form."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.envelope import InvalidEvent, Limits, json_depth, to_wire, validate_event


def nested(depth: int) -> dict:
    """An event whose JSON nests exactly ``depth`` levels (the event object is level 1)."""
    inner: object = 1
    for level in range(depth - 2):
        inner = {"a": inner} if level % 2 else [inner]
    return {"event_type": "a", "user_id": "u", "properties": {"x": inner}}


def reference_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("limit", [3, 8, 32])
def test_an_event_as_deep_as_the_limit_passes_and_one_level_more_is_too_deep(limit):
    assert json_depth(nested(limit), limit) == limit
    validate_event(nested(limit), Limits(max_depth=limit))
    with pytest.raises(InvalidEvent) as info:
        validate_event(nested(limit + 1), Limits(max_depth=limit))
    assert info.value.reason == "too_deep"


json_values = st.recursive(st.none() | st.integers() | st.text(max_size=3),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=2), children, max_size=3),
                           max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=12))
def test_depth_is_exact_up_to_the_limit_and_past_it_when_deeper(value, limit):
    depth = reference_depth(value)
    measured = json_depth(value, limit)
    if depth <= limit:
        assert measured == depth
    else:
        assert limit < measured <= depth


def test_wire_form_is_compact_utf8_json():
    record = {"event_type": "a", "user_id": "Zoë", "properties": {"n": [1, 2.5, None, True]}}
    data = to_wire(record)
    assert data == '{"event_type":"a","user_id":"Zoë","properties":{"n":[1,2.5,null,true]}}'.encode()
    assert json.loads(data) == record

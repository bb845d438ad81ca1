"""Schemathesis against /openapi.json: generated requests (valid and invalid) never give a 5xx,
and every response matches the documented status codes, content types, headers and schemas.

Schemathesis' pytest plugin does not work with this pytest (``'Function' object has no attribute
'_nodeid'``), so the operations' Hypothesis strategies are driven directly.

One built-in check is replaced: ``negative_data_rejection`` wants any schema-violating request
refused, but SPEC accepts the valid events of a batch and rejects the others individually. The
replacement states exactly that: a 202 to a body that breaks the schema must list rejected entries,
and ``accepted`` + rejected always equals the events sent.
"""
from __future__ import annotations

import json
import os

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.ingress_support import AUTH, ingress_env, make_app  # noqa: F401

EXAMPLES = 60
OPENAPI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ingress", "openapi.json")


def _as_json_schema(node):
    """OpenAPI 3.0 ``nullable`` as JSON Schema."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _as_json_schema(value) for key, value in node.items() if key not in ("nullable", "description")}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _body_validator():
    with open(OPENAPI, encoding="utf-8") as handle:
        doc = json.load(handle)
    body = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = {**_as_json_schema(body), "components": _as_json_schema(doc["components"])}
    return jsonschema.Draft7Validator(schema)


def _check_event_answer(case, response, validator):
    if response.status_code not in (202, 400):
        return
    answer = response.json()
    body = case.body
    sent = len(body["events"]) if isinstance(body, dict) and isinstance(body.get("events"), list) \
        and set(body) == {"events"} else 1
    if response.status_code == 202:
        assert answer["accepted"] + len(answer["rejected"]) == sent
        if not validator.is_valid(body):
            assert answer["rejected"], "a body breaking the schema was accepted whole"
        assert all(0 <= item["index"] < sent for item in answer["rejected"])
    else:
        assert answer["accepted"] == 0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_openapi_document(ingress_env, mode):
    app = make_app(ingress_env, EVENTLAKE_RATE_LIMIT_RPS="0")
    api_schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"/v1/events", "/healthz", "/readyz", "/metrics"} <= {op.path for op in operations}
    validator = _body_validator()
    seen_statuses = set()
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.path != "/v1/events":
            continue  # nothing to make invalid in a GET without parameters
        examples = EXAMPLES if operation.path == "/v1/events" else 5

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def conforms(case):
            events = case.path == "/v1/events"
            response = case.call_and_validate(headers=AUTH if events else None,
                                              excluded_checks=[negative_data_rejection])
            seen_statuses.add((case.path, response.status_code))
            if events:
                _check_event_answer(case, response, validator)

        conforms()
    assert ("/v1/events", 202 if mode is GenerationMode.POSITIVE else 400) in seen_statuses

"""MaskPersonalData: schema-driven masking in a pipeline, dead letters, counters, and secrecy of keys."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import pickle

import apache_beam as beam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from apache_beam.internal import pickler
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.mask import MaskPersonalData, MaskPersonalDataFn, PersonalDataMasker
from transforms.pseudonymization_keys import KEYS_ENV, SECRET_ID_ENV, KeyConfigurationError, parse_keys
from transforms.records import SourceRecord
from transforms.schemas import SchemaRegistry, default_schema_dir, read_documents

SECRET = "mask-test-secret-0123456789abcdef"
OLD_SECRET = "older-test-secret-0123456789abcd"
KEYS = f"k2={SECRET},k1={OLD_SECRET}"

EMAIL = "ada.lovelace@example.com"
COACH_EMAIL = "grace.hopper@example.org"
NAME = "Ada Lovelace"
PHONE = "+44 20 7946 0958"
IP4 = "203.0.113.77"
IP6 = "2001:db8:85a3:7:8a2e:370:7334:1"
OTHER_IP = "198.51.100.23"
PLANTED = (EMAIL, COACH_EMAIL, NAME, PHONE, IP4, IP6, OTHER_IP, "ada.lovelace", "grace.hopper", "Lovelace")

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def expected_pseudonym(value: str, key_id: str = "k2", secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), value.encode(), hashlib.sha256).digest()
    return f"{key_id}:{base64.urlsafe_b64encode(digest).decode().rstrip('=')}"


def obj(properties: dict, **extra) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


@pytest.fixture
def schema_dir(tmp_path):
    """Schemas with x-pii at every depth: nested objects and arrays of objects."""
    documents = {
        "coached_session.json": {"$schema": DRAFT, "version": 1, **obj({
            "title": {"type": "string"},
            "coach": obj({
                "email": {"type": "string", "x-pii": "pseudonymize"},
                "name": {"type": "string", "x-pii": "redact"},
                "phone": {"type": "string", "x-pii": "drop"},
                "club": {"type": "string"},
            }),
            "attendees": {"type": "array", "items": obj({
                "member_no": {"type": "integer", "x-pii": "pseudonymize"},
                "name": {"type": "string", "x-pii": "redact"},
                "last_ip": {"type": "string", "x-pii": "truncate_ip"},
                "comment": {"type": "string"},
            })},
            "tags": {"type": "array", "items": {"type": "string"}},
            "rating": {"type": "number"},
        })},
        "_user.json": {"$schema": DRAFT, "version": 1, **obj({
            "email": {"type": "string", "x-pii": "pseudonymize"},
            "full_name": {"type": "string", "x-pii": "drop"},
            "profile": obj({"city": {"type": "string"}, "home_ip": {"type": "string", "x-pii": "truncate_ip"}}),
            "devices": {"type": "array", "items": {"type": "string", "x-pii": "pseudonymize"}},
            "height_cm": {"type": "integer"},
        })},
    }
    for name, document in documents.items():
        (tmp_path / name).write_text(json.dumps(document))
    return str(tmp_path)


@pytest.fixture
def keys_env(monkeypatch):
    monkeypatch.delenv(SECRET_ID_ENV, raising=False)
    monkeypatch.setenv(KEYS_ENV, KEYS)


def element(event: dict, sequence: str = "1") -> tuple:
    record = SourceRecord(json.dumps(event).encode(), "events", "shardId-000000000000", sequence, "u1")
    return record, event


def coached_session_event() -> dict:
    return {
        "event_type": "coached_session",
        "event_id": "e-1",
        "user_id": "u1",
        "anonymous_id": None,
        "event_time": 1_700_000_000_000,
        "received_at": 1_700_000_000_500,
        "schema_version": "1",
        "properties": {
            "title": f"Session with {EMAIL} from {OTHER_IP}",
            "coach": {"email": COACH_EMAIL, "name": NAME, "phone": PHONE, "club": "Hackney Runners"},
            "attendees": [
                {"member_no": 1234, "name": NAME, "last_ip": IP6, "comment": f"mail me: {EMAIL}."},
                {"member_no": 99, "name": None, "last_ip": "not an ip", "comment": "see you"},
            ],
            "tags": ["morning", f"ip {IP4}"],
            "rating": 4.5,
        },
        "context": {
            "ip": IP4,
            "user_agent": f"FitApp/3.1 (proxy {OTHER_IP})",
            "locale": "en-GB",
            "extra": {EMAIL: f"ref {IP6}", "campaign": "spring"},
        },
        "user": {
            "email": EMAIL,
            "full_name": NAME,
            "profile": {"city": f"London <{EMAIL}>", "home_ip": f"::ffff:{IP4}"},
            "devices": ["device-a", "device-b"],
            "height_cm": 180,
        },
        "user_found": True,
    }


def expected_coached_session() -> dict:
    event = coached_session_event()
    return {
        **event,
        "properties": {
            "title": "Session with [email] from [ip]",
            "coach": {"email": expected_pseudonym(COACH_EMAIL), "name": "[redacted]", "club": "Hackney Runners"},
            "attendees": [
                {"member_no": expected_pseudonym("1234"), "name": "[redacted]", "last_ip": "2001:db8:85a3::",
                 "comment": "mail me: [email]."},
                {"member_no": expected_pseudonym("99"), "name": None, "last_ip": None, "comment": "see you"},
            ],
            "tags": ["morning", "ip [ip]"],
            "rating": 4.5,
        },
        "context": {
            "ip": "203.0.113.0",
            "user_agent": "FitApp/3.1 (proxy [ip])",
            "locale": "en-GB",
            "extra": {"[email]": "ref [ip]", "campaign": "spring"},
        },
        "user": {
            "email": expected_pseudonym(EMAIL),
            "profile": {"city": "London <[email]>", "home_ip": "203.0.113.0"},
            "devices": [expected_pseudonym("device-a"), expected_pseudonym("device-b")],
            "height_cm": 180,
        },
    }


def events_of(pairs):
    return [event for _, event in pairs]


def assert_no_planted_data(text: str):
    for planted in PLANTED:
        assert planted not in text


def test_x_pii_actions_apply_at_every_depth_and_everything_else_is_scrubbed(schema_dir, keys_env, caplog):
    caplog.set_level(logging.INFO)
    with TestPipeline() as p:
        events, dead = (p | "Events" >> beam.Create([element(coached_session_event())])
                        | "Mask" >> MaskPersonalData(schema_dir))
        masked = events | "Events only" >> beam.Map(lambda pair: pair[1])
        assert_that(masked, equal_to([expected_coached_session()]), label="CheckEvents")
        assert_that(masked | "Serialize" >> beam.Map(json.dumps, ensure_ascii=False)
                    | "Leaks" >> beam.Filter(lambda text: any(planted in text for planted in PLANTED)),
                    equal_to([]), label="NoPlantedData")
        assert_that(dead, equal_to([]), label="NoDeadLetters")
    assert_no_planted_data(caplog.text)
    assert "k2" in caplog.text  # the key id is logged, never its secret
    assert SECRET not in caplog.text


def test_the_project_schemas_mask_a_workout_and_its_user(keys_env):
    event = {
        "event_type": "workout_completed", "event_id": "e-2", "user_id": "u2", "anonymous_id": None,
        "event_time": None, "received_at": 1_700_000_000_000, "schema_version": "1",
        "properties": {"workout_id": "w1", "workout_type": "running", "duration_s": 1800,
                       "note": f"ran with {NAME}", "device_id": "dev-42",
                       "exercises": [{"name": f"ask {EMAIL}", "sets": 3}]},
        "context": {"ip": IP6, "app_version": "3.1.0"},
        "user": {"email": EMAIL, "full_name": NAME, "devices": ["dev-42"], "profile": {"city": "Leeds"}},
        "user_found": True,
    }
    with TestPipeline() as p:
        events, dead = p | beam.Create([element(event)]) | "Mask" >> MaskPersonalData(default_schema_dir())
        assert_that(events | beam.Map(lambda pair: pair[1]), equal_to([{
            **event,
            "properties": {"workout_id": "w1", "workout_type": "running", "duration_s": 1800,
                           "note": "[redacted]", "device_id": expected_pseudonym("dev-42"),
                           "exercises": [{"name": "ask [email]", "sets": 3}]},
            "context": {"ip": "2001:db8:85a3::", "app_version": "3.1.0"},
            "user": {"email": expected_pseudonym(EMAIL), "devices": [expected_pseudonym("dev-42")],
                     "profile": {"city": "Leeds"}},
        }]))
        assert_that(dead, equal_to([]), label="NoDeadLetters")


def test_unknown_users_and_missing_context_stay_null(schema_dir, keys_env):
    event = {**coached_session_event(), "user": None, "user_found": False, "context": {}}
    masker = PersonalDataMasker(SchemaRegistry.load(schema_dir), parse_keys(KEYS))
    masked = masker.mask(event)
    assert masked["user"] is None and masked["context"] == {}
    assert masker.mask({**event, "context": None})["context"] is None


def test_masking_leaves_its_input_unchanged(schema_dir):
    event = coached_session_event()
    before = json.dumps(event, sort_keys=True)
    PersonalDataMasker(SchemaRegistry.load(schema_dir), parse_keys(KEYS)).mask(event)
    assert json.dumps(event, sort_keys=True) == before


def test_a_cached_user_changed_in_place_is_masked_again(schema_dir):
    """A masker given shared users remembers each masked user (the join hands every event of a user one cached
    dict), checked by content."""
    masker = PersonalDataMasker(SchemaRegistry.load(schema_dir), parse_keys(KEYS), shared_users=True)
    user = {"email": EMAIL, "full_name": NAME, "devices": ["dev-1"], "profile": {"city": "Leeds", "home_ip": IP4}}
    first = masker.mask({**coached_session_event(), "user": user})["user"]
    assert masker.mask({**coached_session_event(), "event_id": "e-2", "user": user})["user"] == first
    user["devices"].append("dev-2")  # deep, in place: the same object, other content
    user["profile"]["city"] = f"near {OTHER_IP}"
    again = masker.mask({**coached_session_event(), "user": user})["user"]
    assert again == {"email": expected_pseudonym(EMAIL), "devices": [expected_pseudonym("dev-1"),
                     expected_pseudonym("dev-2")], "profile": {"city": "near [ip]", "home_ip": "203.0.113.0"}}
    assert first["devices"] == [expected_pseudonym("dev-1")]  # what was handed out before is not changed


def test_remembered_users_answer_as_a_fresh_masker_does_and_are_let_go(schema_dir, monkeypatch):
    """Past the memo's bound in number or idle time, users are masked anew (and no longer held); every answer
    equals a memo-less masker's."""
    import transforms.mask as mask_module

    monkeypatch.setattr(mask_module, "USER_MEMO_SIZE", 3)
    now = [0.0]
    registry = SchemaRegistry.load(schema_dir)
    masker = PersonalDataMasker(registry, parse_keys(KEYS), shared_users=True, clock=lambda: now[0])
    plain = PersonalDataMasker(registry, parse_keys(KEYS))
    users = [{"email": f"user{i}@example.com", "devices": [f"dev-{i}"], "height_cm": 150 + i} for i in range(8)]
    for i in [0, 1, 0, 2, 3, 4, 0, 5, 1, 6, 7, 7, 2, 0]:
        now[0] += 1.0
        event = {**coached_session_event(), "user": users[i]}
        assert masker.mask(event) == plain.mask(event)
        assert len(masker._users) <= 3
    assert plain._users == {}  # a masker not told its users are shared holds none
    held = {id(entry[0]) for entry in masker._users.values()}
    assert held == {id(users[7]), id(users[2]), id(users[0])}
    now[0] += mask_module.USER_MEMO_SECONDS + 1
    masker.mask({**coached_session_event(), "user": users[5]})
    assert [entry[0] for entry in masker._users.values()] == [users[5]]  # the idle ones are let go


def test_context_ip_is_truncated_even_when_no_schema_says_so(tmp_path, keys_env):
    documents = read_documents(default_schema_dir())
    documents["_context.json"] = {"$schema": DRAFT, "version": 1, **obj({"ip": {"type": "string"},
                                                                          "locale": {"type": "string"}})}
    masker = PersonalDataMasker(SchemaRegistry.from_documents(documents), parse_keys(KEYS))
    event = {"event_type": "app_opened", "properties": {}, "context": {"ip": IP4, "locale": "de-DE"}, "user": None}
    assert masker.mask(event)["context"] == {"ip": "203.0.113.0", "locale": "de-DE"}


def test_a_stronger_declared_action_on_context_ip_is_kept(keys_env):
    documents = read_documents(default_schema_dir())
    documents["_context.json"] = {"$schema": DRAFT, "version": 1, **obj({"ip": {"type": "string", "x-pii": "drop"},
                                                                          "locale": {"type": "string"}})}
    masker = PersonalDataMasker(SchemaRegistry.from_documents(documents), parse_keys(KEYS))
    event = {"event_type": "app_opened", "properties": {}, "context": {"ip": IP4, "locale": "de-DE"}, "user": None}
    assert masker.mask(event)["context"] == {"locale": "de-DE"}


def test_failures_are_dead_letters_and_counters_add_up(schema_dir, keys_env, caplog):
    caplog.set_level(logging.INFO)
    good = coached_session_event()
    broken = {key: value for key, value in coached_session_event().items() if key != "properties"}
    unknown = {**coached_session_event(), "event_type": "no_such_type"}
    p = TestPipeline()
    events, dead = (p | beam.Create([element(good, "1"), element(broken, "2"), element(unknown, "3")])
                    | "Mask" >> MaskPersonalData(schema_dir))
    assert_that(events | "Ids" >> beam.Map(lambda pair: pair[0].sequence_number), equal_to(["1"]),
                label="CheckEvents")
    assert_that(dead | "Failures" >> beam.Map(lambda d: (d["source"]["sequence_number"], d["failure"]["stage"],
                                                         d["failure"]["reason"], d["failure"]["retryable"])),
                equal_to([("2", "mask", "masking_failed", False), ("3", "mask", "unknown_event_type", False)]),
                label="CheckDeadLetters")
    assert_that(dead | "Messages" >> beam.Map(lambda d: d["failure"]["message"])
                | "Leaks" >> beam.Filter(lambda text: any(planted in text for planted in PLANTED)),
                equal_to([]), label="NoPlantedDataInMessages")
    assert_that(dead | "Payloads" >> beam.Map(lambda d: json.loads(d["payload"])["event_id"]),
                equal_to(["e-1", "e-1"]), label="OriginalPayloads")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("eventlake"))["counters"]}
    assert counters == {"mask.received": 3, "mask.succeeded": 1, "mask.dead_lettered": 2}
    assert_no_planted_data(caplog.text)


def test_a_schema_that_pseudonymizes_without_a_key_fails_setup_clearly(schema_dir, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(SECRET_ID_ENV, raising=False)
    with pytest.raises(KeyConfigurationError, match="no pseudonymization key is configured"):
        PersonalDataMasker(SchemaRegistry.load(schema_dir), None)
    with pytest.raises(Exception, match="no pseudonymization key is configured"):
        with TestPipeline() as p:
            _ = p | beam.Create([element(coached_session_event())]) | "Mask" >> MaskPersonalData(schema_dir)


def test_schemas_without_pseudonymization_need_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(SECRET_ID_ENV, raising=False)
    (tmp_path / "note_taken.json").write_text(json.dumps(
        {"$schema": DRAFT, "version": 1,
         **obj({"text": {"type": "string"}, "by": {"type": "string", "x-pii": "redact"}})}))
    (tmp_path / "_user.json").write_text(json.dumps(
        {"$schema": DRAFT, "version": 1, **obj({"city": {"type": "string"}})}))
    event = {"event_type": "note_taken", "properties": {"text": f"call {EMAIL}", "by": NAME},
             "context": {"ip": IP4}, "user": {"city": "York"}}
    with TestPipeline() as p:
        events, _ = p | beam.Create([element(event)]) | "Mask" >> MaskPersonalData(str(tmp_path))
        assert_that(events | beam.Map(lambda pair: pair[1]), equal_to([{
            **event, "properties": {"text": "call [email]", "by": "[redacted]"}, "context": {"ip": "203.0.113.0"}}]))


def test_keys_from_secrets_manager_by_secret_id(stack, schema_dir, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(SECRET_ID_ENV, raising=False)
    stack.client("secretsmanager").create_secret(Name="eventlake/mask-keys", SecretString=f"sm7={SECRET}")
    with TestPipeline() as p:
        events, _ = (p | beam.Create([element(coached_session_event())])
                     | "Mask" >> MaskPersonalData(schema_dir, keys_secret_id="eventlake/mask-keys"))
        assert_that(events | beam.Map(lambda pair: pair[1]["user"]["email"]),
                    equal_to([expected_pseudonym(EMAIL, key_id="sm7")]))


@pytest.mark.parametrize("kwargs", [{"schema_dir": ""}, {"schema_dir": None}, {"schema_dir": "s", "keys_secret_id": ""},
                                    {"schema_dir": "s", "keys_secret_id": 5}])
def test_bad_configuration_is_refused_at_construction(kwargs):
    with pytest.raises(ValueError):
        MaskPersonalData(**kwargs)


def test_a_bad_schema_directory_fails_when_the_pipeline_is_built(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        with TestPipeline() as p:
            _ = p | beam.Create([]) | "Mask" >> MaskPersonalData(str(tmp_path / "missing"))


# -- secrets stay out of the job graph -------------------------------------------------------------

def test_no_secret_in_the_pickled_transform_dofn_or_pipeline(schema_dir, keys_env):
    transform = MaskPersonalData(schema_dir)
    fn = MaskPersonalDataFn(read_documents(schema_dir), None)
    for blob in (pickle.dumps(transform), pickler.dumps(transform), pickler.dumps(fn)):
        assert SECRET.encode() not in blob and OLD_SECRET.encode() not in blob
    fn.setup()  # keys loaded: a DoFn pickled after setup still carries none
    assert fn._masker is not None
    blob = pickler.dumps(fn)
    assert SECRET.encode() not in blob and OLD_SECRET.encode() not in blob
    assert pickler.loads(blob)._masker is None
    p = beam.Pipeline()
    _ = p | beam.Create([element(coached_session_event())]) | "Mask" >> transform
    graph = p.to_runner_api().SerializeToString()
    assert SECRET.encode() not in graph and OLD_SECRET.encode() not in graph
    assert os.environ[KEYS_ENV] == KEYS  # the secret was there to be leaked


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


_PROJECT_MASKER = []


def project_masker() -> PersonalDataMasker:
    """The project schemas' masker, built once (compiling every schema per example is slow)."""
    if not _PROJECT_MASKER:
        registry = SchemaRegistry.from_documents(read_documents(default_schema_dir()))
        _PROJECT_MASKER.append(PersonalDataMasker(registry, parse_keys(KEYS)))
    return _PROJECT_MASKER[0]


@settings(max_examples=100, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=10), _JSON, max_size=4), filler=st.text(max_size=10),
       planted=st.sampled_from([EMAIL, IP4, IP6, COACH_EMAIL]))
def test_planted_addresses_never_survive_anywhere_in_the_free_form_parts(extra, filler, planted):
    masker = project_masker()
    event = {"event_type": "app_opened", "properties": {},
             "context": {"locale": f"{filler} {planted} {filler}",
                         "extra": {**extra, planted: [f" {planted} ", extra]}},
             "user": {"profile": {"city": f"{planted} "}}}
    text = json.dumps(masker.mask(event), ensure_ascii=False)
    assert planted not in text


def _containers(value, found=None) -> list:
    """Every dict and list inside ``value`` (itself included)."""
    found = [] if found is None else found
    if isinstance(value, (dict, list)):
        found.append(value)
        for item in (value.values() if isinstance(value, dict) else value):
            _containers(item, found)
    return found


@settings(max_examples=100, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=10), _JSON, max_size=4), devices=st.lists(_JSON, max_size=3))
def test_the_masked_event_shares_no_container_with_its_input(extra, devices):
    """The core masks cached users without copying them: a shared dict or list would let a row corrupt the cache."""
    masker = project_masker()
    user = {"email": EMAIL, "profile": {"city": "Leeds", "extra": extra}, "devices": devices}
    event = {"event_type": "app_opened", "properties": {}, "context": {"extra": extra, "locale": "en"},
             "user": user}
    before = json.dumps(event, sort_keys=True)
    masked = masker.mask(event)
    inputs = {id(c) for c in _containers(event["properties"]) + _containers(event["context"]) + _containers(user)}
    outputs = _containers(masked["properties"]) + _containers(masked["context"]) + _containers(masked["user"])
    assert not inputs & {id(c) for c in outputs}
    assert json.dumps(event, sort_keys=True) == before

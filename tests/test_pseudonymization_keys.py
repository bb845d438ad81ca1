"""Loading pseudonymization keys: environment, Secrets Manager over the wire, and secrecy."""
from __future__ import annotations

import json
import pickle

import boto3
import pytest

from transforms.pseudonymization_keys import (
    KEYS_ENV,
    SECRET_ID_ENV,
    KeyConfigurationError,
    KeyRing,
    PseudonymizationKey,
    load_keys,
    parse_keys,
    parse_secret_string,
    require_keys,
)

SECRET_A = "alpha-secret-0123456789abcdef"
SECRET_B = "bravo-secret-0123456789abcdef"


def test_the_first_key_is_current_and_all_versions_are_kept():
    ring = parse_keys(f" k2={SECRET_B} , k1={SECRET_A}")
    assert ring.current.id == "k2"
    assert ring.current.secret == SECRET_B.encode()
    assert ring.ids() == ("k2", "k1")
    assert ring.get("k1").secret == SECRET_A.encode()
    assert ring.get("k3") is None
    assert len(ring) == 2


def test_a_secret_may_contain_equals_signs():
    assert parse_keys("k1=abc=def=ghi=jkl=mno").current.secret == b"abc=def=ghi=jkl=mno"


@pytest.mark.parametrize("text", [
    "",
    "   ",
    SECRET_A,  # no id
    f"k1={SECRET_A},{SECRET_B}",
    f"={SECRET_A}",
    f"bad id={SECRET_A}",
    f"{'k' * 33}={SECRET_A}",
    "k1=short-secret",
    f"k1={SECRET_A},k1={SECRET_B}",
    f"k1={SECRET_A},",
])
def test_malformed_keys_are_refused_without_quoting_a_secret(text):
    with pytest.raises(KeyConfigurationError) as info:
        parse_keys(text)
    message = str(info.value)
    for secret in (SECRET_A, SECRET_B, "short-secret", SECRET_A[:8], SECRET_B[:8]):
        assert secret not in message
    assert KEYS_ENV in message


def test_secret_strings_may_be_json_objects_in_key_order():
    ring = parse_secret_string(json.dumps({"v9": SECRET_B, "v8": SECRET_A}), source="secret 'x'")
    assert ring.ids() == ("v9", "v8")


@pytest.mark.parametrize("text", ['{"k1": ', '["k1"]', '{"k1": 5}', "{}"])
def test_malformed_json_secrets_are_refused(text):
    with pytest.raises(KeyConfigurationError):
        parse_secret_string(text, source="secret 'x'")


def test_no_configuration_means_no_keys_and_require_keys_says_how_to_configure():
    assert load_keys(environ={}) is None
    assert load_keys(environ={KEYS_ENV: "  "}) is None
    with pytest.raises(KeyConfigurationError, match=KEYS_ENV) as info:
        require_keys(None, why="a schema pseudonymizes")
    assert SECRET_ID_ENV in str(info.value)


def test_keys_come_from_the_environment():
    ring = load_keys(environ={KEYS_ENV: f"k1={SECRET_A}"})
    assert ring.current.id == "k1"


def test_keys_never_pickle_and_never_show_their_secret():
    ring = parse_keys(f"k1={SECRET_A},k2={SECRET_B}")
    for thing in (ring, ring.current, [ring]):
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps(thing)
    for text in (repr(ring), repr(ring.current), str(ring), str(ring.current)):
        assert SECRET_A not in text and SECRET_B not in text
    assert "k1" in repr(ring)


def test_an_empty_key_ring_is_refused():
    with pytest.raises(KeyConfigurationError):
        KeyRing([])
    with pytest.raises(KeyConfigurationError):
        KeyRing([PseudonymizationKey("a", b"x" * 16), PseudonymizationKey("a", b"y" * 16)])


# -- AWS Secrets Manager, over the wire against the moto server ---------------------------------------

def _secretsmanager(stack):
    return stack.client("secretsmanager")


def test_keys_come_from_secrets_manager_as_text(stack):
    _secretsmanager(stack).create_secret(Name="eventlake/pseudonymization", SecretString=f"s2={SECRET_B},s1={SECRET_A}")
    ring = load_keys("eventlake/pseudonymization", environ={KEYS_ENV: "ignored=when-a-secret-id-is-given"})
    assert ring.ids() == ("s2", "s1")
    assert ring.current.secret == SECRET_B.encode()


def test_keys_come_from_secrets_manager_as_json_by_environment_secret_id(stack):
    arn = _secretsmanager(stack).create_secret(
        Name="eventlake/keys-json", SecretString=json.dumps({"j1": SECRET_A}))["ARN"]
    assert load_keys(environ={SECRET_ID_ENV: arn}).current.id == "j1"
    assert load_keys(environ={SECRET_ID_ENV: "eventlake/keys-json"}).current.secret == SECRET_A.encode()


def test_a_rotated_secret_gives_the_new_current_key(stack):
    client = _secretsmanager(stack)
    client.create_secret(Name="eventlake/rotating", SecretString=f"r1={SECRET_A}")
    client.put_secret_value(SecretId="eventlake/rotating", SecretString=f"r2={SECRET_B},r1={SECRET_A}")
    ring = load_keys("eventlake/rotating", environ={})
    assert ring.current.id == "r2" and ring.ids() == ("r2", "r1")


def test_a_missing_secret_is_a_clear_error(stack):
    with pytest.raises(KeyConfigurationError, match=r"ResourceNotFoundException"):
        load_keys("eventlake/does-not-exist", environ={})


def test_a_malformed_secret_is_refused_without_quoting_it(stack):
    _secretsmanager(stack).create_secret(Name="eventlake/bad", SecretString=f"{SECRET_A}")
    with pytest.raises(KeyConfigurationError) as info:
        load_keys("eventlake/bad", environ={})
    assert SECRET_A not in str(info.value)
    assert "eventlake/bad" in str(info.value)


def test_an_unreachable_secrets_manager_is_a_clear_error(moto_server, monkeypatch):
    from runners.local import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("secretsmanager", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                          config=boto3.session.Config(retries={"max_attempts": 1}, connect_timeout=2))
    with pytest.raises(KeyConfigurationError, match="unreachable"):
        load_keys("eventlake/anything", environ={}, client=client)

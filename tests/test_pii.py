"""The masking functions: tables of odd inputs, and properties checked by hypothesis."""
from __future__ import annotations

import dataclasses
import decimal
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from transforms.pii import (
    EMAIL_MARKER,
    IP_MARKER,
    REDACTED,
    canonical_text,
    pseudonymize,
    redact,
    scrub_free_text,
    truncate_ip,
)


@dataclasses.dataclass(frozen=True)
class Key:
    id: str
    secret: bytes


K1 = Key("k1", b"first-secret-of-thirty-two-bytes")
K2 = Key("k2", b"second-secret-of-thirty-two-byte")


# -- truncate_ip -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("203.0.113.77", "203.0.113.0"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.0"),
    ("  198.51.100.9\n", "198.51.100.0"),
    ("198.51.100.9:8080", "198.51.100.0"),
    ("2001:db8:abcd:12:34:56:78:9a", "2001:db8:abcd::"),
    ("2001:DB8:ABCD:0012::1", "2001:db8:abcd::"),
    ("2001:db8::1", "2001:db8::"),
    ("::1", "::"),
    ("::", "::"),
    ("fe80::1%eth0", "fe80::"),
    ("fe80::1%25", "fe80::"),
    ("[2001:db8:1:2::3]", "2001:db8:1::"),
    ("[2001:db8:1:2::3]:443", "2001:db8:1::"),
    ("[fe80::1%en0]:80", "fe80::"),
    ("::ffff:192.0.2.128", "192.0.2.0"),
    ("::FFFF:c000:280", "192.0.2.0"),
    ("[::ffff:192.0.2.128]:80", "192.0.2.0"),
    ("64:ff9b::192.0.2.33", "64:ff9b::"),  # NAT64 is an IPv6 network, not IPv4-mapped
])
def test_truncate_ip_keeps_only_the_network(value, expected):
    assert truncate_ip(value) == expected


@pytest.mark.parametrize("value", [
    None, "", " ", "garbage", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.4/24", "1.2.3.-4",
    "2001:db8:::1", "1:2:3:4:5:6:7:8:9", "[2001:db8::1", "[2001:db8::1]x", "[1.2.3.4]:x", "1.2.3.4:http",
    "1.2.3.4:80:80", "%eth0", "::ffff:999.1.1.1", "١٢٣.١.١.١", "１.２.３.４", "1.2.3.4\x00", 1234, 3.5, b"1.2.3.4",
    ["1.2.3.4"], {"ip": "1.2.3.4"}, True, "x" * 1_000_000, "1." * 500_000, "[" * 1_000_000,
])
def test_truncate_ip_makes_anything_else_none(value):
    assert truncate_ip(value) is None


@given(st.ip_addresses(v=4), st.integers(0, 255))
def test_every_address_of_a_slash_24_maps_to_one_value(address, last_octet):
    neighbour = ipaddress.IPv4Address((int(address) & ~0xFF) | last_octet)
    assert truncate_ip(str(address)) == truncate_ip(str(neighbour))


@given(st.ip_addresses(v=6), st.integers(0, 2**80 - 1))
def test_every_address_of_a_slash_48_maps_to_one_value(address, host_bits):
    assume(address.ipv4_mapped is None)
    neighbour = ipaddress.IPv6Address((int(address) >> 80 << 80) | host_bits)
    assume(neighbour.ipv4_mapped is None)
    assert truncate_ip(str(address)) == truncate_ip(str(neighbour))


@given(st.ip_addresses())
def test_the_result_is_a_valid_address_of_the_input_network(address):
    result = truncate_ip(str(address))
    truncated = ipaddress.ip_address(result)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    assert truncated.version == address.version
    assert address in ipaddress.ip_network((truncated, prefix))
    assert int(truncated) & ((1 << (address.max_prefixlen - prefix)) - 1) == 0


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_ipv6_is_treated_as_ipv4(address):
    assert truncate_ip(f"::ffff:{address}") == truncate_ip(str(address))
    assert truncate_ip(str(ipaddress.IPv6Address(f"::ffff:{address}").exploded)) == truncate_ip(str(address))


@given(st.ip_addresses(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=15),
       st.integers(0, 65535))
def test_zone_brackets_and_port_do_not_change_the_result(address, zone, port):
    plain = truncate_ip(str(address))
    if address.version == 6:
        assert truncate_ip(f"{address}%{zone}") == plain
        assert truncate_ip(f"[{address}]:{port}") == plain
    else:
        assert truncate_ip(f"{address}:{port}") == plain


@given(st.one_of(st.text(), st.binary(), st.integers(), st.none(), st.floats()))
def test_truncate_ip_never_raises_and_returns_an_address_or_none(value):
    result = truncate_ip(value)
    assert result is None or ipaddress.ip_address(result)


# -- pseudonymize and redact -----------------------------------------------------------------------

def test_pseudonym_is_the_key_id_and_a_base64url_hmac():
    pseudonym = pseudonymize("ada@example.com", K1)
    assert re.fullmatch(r"k1:[A-Za-z0-9_-]{43}", pseudonym)
    assert "ada" not in pseudonym and "example" not in pseudonym


@pytest.mark.parametrize("left, right", [
    (42, "42"), (42, 42.0), (42, decimal.Decimal("42")), (True, "true"), (1.5, "1.5"),
    ({"b": 1, "a": [1, 2]}, {"a": [1, 2], "b": 1}),
])
def test_equivalent_values_share_a_pseudonym(left, right):
    assert pseudonymize(left, K1) == pseudonymize(right, K1)


@pytest.mark.parametrize("left, right", [
    ("ada@example.com", "Ada@example.com"), (1, 2), ("", " "), ([1, 2], [2, 1]), (True, 1), (0.1, 0.2),
])
def test_different_values_get_different_pseudonyms(left, right):
    assert pseudonymize(left, K1) != pseudonymize(right, K1)


@pytest.mark.parametrize("value", [
    "", "x" * 1_000_000, "\ud800", "\x00", float("nan"), float("inf"), -0.0, 10**40, decimal.Decimal("NaN"),
    {"nested": {"deep": [None, True, 1.25]}}, [], {}, (1, 2), {3, 1, 2},
])
def test_pseudonymize_accepts_any_value(value):
    assert pseudonymize(value, K1).startswith("k1:")


def test_null_stays_null():
    assert pseudonymize(None, K1) is None
    assert redact(None) is None


@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(),
                 st.lists(st.integers()), st.dictionaries(st.text(), st.integers())))
def test_pseudonyms_are_deterministic_per_key_version_and_differ_across_versions(value):
    first = pseudonymize(value, K1)
    assert first == pseudonymize(value, Key("k1", K1.secret))
    second = pseudonymize(value, K2)
    assert first.startswith("k1:") and second.startswith("k2:")
    assert first.split(":", 1)[1] != second.split(":", 1)[1]


@given(st.text(), st.text())
def test_distinct_strings_get_distinct_pseudonyms(left, right):
    assume(left != right)
    assert pseudonymize(left, K1) != pseudonymize(right, K1)


@pytest.mark.parametrize("value", ["ada@example.com", 0, False, 3.5, [1], {"a": 1}, ""])
def test_redact_is_the_marker_whatever_the_value(value):
    assert redact(value) == REDACTED


def test_canonical_text_of_containers_is_sorted_compact_json():
    assert canonical_text({"b": [1, 2.0], "a": None}) == '{"a":null,"b":[1,2.0]}'


# -- scrub_free_text --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("write to ada@example.com.", f"write to {EMAIL_MARKER}."),
    ("<ADA.Lovelace+fit@mail.example.co.uk>", f"<{EMAIL_MARKER}>"),
    ("o'brien@example.ie, thanks", f"{EMAIL_MARKER}, thanks"),
    ("mailto:ada@example.com?subject=hi", f"mailto:{EMAIL_MARKER}"),
    ("jürgen@bücher.de", EMAIL_MARKER),
    ("a@b.c@d.e", EMAIL_MARKER),
    ("from 203.0.113.7 today", f"from {IP_MARKER} today"),
    ("ip=010.001.002.003;", f"ip={IP_MARKER};"),
    ("255.255.255.255.", f"{IP_MARKER}."),
    ("host 2001:db8::7 down", f"host {IP_MARKER} down"),
    ("ip:2001:db8:0:0:1:0:0:1: lost", f"ip:{IP_MARKER}: lost"),
    ("[fe80::1%eth0]:80", f"[{IP_MARKER}%eth0]:80"),
    ("v6 ::1 and ::ffff:192.0.2.1", f"v6 {IP_MARKER} and {IP_MARKER}"),
    ("1::2:3 and 1:2::", f"{IP_MARKER} and {IP_MARKER}"),
    ("FE80::ABCD", IP_MARKER),
    ("release 1.2.3.4 notes", f"release {IP_MARKER} notes"),  # a dotted quad is an address: privacy first
])
def test_scrub_replaces_addresses(text, expected):
    assert scrub_free_text(text) == expected


@pytest.mark.parametrize("text", [
    "", "no personal data here", "@mention and a@b and user@localhost", "ratio 1.2.3", "1.2.3.256",
    "at 12:30:45", "mac 00:1a:2b:3c:4d:5e", "std::vector", "Data::Dumper", "Note:: fine", "a :: b",
    "v1.2.3", "temperature 36.6", "π@∞", "emoji 😀@😀.😀",
])
def test_scrub_leaves_text_without_addresses_alone(text):
    assert scrub_free_text(text) == text


@pytest.mark.parametrize("value", [None, 0, 1.5, True, b"ada@example.com", ["ada@example.com"]])
def test_scrub_passes_non_strings_through(value):
    assert scrub_free_text(value) is value


_FILLER = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).map(
    lambda text: "".join(char if not char.isspace() else "_" for char in text))
_ADDRESS = st.one_of(st.emails(), st.ip_addresses(v=4).map(str),
                     st.ip_addresses(v=6).filter(lambda a: int(a) != 0).map(str))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.lists(st.tuples(_FILLER, _ADDRESS), min_size=1, max_size=5), _FILLER)
def test_scrubbed_text_contains_none_of_the_planted_addresses(parts, tail):
    text = " ".join(f"{filler} {address}" for filler, address in parts) + " " + tail
    scrubbed = scrub_free_text(text)
    for _, address in parts:
        assert f" {address} " not in f" {scrubbed} "


@given(st.text())
def test_scrub_never_raises_and_is_idempotent(text):
    once = scrub_free_text(text)
    assert scrub_free_text(once) == once


def _near_misses(size: int) -> str:
    """Strings that make a backtracking matcher go quadratic, about ``size`` characters in all."""
    patterns = ["a" * 4096 + "@", "a@", "@a", "a@a.", "a.", "1.2.3.", "1.", "1:", "1::", "ffff:", "1:2:3:4:5:6:7:",
                "255.255.255.", "::ffff:1.2.3.", ".", ":", "x" * 64 + "." * 64, "a" * 300 + "@" + "b." * 300]
    share = size // len(patterns)
    return "".join((pattern * (share // len(pattern) + 1))[:share] + " " for pattern in patterns)


@pytest.mark.timeout(120)  # a guard against catastrophic backtracking (hours), not a speed assertion
def test_scrubbing_a_megabyte_of_near_misses_finishes_and_still_finds_addresses():
    text = _near_misses(1_000_000) + " ada@example.com 203.0.113.7 2001:db8::7 "
    assert len(text) > 1_000_000
    scrubbed = scrub_free_text(text)
    assert "ada@example.com" not in scrubbed
    assert "203.0.113.7" not in scrubbed
    assert "2001:db8::7" not in scrubbed
    assert scrubbed.endswith(f" {EMAIL_MARKER} {IP_MARKER} {IP_MARKER} ")


def _by_ipaddress(text: str):
    """What the ipaddress module makes of a bare IPv4 text: its /24 network, or None."""
    try:
        return str(ipaddress.IPv4Network((ipaddress.IPv4Address(text), 24), strict=False).network_address)
    except ValueError:
        return None


@settings(max_examples=500, deadline=None)
@given(octets=st.lists(st.integers(0, 299).map(str) | st.sampled_from(["00", "01", "007", "255", "256", "0"]),
                       min_size=4, max_size=4))
def test_dotted_quads_truncate_exactly_as_the_ipaddress_module_reads_them(octets):
    text = ".".join(octets)
    assert truncate_ip(text) == _by_ipaddress(text)

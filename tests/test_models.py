"""Every rule about valid input: names, interface names, IPs, bodies (issue 2's list)."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from masqd.models import (
    CNI_NAME_PATTERN,
    MAX_CONTAINER_ID,
    MAX_NETWORK_NAME,
    Attachment,
    AttachmentKey,
    AttachmentSpec,
    GcRequest,
    ValidAttachment,
    key_problem,
    parse_ip,
    validation_details,
)


def key(network: str = "net1", container_id: str = "c1", ifname: str = "eth0") -> AttachmentKey:
    return AttachmentKey(network=network, container_id=container_id, ifname=ifname)


# ---- network names and container IDs ---------------------------------------------------

GOOD_NAMES = ["a", "Z", "0", "net1", "my-net_2.x", "a" * 64, "1.2.3", "a--", "A.."]
BAD_NAMES = [
    "",
    "-net",
    ".net",
    "_net",
    "net/1",
    "net 1",
    " net",
    "net\n",
    "net:1",
    "nét",
    "net\x00",
    "net%",
    "ne*t",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_cni_names_are_accepted(name: str) -> None:
    assert key(network=name, container_id=name).network == name


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["network", "container_id"])
def test_bad_names_are_refused(field: str, name: str) -> None:
    with pytest.raises(ValidationError):
        AttachmentKey(**{"network": "n", "container_id": "c", "ifname": "eth0", field: name})


def test_name_length_bounds() -> None:
    key(network="n" * MAX_NETWORK_NAME, container_id="c" * MAX_CONTAINER_ID)
    with pytest.raises(ValidationError):
        key(network="n" * (MAX_NETWORK_NAME + 1))
    with pytest.raises(ValidationError):
        key(container_id="c" * (MAX_CONTAINER_ID + 1))


_CNI = re.compile(CNI_NAME_PATTERN)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70))
def test_a_network_name_is_valid_exactly_when_it_matches_the_cni_pattern(name: str) -> None:
    expected = 1 <= len(name) <= MAX_NETWORK_NAME and _CNI.fullmatch(name) is not None
    try:
        key(network=name)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == expected


# ---- interface names --------------------------------------------------------------------

GOOD_IFNAMES = [
    "eth0",
    "a",
    "x" * 15,
    "eth0.100",
    "veth-a_b",
    "...",
    ".a",
    "a.",
    "é" * 7,
    "@",
]
BAD_IFNAMES = {
    "empty": "",
    "16 bytes": "x" * 16,
    "16 bytes of 8 characters": "é" * 8,
    "slash": "eth/0",
    "colon": "eth0:1",
    "space": "eth 0",
    "tab": "eth\t0",
    "newline": "eth0\n",
    "vertical tab": "e\x0b",
    "unicode space": "eth\u20280",
    "no-break space": "eth\xa00",
    "dot": ".",
    "dot dot": "..",
    "nul": "eth\x000",
    "control character": "\x01",
    "double quote": 'a"b',
    "backslash": "a\\b",
}


@pytest.mark.parametrize("ifname", GOOD_IFNAMES)
def test_linux_interface_names_are_accepted(ifname: str) -> None:
    assert key(ifname=ifname).ifname == ifname


@pytest.mark.parametrize("ifname", list(BAD_IFNAMES.values()), ids=list(BAD_IFNAMES))
def test_bad_interface_names_are_refused(ifname: str) -> None:
    with pytest.raises(ValidationError):
        key(ifname=ifname)
    with pytest.raises(ValidationError):
        ValidAttachment(container_id="c1", ifname=ifname)


_INVISIBLE = "\u061c\ufeff" + "".join(
    chr(c)
    for lo, hi in ((0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x2069))
    for c in range(lo, hi + 1)
)


def _ifname_ok(name: str) -> bool:
    """The kernel's rules, plus no quote, backslash or control character, no bidirectional or
    zero-width character, no trailing '~' (see models)."""
    return (
        1 <= len(name.encode()) <= 15
        and name not in (".", "..")
        and not name.endswith("~")
        and not any(
            c in '/:"\\' or c.isspace() or ord(c) < 0x20 or c == "\x7f" or c in _INVISIBLE
            for c in name
        )
    )


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_an_interface_name_is_valid_exactly_by_the_documented_rules(name: str) -> None:
    try:
        key(ifname=name)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == _ifname_ok(name)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=70), st.sampled_from(GOOD_NAMES + BAD_NAMES)),
    st.one_of(st.text(max_size=20), st.sampled_from(GOOD_NAMES)),
    st.one_of(st.text(max_size=20), st.sampled_from(GOOD_IFNAMES + list(BAD_IFNAMES.values()))),
)
def test_key_problem_agrees_with_the_model(network: str, container_id: str, ifname: str) -> None:
    """The journal replay's fast check applies exactly the model's rules."""
    try:
        key(network, container_id, ifname)
        valid = True
    except ValidationError:
        valid = False
    assert (key_problem(network, container_id, ifname) is None) == valid


# ---- the vectors masqd-cni is tested against too (cni/names_test.go) ---------------------

VECTORS = json.loads((Path(__file__).parent / "vectors" / "names.json").read_text())


def _accepted(field: str, value: str) -> bool:
    fields = {"network": "net1", "container_id": "c1", "ifname": "eth0", field: value}
    try:
        AttachmentKey(**fields)
    except ValidationError:
        model = False
    else:
        model = True
    fast = key_problem(fields["network"], fields["container_id"], fields["ifname"]) is None
    assert model == fast, (field, value)
    return model


@pytest.mark.parametrize("field", ["network", "container_id", "ifname"])
def test_the_shared_name_vectors_are_accepted_and_refused_as_listed(field: str) -> None:
    assert VECTORS[field]["valid"] and VECTORS[field]["invalid"]
    wrongly_refused = [v for v in VECTORS[field]["valid"] if not _accepted(field, v)]
    wrongly_accepted = [v for v in VECTORS[field]["invalid"] if _accepted(field, v)]
    assert (wrongly_refused, wrongly_accepted) == ([], [])


# ---- IPs --------------------------------------------------------------------------------

CANONICAL = {
    "10.22.0.5/16": "10.22.0.5/16",
    "198.18.1.2/32": "198.18.1.2/32",
    "2001:DB8:0:0::0005/64": "2001:db8::5/64",
    "fd00:22::5/64": "fd00:22::5/64",
    "10.22.0.5/255.255.0.0": "10.22.0.5/16",
    "2001:db8::1/128": "2001:db8::1/128",
    "100.64.0.1/10": "100.64.0.1/10",
}

BAD_IPS = {
    "no prefix": "10.22.0.5",
    "no prefix v6": "2001:db8::5",
    "garbage": "banana/24",
    "octet out of range": "10.22.0.256/16",
    "prefix too long": "10.22.0.5/33",
    "v6 prefix too long": "2001:db8::5/129",
    "negative prefix": "10.22.0.5/-1",
    "empty": "",
    "slash only": "/",
    "leading space": " 10.22.0.5/16",
    "trailing newline": "10.22.0.5/16\n",
    "zone id": "fe80::1%eth0/64",
    "multicast v4": "224.0.0.5/4",
    "multicast v4 high": "239.255.0.1/8",
    "multicast v6": "ff02::1/16",
    "loopback v4": "127.0.0.1/8",
    "loopback v4 other": "127.1.2.3/8",
    "loopback v6": "::1/128",
    "unspecified v4": "0.0.0.0/0",
    "unspecified v6": "::/0",
    "link-local v4": "169.254.1.1/16",
    "link-local v6": "fe80::1/64",
    "broadcast": "255.255.255.255/32",
    "v4-mapped": "::ffff:10.22.0.5/96",
    "v4-compatible": "::10.22.0.5/96",
}


@pytest.mark.parametrize(("given_ip", "canonical"), list(CANONICAL.items()))
def test_ips_are_kept_in_canonical_form(given_ip: str, canonical: str) -> None:
    assert parse_ip(given_ip) == canonical
    assert AttachmentSpec(ips=(given_ip,)).ips == (canonical,)


@pytest.mark.parametrize("ip", list(BAD_IPS.values()), ids=list(BAD_IPS))
def test_bad_ips_are_refused_with_a_reason(ip: str) -> None:
    with pytest.raises(ValidationError) as raised:
        AttachmentSpec(ips=(ip,))
    details = validation_details(raised.value.errors())
    assert details and details[0]["loc"].startswith("ips")
    assert details[0]["msg"]


def test_one_to_sixteen_ips() -> None:
    sixteen = [f"198.18.1.{n}/24" for n in range(2, 18)]
    assert len(AttachmentSpec(ips=tuple(sixteen)).ips) == 16
    for ips in ([], [*sixteen, "198.18.1.99/24"]):
        with pytest.raises(ValidationError):
            AttachmentSpec(ips=tuple(ips))


@pytest.mark.parametrize(
    "ips",
    [
        ["198.18.1.2/24", "198.18.1.2/24"],
        ["198.18.1.2/24", "198.18.1.2/16"],  # one address, two prefixes
        ["2001:db8::5/64", "2001:DB8::5/64"],  # the same once canonical
        ["2001:db8::5/64", "198.18.1.2/24", "2001:db8:0::5/48"],
    ],
)
def test_an_address_listed_twice_is_refused(ips: list[str]) -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        AttachmentSpec(ips=tuple(ips))


def test_dual_stack_is_fine() -> None:
    spec = AttachmentSpec(ips=("198.18.1.2/24", "2001:db8:1::2/64"))
    assert spec.ips == ("198.18.1.2/24", "2001:db8:1::2/64")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ips": "198.18.1.2/24"},  # a string is not a list
        {"ips": [5]},
        {"ips": [None]},
        {"ips": None},
        {"ips": [["198.18.1.2/24"]]},
        {"ips": {"198.18.1.2/24": True}},
        {"ips": ["198.18.1.2/24"], "extra": 1},  # unknown keys are refused
        {"IPS": ["198.18.1.2/24"]},
    ],
)
def test_bad_bodies_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AttachmentSpec.model_validate(body)


def test_extra_keys_are_refused_everywhere() -> None:
    with pytest.raises(ValidationError):
        AttachmentKey.model_validate({"network": "n", "container_id": "c", "ifname": "e", "x": 1})
    with pytest.raises(ValidationError):
        GcRequest.model_validate({"valid_attachments": [], "network": "n"})
    with pytest.raises(ValidationError):
        GcRequest.model_validate(
            {"valid_attachments": [{"container_id": "c", "ifname": "e", "x": 1}]}
        )
    with pytest.raises(ValidationError):
        Attachment.model_validate(
            {"network": "n", "container_id": "c", "ifname": "e", "ips": ["198.18.1.2/24"], "x": 1}
        )


def test_models_are_frozen() -> None:
    spec = AttachmentSpec(ips=("198.18.1.2/24",))
    with pytest.raises(ValidationError):
        spec.ips = ("198.18.1.3/24",)


def test_gc_request_needs_its_list() -> None:
    assert GcRequest.model_validate({"valid_attachments": []}).valid_attachments == ()
    for body in ({}, {"valid_attachments": None}, {"valid_attachments": [{"container_id": "c"}]}):
        with pytest.raises(ValidationError):
            GcRequest.model_validate(body)


@st.composite
def unicast_interfaces(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
            draw(st.integers(0, 2**32 - 1))
        )
        prefix = draw(st.integers(0, 32))
    else:
        addr = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        prefix = draw(st.integers(0, 128))
    return f"{addr}/{prefix}"


@settings(max_examples=500, deadline=None)
@given(unicast_interfaces())
def test_an_ip_is_accepted_exactly_when_it_is_plain_unicast(ip: str) -> None:
    addr = ipaddress.ip_interface(ip).ip
    refused = (
        addr.is_multicast
        or addr.is_loopback
        or addr.is_unspecified
        or addr.is_link_local
        or str(addr) == "255.255.255.255"
        or (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None)
        # IPv4-compatible (::a.b.c.d), deprecated: nft prints it unlike Python.
        or (isinstance(addr, ipaddress.IPv6Address) and int(addr) >> 32 == 0)
    )
    try:
        canonical = parse_ip(ip)
    except ValueError:
        assert refused
        return
    assert not refused
    # Canonical form is stable and keeps address and prefix.
    assert parse_ip(canonical) == canonical
    assert ipaddress.ip_interface(canonical) == ipaddress.ip_interface(ip)


def test_validation_details_name_the_cause_not_the_tuple() -> None:
    with pytest.raises(ValidationError) as raised:
        AttachmentSpec(ips=("224.0.0.1/4",))
    details = validation_details(raised.value.errors())
    assert len(details) == 1
    assert "multicast" in details[0]["msg"]

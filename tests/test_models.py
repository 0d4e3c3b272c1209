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
    COMMENT_MAX_BYTES,
    MAX_CONTAINER_ID,
    MAX_NETWORK_NAME,
    Attachment,
    AttachmentKey,
    AttachmentRef,
    AttachmentSpec,
    GcRequest,
    ValidAttachment,
    comment_problem,
    key_problem,
    parse_ip,
    validation_details,
)
from masqd.planning.ruleset import owner_comment, parse_owner_comment


def key(network: str = "net1", container_id: str = "c1", ifname: str = "eth0") -> AttachmentKey:
    return AttachmentKey(network=network, container_id=container_id, ifname=ifname)


# ---- network names and container IDs ---------------------------------------------------

# The name rules, shared with the Go plugin's tests (which read the same file).
VECTORS = json.loads((Path(__file__).parent / "vectors" / "names.json").read_text())
# Either field takes the other's valid names: the rules are the same, only the length differs.
GOOD_NAMES = [n for n in VECTORS["network"]["valid"] if len(n) <= MAX_NETWORK_NAME]
BAD_NAMES = [n for n in VECTORS["network"]["invalid"] if len(n) <= MAX_NETWORK_NAME]


@pytest.mark.parametrize(
    ("field", "name", "valid"),
    [
        (field, name, valid)
        for field in ("network", "container_id", "ifname")
        for valid in (True, False)
        for name in VECTORS[field]["valid" if valid else "invalid"]
    ],
)
def test_shared_name_vectors(field: str, name: str, valid: bool) -> None:
    parts = {"network": "n", "container_id": "c", "ifname": "eth0", field: name}
    try:
        AttachmentKey(**parts)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == valid
    assert (key_problem(**parts) is None) == valid


def test_the_vectors_cover_every_invisible_character_in_interface_names() -> None:
    for low, high in ((0x61C, 0x61C), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064),
                      (0x2066, 0x2069), (0xFEFF, 0xFEFF)):  # fmt: skip
        for code in range(low, high + 1):
            assert f"e{chr(code)}0" in VECTORS["ifname"]["invalid"], hex(code)


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

GOOD_IFNAMES = VECTORS["ifname"]["valid"]
BAD_IFNAMES = {repr(name): name for name in VECTORS["ifname"]["invalid"]}


@pytest.mark.parametrize("ifname", GOOD_IFNAMES)
def test_linux_interface_names_are_accepted(ifname: str) -> None:
    assert key(ifname=ifname).ifname == ifname


@pytest.mark.parametrize("ifname", list(BAD_IFNAMES.values()), ids=list(BAD_IFNAMES))
def test_bad_interface_names_are_refused(ifname: str) -> None:
    with pytest.raises(ValidationError):
        key(ifname=ifname)
    if _recorded_ifname_ok(ifname):
        # Accepted before the newer rules: such an attachment can still be named.
        assert ValidAttachment(container_id="c1", ifname=ifname).ifname == ifname
        assert AttachmentRef(network="n", container_id="c", ifname=ifname).ifname == ifname
        assert key_problem("n", "c", ifname, recorded=True) is None
    else:
        with pytest.raises(ValidationError):
            ValidAttachment(container_id="c1", ifname=ifname)
        assert key_problem("n", "c", ifname, recorded=True) is not None


def test_names_refused_only_by_the_newer_rules_still_name_an_attachment() -> None:
    for ifname in ("eth0~", "e\u200b0", "e\u202e0"):
        assert not _ifname_ok(ifname) and _recorded_ifname_ok(ifname)
        with pytest.raises(ValidationError, match=r"'~'|bidirectional"):
            key(ifname=ifname)


@pytest.mark.parametrize(
    ("network", "container_id", "ifname", "fits"),
    [
        ("n" * 64, "c" * 48, "x" * 14, True),  # 64 + 1 + 48 + 1 + 14 = 128 bytes
        ("n" * 64, "c" * 48, "x" * 15, False),  # 129
        ("n" * 63, "c" * 49, "\u00e9" * 7, True),  # 128 bytes, 121 characters
        ("n" * 64, "c" * 49, "\u00e9" * 7, False),  # 129 bytes
        ("net", "c" * 128, "eth0", False),
        ("podman", "0123456789abcdef" * 4, "eth0", True),  # the usual shape: 76 bytes
    ],
)
def test_a_new_key_must_fit_the_element_comment(
    network: str, container_id: str, ifname: str, fits: bool
) -> None:
    key(network, container_id, ifname)  # a valid key either way
    problem = comment_problem(network, container_id, ifname)
    assert (problem is None) == fits
    comment = owner_comment(network, container_id, ifname)
    assert (parse_owner_comment(comment) == (network, container_id, ifname)) == fits
    if not fits:
        assert problem is not None and f"at most {COMMENT_MAX_BYTES}" in problem


def _recorded_ifname_ok(name: str) -> bool:
    """The kernel's rules, plus no quote, backslash or control character (see models)."""
    return (
        1 <= len(name.encode()) <= 15
        and name not in (".", "..")
        and not any(c in '/:"\\' or c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in name)
    )


_INVISIBLE = {0x61C, *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065),
              *range(0x2066, 0x206A), 0xFEFF}  # fmt: skip


def _ifname_ok(name: str) -> bool:
    """The recorded rules, no bidirectional or zero-width character, no trailing '~'."""
    return (
        _recorded_ifname_ok(name)
        and not any(ord(c) in _INVISIBLE for c in name)
        and not name.endswith("~")
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20), st.text(alphabet="ab~\u200b\u202e\ufeff", max_size=6)))
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


# ---- IPs --------------------------------------------------------------------------------

CANONICAL = {
    "10.22.0.5/16": "10.22.0.5/16",
    "198.18.1.2/32": "198.18.1.2/32",
    "2001:DB8:0:0::0005/64": "2001:db8::5/64",
    "fd00:22::5/64": "fd00:22::5/64",
    "198.18.1.0/31": "198.18.1.0/31",
    "198.18.1.1/31": "198.18.1.1/31",
    "2001:db8::/127": "2001:db8::/127",
    "198.18.1.255/16": "198.18.1.255/16",
    "198.18.1.0/16": "198.18.1.0/16",
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
    "network address /24": "198.18.1.0/24",
    "broadcast /24": "198.18.1.255/24",
    "network address /30": "198.18.1.4/30",
    "broadcast /30": "198.18.1.7/30",
    "v6 subnet-router anycast": "2001:db8:1::/64",
    "zone on a global address": "2001:db8::5%eth0/64",
    "zone v4": "198.18.1.2%eth0/24",
    "netmask": "10.22.0.5/255.255.0.0",
    "hostmask": "10.22.0.5/0.0.255.255",
    "v6 prefix with a sign": "2001:db8::5/+64",
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
    net = ipaddress.ip_interface(ip).network
    refused = (
        addr.is_multicast
        or addr.is_loopback
        or addr.is_unspecified
        or addr.is_link_local
        or str(addr) == "255.255.255.255"
        or (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None)
        # IPv4-compatible (::a.b.c.d), deprecated: nft prints it unlike Python.
        or (isinstance(addr, ipaddress.IPv6Address) and int(addr) >> 32 == 0)
        # a subnet's own address, and IPv4's broadcast, except on /31, /32, /127, /128
        or (net.prefixlen < net.max_prefixlen - 1 and addr == net.network_address)
        or (net.version == 4 and net.prefixlen < 31 and addr == net.broadcast_address)
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

"""Every rule about valid input, in one place.

The API, the journal loader, the CLI and the adoption code all go through these types, so a
value that got past them is valid everywhere. Models are frozen and forbid unknown keys: a
typo in a request is an error, never a silently ignored field.

Inside the daemon attachments are kept in a compact form (strings and tuples, see `state`);
these models are the boundary.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_IPS_PER_ATTACHMENT = 16
MAX_NETWORK_NAME = 64
MAX_CONTAINER_ID = 128
MAX_IFNAME_BYTES = 15  # IFNAMSIZ - 1

# The CNI spec's pattern for network names and container IDs.
CNI_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
# The kernel's own rule (dev_valid_name), plus NUL (nftables refuses a whole batch with
# "\u0000" in an element comment, so one such name would stop every later sync), plus quotes,
# backslashes and control characters: the name lands in element comments that `nft list`
# prints unescaped.
_IFNAME_FORBIDDEN = re.compile(r'[/:\s\x00-\x1f\x7f"\\]')
# Bidirectional controls and zero-width characters: a listing would show another name than
# the one held.
_IFNAME_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")

MULTICAST4 = ipaddress.IPv4Network("224.0.0.0/4")
MULTICAST6 = ipaddress.IPv6Network("ff00::/8")


def _check_ifname(value: str) -> str:
    size = len(value.encode())
    if not 1 <= size <= MAX_IFNAME_BYTES:
        raise ValueError(f"interface name must be 1 to {MAX_IFNAME_BYTES} bytes, got {size}")
    if value in (".", ".."):
        raise ValueError("interface name must not be '.' or '..'")
    if _IFNAME_FORBIDDEN.search(value):
        raise ValueError(
            "interface name must not contain '/', ':', '\"', '\\', whitespace or control characters"
        )
    if _IFNAME_INVISIBLE.search(value):
        raise ValueError("interface name must not contain bidirectional or zero-width characters")
    if value.endswith("~"):
        raise ValueError("interface name must not end with '~'")
    return value


def parse_ip(value: str) -> str:
    """Canonical 'address/prefix' for an attachment IP, or ValueError saying why not.

    Link-local addresses are refused: they never leave their link, so there is nothing to
    masquerade, and fe80::/64 is the same subnet on every interface, which would make the
    per-IP subnet ambiguous.
    """
    if not isinstance(value, str):
        raise ValueError("an IP must be a string like '10.22.0.5/16'")
    if "/" not in value:
        raise ValueError(f"{value!r}: an IP needs a prefix length, like '10.22.0.5/16'")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address with prefix length") from exc
    addr = iface.ip
    for bad, what in (
        (addr.is_multicast, "multicast"),
        (addr.is_loopback, "loopback"),
        (addr.is_unspecified, "unspecified"),
        (addr.is_link_local, "link-local"),
    ):
        if bad:
            raise ValueError(
                f"{value!r} is a {what} address; only unicast addresses can be masqueraded"
            )
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value!r} is the broadcast address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise ValueError(f"{value!r} is an IPv4-mapped IPv6 address; give the IPv4 address instead")
    if isinstance(addr, ipaddress.IPv6Address) and int(addr) >> 32 == 0:
        # ::a.b.c.d (RFC 4291 deprecates it); nft would print it in a form Python does not.
        raise ValueError(f"{value!r} is an IPv4-compatible IPv6 address (deprecated)")
    return f"{addr}/{iface.network.prefixlen}"


def _check_ips(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for ip in values:
        addr = ip.split("/", 1)[0]
        if addr in seen:
            raise ValueError(f"address {addr} is listed twice")
        seen.add(addr)
    return values


NetworkName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NETWORK_NAME, pattern=CNI_NAME_PATTERN)
]
ContainerID = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_CONTAINER_ID, pattern=CNI_NAME_PATTERN)
]
IfName = Annotated[str, AfterValidator(_check_ifname)]
AttachmentIP = Annotated[str, AfterValidator(parse_ip)]
AttachmentIPs = Annotated[
    tuple[AttachmentIP, ...],
    Field(min_length=1, max_length=MAX_IPS_PER_ATTACHMENT),
    AfterValidator(_check_ips),
]

_CNI_NAME = re.compile(CNI_NAME_PATTERN)


def key_problem(network: str, container_id: str, ifname: str) -> str | None:
    """Why (network, container ID, ifname) is not a valid attachment key, or None.

    The same rules as `AttachmentKey`, without pydantic's per-call cost: start-up checks
    every journal record with it.
    """
    for name, value, limit in (
        ("network", network, MAX_NETWORK_NAME),
        ("container ID", container_id, MAX_CONTAINER_ID),
    ):
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= limit
            # fullmatch: re's `$` also matches before a final newline, which pydantic's
            # pattern (Rust regex) does not.
            or not _CNI_NAME.fullmatch(value)
        ):
            return f"invalid {name} {value!r}"
    try:
        _check_ifname(ifname)
    except (ValueError, AttributeError) as exc:
        return str(exc)
    return None


_STRICT = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class AttachmentKey(BaseModel):
    """Identity of an attachment: (network name, container ID, interface name)."""

    model_config = _STRICT
    network: NetworkName
    container_id: ContainerID
    ifname: IfName

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)


class AttachmentSpec(BaseModel):
    """Body of PUT /v1/attachments/{network}/{container_id}/{ifname}."""

    model_config = _STRICT
    ips: AttachmentIPs


class Attachment(BaseModel):
    """An attachment as the API returns it."""

    model_config = _STRICT
    network: NetworkName
    container_id: ContainerID
    ifname: IfName
    ips: AttachmentIPs


class ValidAttachment(BaseModel):
    """One entry of a GC request: an attachment the runtime still knows."""

    model_config = _STRICT
    container_id: ContainerID
    ifname: IfName


class GcRequest(BaseModel):
    """Body of POST /v1/networks/{network}/gc."""

    model_config = _STRICT
    valid_attachments: tuple[ValidAttachment, ...] = Field(max_length=1_000_000)


class GcResult(BaseModel):
    model_config = _STRICT
    network: str
    removed: tuple[Attachment, ...]


class ErrorBody(BaseModel):
    """What every rejected request answers: a message, and per-field details when useful."""

    model_config = _STRICT
    error: str
    details: tuple[dict[str, Any], ...] = ()


def validation_details(errors: list[Any]) -> tuple[dict[str, Any], ...]:
    """Pydantic's errors reduced to what a client can act on (no echo of huge inputs)."""
    # A failed item also makes pydantic count the tuple as too short: say only the cause.
    causes = [e for e in errors if e.get("type") != "too_short"] or errors
    return tuple(
        {"loc": ".".join(str(part) for part in err.get("loc", ())), "msg": err.get("msg", "")}
        for err in causes[:20]
    )

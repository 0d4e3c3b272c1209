"""Every rule about valid input, in one place.

The API (with `gcbody` for GC bodies), the DEL spool, the recovery from the kernel's table
(`planning.recovery`) and the CNI-rules migration go through these types, and the journal's
replay checks keys with `key_problem`, so a value that got past them is valid everywhere.
(`masqctl` checks nothing itself: the daemon judges what it sends.) Models are frozen and
forbid unknown keys: a typo in a request is an error, never a silently ignored field.

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
MAX_GC_ENTRIES = 1_000_000

# The CNI spec's pattern for network names and container IDs.
CNI_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
# The kernel's own rule (dev_valid_name), plus NUL (nftables refuses a whole batch with
# "\u0000" in an element comment, so one such name would stop every later sync), plus quotes,
# backslashes and control characters: the name lands in element comments that `nft list`
# prints unescaped.
_IFNAME_FORBIDDEN = re.compile(r'[/:\s\x00-\x1f\x7f"\\]')
# Bidirectional controls and zero-width characters: invisible in `nft list`, logs and
# `masqctl` output, they make two names that print alike name different attachments (and
# can reorder what a reader sees). Refused in every name; the CNI pattern already keeps them
# out of network names and container IDs, so this matters for interface names.
INVISIBLE_CHARACTERS = re.compile(
    r"[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)
# Marks an element comment that nftables' length limit cut (see `ruleset.owner_comment`):
# an interface name ending in it could not be told from a cut comment on adoption.
TRUNCATED_MARK = "~"
# nftables' limit on an element comment, in bytes without the terminating NUL (the `nft`
# parser refuses 129; tests/test_nft_kernel.py measures it). Element comments name the owner
# as 'network/container_id/ifname': a new attachment whose name does not fit is refused, or
# it could not be adopted back from the table after a journal loss.
COMMENT_MAX_BYTES = 128

_PREFIX_LENGTH = re.compile(r"[0-9]{1,3}")


def _check_recorded_ifname(value: str) -> str:
    """The kernel's rules and what nftables needs: enough to identify an attachment that the
    daemon already holds (journalled before the rules in `_check_ifname` were added)."""
    size = len(value.encode())
    if not 1 <= size <= MAX_IFNAME_BYTES:
        raise ValueError(f"interface name must be 1 to {MAX_IFNAME_BYTES} bytes, got {size}")
    if value in (".", ".."):
        raise ValueError("interface name must not be '.' or '..'")
    if _IFNAME_FORBIDDEN.search(value):
        raise ValueError(
            "interface name must not contain '/', ':', '\"', '\\', whitespace or control characters"
        )
    return value


def _check_ifname(value: str) -> str:
    """The rules for an interface name in a request: the recorded rules, and nothing that
    cannot be told apart on screen or read back from an element comment."""
    _check_recorded_ifname(value)
    if INVISIBLE_CHARACTERS.search(value):
        raise ValueError("interface name must not contain bidirectional or zero-width characters")
    if value.endswith(TRUNCATED_MARK):
        raise ValueError(f"interface name must not end in {TRUNCATED_MARK!r}")
    return value


def comment_problem(network: str, container_id: str, ifname: str) -> str | None:
    """Why a new attachment's name cannot round-trip through its element comment, or None.

    Checked only for keys the daemon does not hold yet: attachments accepted before this
    rule (journalled with longer names) keep working; only their adoption is not possible.
    """
    size = len(f"{network}/{container_id}/{ifname}".encode())
    if size > COMMENT_MAX_BYTES:
        return (
            f"network, container ID and interface name take {size} bytes as "
            f"'network/container_id/ifname'; at most {COMMENT_MAX_BYTES} fit in the kernel's "
            "element comment that lets masqd adopt the attachment back"
        )
    return None


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
    if "%" in value:
        # ipaddress accepts a scope and drops it from the network: the zone would be lost.
        raise ValueError(f"{value!r} has a zone (%...); give the address without it")
    if not _PREFIX_LENGTH.fullmatch(value.rsplit("/", 1)[1]):
        # ipaddress also takes a netmask or hostmask here; one spelling keeps the API exact.
        raise ValueError(f"{value!r}: the prefix must be a length like /16, not a mask")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address with prefix length") from exc
    addr = iface.ip
    net = iface.network
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
    # A subnet's own address (and IPv4's broadcast) is no host's: /31, /32, /127 and /128
    # have no such addresses (RFC 3021, RFC 6164).
    if net.prefixlen < net.max_prefixlen - 1 and addr == net.network_address:
        raise ValueError(f"{value!r} is the network address of {net}, not a host's")
    if (
        isinstance(addr, ipaddress.IPv4Address)
        and net.prefixlen < 31
        and addr == net.broadcast_address
    ):
        raise ValueError(f"{value!r} is the broadcast address of {net}, not a host's")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise ValueError(f"{value!r} is an IPv4-mapped IPv6 address; give the IPv4 address instead")
    if isinstance(addr, ipaddress.IPv6Address) and int(addr) >> 32 == 0:
        # ::a.b.c.d (RFC 4291 deprecates it); nft would print it in a form Python does not.
        raise ValueError(f"{value!r} is an IPv4-compatible IPv6 address (deprecated)")
    return f"{addr}/{net.prefixlen}"


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
RecordedIfName = Annotated[str, AfterValidator(_check_recorded_ifname)]
AttachmentIP = Annotated[str, AfterValidator(parse_ip)]
AttachmentIPs = Annotated[
    tuple[AttachmentIP, ...],
    Field(min_length=1, max_length=MAX_IPS_PER_ATTACHMENT),
    AfterValidator(_check_ips),
]

_CNI_NAME = re.compile(CNI_NAME_PATTERN)


def key_problem(
    network: str, container_id: str, ifname: str, *, recorded: bool = False
) -> str | None:
    """Why (network, container ID, ifname) is not a valid attachment key, or None.

    The same rules as `AttachmentKey` (with `recorded`, as `AttachmentRef`), without
    pydantic's per-call cost: start-up checks every journal record with it.
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
        (_check_recorded_ifname if recorded else _check_ifname)(ifname)
    except (ValueError, AttributeError) as exc:
        return str(exc)
    return None


# An attachment's key inside the daemon (state, journal, planning, adoption): (network,
# container ID, ifname), as `AttachmentKey.as_tuple` gives it.
AttachmentKeyT = tuple[str, str, str]

_STRICT = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class AttachmentKey(BaseModel):
    """Identity of an attachment: (network name, container ID, interface name)."""

    model_config = _STRICT
    network: NetworkName
    container_id: ContainerID
    ifname: IfName

    def as_tuple(self) -> AttachmentKeyT:
        return (self.network, self.container_id, self.ifname)


class AttachmentRef(BaseModel):
    """A key that names an attachment to read, delete or keep, not to create.

    Accepts the interface names that the rules added later refuse (a trailing '~',
    bidirectional or zero-width characters), so an attachment journalled before them can
    still be deleted, listed and kept by a GC.
    """

    model_config = _STRICT
    network: NetworkName
    container_id: ContainerID
    ifname: RecordedIfName

    def as_tuple(self) -> AttachmentKeyT:
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
    ifname: RecordedIfName
    ips: AttachmentIPs


class ValidAttachment(BaseModel):
    """One entry of a GC request: an attachment the runtime still knows."""

    model_config = _STRICT
    container_id: ContainerID
    ifname: RecordedIfName


class GcRequest(BaseModel):
    """Body of POST /v1/networks/{network}/gc."""

    model_config = _STRICT
    valid_attachments: tuple[ValidAttachment, ...] = Field(max_length=MAX_GC_ENTRIES)


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

"""Attachment identities and addresses for the benchmarks, all from the benchmarking ranges.

Attachment i gets the i-th host address of 198.18.0.0/15 with its /16 as its subnet (the
network and broadcast addresses of both /16s are skipped) and 2001:db8::<i+1>/64, so
100,000 dual-stack attachments fit with room to spare and every address is unique. The
index order is the creation order, which keeps fills resumable: growing from 1,000 to
10,000 attachments adds indices 1,000..9,999.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

NETWORK = "bench"
IFNAME = "eth0"
_BASE4 = int(ipaddress.IPv4Address("198.18.0.0"))
_SPAN4 = 1 << 17  # 198.18.0.0/15
_BASE6 = int(ipaddress.IPv6Address("2001:db8::"))
MAX_ATTACHMENTS = _SPAN4 - 4


@dataclass(frozen=True)
class Attachment:
    network: str
    container_id: str
    ifname: str
    ips: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"/v1/attachments/{self.network}/{self.container_id}/{self.ifname}"

    @property
    def ip4(self) -> str:
        return self.ips[0]


def ipv4(i: int) -> str:
    """The i-th host address of 198.18.0.0/15, with its /16 prefix."""
    if not 0 <= i < MAX_ATTACHMENTS:
        raise ValueError(f"attachment index {i} outside 0..{MAX_ATTACHMENTS - 1}")
    # Each /16 loses its network and broadcast address: 65,534 hosts per /16.
    half, offset = divmod(i, 65534)
    return f"{ipaddress.IPv4Address(_BASE4 + half * 65536 + offset + 1)}/16"


def ipv6(i: int) -> str:
    return f"{ipaddress.IPv6Address(_BASE6 + i + 1)}/64"


def attachment(i: int, *, dual_stack: bool = True, prefix: str = "c") -> Attachment:
    ips = (ipv4(i), ipv6(i)) if dual_stack else (ipv4(i),)
    return Attachment(NETWORK, f"{prefix}{i:07d}", IFNAME, ips)


def attachments(start: int, stop: int, *, dual_stack: bool = True) -> Iterator[Attachment]:
    """Attachments with indices start..stop-1."""
    for i in range(start, stop):
        yield attachment(i, dual_stack=dual_stack)


def fillers(count: int, *, avoid: frozenset[str], dual_stack: bool = True) -> list[Attachment]:
    """Exactly `count` attachments whose IPv4 address (without prefix) is not in `avoid`."""
    out: list[Attachment] = []
    i = 0
    while len(out) < count:
        a = attachment(i, dual_stack=dual_stack)
        if a.ip4.split("/")[0] not in avoid:
            out.append(a)
        i += 1
    return out

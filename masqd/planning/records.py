"""An attachment as the planner sees it, and the address parsing it is built from.

`DesiredState` holds one `AttachmentRecord` per attachment; the journal and the API turn
records back into CIDR strings (`cidrs_of`).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, init=False)
class AttachmentRecord:
    """An attachment as the planner sees it: its IPs as (address, subnet) and its setup order.

    Stored flat (address, subnet, address, subnet ...): one tuple per attachment instead of
    one per IP as well, about 10 MiB at 100,000 dual-stack attachments.
    """

    flat: tuple[str, ...]
    seq: int

    def __init__(self, ips: Iterable[tuple[str, str]], seq: int) -> None:
        object.__setattr__(self, "flat", tuple(part for pair in ips for part in pair))
        object.__setattr__(self, "seq", seq)

    @property
    def ips(self) -> tuple[tuple[str, str], ...]:
        flat = self.flat
        return tuple(zip(flat[::2], flat[1::2], strict=True))

    def cidrs(self) -> list[str]:
        """The IPs as the API and the journal write them: 'address/prefix length'."""
        return cidrs_of(self.ips)

    def subnet_of(self, address: str) -> str | None:
        """The subnet this attachment gave `address`; None when it does not hold it."""
        flat = self.flat
        for i in range(0, len(flat), 2):
            if flat[i] == address:
                return flat[i + 1]
        return None


def cidrs_of(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """(address, subnet) pairs -> 'address/prefix length' strings (`address_subnet` undone)."""
    return [f"{address}/{subnet.rpartition('/')[2]}" for address, subnet in pairs]


def address_subnet(ip: str) -> tuple[str, str]:
    """'10.22.0.5/16' -> ('10.22.0.5', '10.22.0.0/16').

    A fast path for both families: start-up replays 100,000 of these, and `ipaddress` costs
    about 25 us each. inet_ntop prints addresses as nft does (and as `ipaddress` does, for
    every address `models` admits).
    """
    address, _, prefix = ip.partition("/")
    family, width = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    if prefix.isdigit() and int(prefix) <= width:
        try:
            packed = socket.inet_pton(family, address)
        except OSError:
            pass
        else:
            bits = int(prefix)
            mask = ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)
            network = (int.from_bytes(packed, "big") & mask).to_bytes(width // 8, "big")
            # Interned: every attachment of a network shares one string.
            subnet = sys.intern(f"{socket.inet_ntop(family, network)}/{bits}")
            return socket.inet_ntop(family, packed), subnet
    iface = ipaddress.ip_interface(ip)
    return str(iface.ip), str(iface.network)

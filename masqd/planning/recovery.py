"""Recovery: rebuild attachments from the kernel's table when the journal cannot tell.

If masqd starts without its journal (deleted, or a state directory that did not survive)
while `table inet <name>` is still in the kernel, the table itself is the best record of
what the runtime asked for: every sources element and its local element carry a comment
naming their owner, `network/container_id/ifname` (see `ruleset.owner_comment`), and the local
element gives the address's subnet. Starting empty instead would make the first sync delete
every element, and every container would lose its masquerade until its runtime happened to
call again, which for a running container is never.

`recover` is a pure function of an observed table. What it cannot read back whole (no owner
comment, a comment cut short by nftables' length limit, a sources element without its local
element, an owner or address that the models refuse) is listed as unreadable, never
guessed: the daemon reports those, and the first sync removes them since no attachment holds
them. Attachments recovered wrongly cost little: the runtime's next GC of the network removes
any that it does not know.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pydantic import ValidationError

from masqd.models import AttachmentKeyT, AttachmentRef, AttachmentSpec, parse_ip
from masqd.planning.ruleset import (
    SOURCES4,
    SOURCES6,
    Element,
    TableState,
    parse_local_set,
    parse_owner_comment,
)


@dataclass
class Recovery:
    """Attachments read back from a table (key -> canonical 'address/prefix' IPs), and a
    description of every element that could not be."""

    attachments: dict[AttachmentKeyT, tuple[str, ...]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


def recover(table: TableState) -> Recovery:
    result = Recovery()
    if table.structure is None:
        return result
    found: dict[AttachmentKeyT, list[tuple[str, str]]] = {}  # owner -> [(ip, element name)]
    for family, sources_name in ((4, SOURCES4), (6, SOURCES6)):
        local_name = f"local{family}"  # names its local{family}_<plen> sets in messages
        sources = table.sets.get(sources_name, {})
        # One local element per address, in the set of its subnet's prefix length.
        local: dict[str, Element] = {}
        for name, elems in sorted(table.sets.items()):
            parsed = parse_local_set(name)
            if parsed is not None and parsed[0] == family:
                local.update(elems)
        for address, source in sorted(sources.items()):
            where = f"{sources_name} {address}"
            subnet_elem = local.get(address)
            if subnet_elem is None:
                result.unreadable.append(f"{where}: no {local_name} element gives its subnet")
                continue
            owner, problem = _owner(subnet_elem, source)
            if owner is None:
                result.unreadable.append(f"{where}: {problem}")
                continue
            ip, problem = _ip(address, subnet_elem.subnet)
            if ip is None:
                result.unreadable.append(f"{where}: {problem}")
                continue
            found.setdefault(owner, []).append((ip, where))
        for address in sorted(local.keys() - sources.keys()):
            result.unreadable.append(f"{local_name} {address}: no {sources_name} element")
    for owner in sorted(found):
        ips = tuple(ip for ip, _ in found[owner])
        try:
            spec = AttachmentSpec(ips=ips)
        except ValidationError as exc:
            reason = "; ".join(str(e["msg"]) for e in exc.errors())
            name = "/".join(owner)
            result.unreadable.extend(
                f"{where}: owner {name}: {reason}" for _, where in found[owner]
            )
            continue
        result.attachments[owner] = spec.ips
    return result


def _owner(local: Element, source: Element) -> tuple[AttachmentKeyT | None, str]:
    """The owner named by the local element's comment (it also decides the subnet), else the
    sources element's; None and why when neither names a valid attachment."""
    for elem in (local, source):
        parts = parse_owner_comment(elem.comment)
        if parts is None:
            continue
        try:
            key = AttachmentRef(network=parts[0], container_id=parts[1], ifname=parts[2])
        except ValidationError:
            continue
        return key.as_tuple(), ""
    comment = local.comment or source.comment
    if comment is None:
        return None, "no owner comment"
    return None, f"comment {comment!r} names no attachment (or was cut short)"


def _ip(address: str, subnet: str | None) -> tuple[str | None, str]:
    if subnet is None:
        return None, "its local element has no subnet"
    try:
        network = ipaddress.ip_network(subnet)
        if ipaddress.ip_address(address) not in network:
            return None, f"address is outside its listed subnet {subnet}"
        return parse_ip(f"{address}/{network.prefixlen}"), ""
    except ValueError as exc:
        return None, str(exc)

"""masqd's table layout as an `nft -f` script, and a shape to compare tables by.

The layout is the daemon's (masqd/planning/ruleset.py): sources and `exempt` sets
(destinations never masqueraded, empty by default), and one hash set
`local4_<plen>`/`local6_<plen>` of (address . network address) per prefix length in use,
each with its rule masking the destination to
that length, longest prefix first, rules in the daemon's order. The connection-rate
benchmark measures the table the daemon itself wrote when the daemon is there, and this
script when it is not; `shape()` reduces an `nft --json list table` dump to what decides
per-packet cost (sets with type, flags and element count; chains with hook and priority;
rules without handles) so the two can be compared and a drift between them is reported.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator
from typing import Any

from bench.addresses import Attachment

TABLE = "masqd"
_BASE_CHAIN = "type nat hook postrouting priority srcnat ; policy accept ;"
_CHUNK = 2000  # elements per `add element` line: keeps nft's parser input lines moderate


def _owner(a: Attachment) -> str:
    return f"{a.network}/{a.container_id}/{a.ifname}"


def _elements(attachments: Iterable[Attachment]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {"sources4": [], "sources6": []}
    for a in attachments:
        comment = json.dumps(_owner(a))
        for ip in a.ips:
            iface = ipaddress.ip_interface(ip)
            v = str(iface.version)
            local = f"local{v}_{iface.network.prefixlen}"
            sets["sources" + v].append(f"{iface.ip} comment {comment}")
            sets.setdefault(local, []).append(
                f"{iface.ip} . {iface.network.network_address} comment {comment}"
            )
    return sets


def _local_rules(t: str, sets: Iterable[str], v: str) -> list[str]:
    proto, width = ("ip", 32) if v == "4" else ("ip6", 128)
    plens = sorted((int(n.split("_")[1]) for n in sets if n.startswith(f"local{v}_")), reverse=True)
    rules = []
    for plen in plens:
        net = ipaddress.ip_network(f"{'0.0.0.0' if v == '4' else '::'}/{plen}")
        masked = f"{proto} daddr" + ("" if plen == width else f" & {net.netmask}")
        rules.append(f"add rule {t} postrouting {proto} saddr . {masked} @local{v}_{plen} return")
    return rules


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def table_script(attachments: Iterable[Attachment], table: str = TABLE) -> str:
    t = f"inet {table}"
    sets = _elements(attachments)
    locals_ = sorted(n for n in sets if n.startswith("local"))
    lines = [
        f"add table {t}",
        f"add set {t} sources4 {{ type ipv4_addr ; }}",
        f"add set {t} exempt4 {{ type ipv4_addr ; flags interval ; }}",
        f"add set {t} sources6 {{ type ipv6_addr ; }}",
        f"add set {t} exempt6 {{ type ipv6_addr ; flags interval ; }}",
        *(f"add set {t} {n} {{ type ipv{n[5]}_addr . ipv{n[5]}_addr ; }}" for n in locals_),
        f"add chain {t} postrouting {{ {_BASE_CHAIN} }}",
        f"add rule {t} postrouting ip daddr 224.0.0.0/4 return",
        f"add rule {t} postrouting ip daddr @exempt4 return",
        *_local_rules(t, locals_, "4"),
        f"add rule {t} postrouting ip saddr @sources4 masquerade",
        f"add rule {t} postrouting ip6 daddr ff00::/8 return",
        f"add rule {t} postrouting ip6 daddr @exempt6 return",
        *_local_rules(t, locals_, "6"),
        f"add rule {t} postrouting ip6 saddr @sources6 masquerade",
    ]
    for name, elements in sets.items():
        for chunk in _chunks(elements):
            lines.append(f"add element {t} {name} {{ {', '.join(chunk)} }}")
    return "\n".join(lines) + "\n"


def shape(listing: str) -> dict[str, Any]:
    """What decides per-packet cost in an `nft --json list table` dump; names kept."""
    sets: dict[str, Any] = {}
    chains: dict[str, Any] = {}
    rules: dict[str, list[Any]] = {}
    for obj in json.loads(listing)["nftables"]:
        if "set" in obj:
            s = obj["set"]
            sets[s["name"]] = {
                "type": s["type"],
                "flags": sorted(s.get("flags", [])),
                "elements": len(s.get("elem", [])),
            }
        elif "chain" in obj:
            c = obj["chain"]
            chains[c["name"]] = {k: c.get(k) for k in ("type", "hook", "prio", "policy")}
        elif "rule" in obj:
            r = obj["rule"]
            rules.setdefault(r["chain"], []).append(r["expr"])
    return {"sets": sets, "chains": chains, "rules": rules}


def shape_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Human-readable differences between two shapes; empty when they match."""
    diffs = []
    for part in ("sets", "chains", "rules"):
        a, b = ours[part], theirs[part]
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                diffs.append(f"{part} {name}: bench={a.get(name)!r} daemon={b.get(name)!r}")
    return diffs

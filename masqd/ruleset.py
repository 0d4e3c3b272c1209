"""The shape of masqd's nftables table, as values.

One place names every set, the chain and its rules, and says how an element is written in
nftables JSON (libnftables-json(5)) and read back. The planner compares these values; the
backend turns them into JSON and parses the kernel's listing into them.

    table inet <name> {
        set sources4 { type ipv4_addr; }                              # IPs to masquerade
        set local4   { type ipv4_addr . ipv4_addr; flags interval; }  # (IP . its subnet): never
        set exempt4  { type ipv4_addr; flags interval; }              # never masqueraded to
        ... the same for IPv6 ...
        chain postrouting { type nat hook postrouting priority srcnat; policy accept; ... }
    }
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

# Sets, by family.
SOURCES4 = "sources4"
LOCAL4 = "local4"
EXEMPT4 = "exempt4"
SOURCES6 = "sources6"
LOCAL6 = "local6"
EXEMPT6 = "exempt6"
# The one chain.
CHAIN = "postrouting"
CHAIN_PRIORITY = 100  # srcnat

SOURCE_SETS = (SOURCES4, SOURCES6)
LOCAL_SETS = (LOCAL4, LOCAL6)
EXEMPT_SETS = (EXEMPT4, EXEMPT6)
ALL_SETS = (SOURCES4, LOCAL4, EXEMPT4, SOURCES6, LOCAL6, EXEMPT6)

COMMENT_MAX_BYTES = 128  # nftables refuses longer element comments
TRUNCATED_MARK = "~"  # never valid in a CNI name, so a truncated owner is recognisable

_SET_TYPES: dict[str, tuple[Any, tuple[str, ...]]] = {
    SOURCES4: ("ipv4_addr", ()),
    LOCAL4: (["ipv4_addr", "ipv4_addr"], ("interval",)),
    EXEMPT4: ("ipv4_addr", ("interval",)),
    SOURCES6: ("ipv6_addr", ()),
    LOCAL6: (["ipv6_addr", "ipv6_addr"], ("interval",)),
    EXEMPT6: ("ipv6_addr", ("interval",)),
}


@dataclass(frozen=True, slots=True)
class Element:
    """One set element. `key` is the address (sources, local) or CIDR (exempt); `subnet` is the
    address's own subnet for the local sets; `comment` names the owner."""

    key: str
    subnet: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class Policy:
    """What applies to every attachment: destinations never masqueraded, masquerade flags."""

    exempt4: tuple[str, ...] = ()
    exempt6: tuple[str, ...] = ()
    random_fully: bool = False


@dataclass(frozen=True)
class Structure:
    """Everything in the table but the elements. Two structures compare equal exactly when the
    kernel objects are interchangeable."""

    sets: frozenset[tuple[str, str, tuple[str, ...]]]
    chains: frozenset[tuple[str, str | None, str | None, int | None, str | None]]
    rules: tuple[str, ...]  # canonical JSON of each rule's expressions, in chain order


@dataclass
class TableState:
    """A table's content: desired (from attachments and policy) or observed (from the kernel).

    `structure` is None when the table does not exist. `sets` maps set name -> key -> element.
    """

    structure: Structure | None
    sets: dict[str, dict[str, Element]] = field(default_factory=lambda: {s: {} for s in ALL_SETS})

    def copy(self) -> TableState:
        return TableState(self.structure, {name: dict(elems) for name, elems in self.sets.items()})

    def element_count(self) -> int:
        return sum(len(elems) for elems in self.sets.values())


def family_sets(address: str) -> tuple[str, str]:
    """(sources set, local set) for an address string."""
    return (SOURCES6, LOCAL6) if ":" in address else (SOURCES4, LOCAL4)


def owner_comment(network: str, container_id: str, ifname: str) -> str:
    """'network/container/ifname', cut to what nftables stores, the cut marked."""
    comment = f"{network}/{container_id}/{ifname}"
    raw = comment.encode()
    if len(raw) <= COMMENT_MAX_BYTES:
        return comment
    return raw[: COMMENT_MAX_BYTES - 1].decode(errors="ignore") + TRUNCATED_MARK


def parse_owner_comment(comment: str | None) -> tuple[str, str, str] | None:
    """The owner named by an element comment, or None when it cannot be read back whole."""
    if not comment or comment.endswith(TRUNCATED_MARK):
        return None
    parts = comment.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return (parts[0], parts[1], parts[2])


# ---- desired structure ------------------------------------------------------------------


def _payload(proto: str, field_: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field_}}


def _match(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _prefix(cidr: str) -> dict[str, Any]:
    addr, length = _split_network(cidr)
    return {"prefix": {"addr": addr, "len": length}}


@functools.lru_cache(maxsize=4096)
def _split_network(cidr: str) -> tuple[str, int]:
    # Subnets recur across 100,000 elements; a whole-table transaction parses each once.
    net = ipaddress.ip_network(cidr)
    return str(net.network_address), net.prefixlen


def rule_exprs(policy: Policy) -> list[list[dict[str, Any]]]:
    """The chain's rules, in the exact form the kernel lists them back (so they compare equal)."""
    masquerade: dict[str, Any] = (
        {"masquerade": {"flags": "fully-random"}} if policy.random_fully else {"masquerade": None}
    )
    ret: dict[str, Any] = {"return": None}
    rules: list[list[dict[str, Any]]] = []
    for proto, multicast, exempt, local, sources in (
        ("ip", "224.0.0.0/4", EXEMPT4, LOCAL4, SOURCES4),
        ("ip6", "ff00::/8", EXEMPT6, LOCAL6, SOURCES6),
    ):
        rules.append([_match(_payload(proto, "daddr"), _prefix(multicast)), ret])
        rules.append([_match(_payload(proto, "daddr"), f"@{exempt}"), ret])
        pair = {"concat": [_payload(proto, "saddr"), _payload(proto, "daddr")]}
        rules.append([_match(pair, f"@{local}"), ret])
        rules.append([_match(_payload(proto, "saddr"), f"@{sources}"), masquerade])
    return rules


def canonical(exprs: Any) -> str:
    return json.dumps(exprs, sort_keys=True, separators=(",", ":"))


def desired_structure(policy: Policy) -> Structure:
    return Structure(
        sets=frozenset(
            (name, canonical(kind), flags) for name, (kind, flags) in _SET_TYPES.items()
        ),
        chains=frozenset({(CHAIN, "nat", "postrouting", CHAIN_PRIORITY, "accept")}),
        rules=tuple(canonical(r) for r in rule_exprs(policy)),
    )


# ---- JSON encoding ----------------------------------------------------------------------


def table_ref(table: str) -> dict[str, Any]:
    return {"family": "inet", "name": table}


def structure_commands(table: str, policy: Policy) -> list[dict[str, Any]]:
    """Commands that create every set, the chain and its rules in an existing, empty table."""
    cmds: list[dict[str, Any]] = []
    for name, (kind, flags) in _SET_TYPES.items():
        spec: dict[str, Any] = {"family": "inet", "table": table, "name": name, "type": kind}
        if flags:
            spec["flags"] = list(flags)
        cmds.append({"add": {"set": spec}})
    cmds.append({"add": {"chain": chain_spec(table)}})
    cmds.extend(rule_commands(table, policy))
    return cmds


def chain_spec(table: str) -> dict[str, Any]:
    return {
        "family": "inet",
        "table": table,
        "name": CHAIN,
        "type": "nat",
        "hook": "postrouting",
        "prio": CHAIN_PRIORITY,
        "policy": "accept",
    }


def rule_commands(table: str, policy: Policy) -> list[dict[str, Any]]:
    return [
        {"add": {"rule": {"family": "inet", "table": table, "chain": CHAIN, "expr": exprs}}}
        for exprs in rule_exprs(policy)
    ]


def element_value(set_name: str, elem: Element) -> Any:
    if set_name in LOCAL_SETS:
        assert elem.subnet is not None
        return {"concat": [elem.key, _prefix(elem.subnet)]}
    if set_name in EXEMPT_SETS:
        return _prefix(elem.key)
    return elem.key


def element_json(set_name: str, elem: Element, *, with_comment: bool = True) -> Any:
    value = element_value(set_name, elem)
    if with_comment and elem.comment:
        return {"elem": {"val": value, "comment": elem.comment}}
    return value


def element_script(set_name: str, elem: Element) -> str:
    """The element as nft script text, for logs and `masqctl diff`."""
    text = f"{elem.key} . {elem.subnet}" if set_name in LOCAL_SETS else elem.key
    if elem.comment:
        text += f' comment "{elem.comment}"'
    return text


# ---- parsing the kernel's listing -------------------------------------------------------


class UnexpectedListing(ValueError):
    """The kernel listed something this module cannot read (a foreign element shape)."""


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> str:
    # Few distinct subnets recur across 100,000 elements: parse each once.
    return str(ipaddress.ip_network(text))


def _cidr(value: Any) -> str:
    """A listed address, prefix or range, as one CIDR (ranges that are not one CIDR raise)."""
    if isinstance(value, str):
        return _network(value)
    if isinstance(value, dict) and "prefix" in value:
        return _network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(v) for v in value["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        if len(nets) == 1:
            return str(nets[0])
    raise UnexpectedListing(f"unexpected set value {value!r}")


def _cidrs(value: Any) -> list[str]:
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(v) for v in value["range"])
        return [str(n) for n in ipaddress.summarize_address_range(lo, hi)]
    return [_cidr(value)]


def parse_elements(
    set_name: str, listed: list[Any], duplicates: list[str] | None = None
) -> dict[str, Element]:
    """A set's listed elements by key; keys listed more than once go to `duplicates`."""
    out: dict[str, Element] = {}
    for item in listed:
        comment = None
        value = item
        if isinstance(item, dict) and "elem" in item:
            comment = item["elem"].get("comment")
            value = item["elem"]["val"]
        if set_name in LOCAL_SETS:
            if not (isinstance(value, dict) and "concat" in value and len(value["concat"]) == 2):
                raise UnexpectedListing(f"unexpected {set_name} element {value!r}")
            addr_v, subnet_v = value["concat"]
            addr = addr_v if isinstance(addr_v, str) else _cidr(addr_v).split("/")[0]
            if duplicates is not None and addr in out:
                duplicates.append(addr)
            out[addr] = Element(addr, _cidr(subnet_v), comment)
        elif set_name in EXEMPT_SETS:
            for cidr in _cidrs(value):
                out[cidr] = Element(cidr, None, comment)
        else:
            if not isinstance(value, str):
                raise UnexpectedListing(f"unexpected {set_name} element {value!r}")
            out[value] = Element(value, None, comment)
    return out


# The keys of a listed set that our own sets have; any other key is a difference.
_SET_IDENTITY = frozenset({"family", "name", "table", "type", "handle", "flags", "elem"})


def parse_table(table: str, listing: list[dict[str, Any]]) -> TableState:
    """The kernel's JSON listing of `table inet <table>` as a TableState.

    Objects the design does not have (a foreign set, chain or rule) land in the structure, so
    they make it differ from the desired one and get repaired.
    """
    sets: set[tuple[str, str, tuple[str, ...]]] = set()
    chains: set[tuple[str, str | None, str | None, int | None, str | None]] = set()
    rules: list[str] = []
    elements: dict[str, dict[str, Element]] = {s: {} for s in ALL_SETS}
    found = False
    for obj in listing:
        if "table" in obj:
            found = found or obj["table"].get("name") == table
        elif "set" in obj or "map" in obj:
            spec = obj.get("set") or obj["map"]
            kind = "map" if "map" in obj else "set"
            name = spec["name"]
            # Anything else that shapes a set (size, timeout, policy, comment...) must be absent,
            # as in ours: a look-alike `size 1` set would make every later sync fail.
            extra = {k: v for k, v in spec.items() if k not in _SET_IDENTITY}
            sets.add(
                (
                    (name if kind == "set" else f"map:{name}")
                    + (f" {canonical(extra)}" if extra else ""),
                    canonical(spec.get("type")),
                    tuple(spec.get("flags", ())),
                )
            )
            if kind == "set" and name in elements:
                duplicates: list[str] = []
                elements[name] = parse_elements(name, spec.get("elem", []), duplicates)
                # The kernel accepts a local element whose subnet encloses one it holds, and
                # deletes match the first point only: element operations cannot repair an
                # address listed twice, so it counts as damage to the structure (replace).
                sets.update((f"duplicate:{name}:{addr}", "", ()) for addr in duplicates)
        elif "chain" in obj:
            c = obj["chain"]
            chains.add((c["name"], c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")))
        elif "rule" in obj:
            r = obj["rule"]
            # Rules of a foreign chain are part of its structure too.
            prefix = "" if r.get("chain") == CHAIN else f"{r.get('chain')}:"
            rules.append(prefix + canonical(r.get("expr")))
        elif "metainfo" in obj:
            continue
        else:
            # flowtables, counters, quotas...: anything else is foreign structure.
            sets.add((f"other:{canonical(obj)}", "", ()))
    if not found:
        return TableState(None)
    return TableState(Structure(frozenset(sets), frozenset(chains), tuple(rules)), elements)

"""The shape of masqd's nftables table, as values.

One place names every set, the chain and its rules, and says how an element is written in
nftables JSON (libnftables-json(5)) and read back. The planner compares these values; the
backend turns them into JSON and parses the kernel's listing into them.

    table inet <name> {
        set sources4    { type ipv4_addr; }                   # IPs to masquerade
        set exempt4     { type ipv4_addr; flags interval; }   # never masqueraded to
        set local4_24   { type ipv4_addr . ipv4_addr; }       # (IP . its /24 network): never
        set local4_16   { type ipv4_addr . ipv4_addr; }       #   masqueraded to its own subnet
        ... the same for IPv6 (local6_<plen>) ...
        chain postrouting {
            type nat hook postrouting priority srcnat; policy accept;
            ip daddr 224.0.0.0/4 return
            ip daddr @exempt4 return
            ip saddr . ip daddr & 255.255.255.0 @local4_24 return
            ip saddr . ip daddr & 255.255.0.0 @local4_16 return
            ip saddr @sources4 masquerade
            ... the same for IPv6 ...
        }
    }

The local sets are plain hash sets, one per prefix length in use, holding (address . network
address of its subnet); the rule masks the destination to that prefix length before the
lookup. A concatenated interval set would need one set for all prefix lengths, but the kernel
implements it with pipapo, whose every change costs O(set size) (25 ms to delete one element
of 100,000): hash sets keep a change O(1), and a connection pays one hash lookup per prefix
length in use (usually one or two). Which local sets exist is therefore derived from the
elements (`desired_structure(policy, local_sets)`); a set for a prefix length no longer in
use is removed, a new one added with its rule, in the same transaction as the elements.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from masqd import models

# Sets, by family (the local sets are named by `local_set`: local4_<plen>, local6_<plen>).
SOURCES4 = "sources4"
EXEMPT4 = "exempt4"
SOURCES6 = "sources6"
EXEMPT6 = "exempt6"
LOCAL_PREFIXES = {4: "local4_", 6: "local6_"}
# The one chain.
CHAIN = "postrouting"
CHAIN_PRIORITY = 100  # srcnat

SOURCE_SETS = (SOURCES4, SOURCES6)
EXEMPT_SETS = (EXEMPT4, EXEMPT6)
FIXED_SETS = (SOURCES4, EXEMPT4, SOURCES6, EXEMPT6)  # always there, whatever the attachments

# nftables refuses longer element comments; "~" is never valid at the end of a name (see
# models), so a truncated owner is recognisable.
COMMENT_MAX_BYTES = models.COMMENT_MAX_BYTES
TRUNCATED_MARK = models.TRUNCATED_MARK

_SET_TYPES: dict[str, tuple[Any, tuple[str, ...]]] = {
    SOURCES4: ("ipv4_addr", ()),
    EXEMPT4: ("ipv4_addr", ("interval",)),
    SOURCES6: ("ipv6_addr", ()),
    EXEMPT6: ("ipv6_addr", ("interval",)),
}
_LOCAL_TYPES: dict[int, Any] = {4: ["ipv4_addr", "ipv4_addr"], 6: ["ipv6_addr", "ipv6_addr"]}
_WIDTH = {4: 32, 6: 128}


@functools.cache
def local_set(family: int, plen: int) -> str:
    """The local set of a family (4 or 6) and prefix length: 'local4_16', 'local6_64'.

    Cached: one string per name, however many elements' bookkeeping refers to it."""
    return f"{LOCAL_PREFIXES[family]}{plen}"


@functools.lru_cache(maxsize=512)
def parse_local_set(name: str) -> tuple[int, int] | None:
    """(family, prefix length) of a local set's name; None for any other name (including
    look-alikes such as 'local4_016' or 'local4_33', which are foreign)."""
    for family, prefix in LOCAL_PREFIXES.items():
        if name.startswith(prefix):
            digits = name[len(prefix) :]
            if digits.isdigit() and str(int(digits)) == digits and int(digits) <= _WIDTH[family]:
                return family, int(digits)
    return None


def local_family(name: str) -> int | None:
    """4 or 6 for a local set's name; None for any other name."""
    parsed = parse_local_set(name)
    return parsed[0] if parsed is not None else None


def is_local_set(name: str) -> bool:
    return parse_local_set(name) is not None


def is_our_set(name: str) -> bool:
    """A set whose elements masqd reads and writes: a fixed set or a local set."""
    return name in _SET_TYPES or parse_local_set(name) is not None


def set_type(name: str) -> tuple[Any, tuple[str, ...]]:
    """(nftables type, flags) of one of our sets."""
    local = parse_local_set(name)
    if local is not None:
        return _LOCAL_TYPES[local[0]], ()
    return _SET_TYPES[name]


def local_set_of(address: str, subnet: str) -> str:
    """The local set that holds the element (address . subnet)."""
    return local_set(6 if ":" in address else 4, int(subnet.rpartition("/")[2]))


def local_order(names: Iterable[str]) -> tuple[str, ...]:
    """Local set names in chain order: IPv4 first, then the longest prefix first. Any fixed
    order is right (an address has one local element), a fixed one keeps the rules stable."""
    parsed = sorted(
        (fp[0], -fp[1], name) for name in names if (fp := parse_local_set(name)) is not None
    )
    return tuple(name for _, _, name in parsed)


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
    # (name, type, hook, priority, policy) of each chain
    chains: frozenset[tuple[str, str | None, str | None, int | None, str | None]]
    rules: tuple[str, ...]  # canonical JSON of each rule's expressions, in chain order
    # The table's flags as listed; ours has none. `dormant` unhooks every chain: masquerade
    # stops while every set and rule still looks right.
    table_flags: tuple[str, ...] = ()


@dataclass
class TableState:
    """A table's content: desired (from attachments and policy) or observed (from the kernel).

    `structure` is None when the table does not exist. `sets` maps set name -> key -> element.
    """

    structure: Structure | None
    sets: dict[str, dict[str, Element]] = field(default_factory=lambda: {s: {} for s in FIXED_SETS})

    def copy(self) -> TableState:
        return TableState(self.structure, {name: dict(elems) for name, elems in self.sets.items()})


def sources_set(address: str) -> str:
    """The sources set for an address string."""
    return SOURCES6 if ":" in address else SOURCES4


def owner_comment(network: str, container_id: str, ifname: str) -> str:
    """'network/container/ifname', cut to what nftables stores, the cut marked."""
    comment = f"{network}/{container_id}/{ifname}"
    raw = comment.encode()
    if len(raw) <= COMMENT_MAX_BYTES:
        return comment
    return raw[: COMMENT_MAX_BYTES - 1].decode(errors="ignore") + TRUNCATED_MARK


def parse_owner_comment(comment: str | None) -> models.AttachmentKeyT | None:
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


def _mask(family: int, plen: int) -> str:
    width = _WIDTH[family]
    bits = ((1 << width) - 1) ^ ((1 << (width - plen)) - 1)
    return str(ipaddress.ip_address(bits) if family == 4 else ipaddress.IPv6Address(bits))


def _masked_daddr(proto: str, family: int, plen: int) -> Any:
    # nft drops an all-ones mask (it lists a /32 or /128 rule as plain `daddr`): so do we,
    # so that the rule compares equal to its listing.
    if plen == _WIDTH[family]:
        return _payload(proto, "daddr")
    return {"&": [_payload(proto, "daddr"), _mask(family, plen)]}


def rule_exprs(policy: Policy, local_sets: Iterable[str]) -> list[list[dict[str, Any]]]:
    """The chain's rules, in the exact form the kernel lists them back (so they compare equal).

    One local rule per local set in `local_sets`, between the exempt return and the
    masquerade of its family."""
    masquerade: dict[str, Any] = (
        {"masquerade": {"flags": "fully-random"}} if policy.random_fully else {"masquerade": None}
    )
    ret: dict[str, Any] = {"return": None}
    locals_ = local_order(local_sets)
    rules: list[list[dict[str, Any]]] = []
    for family, proto, multicast, exempt, sources in (
        (4, "ip", "224.0.0.0/4", EXEMPT4, SOURCES4),
        (6, "ip6", "ff00::/8", EXEMPT6, SOURCES6),
    ):
        rules.append([_match(_payload(proto, "daddr"), _prefix(multicast)), ret])
        rules.append([_match(_payload(proto, "daddr"), f"@{exempt}"), ret])
        for name in locals_:
            fam, plen = parse_local_set(name) or (0, 0)
            if fam == family:
                pair = {"concat": [_payload(proto, "saddr"), _masked_daddr(proto, family, plen)]}
                rules.append([_match(pair, f"@{name}"), ret])
        rules.append([_match(_payload(proto, "saddr"), f"@{sources}"), masquerade])
    return rules


def canonical(exprs: Any) -> str:
    return json.dumps(exprs, sort_keys=True, separators=(",", ":"))


def set_entry(name: str) -> tuple[str, str, tuple[str, ...]]:
    """How one of our sets appears in `Structure.sets`."""
    kind, flags = set_type(name)
    return (name, canonical(kind), flags)


def desired_structure(policy: Policy, local_sets: Iterable[str]) -> Structure:
    """The table's structure: the fixed sets, the given local sets, the chain and its rules."""
    locals_ = local_order(local_sets)
    return Structure(
        sets=frozenset(set_entry(name) for name in (*_SET_TYPES, *locals_)),
        chains=frozenset({(CHAIN, "nat", "postrouting", CHAIN_PRIORITY, "accept")}),
        rules=tuple(canonical(r) for r in rule_exprs(policy, locals_)),
    )


# ---- JSON encoding ----------------------------------------------------------------------


def table_ref(table: str) -> dict[str, Any]:
    return {"family": "inet", "name": table}


def set_spec(table: str, name: str) -> dict[str, Any]:
    kind, flags = set_type(name)
    spec: dict[str, Any] = {"family": "inet", "table": table, "name": name, "type": kind}
    if flags:
        spec["flags"] = list(flags)
    return spec


def structure_commands(
    table: str, policy: Policy, local_sets: Iterable[str]
) -> list[dict[str, Any]]:
    """Commands that create every set, the chain and its rules in an existing, empty table."""
    locals_ = local_order(local_sets)
    cmds: list[dict[str, Any]] = [
        {"add": {"set": set_spec(table, name)}} for name in (*_SET_TYPES, *locals_)
    ]
    cmds.append({"add": {"chain": chain_spec(table)}})
    cmds.extend(rule_commands(table, policy, locals_))
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


def rule_commands(table: str, policy: Policy, local_sets: Iterable[str]) -> list[dict[str, Any]]:
    return [
        {"add": {"rule": {"family": "inet", "table": table, "chain": CHAIN, "expr": exprs}}}
        for exprs in rule_exprs(policy, local_sets)
    ]


def element_value(set_name: str, elem: Element) -> Any:
    if set_name not in _SET_TYPES:  # a local set: (address . network address)
        assert elem.subnet is not None
        return {"concat": [elem.key, elem.subnet.partition("/")[0]]}
    if set_name in EXEMPT_SETS:
        return _prefix(elem.key)
    return elem.key


def element_json(set_name: str, elem: Element, *, with_comment: bool = True) -> Any:
    value = element_value(set_name, elem)
    if with_comment and elem.comment:
        return {"elem": {"val": value, "comment": elem.comment}}
    return value


def element_json_text(set_name: str, elem: Element, *, with_comment: bool = True) -> str:
    """`element_json` already encoded, for whole-table transactions (see
    `Transaction.encode`); a test keeps the two equal."""
    if set_name not in _SET_TYPES:
        assert elem.subnet is not None
        value = f'{{"concat":[{_quote(elem.key)},{_quote(elem.subnet.partition("/")[0])}]}}'
    elif set_name in EXEMPT_SETS:
        value = json.dumps(_prefix(elem.key), separators=(",", ":"))
    else:
        value = _quote(elem.key)
    if with_comment and elem.comment:
        return f'{{"elem":{{"val":{value},"comment":{_quote(elem.comment)}}}}}'
    return value


def element_script(set_name: str, elem: Element) -> str:
    """The element as nft script text, for logs and `masqctl diff`."""
    text = (
        f"{elem.key} . {elem.subnet.partition('/')[0]}"
        if elem.subnet is not None and set_name not in _SET_TYPES
        else elem.key
    )
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
    local = parse_local_set(set_name)
    for item in listed:
        comment = None
        value = item
        if isinstance(item, dict) and "elem" in item:
            comment = item["elem"].get("comment")
            value = item["elem"]["val"]
        if local is not None:
            if not (
                isinstance(value, dict)
                and "concat" in value
                and len(value["concat"]) == 2
                and all(isinstance(v, str) for v in value["concat"])
            ):
                raise UnexpectedListing(f"unexpected {set_name} element {value!r}")
            addr, network = value["concat"]
            if duplicates is not None and addr in out:
                duplicates.append(addr)
            # A network address that is not one for this prefix length (a foreign element)
            # stays as listed: it differs from every desired element, so it gets deleted.
            out[addr] = Element(addr, f"{network}/{local[1]}", comment)
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
    elements: dict[str, dict[str, Element]] = {s: {} for s in FIXED_SETS}
    found = False
    table_flags: tuple[str, ...] = ()
    for obj in listing:
        if "table" in obj:
            if obj["table"].get("name") == table:
                found = True
                # nft 1.0.6 lists a flagged table's flags wrong (libnftables writes the
                # table's name, `nft -j` cuts the JSON short there), so only their presence
                # is trusted: any flag at all differs from ours, which has none.
                listed = obj["table"].get("flags")
                if listed is not None and listed != []:
                    values = listed if isinstance(listed, list) else [listed]
                    table_flags = tuple(str(v) for v in values)
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
            entry = (canonical(spec.get("type")), tuple(spec.get("flags", ())))
            if kind == "set" and is_our_set(name) and not extra and entry == set_entry(name)[1:]:
                # (A look-alike of another type is foreign structure: replaced, not read.)
                duplicates: list[str] = []
                elements[name] = parse_elements(name, spec.get("elem", []), duplicates)
                # Only tampering puts two elements for one address in a local set (two network
                # addresses): the element map cannot hold both, so it counts as damage to the
                # structure (replace).
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
    structure = Structure(frozenset(sets), frozenset(chains), tuple(rules), table_flags)
    return TableState(structure, elements)

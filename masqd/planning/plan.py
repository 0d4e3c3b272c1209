"""Pure planning: desired state -> desired table; desired vs observed -> one transaction.

No I/O, no clock, no logging, no globals: everything here is a function of its arguments, so
it is property-tested alone (`plan(d, d)` is empty; applying `plan(d, o)` to `o` gives `d`).

A transaction is a value. It has three tiers, cheapest first, and the planner picks the
cheapest that reaches the desired table:
- element changes only (the normal case: a setup adds a handful of elements);
- local sets added or removed (a prefix length came into use or went out of it) and the
  chain's rules rewritten in place (flush chain, add its few rules), with the element
  changes: also the repair when someone flushed the chain or inserted a rule;
- the whole table replaced atomically (`add table; delete table; add table; ...` in one batch)
  when a fixed set or the chain is missing, foreign or of the wrong type (or a local set is).

A transaction is one atomic batch unless it is too big for libnftables to take in one piece
(tens of thousands of element changes): then `Transaction.batches` splits it, the structure
and the first elements first, and every batch leaves a working table.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from masqd.models import AttachmentKeyT
from masqd.planning import ruleset
from masqd.planning.ruleset import (
    EXEMPT4,
    EXEMPT6,
    Element,
    Policy,
    Structure,
    TableState,
    is_local_set,
    local_order,
    local_set_of,
    owner_comment,
    set_entry,
    sources_set,
)

_ENCODE_CHUNK = 4096  # elements joined at a time: their fragments are freed chunk by chunk


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


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


# ---- desired state -> desired table -----------------------------------------------------


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


def elements_for_owner(
    address: str, owner: AttachmentKeyT, subnet: str
) -> tuple[tuple[str, Element], tuple[str, Element]]:
    """The (sources, local) elements that the deciding owner of `address` puts in the table."""
    sources, local = sources_set(address), local_set_of(address, subnet)
    # Interned: a dual-stack attachment's addresses share one comment string.
    comment = sys.intern(owner_comment(*owner))
    return (sources, Element(address, None, comment)), (local, Element(address, subnet, comment))


def exempt_elements(policy: Policy) -> dict[str, dict[str, Element]]:
    """The exempt sets' elements: CIDRs collapsed, since an interval set refuses overlaps.

    Fresh dicts (callers may change them) over elements computed once per policy: every
    sync asks, and collapsing 5,000 CIDRs each time would put milliseconds on every setup.
    """
    return {name: dict(elems) for name, elems in _exempt_elements(policy).items()}


@functools.lru_cache(maxsize=4)
def _exempt_elements(policy: Policy) -> dict[str, dict[str, Element]]:
    out: dict[str, dict[str, Element]] = {}
    for name, cidrs in ((EXEMPT4, policy.exempt4), (EXEMPT6, policy.exempt6)):
        nets: list[str] = [
            str(n)
            for n in ipaddress.collapse_addresses(
                ipaddress.ip_network(c)
                for c in cidrs  # type: ignore[type-var]
            )
        ]
        out[name] = {n: Element(n) for n in nets}
    return out


def desired_table(
    attachments: Mapping[AttachmentKeyT, AttachmentRecord], policy: Policy
) -> TableState:
    """The reference computation of the table that a set of attachments calls for.

    Every address held by at least one attachment is in its family's sources set; its local
    element carries the subnet of the most recently set-up holder (the highest `seq`), which
    is also the owner its comments name. `state.DesiredState` maintains the same result
    incrementally; tests prove the two agree.
    """
    deciding: dict[str, tuple[int, AttachmentKeyT, str]] = {}
    for key, record in attachments.items():
        for address, subnet in record.ips:
            current = deciding.get(address)
            if current is None or record.seq > current[0]:
                deciding[address] = (record.seq, key, subnet)
    table = TableState(None)
    for address, (_, key, subnet) in deciding.items():
        for set_name, elem in elements_for_owner(address, key, subnet):
            table.sets.setdefault(set_name, {})[address] = elem
    table.sets.update(exempt_elements(policy))
    table.structure = ruleset.desired_structure(policy, local_order(table.sets))
    return table


def policy_fingerprint(policy: Policy) -> str:
    """Names everything but the attachments' elements and the local sets they call for (those
    follow from the attachments): the fixed structure and the exempt sets."""
    structure = ruleset.desired_structure(policy, ())
    exempt = exempt_elements(policy)
    text = repr(
        (
            sorted(structure.sets),
            sorted(structure.chains),
            structure.rules,
            {name: sorted(elems) for name, elems in sorted(exempt.items())},
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- desired vs observed -> transaction -------------------------------------------------


@dataclass(frozen=True)
class Transaction:
    """One nftables transaction, as a value: one atomic batch (`encode`), or consecutive
    batches when it is big (`batches`).

    `local_sets`: the local sets of the desired table, in chain order (they shape the rules).
    `recreate`: replace the table whole (structure first, then `add` holds every element).
    `clear_table_flags`: the table has flags (`dormant`): `add table` without flags clears
    them (the kernel takes a missing flags attribute as none), first.
    `add_sets`: local sets to create, first.
    `rewrite_rules`: flush the chain and add its rules again.
    `delete`/`add`: element changes per set, deletes applied before adds.
    `delete_sets`: local sets to delete, last (once no rule refers to them); their elements
    go with them.
    """

    table: str
    policy: Policy
    local_sets: tuple[str, ...] = ()
    recreate: bool = False
    clear_table_flags: bool = False
    add_sets: tuple[str, ...] = ()
    rewrite_rules: bool = False
    delete: Mapping[str, tuple[Element, ...]] = field(default_factory=dict)
    add: Mapping[str, tuple[Element, ...]] = field(default_factory=dict)
    delete_sets: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.recreate
            or self.clear_table_flags
            or self.add_sets
            or self.rewrite_rules
            or self.delete_sets
            or any(self.delete.values())
            or any(self.add.values())
        )

    @property
    def element_changes(self) -> int:
        return sum(len(v) for v in self.delete.values()) + sum(len(v) for v in self.add.values())

    def to_json(self) -> dict[str, Any]:
        """The batch in nftables JSON (libnftables-json(5))."""
        cmds = self._head_commands()
        for verb, set_name, elems, with_comment in self._element_groups():
            values = [ruleset.element_json(set_name, e, with_comment=with_comment) for e in elems]
            cmds.append({verb: {"element": self._set_ref(set_name) | {"elem": values}}})
        cmds.extend(self._tail_commands())
        return {"nftables": cmds}

    def encode(self) -> bytes:
        """`to_json()` as the bytes libnftables reads, with the elements written as text
        directly: building 400,000 elements as dicts and dumping them took 2 s, and their
        hundreds of MiB of short-lived objects left the heap fragmented."""
        return self._encode(self._head_commands(), self._element_groups(), self._tail_commands())

    def batches(self, max_elements: int) -> Iterator[bytes]:
        """The transaction as consecutive batches of at most `max_elements` element changes:
        the first also holds everything else (table, sets, rules, set deletions), the others
        the remaining element changes in order. Applied one after the other they make the same
        table as `encode()`, and each leaves a working table holding a subset of the elements.
        A whole table of 400,000 elements in one batch made libnftables peak at 700 MiB.
        """
        groups = list(self._element_groups())
        cuts: list[list[tuple[str, str, tuple[Element, ...], bool]]] = [[]]
        room = max_elements
        for verb, set_name, elems, with_comment in groups:
            start = 0
            while start < len(elems):
                if room == 0:
                    cuts.append([])
                    room = max_elements
                part = elems[start : start + room]
                cuts[-1].append((verb, set_name, part, with_comment))
                start += len(part)
                room -= len(part)
        yield self._encode(self._head_commands(), cuts[0], self._tail_commands())
        for cut in cuts[1:]:
            yield self._encode([], cut, [])

    def _encode(
        self,
        head: list[dict[str, Any]],
        groups: Iterable[tuple[str, str, tuple[Element, ...], bool]],
        tail: list[dict[str, Any]],
    ) -> bytes:
        commands = [_dumps(c) for c in head]
        for verb, set_name, elems, with_comment in groups:
            # '{"family":...,"name":...,"elem":' then the elements, written chunk by chunk.
            ref = _dumps(self._set_ref(set_name) | {"elem": None})[: -len("null}")]
            chunks = [
                ",".join(
                    ruleset.element_json_text(set_name, e, with_comment=with_comment)
                    for e in elems[start : start + _ENCODE_CHUNK]
                )
                for start in range(0, len(elems), _ENCODE_CHUNK)
            ]
            commands.append(f'{{"{verb}":{{"element":{ref}[{",".join(chunks)}]}}}}}}')
        commands.extend(_dumps(c) for c in tail)
        return f'{{"nftables":[{",".join(commands)}]}}'.encode()

    def _set_ref(self, set_name: str) -> dict[str, Any]:
        return {"family": "inet", "table": self.table, "name": set_name}

    def _head_commands(self) -> list[dict[str, Any]]:
        """The commands before the element changes: table, sets, chain and rules."""
        t = self.table
        cmds: list[dict[str, Any]] = []
        if self.recreate:
            # Adding first makes the delete valid whether or not the table exists; all three
            # commit together, so no packet ever sees the table missing.
            cmds.append({"add": {"table": ruleset.table_ref(t)}})
            cmds.append({"delete": {"table": ruleset.table_ref(t)}})
            cmds.append({"add": {"table": ruleset.table_ref(t)}})
            cmds.extend(ruleset.structure_commands(t, self.policy, self.local_sets))
        else:
            if self.clear_table_flags:
                cmds.append({"add": {"table": ruleset.table_ref(t)}})
            cmds.extend({"add": {"set": ruleset.set_spec(t, name)}} for name in self.add_sets)
            if self.rewrite_rules:
                chain = {"family": "inet", "table": t, "name": ruleset.CHAIN}
                cmds.append({"flush": {"chain": chain}})
                cmds.extend(ruleset.rule_commands(t, self.policy, self.local_sets))
        return cmds

    def _element_groups(self) -> Iterator[tuple[str, str, tuple[Element, ...], bool]]:
        """(verb, set, elements, with comments) for each non-empty group, deletions first.

        Elements go in with `create`, not `add`: adding an element that is there commits
        nothing, so a foreign commit that added it just before ours would leave the generation
        moved by one, as if only we had committed, and a mirror that missed the rest of that
        commit would pass for exact (see `nft.Applied.exclusive_since`). `create` fails with
        EEXIST instead, like `delete` of a missing element fails with ENOENT, and the next
        sync lists the table. A recreated table keeps `add`: its batch always commits
        (it replaces the table), and nft 1.0.6 refuses to `create` an interval element there
        that the table being replaced held ("File exists").
        """
        add_verb = "add" if self.recreate else "create"
        for verb, groups, with_comment in (
            ("delete", self.delete, False),
            (add_verb, self.add, True),
        ):
            for set_name in sorted(groups):
                if groups[set_name]:
                    yield verb, set_name, groups[set_name], with_comment

    def _tail_commands(self) -> list[dict[str, Any]]:
        return [{"delete": {"set": self._set_ref(name)}} for name in self.delete_sets]

    def to_script(self) -> str:
        """The batch as nft script text: for logs, debugging and `masqctl diff`."""
        t = self.table
        lines: list[str] = []
        if self.recreate:
            lines += [
                f"add table inet {t}",
                f"delete table inet {t}",
                f"add table inet {t}",
                f"# ... sets, chain {ruleset.CHAIN} and its rules as designed",
            ]
        else:
            if self.clear_table_flags:
                lines.append(f"add table inet {t}  # clears its flags (dormant: no hook runs)")
            for name in self.add_sets:
                kind, _ = ruleset.set_type(name)
                lines.append(f"add set inet {t} {name} {{ type {' . '.join(kind)}; }}")
            if self.rewrite_rules:
                count = len(ruleset.rule_exprs(self.policy, self.local_sets))
                lines += [
                    f"flush chain inet {t} {ruleset.CHAIN}",
                    f"# ... the {count} rules of {ruleset.CHAIN}",
                ]
        add_verb = "add" if self.recreate else "create"
        for verb, groups in (("delete", self.delete), (add_verb, self.add)):
            for set_name in sorted(groups):
                for e in groups[set_name]:
                    lines.append(
                        f"{verb} element inet {t} {set_name} "
                        f"{{ {ruleset.element_script(set_name, e)} }}"
                    )
        lines += [f"delete set inet {t} {name}" for name in self.delete_sets]
        return "\n".join(lines)


def plan(
    desired: TableState,
    observed: TableState,
    *,
    table: str,
    policy: Policy,
    touched: Iterable[str] | None = None,
) -> Transaction:
    """The one transaction that turns `observed` into `desired`.

    `touched`: when given, only these keys (addresses or exempt CIDRs) are compared, because
    the caller knows nothing else changed since `observed` was right: this keeps a setup's
    cost independent of the table's size. None compares everything.
    """
    assert desired.structure is not None
    local_sets = local_order(e[0] for e in desired.structure.sets)
    if _needs_recreate(desired.structure, observed.structure):
        return Transaction(
            table,
            policy,
            local_sets,
            recreate=True,
            add={name: tuple(elems.values()) for name, elems in desired.sets.items() if elems},
        )
    assert observed.structure is not None
    observed_locals = {e[0] for e in observed.structure.sets if is_local_set(e[0])}
    add_sets = tuple(name for name in local_sets if name not in observed_locals)
    delete_sets = local_order(observed_locals - set(local_sets))
    rewrite_rules = observed.structure.rules != desired.structure.rules
    delete: dict[str, tuple[Element, ...]] = {}
    add: dict[str, tuple[Element, ...]] = {}
    keys = None if touched is None else set(touched)
    empty: dict[str, Element] = {}
    for name in desired.sets.keys() | observed.sets.keys():
        if name in delete_sets:
            continue  # its elements go with it
        want, have = desired.sets.get(name, empty), observed.sets.get(name, empty)
        if keys is None or name in add_sets:
            stale = [e for k, e in have.items() if want.get(k) != e]
            missing = [e for k, e in want.items() if have.get(k) != e]
        else:
            stale, missing = [], []
            for k in keys:
                w, h = want.get(k), have.get(k)
                if w != h:
                    if h is not None:
                        stale.append(h)
                    if w is not None:
                        missing.append(w)
        if stale:
            delete[name] = tuple(stale)
        if missing:
            add[name] = tuple(missing)
    return Transaction(
        table,
        policy,
        local_sets,
        clear_table_flags=observed.structure.table_flags != desired.structure.table_flags,
        add_sets=add_sets,
        rewrite_rules=rewrite_rules,
        delete=delete,
        add=add,
        delete_sets=delete_sets,
    )


def _needs_recreate(desired: Structure, observed: Structure | None) -> bool:
    """True when element, rule and local set changes cannot reach `desired`: the table is
    missing, a fixed set or the chain is missing, foreign or of another type, a local set is
    of another type (a look-alike), or something foreign sits in the table."""
    if observed is None or observed.chains != desired.chains:
        return True
    fixed_observed = {e for e in observed.sets if not is_local_set(e[0])}
    fixed_desired = {e for e in desired.sets if not is_local_set(e[0])}
    if fixed_observed != fixed_desired:
        return True
    return any(e != set_entry(e[0]) for e in observed.sets if is_local_set(e[0]))


def apply(tx: Transaction, observed: TableState) -> TableState:
    """What the kernel holds after `tx` commits on top of `observed` (a new value)."""
    result = observed.copy()
    structure = ruleset.desired_structure(tx.policy, tx.local_sets)
    apply_in_place(tx, result, desired_structure=structure)
    return result


def apply_in_place(tx: Transaction, state: TableState, *, desired_structure: Structure) -> None:
    """`apply`, mutating `state`: the reconciler keeps its mirror of the kernel this way
    without copying 100,000 elements per setup. `desired_structure` is the structure the
    transaction was planned for (its policy and local sets)."""
    if tx.recreate:
        state.structure = desired_structure
        state.sets = {entry[0]: {} for entry in desired_structure.sets}
    elif tx.add_sets or tx.delete_sets or tx.rewrite_rules or tx.clear_table_flags:
        assert state.structure is not None
        gone = set(tx.delete_sets)
        sets = {e for e in state.structure.sets if e[0] not in gone}
        sets.update(set_entry(name) for name in tx.add_sets)
        rules = desired_structure.rules if tx.rewrite_rules else state.structure.rules
        flags = (
            desired_structure.table_flags if tx.clear_table_flags else state.structure.table_flags
        )
        state.structure = Structure(frozenset(sets), state.structure.chains, rules, flags)
        for name in tx.delete_sets:
            state.sets.pop(name, None)
        for name in tx.add_sets:
            state.sets[name] = {}
    for name, elems in tx.delete.items():
        current = state.sets[name]
        for e in elems:
            current.pop(e.key, None)
    for name, elems in tx.add.items():
        current = state.sets[name]
        for e in elems:
            current[e.key] = e

"""Desired state -> desired table: the elements an attachment owns, the exempt sets of a
policy, the fingerprint that names a policy's fixed structure (the journal's marker
carries it), and `DesiredTables`, which builds the table a sync plans towards. Pure, like
the planner: no asyncio, no logging, no clock."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import sys
from collections.abc import Mapping

from masqd.models import AttachmentKeyT
from masqd.planning import ruleset
from masqd.planning.records import AttachmentRecord
from masqd.planning.ruleset import (
    EXEMPT4,
    EXEMPT6,
    Element,
    Policy,
    TableState,
    local_order,
    local_set_of,
    owner_comment,
    sources_set,
)


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
    is also the owner its comments name. `state.desired.DesiredState` maintains the same result
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


class DesiredTables:
    """Builds the desired table for one policy, as the reconciler asks on every sync.

    The structure depends only on the policy and on which local sets (prefix lengths) are in
    use: a handful of combinations at most, so each is built once and looked up after, and
    a sync does not rebuild rules and chains. A new policy gets a new builder.
    """

    CACHED_STRUCTURES = 64  # beyond this many combinations, prefix lengths churned: start over

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.fingerprint = policy_fingerprint(policy)
        self._structures: dict[frozenset[str], ruleset.Structure] = {}

    def table(self, sets: dict[str, dict[str, Element]]) -> TableState:
        """The desired table with these desired elements (exempt sets included)."""
        return TableState(self.structure_for(sets), sets)

    def baseline(self, elements: Mapping[str, dict[str, Element]]) -> TableState:
        """The table the policy gives with these attachment elements (no exempt sets yet)."""
        sets = dict(elements)
        sets.update(exempt_elements(self.policy))
        return self.table(sets)

    def structure_for(self, sets: Mapping[str, dict[str, Element]]) -> ruleset.Structure:
        """The policy's structure, with a local set for each local set name among `sets`."""
        names = frozenset(name for name in sets if ruleset.is_local_set(name))
        structure = self._structures.get(names)
        if structure is None:
            structure = ruleset.desired_structure(self.policy, names)
            if len(self._structures) > self.CACHED_STRUCTURES:
                self._structures.clear()
            self._structures[names] = structure
        return structure

"""Desired state -> desired table: the elements an attachment owns, the exempt sets of a
policy, and the fingerprint that names a policy's fixed structure (the journal's marker
carries it). Pure, like the planner."""

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

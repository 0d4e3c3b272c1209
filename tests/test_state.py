"""The desired state and its owner index, kept incrementally, against the planner's reference.

`DesiredState` maintains the table's elements change by change; `desired_table`
computes them from scratch. A hypothesis state machine drives random puts, deletes and GCs
and checks after every step that the two agree, that the owner index is exact, and that the
dirty keys name every element that changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from masqd.models import AttachmentKeyT, parse_ip
from masqd.planning import ruleset
from masqd.planning.desired import desired_table
from masqd.planning.ruleset import SOURCES4, Element, Policy
from masqd.state.desired import CapacityExceeded, DesiredState
from masqd.state.journal import Journal

A = ("net1", "a", "eth0")
B = ("net1", "b", "eth0")
C = ("net2", "c", "eth0")


def local_subnet(state: DesiredState, address: str) -> str | None:
    found = [
        elems[address].subnet
        for name, elems in state.elements.items()
        if ruleset.is_local_set(name) and address in elems
    ]
    assert len(found) <= 1  # one local element per address
    return found[0] if found else None


def reference(state: DesiredState) -> dict[str, dict[str, Element]]:
    """The elements `desired_table` computes, but the policy's exempt sets."""
    sets = desired_table(state.attachments, Policy()).sets
    return {name: elems for name, elems in sets.items() if name not in ruleset.EXEMPT_SETS}


# ---- the seed's case and its relatives ---------------------------------------------------


def test_a_shared_address_stays_while_another_attachment_holds_it() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.3/24"])
    state.put(B, ["198.18.1.3/24"])
    state.delete(A)
    assert state.elements[SOURCES4]["198.18.1.3"].comment == "net1/b/eth0"
    assert local_subnet(state, "198.18.1.3") == "198.18.1.0/24"
    assert state.holders("198.18.1.3") == {B: "198.18.1.0/24"}
    state.delete(B)
    assert "198.18.1.3" not in state.elements[SOURCES4]
    assert "198.18.1.3" not in state.owners


def test_after_the_newer_owner_leaves_the_element_takes_the_remaining_owners_subnet() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.3/16"])
    state.put(B, ["198.18.1.3/24"])
    assert local_subnet(state, "198.18.1.3") == "198.18.1.0/24"  # B is more recent
    state.delete(B)
    assert local_subnet(state, "198.18.1.3") == "198.18.0.0/16"
    assert state.elements["local4_16"]["198.18.1.3"].comment == "net1/a/eth0"
    assert "local4_24" not in state.elements  # B's /24 set went with its last element


def test_the_most_recent_setup_decides_the_subnet() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.3/24"])
    state.put(B, ["198.18.1.3/16"])
    assert local_subnet(state, "198.18.1.3") == "198.18.0.0/16"
    state.put(A, ["198.18.1.3/22"])  # A set up again, with another prefix: A decides now
    assert local_subnet(state, "198.18.1.3") == "198.18.0.0/22"
    assert state.elements == reference(state)


def test_a_reput_replaces_the_ips_and_releases_the_old_ones() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.2/24", "2001:db8:1::2/64"])
    state.put(B, ["198.18.1.9/24"])
    state.take_dirty()
    state.put(A, ["198.18.1.3/24", "198.18.1.9/24"])
    assert set(state.elements[SOURCES4]) == {"198.18.1.3", "198.18.1.9"}
    assert state.elements["sources6"] == {}
    assert state.take_dirty() == {"198.18.1.2", "2001:db8:1::2", "198.18.1.3", "198.18.1.9"}
    state.delete(A)
    assert set(state.elements[SOURCES4]) == {"198.18.1.9"}  # B's, kept


def test_putting_the_same_ips_again_changes_nothing() -> None:
    state = DesiredState()
    assert state.put(A, ["198.18.1.2/24"])
    version = state.version
    state.take_dirty()
    assert not state.put(A, ["198.18.1.2/24"])
    assert state.version == version and state.take_dirty() == set()


def test_delete_of_an_unknown_attachment_is_a_no_op() -> None:
    state = DesiredState()
    assert state.delete(A) is None
    assert state.version == 0 and state.take_dirty() == set()


def test_gc_removes_exactly_the_others_of_that_network() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.2/24"])
    state.put(B, ["198.18.1.3/24"])
    state.put(("net1", "b", "eth1"), ["198.18.1.4/24"])
    state.put(C, ["198.18.2.2/24"])
    removed = state.gc("net1", {("b", "eth0")})
    assert sorted(k for k, _ in removed) == [A, ("net1", "b", "eth1")]
    assert set(state.attachments) == {B, C}
    assert state.gc("net3", set()) == []


def test_capacity_is_enforced_for_new_attachments_only() -> None:
    state = DesiredState(max_attachments=2)
    state.put(A, ["198.18.1.2/24"])
    state.put(B, ["198.18.1.3/24"])
    version = state.version
    with pytest.raises(CapacityExceeded, match="--max-attachments is 2"):
        state.put(C, ["198.18.2.2/24"])
    assert set(state.attachments) == {A, B} and state.version == version
    assert "198.18.2.2" not in state.elements[SOURCES4]
    state.put(A, ["198.18.1.5/24"])  # replacing is fine at the limit


def test_restored_dirty_keys_are_not_lost() -> None:
    state = DesiredState()
    state.put(A, ["198.18.1.2/24"])
    taken = state.take_dirty()
    state.put(B, ["198.18.1.3/24"])
    state.restore_dirty(taken)
    assert state.take_dirty() == {"198.18.1.2", "198.18.1.3"}


def test_changes_are_journalled_and_replay_to_the_same_elements(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    state = DesiredState(journal=journal)
    state.put(A, ["198.18.1.3/16"])
    state.put(B, ["198.18.1.3/24", "2001:db8::2/64"])
    state.put(C, ["198.18.2.2/24"])
    state.put(A, ["198.18.1.3/16"])  # no change: no record
    state.delete(C)
    state.delete(C)  # absent: no record
    lines = journal.take_pending()
    assert len(lines) == 4
    journal.write_pending(lines)
    journal.close()
    replayed = DesiredState()
    replayed.replay(Journal(tmp_path).load().entries)
    assert replayed.attachments.keys() == state.attachments.keys()
    assert replayed.elements == state.elements


# ---- the state machine ------------------------------------------------------------------

ADDRESSES4 = [f"198.18.{x}.{y}" for x in range(2) for y in range(2, 5)]
ADDRESSES6 = [f"2001:db8:{x}::{y}" for x in range(2) for y in range(2, 4)]
ips4 = st.builds(
    lambda a, p: parse_ip(f"{a}/{p}"), st.sampled_from(ADDRESSES4), st.sampled_from([24, 16, 32])
)
ips6 = st.builds(
    lambda a, p: parse_ip(f"{a}/{p}"), st.sampled_from(ADDRESSES6), st.sampled_from([64, 48])
)
keys = st.tuples(
    st.sampled_from(["net1", "net2"]),
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(["eth0", "eth1"]),
)


@st.composite
def ip_lists(draw: st.DrawFn) -> list[str]:
    chosen = draw(st.lists(st.one_of(ips4, ips6), min_size=1, max_size=4))
    seen: dict[str, str] = {}
    for ip in chosen:
        seen.setdefault(ip.split("/")[0], ip)
    return list(seen.values())


class OwnerIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = DesiredState()
        self.before = self._snapshot()
        self.changed: set[str] = set()

    def _snapshot(self) -> dict[str, dict[str, Element]]:
        return {name: dict(elems) for name, elems in self.state.elements.items()}

    def _changed_since(self, before: dict[str, dict[str, Element]]) -> set[str]:
        after = self.state.elements
        return {
            k
            for name in before.keys() | after.keys()
            for k in before.get(name, {}).keys() | after.get(name, {}).keys()
            if before.get(name, {}).get(k) != after.get(name, {}).get(k)
        }

    def _step(self) -> None:
        self.changed |= self._changed_since(self.before)
        self.before = self._snapshot()

    @rule(key=keys, ips=ip_lists())
    def put(self, key: AttachmentKeyT, ips: list[str]) -> None:
        self.state.put(key, ips)
        self._step()

    @rule(key=keys)
    def delete(self, key: AttachmentKeyT) -> None:
        self.state.delete(key)
        self._step()

    @rule(
        network=st.sampled_from(["net1", "net2"]),
        valid=st.sets(st.tuples(st.sampled_from(["a", "b", "c"]), st.just("eth0"))),
    )
    def gc(self, network: str, valid: set[tuple[str, str]]) -> None:
        removed = self.state.gc(network, valid)
        assert all(k[0] == network and (k[1], k[2]) not in valid for k, _ in removed)
        assert not any(
            k[0] == network and (k[1], k[2]) not in valid for k in self.state.attachments
        )
        self._step()

    @rule()
    def take_dirty(self) -> None:
        # Every element that changed since the last take is named (more is harmless).
        assert self.changed <= self.state.take_dirty()
        self.changed = set()

    @invariant()
    def elements_match_the_reference(self) -> None:
        assert self.state.elements == reference(self.state)

    @invariant()
    def owner_index_is_exact(self) -> None:
        expected: dict[str, dict[AttachmentKeyT, str]] = {}
        for key, record in self.state.attachments.items():
            for address, subnet in record.ips:
                expected.setdefault(address, {})[key] = subnet
        assert {a: self.state.holders(a) for a in self.state.owners} == expected
        for holders in map(self.state.holders, self.state.owners):
            # The last holder is the one with the highest setup sequence.
            newest = max(holders, key=lambda k: self.state.attachments[k].seq)
            assert next(reversed(holders)) == newest


OwnerIndexMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestOwnerIndex = OwnerIndexMachine.TestCase


def test_keys_journalled_before_the_newer_naming_rules_replay(tmp_path: Path) -> None:
    """A long key (its comment would be cut) and an ifname ending in '~' were accepted before
    those rules: a restart must keep them, not drop them as invalid."""
    journal = Journal(tmp_path)
    state = DesiredState(journal=journal)
    long_key = ("n" * 64, "c" * 128, "eth0")
    tilde_key = ("net", "ctr", "eth0~")
    state.put(long_key, ["198.18.1.2/24"])
    state.put(tilde_key, ["198.18.1.3/24"])
    journal.write_pending(journal.take_pending())
    journal.close()
    replayed = DesiredState()
    assert replayed.replay(Journal(tmp_path).load().entries) == []
    assert set(replayed.attachments) == {long_key, tilde_key}

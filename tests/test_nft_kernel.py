"""The nftables backend on the real kernel, and the fake held to the kernel's semantics.

Every test here runs in a throwaway network namespace. The parity tests run one scenario on
the fake and on the kernel (through libnftables and through the `nft` binary) and expect the
same table, the same errors and the same generation moves; the lock-step test drives both
through one random sequence and compares after every step. The layout tests read the kernel's
own listing (`nft -j list table`), not masqd's parser.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from masqd.kernel import nft as nft_module
from masqd.kernel.fake import FakeBackend, dump_table
from masqd.kernel.nft import Backend, KernelBackend, NftError
from masqd.planning import planner, ruleset
from masqd.planning.desired import DesiredTables
from masqd.planning.ruleset import SOURCES4, SOURCES6, Element, Policy, TableState
from masqd.planning.transaction import Transaction
from masqd.state.desired import DesiredState
from tests.daemon import kernel_table, nft_listing
from tests.netns import netns, nft

pytestmark = pytest.mark.kernel

TABLE = "masqd"
POLICY = Policy()
EXEMPT_POLICY = Policy(exempt4=("198.19.0.0/16",), exempt6=("2001:db8:ff::/48",))
L4_24 = ruleset.local_set(4, 24)
L4_16 = ruleset.local_set(4, 16)
L6_64 = ruleset.local_set(6, 64)


# ---- one interface over the fake and the kernel -----------------------------------------


@dataclass
class Harness:
    """A backend plus what a test does beside masqd: run raw nft JSON, dump the table."""

    kind: str
    backend: Backend
    ns: str | None = None

    def run(self, commands: list[dict[str, Any]]) -> None:
        """A batch as a person would send it with `nft -j -f -`; NftError when refused."""
        payload = {"nftables": commands}
        if isinstance(self.backend, FakeBackend):
            self.backend.execute(payload)
            return
        assert self.ns is not None
        proc = nft(self.ns, "-j", "-f", "-", input=json.dumps(payload), check=False)
        if proc.returncode != 0:
            raise NftError(proc.stderr.strip())

    def state(self) -> TableState:
        if isinstance(self.backend, FakeBackend):
            return self.backend.state()
        assert self.ns is not None
        return kernel_table(self.ns, TABLE)

    def dump(self) -> str:
        return dump_table(self.state())


@pytest.fixture(params=["fake", "kernel-lib", "kernel-cli"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "fake":
        yield Harness(kind, FakeBackend(table=TABLE))
        return
    with netns("nk") as name:
        runner = kind.removeprefix("kernel-")
        backend = KernelBackend(table=TABLE, runner=runner, netns=f"/var/run/netns/{name}")
        try:
            yield Harness(kind, backend, name)
        finally:
            await backend.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Harness, Harness]]:
    """The fake and the kernel side by side."""
    with netns("np") as name:
        backend = KernelBackend(table=TABLE, netns=f"/var/run/netns/{name}")
        try:
            yield Harness("fake", FakeBackend(table=TABLE)), Harness("kernel", backend, name)
        finally:
            await backend.close()


# ---- helpers ----------------------------------------------------------------------------


def desired(state: DesiredState, policy: Policy = POLICY) -> TableState:
    return DesiredTables(policy).baseline(state.elements)


def two_attachments() -> DesiredState:
    state = DesiredState()
    state.put(("net1", "a", "eth0"), ["198.18.1.2/24", "2001:db8:1::2/64"])
    state.put(("net1", "b", "eth0"), ["198.18.1.3/24"])
    state.take_dirty()
    return state


async def sync(h: Harness, state: DesiredState, policy: Policy = POLICY) -> Transaction:
    """A full sync: observe, plan, apply; returns the transaction."""
    observed = (await h.backend.observe()).table
    tx = planner.plan(desired(state, policy), observed, table=TABLE, policy=policy)
    if not tx.empty:
        await h.backend.apply(tx)
    return tx


async def partial(h: Harness, state: DesiredState, mirror: TableState) -> Transaction:
    """A partial sync against `mirror` (updated in place), as the reconciler does it."""
    want = desired(state)
    tx = planner.plan(want, mirror, table=TABLE, policy=POLICY, touched=state.take_dirty())
    if not tx.empty:
        await h.backend.apply(tx)
        assert want.structure is not None
        planner.simulate_in_place(tx, mirror, desired_structure=want.structure)
    return tx


def elem_cmd(verb: str, set_name: str, elem: Element) -> dict[str, Any]:
    value = ruleset.element_json(set_name, elem, with_comment=False)
    return {
        verb: {"element": {"family": "inet", "table": TABLE, "name": set_name, "elem": [value]}}
    }


# ---- parity scenarios -------------------------------------------------------------------


async def test_fresh_namespace_has_no_table_and_a_full_sync_creates_it(harness: Harness) -> None:
    first = await harness.backend.observe()
    assert first.table.structure is None
    assert harness.dump() == "(no table)"
    state = two_attachments()
    tx = await sync(harness, state)
    assert tx.recreate
    assert harness.dump() == dump_table(desired(state))
    after = await harness.backend.observe()
    assert after.generation == first.generation + 1
    assert planner.plan(desired(state), after.table, table=TABLE, policy=POLICY).empty


async def test_setup_adds_its_elements_and_teardown_removes_them(harness: Harness) -> None:
    state = two_attachments()
    await sync(harness, state)
    mirror = (await harness.backend.observe()).table
    state.put(("net2", "c", "eth1"), ["198.18.2.2/24", "2001:db8:2::2/64"])
    tx = await partial(harness, state, mirror)
    assert not tx.recreate and not tx.rewrite_rules and not tx.delete
    assert tx.element_changes == 4
    assert harness.dump() == dump_table(desired(state)) == dump_table(mirror)
    state.delete(("net2", "c", "eth1"))
    tx = await partial(harness, state, mirror)
    assert not tx.add and tx.element_changes == 4
    assert harness.dump() == dump_table(desired(state)) == dump_table(mirror)


async def test_resetup_with_another_subnet_replaces_the_local_element(harness: Harness) -> None:
    state = two_attachments()
    await sync(harness, state)
    mirror = (await harness.backend.observe()).table
    state.put(("net1", "b", "eth0"), ["198.18.1.3/16"])
    await partial(harness, state, mirror)
    assert harness.state().sets[L4_16]["198.18.1.3"].subnet == "198.18.0.0/16"
    assert "198.18.1.3" not in harness.state().sets[L4_24]
    assert harness.dump() == dump_table(desired(state))


TAMPERS: dict[str, list[dict[str, Any]]] = {
    "delete element": [
        elem_cmd("delete", SOURCES4, Element("198.18.1.2")),
        elem_cmd("delete", L4_24, Element("198.18.1.3", "198.18.1.0/24")),
    ],
    "add foreign element": [elem_cmd("add", SOURCES6, Element("2001:db8:9::9"))],
    "flush set": [{"flush": {"set": {"family": "inet", "table": TABLE, "name": SOURCES6}}}],
    "flush chain": [
        {"flush": {"chain": {"family": "inet", "table": TABLE, "name": ruleset.CHAIN}}}
    ],
    "add rule": [
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": TABLE,
                    "chain": ruleset.CHAIN,
                    "expr": [{"accept": None}],
                }
            }
        }
    ],
    "add chain": [{"add": {"chain": {"family": "inet", "table": TABLE, "name": "foreign"}}}],
    "add set": [
        {"add": {"set": {"family": "inet", "table": TABLE, "name": "foreign", "type": "ipv4_addr"}}}
    ],
    "add unused local set": [
        {"add": {"set": ruleset.set_spec(TABLE, "local4_8")}},
        elem_cmd("add", "local4_8", Element("198.18.9.9", "198.0.0.0/8")),
    ],
    "add look-alike local set": [
        {"add": {"set": {**ruleset.set_spec(TABLE, "local4_8"), "flags": ["interval"]}}}
    ],
    "delete table": [{"delete": {"table": ruleset.table_ref(TABLE)}}],
    "chain policy drop": [{"add": {"chain": {**ruleset.chain_spec(TABLE), "policy": "drop"}}}],
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_a_full_sync_repairs_tampering(harness: Harness, tamper: str) -> None:
    state = two_attachments()
    await sync(harness, state)
    good = harness.dump()
    harness.run(TAMPERS[tamper])
    assert harness.dump() != good
    tx = await sync(harness, state)
    assert not tx.empty
    # Damage to sets or chains takes a new table; damage to rules or elements does not.
    recreate = (
        "add chain",
        "add set",
        "add look-alike local set",
        "delete table",
        "chain policy drop",
    )
    assert tx.recreate == (tamper in recreate)
    assert tx.delete_sets == (("local4_8",) if tamper == "add unused local set" else ())
    assert harness.dump() == good
    assert (await sync(harness, state)).empty


async def test_a_full_sync_wakes_a_dormant_table(harness: Harness) -> None:
    """`flags dormant` unhooks the chain while every set and rule looks right: the flags are
    observed, and `add table` without flags clears them, nothing else touched."""
    if harness.kind == "kernel-cli":
        pytest.skip("nft 1.0.6 -j cuts its listing short at a flagged table's flags")
    state = two_attachments()
    await sync(harness, state)
    good = dump_table((await harness.backend.observe()).table)
    if isinstance(harness.backend, FakeBackend):
        harness.backend.set_table_flags("dormant")
    else:
        assert harness.ns is not None
        nft(harness.ns, "add", "table", "inet", TABLE, "{ flags dormant; }")
        assert "flags dormant" in nft(harness.ns, "list", "table", "inet", TABLE).stdout
    observed = (await harness.backend.observe()).table
    assert observed.structure is not None and observed.structure.table_flags
    tx = await sync(harness, state)
    assert tx.clear_table_flags and not tx.recreate and tx.element_changes == 0
    after = (await harness.backend.observe()).table
    assert after.structure is not None and after.structure.table_flags == ()
    assert dump_table(after) == good
    if harness.ns is not None:
        assert "dormant" not in nft(harness.ns, "list", "table", "inet", TABLE).stdout
    assert (await sync(harness, state)).empty


async def test_a_stale_delete_fails_with_enoent_and_changes_nothing(harness: Harness) -> None:
    state = two_attachments()
    await sync(harness, state)
    mirror = (await harness.backend.observe()).table
    harness.run([elem_cmd("delete", SOURCES4, Element("198.18.1.3"))])  # behind masqd's back
    before = harness.dump()
    generation = await harness.backend.generation()
    state.delete(("net1", "b", "eth0"))
    state.put(("net1", "c", "eth0"), ["198.18.1.4/24"])  # an add in the same batch
    with pytest.raises(NftError) as raised:
        await partial(harness, state, mirror)
    assert raised.value.kind == "enoent"
    assert harness.dump() == before  # the add did not happen either
    assert await harness.backend.generation() == generation
    # The reconciler's answer: a full sync.
    await sync(harness, state)
    assert harness.dump() == dump_table(desired(state))


async def test_deleting_a_set_that_a_rule_uses_fails_unless_the_batch_flushed_the_rule(
    harness: Harness,
) -> None:
    state = two_attachments()
    await sync(harness, state)
    before = harness.dump()
    delete = {"delete": {"set": {"family": "inet", "table": TABLE, "name": L4_24}}}
    with pytest.raises(NftError) as raised:
        harness.run([delete])
    assert "Device or resource busy" in str(raised.value)
    assert harness.dump() == before
    flush = {"flush": {"chain": {"family": "inet", "table": TABLE, "name": ruleset.CHAIN}}}
    harness.run([flush, delete])
    assert L4_24 not in harness.state().sets
    assert (await sync(harness, state)).add_sets == (L4_24,)
    assert harness.dump() == before


def local_elements(h: Harness) -> list[Any]:
    """The raw local4_24 elements as listed (two for one address are not merged here)."""
    if isinstance(h.backend, FakeBackend):
        listing = h.backend.listing()
    else:
        assert h.ns is not None
        listing = nft_listing(h.ns, TABLE)
    (spec,) = [o["set"] for o in listing if o.get("set", {}).get("name") == L4_24]
    return sorted(spec.get("elem", []), key=repr)


async def test_a_second_network_address_is_a_second_element_and_a_full_sync_removes_it(
    harness: Harness,
) -> None:
    """A hash set keys on the pair: someone's 198.18.1.2 . 198.18.0.0 sits beside masqd's
    198.18.1.2 . 198.18.1.0 in local4_24. The full sync must leave one element."""
    state = two_attachments()
    await sync(harness, state)
    before = local_elements(harness)
    harness.run([elem_cmd("add", L4_24, Element("198.18.1.2", "198.18.0.0/24"))])
    assert len(local_elements(harness)) == len(before) + 1
    await sync(harness, state)
    assert local_elements(harness) == before


async def test_element_ops_on_a_missing_table_fail_with_enoent(harness: Harness) -> None:
    tx = Transaction(TABLE, POLICY, add={SOURCES4: (Element("198.18.1.9"),)})
    with pytest.raises(NftError) as raised:
        await harness.backend.apply(tx)
    assert raised.value.kind == "enoent"
    assert harness.dump() == "(no table)"


async def test_adding_what_is_there_commits_nothing_and_creating_it_fails(
    harness: Harness,
) -> None:
    """`add element` of an element that is there commits nothing (the generation stays), so
    masqd's transactions `create` their elements instead: that fails with EEXIST."""
    state = two_attachments()
    await sync(harness, state)
    generation = await harness.backend.generation()
    before = harness.dump()
    existing = harness.state().sets[SOURCES4]["198.18.1.2"]
    element = ruleset.element_json(SOURCES4, Element(existing.key, None, "x/y/z"))
    ref = {"family": "inet", "table": TABLE, "name": SOURCES4, "elem": [element]}
    harness.run([{"add": {"element": ref}}])
    assert await harness.backend.generation() == generation
    assert harness.dump() == before  # the old comment stays
    again = Transaction(TABLE, POLICY, add={SOURCES4: (Element(existing.key, None, "x/y/z"),)})
    with pytest.raises(NftError) as raised:
        await harness.backend.apply(again)
    assert raised.value.kind == "eexist"
    assert await harness.backend.generation() == generation
    assert harness.dump() == before


async def test_recreate_replaces_a_table_with_content(harness: Harness) -> None:
    state = two_attachments()
    await sync(harness, state, EXEMPT_POLICY)
    harness.run(TAMPERS["add chain"])
    tx = await sync(harness, state, EXEMPT_POLICY)
    assert tx.recreate
    assert harness.dump() == dump_table(desired(state, EXEMPT_POLICY))


async def test_fake_and_kernel_agree_step_by_step(pair: tuple[Harness, Harness]) -> None:
    """One random sequence of setups, teardowns, tampering and stale transactions on both:
    after every step the same outcome, the same table and the same generation move."""
    rng = random.Random(20261126)
    fake, kernel = pair
    states = {h.kind: DesiredState() for h in pair}
    mirrors: dict[str, TableState | None] = {h.kind: None for h in pair}
    generations = {h.kind: await h.backend.generation() for h in pair}
    keys = [(f"net{n}", f"c{c}", "eth0") for n in range(2) for c in range(6)]

    def ips() -> list[str]:
        # A small address pool, so addresses are shared and subnets disagree.
        # Prefix lengths come and go, so local sets and rules do too.
        out = [f"198.18.{rng.randrange(2)}.{rng.randrange(2, 6)}/{rng.choice([24, 16, 32])}"]
        if rng.random() < 0.5:
            out.append(f"2001:db8:{rng.randrange(2)}::{rng.randrange(2, 5)}/{rng.choice([64, 56])}")
        return out

    for step in range(120):
        roll = rng.random()
        key, new_ips = rng.choice(keys), ips()
        tamper = rng.choice(list(TAMPERS))
        outcomes: dict[str, str] = {}
        for h in pair:
            state = states[h.kind]
            try:
                if roll < 0.1 or mirrors[h.kind] is None:
                    await sync(h, state)
                    mirrors[h.kind] = (await h.backend.observe()).table
                elif roll < 0.3:
                    h.run(TAMPERS[tamper])  # the mirror is now stale
                else:
                    if roll < 0.65:
                        state.put(key, new_ips)
                    else:
                        state.delete(key)
                    mirror = mirrors[h.kind]
                    assert mirror is not None
                    await partial(h, state, mirror)
                outcomes[h.kind] = "ok"
            except NftError as exc:
                outcomes[h.kind] = exc.kind
                mirrors[h.kind] = None  # as the reconciler does: the next sync is full
            generation = await h.backend.generation()
            outcomes[h.kind] += f" gen+{generation - generations[h.kind]}"
            generations[h.kind] = generation
        assert outcomes[fake.kind] == outcomes[kernel.kind], f"step {step}"
        assert fake.dump() == kernel.dump(), f"step {step}"


# ---- the kernel's own view of the layout ------------------------------------------------

EXPECTED_RULES = [
    "ip daddr 224.0.0.0/4 return",
    "ip daddr @exempt4 return",
    "ip saddr . ip daddr & 255.255.255.0 @local4_24 return",
    "ip saddr @sources4 masquerade",
    "ip6 daddr ff00::/8 return",
    "ip6 daddr @exempt6 return",
    "ip6 saddr . ip6 daddr & ffff:ffff:ffff:ffff:: @local6_64 return",
    "ip6 saddr @sources6 masquerade",
]


@pytest.fixture
async def kernel(ns: str) -> AsyncIterator[Harness]:
    backend = KernelBackend(table=TABLE, netns=f"/var/run/netns/{ns}")
    try:
        yield Harness("kernel", backend, ns)
    finally:
        await backend.close()


async def test_table_layout_is_as_designed(kernel: Harness) -> None:
    assert kernel.ns is not None
    await sync(kernel, two_attachments())
    listing = nft_listing(kernel.ns)
    sets = {o["set"]["name"]: o["set"] for o in listing if "set" in o}
    assert {name: (s["type"], s.get("flags", [])) for name, s in sets.items()} == {
        "sources4": ("ipv4_addr", []),
        "local4_24": (["ipv4_addr", "ipv4_addr"], []),
        "exempt4": ("ipv4_addr", ["interval"]),
        "sources6": ("ipv6_addr", []),
        "local6_64": (["ipv6_addr", "ipv6_addr"], []),
        "exempt6": ("ipv6_addr", ["interval"]),
    }
    chains = [o["chain"] for o in listing if "chain" in o]
    assert [(c["name"], c["type"], c["hook"], c["prio"], c["policy"]) for c in chains] == [
        ("postrouting", "nat", "postrouting", 100, "accept")
    ]
    assert [o for o in listing if not {"table", "set", "chain", "rule"} & o.keys()] == []
    text = nft(kernel.ns, "list", "chain", "inet", TABLE, "postrouting").stdout
    body = [line.strip() for line in text.splitlines()]
    assert "type nat hook postrouting priority srcnat; policy accept;" in body
    start = body.index("type nat hook postrouting priority srcnat; policy accept;") + 1
    assert body[start : start + len(EXPECTED_RULES) + 1] == [*EXPECTED_RULES, "}"]
    # Elements carry their owner in a comment, for people reading the table.
    assert sorted(sets["sources4"]["elem"], key=repr) == [
        {"elem": {"val": "198.18.1.2", "comment": "net1/a/eth0"}},
        {"elem": {"val": "198.18.1.3", "comment": "net1/b/eth0"}},
    ]


def _without_elements(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for obj in listing:
        if "set" in obj:
            obj = {"set": {k: v for k, v in obj["set"].items() if k != "elem"}}
        out.append(obj)
    return out


def _elements(listing: list[dict[str, Any]]) -> set[str]:
    return {
        f"{o['set']['name']} {json.dumps(e, sort_keys=True)}"
        for o in listing
        if "set" in o
        for e in o["set"].get("elem", [])
    }


async def test_a_setup_adds_elements_and_nothing_else(kernel: Harness) -> None:
    assert kernel.ns is not None
    state = two_attachments()
    await sync(kernel, state)
    mirror = (await kernel.backend.observe()).table
    before = nft_listing(kernel.ns)
    state.put(("net1", "new", "eth0"), ["198.18.1.7/24", "2001:db8:1::7/64"])
    await partial(kernel, state, mirror)
    after = nft_listing(kernel.ns)
    # Same objects with the same handles: nothing was recreated or rewritten.
    assert _without_elements(after) == _without_elements(before)
    added = _elements(after) - _elements(before)
    assert _elements(before) <= _elements(after)
    assert {line.split(" ", 1)[0] for line in added} == {"sources4", L4_24, "sources6", L6_64}
    assert len(added) == 4
    assert all("net1/new/eth0" in line for line in added)


async def test_rule_count_does_not_grow_with_attachments(kernel: Harness) -> None:
    assert kernel.ns is not None
    counts = {}
    state = DesiredState()
    total = 0
    for target in (1, 100, 1000):
        while total < target:
            total += 1
            state.put(
                ("net", f"c{total}", "eth0"),
                [f"198.18.{total // 250}.{total % 250 + 2}/16", f"2001:db8:1::{total:x}/64"],
            )
        await sync(kernel, state)
        listing = nft_listing(kernel.ns)
        counts[target] = sum(1 for o in listing if "rule" in o)
        assert len(kernel.state().sets[SOURCES4]) == target
    assert counts == {1: 8, 100: 8, 1000: 8}


def _touched_sets(payload: dict[str, Any]) -> set[str]:
    return {
        spec["name"]
        for cmd in payload["nftables"]
        for body in cmd.values()
        for kind, spec in body.items()
        if kind in ("element", "set")
    }


async def test_a_setup_costs_the_same_at_1_and_5000_attachments_and_touches_only_hash_sets(
    kernel: Harness,
) -> None:
    """The kernel work of one setup must not grow with the table: its batch is the same size
    whatever the number of attachments, and touches only hash sets (a concatenated interval
    set, pipapo, costs O(set size) per change: 25 ms per delete at 100,000 elements)."""
    assert kernel.ns is not None
    state = DesiredState()

    def ips(n: int, third: int = 18) -> list[str]:
        return [f"198.{third}.{n // 250}.{n % 250 + 2}/16", f"2001:db8:{third}::{n:x}/64"]

    state.put(("net", "c0", "eth0"), ips(0))
    await sync(kernel, state)
    mirror = (await kernel.backend.observe()).table
    sizes: dict[int, tuple[int, int]] = {}
    for target in (1, 5000):
        for n in range(len(state), target):
            state.put(("net", f"c{n}", "eth0"), ips(n))
        await partial(kernel, state, mirror)
        assert len(kernel.state().sets[SOURCES4]) == target
        key = ("net", "probe", "eth0")
        state.put(key, ips(9999, third=19))  # the same setup at both sizes
        setup = await partial(kernel, state, mirror)
        state.delete(key)
        teardown = await partial(kernel, state, mirror)
        setup_json, teardown_json = setup.to_json(), teardown.to_json()
        sizes[target] = (len(json.dumps(setup_json)), len(json.dumps(teardown_json)))
        for tx in (setup, teardown):
            assert not (tx.recreate or tx.rewrite_rules or tx.add_sets or tx.delete_sets)
            assert tx.element_changes == 4
        listing = nft_listing(kernel.ns)
        flags = {o["set"]["name"]: o["set"].get("flags", []) for o in listing if "set" in o}
        for name in _touched_sets(setup_json) | _touched_sets(teardown_json):
            assert "interval" not in flags[name], name
    assert sizes[1] == sizes[5000]


async def test_a_second_prefix_length_adds_a_set_and_rule_and_its_last_holder_removes_both(
    kernel: Harness,
) -> None:
    assert kernel.ns is not None
    state = two_attachments()
    await sync(kernel, state)
    mirror = (await kernel.backend.observe()).table

    def layout() -> tuple[set[str], list[str]]:
        listing = nft_listing(kernel.ns or "")
        sets = {o["set"]["name"] for o in listing if "set" in o}
        rules = [json.dumps(o["rule"]["expr"]) for o in listing if "rule" in o]
        return sets, rules

    sets_before, rules_before = layout()
    state.put(("net2", "wide", "eth0"), ["198.18.8.2/16"])
    tx = await partial(kernel, state, mirror)
    assert tx.add_sets == (L4_16,) and tx.rewrite_rules and not tx.recreate
    sets, rules = layout()
    assert sets == sets_before | {L4_16} and len(rules) == len(rules_before) + 1
    text = nft(kernel.ns, "list", "chain", "inet", TABLE, "postrouting").stdout
    lines = [line.strip() for line in text.splitlines()]
    assert lines.index("ip saddr . ip daddr & 255.255.255.0 @local4_24 return") < lines.index(
        "ip saddr . ip daddr & 255.255.0.0 @local4_16 return"
    )
    assert kernel.state().sets[L4_16] == {
        "198.18.8.2": Element("198.18.8.2", "198.18.0.0/16", "net2/wide/eth0")
    }
    assert dump_table(mirror) == kernel.dump() == dump_table(desired(state))
    state.delete(("net2", "wide", "eth0"))
    tx = await partial(kernel, state, mirror)
    assert tx.delete_sets == (L4_16,) and tx.rewrite_rules
    assert layout() == (sets_before, rules_before)
    assert dump_table(mirror) == kernel.dump() == dump_table(desired(state))


async def test_a_big_transaction_goes_in_batches_that_make_the_whole_table(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 7 element changes here (20,000 in the daemon): the table is complete, the
    generation moved once per batch, and the transaction still counts as exclusive. The fake
    runs the same batches."""
    monkeypatch.setattr(nft_module, "BATCH_ELEMENTS", 7)
    state = DesiredState()
    for n in range(2, 12):
        state.put(("net", f"c{n}", "eth0"), [f"198.18.7.{n}/24", f"2001:db8:7::{n}/64"])
    before = await harness.backend.generation()
    tx = planner.plan(desired(state), TableState(None), table=TABLE, policy=POLICY)
    assert tx.recreate and tx.element_changes == 40
    applied = await harness.backend.apply(tx)
    assert applied.commits == 6  # ceil(40 / 7) batches
    assert applied.generation == before + 6 and applied.exclusive_since(before)
    assert harness.dump() == dump_table(desired(state))


async def test_a_failing_batch_leaves_the_batches_before_it_committed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big transaction whose second batch fails (it creates an element that is there):
    the first batch stays in the table, the failing batch and the ones after it change
    nothing, and the generation moved once. The fake, fed the kernel's batches, agrees."""
    monkeypatch.setattr(nft_module, "BATCH_ELEMENTS", 7)
    state = DesiredState()
    state.put(("net", "c1", "eth0"), ["198.18.7.1/24"])
    await sync(harness, state)
    mirror = harness.state()
    for n in range(2, 12):
        state.put(("net", f"c{n}", "eth0"), [f"198.18.7.{n}/24"])
    tx = planner.plan(
        desired(state), mirror, table=TABLE, policy=POLICY, touched=state.take_dirty()
    )
    assert not tx.recreate and tx.element_changes == 20
    batches = [_created(json.loads(payload)) for payload in tx.batches(7)]
    assert [len(b) for b in batches] == [7, 7, 6]
    set_name, value = batches[1][0]
    harness.run([{"add": {"element": _set_ref(set_name) | {"elem": [value]}}}])
    before = await harness.backend.generation()
    with pytest.raises(NftError) as raised:
        await harness.backend.apply(tx)
    assert raised.value.kind == "eexist"
    assert await harness.backend.generation() == before + 1
    held = harness.state().sets
    for set_name, value in batches[0]:
        assert _held(held, set_name, value)
    for set_name, value in [*batches[1][1:], *batches[2]]:
        assert not _held(held, set_name, value)


def _set_ref(set_name: str) -> dict[str, Any]:
    return {"family": "inet", "table": TABLE, "name": set_name}


def _created(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """(set, element value) for each element a batch creates, in order."""
    return [
        (cmd["create"]["element"]["name"], value)
        for cmd in payload["nftables"]
        if "element" in cmd.get("create", {})
        for value in cmd["create"]["element"]["elem"]
    ]


def _held(sets: dict[str, dict[str, Element]], set_name: str, value: Any) -> bool:
    return all(
        elem.key in sets.get(set_name, {})
        for elem in ruleset.parse_elements(set_name, [value]).values()
    )


@pytest.mark.parametrize("char", ["a", "\u00e9"], ids=["ascii", "two-byte"])
def test_the_element_comment_limit_is_what_masqd_assumes(ns: str, char: str) -> None:
    """`nft` takes an element comment of COMMENT_MAX_BYTES bytes (the NUL not counted) and
    refuses one byte more: the limit that `models.comment_problem` holds new keys to, so
    that a table masqd wrote can be dumped and restored with `nft -f`."""
    nft(ns, "add", "table", "inet", "t")
    nft(ns, "add", "set", "inet", "t", "s", "{ type ipv4_addr; }")
    width = len(char.encode())
    fits = char * (ruleset.COMMENT_MAX_BYTES // width)
    nft(ns, "add", "element", "inet", "t", "s", f'{{ 198.18.0.2 comment "{fits}" }}')
    over = fits + "a" * (ruleset.COMMENT_MAX_BYTES + 1 - len(fits.encode()))
    refused = nft(ns, "add", "element", "inet", "t", "s", f'{{ 198.18.0.3 comment "{over}" }}',
                  check=False)  # fmt: skip
    assert refused.returncode != 0 and "comment too long" in refused.stderr
    listed = json.loads(nft(ns, "-j", "list", "set", "inet", "t", "s").stdout)["nftables"]
    (elem,) = [e for o in listed if "set" in o for e in o["set"]["elem"]]
    assert elem["elem"]["comment"] == fits


# libnftables 1.0.6 keeps state outside its contexts (its JSON output asserts in json.c
# when two threads list at once): three threads, a context each, listing a 2,000-element
# set. Without the library lock this aborted the process in about half the runs.
_PARALLEL_LISTINGS = """
import subprocess, sys, threading
from masqd.kernel.nft import LibNftables
elements = ", ".join(f"198.18.{i >> 8}.{i & 255}" for i in range(2000))
subprocess.run(["nft", "-f", "-"], check=True, input=(
    "add table inet masqd\\nadd set inet masqd s { type ipv4_addr; }\\n"
    f"add element inet masqd s {{ {elements} }}\\n").encode())
contexts = [LibNftables() for _ in range(3)]
listing = b'{"nftables": [{"list": {"table": {"family": "inet", "name": "masqd"}}}]}'
def work(ctx):
    for _ in range(200):
        assert "198.18.7.207" in ctx.run(listing)
        ctx.release_cache()
threads = [threading.Thread(target=work, args=(c,)) for c in contexts]
for t in threads: t.start()
for t in threads: t.join()
print("done")
"""


def test_threads_of_one_process_may_run_libnftables_at_once() -> None:
    with netns("par") as ns:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _PARALLEL_LISTINGS],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-500:]

"""The planner, pure: desired table from attachments; one minimal transaction per difference.

Property tests over random attachments (from small address pools, so owners share
addresses and disagree on subnets) and random observed tables (other attachments, missing
and foreign elements, damaged rules, sets and chains, no table at all).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Mapping

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from masqd.kernel.fake import FakeBackend
from masqd.models import AttachmentKeyT
from masqd.planning import planner, ruleset
from masqd.planning.desired import desired_table
from masqd.planning.records import AttachmentRecord, address_subnet
from masqd.planning.ruleset import (
    EXEMPT4,
    SOURCES4,
    SOURCES6,
    Element,
    Policy,
    Structure,
    TableState,
)
from masqd.planning.transaction import Transaction

TABLE = "masqd"
L4_24 = ruleset.local_set(4, 24)
L4_16 = ruleset.local_set(4, 16)
L6_64 = ruleset.local_set(6, 64)

# ---- strategies -------------------------------------------------------------------------

ipv4 = st.builds(
    lambda third, host, prefix: f"198.18.{third}.{host}/{prefix}",
    st.integers(0, 3),
    st.integers(2, 9),
    st.sampled_from([24, 16, 32, 22]),
)
ipv6 = st.builds(
    lambda group, host, prefix: f"2001:db8:{group}::{host:x}/{prefix}",
    st.integers(0, 3),
    st.integers(2, 9),
    st.sampled_from([64, 48, 128]),
)
keys = st.tuples(
    st.sampled_from(["net1", "net2"]), st.sampled_from([f"c{n}" for n in range(8)]), st.just("eth0")
)


@st.composite
def ip_lists(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    ips = draw(st.lists(st.one_of(ipv4, ipv6), min_size=1, max_size=4))
    pairs: dict[str, str] = {}
    for ip in ips:
        address, subnet = address_subnet(ip)
        pairs.setdefault(address, subnet)  # an attachment lists an address once
    return tuple(pairs.items())


@st.composite
def attachment_maps(draw: st.DrawFn) -> dict[AttachmentKeyT, AttachmentRecord]:
    items = draw(st.dictionaries(keys, ip_lists(), max_size=10))
    seqs = draw(st.permutations(range(1, len(items) + 1)))
    return {
        k: AttachmentRecord(ips, seq) for (k, ips), seq in zip(items.items(), seqs, strict=True)
    }


policies = st.builds(
    Policy,
    exempt4=st.lists(
        st.sampled_from(["198.19.0.0/16", "198.19.1.0/24", "10.0.0.0/8"]), max_size=2
    ).map(tuple),
    exempt6=st.lists(st.sampled_from(["2001:db8:ff::/48", "2001:db8:fe::/48"]), max_size=1).map(
        tuple
    ),
    random_fully=st.booleans(),
)

FOREIGN_RULE = ruleset.canonical([{"accept": None}])


@st.composite
def damaged(draw: st.DrawFn, table: TableState) -> TableState:
    """`table` after random damage of the kinds tampering and stale mirrors produce."""
    out = table.copy()
    kind = draw(
        st.sampled_from(
            [
                "none",
                "no table",
                "rules",
                "rule order",
                "foreign set",
                "chain",
                "set type",
                "local set type",
                "unused local set",
                "missing local set",
                "dormant",
                "chain policy",
                "elements",
            ]
        )
    )
    assert out.structure is not None
    s = out.structure
    if kind == "no table":
        return TableState(None)
    if kind == "rules":
        rules = list(s.rules)
        cut = draw(st.integers(0, len(rules)))
        rules = rules[:cut] + draw(st.sampled_from([[], [FOREIGN_RULE]]))
        assume(tuple(rules) != s.rules)
        out.structure = Structure(s.sets, s.chains, tuple(rules))
    elif kind == "rule order":
        out.structure = Structure(s.sets, s.chains, tuple(reversed(s.rules)))
    elif kind == "foreign set":
        out.structure = Structure(s.sets | {("foreign", '"ipv4_addr"', ())}, s.chains, s.rules)
    elif kind == "chain":
        chains = frozenset({(ruleset.CHAIN, "nat", "postrouting", 99, "accept")})
        out.structure = Structure(s.sets, chains, s.rules)
    elif kind == "dormant":
        out.structure = dataclasses.replace(s, table_flags=("dormant",))
    elif kind == "chain policy":
        chains = frozenset({(ruleset.CHAIN, "nat", "postrouting", 100, "drop")})
        out.structure = Structure(s.sets, chains, s.rules)
    elif kind == "set type":
        sets = frozenset(x for x in s.sets if x[0] != SOURCES4) | {(SOURCES4, '"ipv6_addr"', ())}
        out.structure = Structure(sets, s.chains, s.rules)
    elif kind == "local set type":
        # A look-alike local set (the old interval layout's flags): foreign damage.
        entry = (L4_16, ruleset.canonical(["ipv4_addr", "ipv4_addr"]), ("interval",))
        sets = frozenset(x for x in s.sets if x[0] != L4_16) | {entry}
        out.structure = Structure(sets, s.chains, s.rules)
        out.sets.pop(L4_16, None)
    elif kind == "unused local set":
        # A local set the desired table may not need, with its rule, holding an element.
        name = ruleset.local_set(4, 8)
        locals_ = {x[0] for x in s.sets if ruleset.is_local_set(x[0])} | {name}
        out.structure = ruleset.desired_structure(Policy(), locals_)
        out.sets[name] = {"198.18.8.8": Element("198.18.8.8", "198.0.0.0/8", "a/b/c")}
    elif kind == "missing local set":
        present = sorted(x[0] for x in s.sets if ruleset.is_local_set(x[0]))
        assume(present)
        gone = draw(st.sampled_from(present))
        sets = frozenset(x for x in s.sets if x[0] != gone)
        out.structure = Structure(sets, s.chains, s.rules)
        del out.sets[gone]
    # Element damage goes with any structure damage too.
    for name in sorted(out.sets):
        for k in list(out.sets[name]):
            if draw(st.integers(0, 9)) == 0:
                del out.sets[name][k]
        if draw(st.integers(0, 4)) == 0:
            if name in (SOURCES4, L4_24):
                out.sets[name]["198.18.7.7"] = Element(
                    "198.18.7.7", "198.18.7.0/24" if name == L4_24 else None, "x/y/z"
                )
            elif name in (SOURCES6, L6_64):
                out.sets[name]["2001:db8:7::7"] = Element(
                    "2001:db8:7::7", "2001:db8:7::/64" if name == L6_64 else None, None
                )
        for k, e in list(out.sets[name].items()):
            if draw(st.integers(0, 9)) == 0:
                out.sets[name][k] = dataclasses.replace(e, comment="someone/else/eth9")
    return out


@st.composite
def observed_tables(draw: st.DrawFn) -> TableState:
    other = desired_table(draw(attachment_maps()), draw(policies))
    return draw(damaged(other))


# ---- helpers ----------------------------------------------------------------------------


def same(a: TableState, b: TableState) -> bool:
    return a.structure == b.structure and a.sets == b.sets


def element_diff(desired: TableState, observed: TableState) -> set[tuple[str, str]]:
    """(set, key) of every element that differs, in sets that both tables have."""
    return {
        (name, k)
        for name in desired.sets.keys() & observed.sets.keys()
        for k in desired.sets[name].keys() | observed.sets[name].keys()
        if desired.sets[name].get(k) != observed.sets[name].get(k)
    }


def local_names(structure: Structure) -> set[str]:
    return {x[0] for x in structure.sets if ruleset.is_local_set(x[0])}


def as_sets(groups: Mapping[str, tuple[Element, ...]]) -> dict[str, frozenset[Element]]:
    return {name: frozenset(elems) for name, elems in groups.items() if elems}


# ---- desired table ----------------------------------------------------------------------


def test_desired_table_for_a_dual_stack_attachment() -> None:
    table = desired_table(
        {
            ("net1", "c1", "eth0"): AttachmentRecord(
                (("198.18.1.2", "198.18.1.0/24"), ("2001:db8:1::2", "2001:db8:1::/64")), 1
            )
        },
        Policy(),
    )
    assert table.structure == ruleset.desired_structure(Policy(), [L4_24, L6_64])
    assert table.sets[SOURCES4] == {"198.18.1.2": Element("198.18.1.2", None, "net1/c1/eth0")}
    assert table.sets[L4_24] == {
        "198.18.1.2": Element("198.18.1.2", "198.18.1.0/24", "net1/c1/eth0")
    }
    assert table.sets[SOURCES6] == {"2001:db8:1::2": Element("2001:db8:1::2", None, "net1/c1/eth0")}
    assert table.sets[L6_64]["2001:db8:1::2"].subnet == "2001:db8:1::/64"


def test_a_shared_address_follows_its_most_recent_owner() -> None:
    a, b = ("net1", "a", "eth0"), ("net1", "b", "eth0")
    older = AttachmentRecord((("198.18.1.3", "198.18.1.0/24"),), 1)
    newer = AttachmentRecord((("198.18.1.3", "198.18.0.0/16"),), 2)
    table = desired_table({b: newer, a: older}, Policy())
    assert table.sets[L4_16]["198.18.1.3"] == Element("198.18.1.3", "198.18.0.0/16", "net1/b/eth0")
    assert L4_24 not in table.sets  # one local element per address, so no /24 set
    alone = desired_table({a: older}, Policy())
    assert alone.sets[L4_24]["198.18.1.3"].subnet == "198.18.1.0/24"
    assert L4_16 not in alone.sets


def test_local_rules_mask_the_destination_to_their_prefix_length_longest_first() -> None:
    rules = ruleset.rule_exprs(Policy(), [L4_16, ruleset.local_set(4, 32), L4_24, L6_64])
    local = [r[0]["match"] for r in rules if str(r[0]["match"]["right"]).startswith("@local")]
    assert [m["right"] for m in local] == ["@local4_32", "@local4_24", "@local4_16", "@local6_64"]
    # The kernel lists an all-ones mask as the plain field: so must we, to compare equal.
    assert local[0]["left"]["concat"][1] == {"payload": {"protocol": "ip", "field": "daddr"}}
    assert local[2]["left"]["concat"][1] == {
        "&": [{"payload": {"protocol": "ip", "field": "daddr"}}, "255.255.0.0"]
    }
    assert local[3]["left"]["concat"][1]["&"][1] == "ffff:ffff:ffff:ffff::"
    # Between the exempt return and the masquerade of the family.
    names = [str(r[0]["match"]["right"]) for r in rules]
    assert names.index("@exempt4") < names.index("@local4_32")
    assert names.index("@local4_16") < names.index("@sources4") < names.index("@exempt6")


def test_local_set_names_are_recognised_exactly() -> None:
    assert ruleset.parse_local_set("local4_16") == (4, 16)
    assert ruleset.parse_local_set("local6_128") == (6, 128)
    foreign = ("local4", "local6", "local4_33", "local6_129", "local4_016", "local4_", "local4_x")
    for name in foreign:
        assert ruleset.parse_local_set(name) is None


def test_exempt_cidrs_are_collapsed_since_the_interval_set_refuses_overlaps() -> None:
    policy = Policy(exempt4=("198.19.0.0/16", "198.19.1.0/24", "198.20.0.0/16", "198.21.0.0/16"))
    table = desired_table({}, policy)
    assert set(table.sets[EXEMPT4]) == {"198.19.0.0/16", "198.20.0.0/15"}


def test_long_owner_comments_are_cut_and_marked() -> None:
    owner = ("n" * 64, "c" * 128, "eth0")
    comment = ruleset.owner_comment(*owner)
    assert len(comment.encode()) <= ruleset.COMMENT_MAX_BYTES
    assert comment.endswith(ruleset.TRUNCATED_MARK)
    assert ruleset.parse_owner_comment(comment) is None
    assert ruleset.parse_owner_comment(ruleset.owner_comment("n", "c", "e")) == ("n", "c", "e")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_the_ipv4_fast_path_agrees_with_ipaddress(value: int, prefix: int) -> None:
    ip = f"{ipaddress.IPv4Address(value)}/{prefix}"
    iface = ipaddress.ip_interface(ip)
    assert address_subnet(ip) == (str(iface.ip), str(iface.network))


# ---- properties of plan -----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(attachment_maps(), policies)
def test_plan_of_a_table_against_itself_is_empty(
    attachments: dict[AttachmentKeyT, AttachmentRecord], policy: Policy
) -> None:
    desired = desired_table(attachments, policy)
    tx = planner.plan(desired, desired.copy(), table=TABLE, policy=policy)
    assert tx.empty
    assert tx.to_json() == {"nftables": []}
    assert planner.plan(desired, desired, table=TABLE, policy=policy, touched=set()).empty


@settings(max_examples=120, deadline=None)
@given(attachment_maps(), policies, observed_tables())
def test_the_encoded_batch_is_the_json_batch(
    attachments: dict[AttachmentKeyT, AttachmentRecord], policy: Policy, observed: TableState
) -> None:
    tx = planner.plan(desired_table(attachments, policy), observed, table=TABLE, policy=policy)
    assert json.loads(tx.encode()) == tx.to_json()


@settings(max_examples=100, deadline=None)
@given(attachment_maps(), attachment_maps(), policies, st.integers(1, 6))
def test_batches_applied_in_order_make_the_same_table_as_one_transaction(
    first: dict[AttachmentKeyT, AttachmentRecord],
    second: dict[AttachmentKeyT, AttachmentRecord],
    policy: Policy,
    size: int,
) -> None:
    whole, batched = FakeBackend(table=TABLE), FakeBackend(table=TABLE)
    for fake in (whole, batched):  # the same starting table: none, then `first`'s
        start = planner.plan(desired_table(first, policy), fake.state(), table=TABLE, policy=policy)
        fake.execute(start.to_json())
    tx = planner.plan(desired_table(second, policy), whole.state(), table=TABLE, policy=policy)
    whole.execute(json.loads(tx.encode()))
    for batch in tx.batches(size):
        commands = json.loads(batch)["nftables"]
        elements = [
            c[verb]["element"]["elem"] for c in commands for verb in c if "element" in c[verb]
        ]
        assert sum(map(len, elements)) <= size
        batched.execute({"nftables": commands})
    assert batched.dump() == whole.dump()
    assert same(whole.state(), desired_table(second, policy))


def test_encoded_comments_are_escaped() -> None:
    comment = 'n/c/\u00e9t"h\\0' + ruleset.TRUNCATED_MARK
    tx = Transaction(
        table=TABLE,
        policy=Policy(),
        add={"local4_24": (Element("198.18.1.2", "198.18.1.0/24", comment),)},
    )
    assert json.loads(tx.encode()) == tx.to_json()
    assert tx.to_json()["nftables"][0]["create"]["element"]["elem"][0]["elem"]["comment"] == comment


@settings(max_examples=120, deadline=None)
@given(attachment_maps(), policies, observed_tables())
def test_applying_the_plan_to_the_observed_table_gives_the_desired_one(
    attachments: dict[AttachmentKeyT, AttachmentRecord], policy: Policy, observed: TableState
) -> None:
    desired = desired_table(attachments, policy)
    tx = planner.plan(desired, observed, table=TABLE, policy=policy)
    result = planner.simulate(tx, observed)
    assert same(result, desired)
    assert planner.plan(desired, result, table=TABLE, policy=policy).empty
    # `apply` returns a new value; the observed table is untouched.
    assert result is not observed


@settings(max_examples=120, deadline=None)
@given(attachment_maps(), policies, observed_tables())
def test_the_plan_is_minimal(
    attachments: dict[AttachmentKeyT, AttachmentRecord], policy: Policy, observed: TableState
) -> None:
    desired = desired_table(attachments, policy)
    tx = planner.plan(desired, observed, table=TABLE, policy=policy)
    assert desired.structure is not None

    def fixed(structure: Structure) -> set[tuple[str, str, tuple[str, ...]]]:
        return {x for x in structure.sets if not ruleset.is_local_set(x[0])}

    structure_ok = observed.structure is not None and (
        fixed(observed.structure) == fixed(desired.structure)
        and observed.structure.chains == desired.structure.chains
        and all(
            ruleset.set_entry(x[0]) == x
            for x in observed.structure.sets - fixed(observed.structure)
        )
    )
    if not structure_ok:
        # A new table, holding exactly the desired elements, and nothing to delete.
        assert tx.recreate and not tx.delete
        assert as_sets(tx.add) == as_sets({n: tuple(e.values()) for n, e in desired.sets.items()})
        return
    assert observed.structure is not None
    assert not tx.recreate
    assert tx.rewrite_rules == (observed.structure.rules != desired.structure.rules)
    # Local sets: exactly the missing ones added, the unused ones deleted (elements with them).
    want, have = local_names(desired.structure), local_names(observed.structure)
    assert set(tx.add_sets) == want - have and set(tx.delete_sets) == have - want
    # Each differing element is deleted if present and added if wanted; nothing else.
    diff = element_diff(desired, observed)
    deleted = {(n, e.key) for n, elems in tx.delete.items() for e in elems}
    added = {(n, e.key) for n, elems in tx.add.items() for e in elems}
    assert deleted == {(n, k) for n, k in diff if k in observed.sets[n]}
    new_sets = {(n, k) for n in tx.add_sets for k in desired.sets[n]}
    assert added == {(n, k) for n, k in diff if k in desired.sets[n]} | new_sets
    assert tx.element_changes == len(deleted) + len(added)


@settings(max_examples=120, deadline=None)
@given(
    attachment_maps(), policies, observed_tables(), st.sets(st.sampled_from(["198.18.9.9", "x"]))
)
def test_a_partial_plan_that_covers_every_difference_equals_the_full_plan(
    attachments: dict[AttachmentKeyT, AttachmentRecord],
    policy: Policy,
    observed: TableState,
    extra: set[str],
) -> None:
    desired = desired_table(attachments, policy)
    full = planner.plan(desired, observed, table=TABLE, policy=policy)
    touched = {k for _, k in element_diff(desired, observed)} | extra
    partial = planner.plan(desired, observed, table=TABLE, policy=policy, touched=touched)
    assert (partial.recreate, partial.rewrite_rules) == (full.recreate, full.rewrite_rules)
    assert (partial.add_sets, partial.delete_sets) == (full.add_sets, full.delete_sets)
    assert as_sets(partial.add) == as_sets(full.add)
    assert as_sets(partial.delete) == as_sets(full.delete)


@settings(max_examples=50, deadline=None)
@given(attachment_maps(), policies)
def test_a_partial_plan_ignores_keys_it_was_not_told_about(
    attachments: dict[AttachmentKeyT, AttachmentRecord], policy: Policy
) -> None:
    desired = desired_table(attachments, policy)
    observed = desired.copy()
    observed.sets[SOURCES4]["198.18.9.9"] = Element("198.18.9.9")  # not touched: left alone
    tx = planner.plan(desired, observed, table=TABLE, policy=policy, touched=set())
    assert tx.empty


def test_a_single_setup_on_a_large_table_is_a_handful_of_element_adds() -> None:
    attachments = {
        ("net1", f"c{n}", "eth0"): AttachmentRecord(
            (
                (f"198.18.{n // 250}.{n % 250 + 2}", f"198.18.{n // 250}.0/24"),
                (f"2001:db8:1::{n + 2:x}", "2001:db8:1::/64"),
            ),
            n + 1,
        )
        for n in range(5000)
    }
    policy = Policy()
    before = desired_table(attachments, policy)
    attachments[("net1", "new", "eth0")] = AttachmentRecord(
        (("198.18.99.2", "198.18.99.0/24"), ("2001:db8:99::2", "2001:db8:99::/64")), 99999
    )
    after = desired_table(attachments, policy)
    touched = {"198.18.99.2", "2001:db8:99::2"}
    for tx in (
        planner.plan(after, before, table=TABLE, policy=policy, touched=touched),
        planner.plan(after, before, table=TABLE, policy=policy),
    ):
        assert not tx.recreate and not tx.rewrite_rules and not tx.delete
        assert tx.element_changes == 4
        assert {n: [e.key for e in es] for n, es in tx.add.items()} == {
            SOURCES4: ["198.18.99.2"],
            L4_24: ["198.18.99.2"],
            SOURCES6: ["2001:db8:99::2"],
            L6_64: ["2001:db8:99::2"],
        }
        commands = tx.to_json()["nftables"]
        assert len(commands) == 4
        assert all("create" in c and "element" in c["create"] for c in commands)


# ---- damage of each kind picks the cheapest repair --------------------------------------


def _table() -> tuple[TableState, Policy]:
    policy = Policy()
    attachments = {("net1", "c1", "eth0"): AttachmentRecord((("198.18.1.2", "198.18.1.0/24"),), 1)}
    return desired_table(attachments, policy), policy


def test_missing_or_foreign_rules_are_rewritten_in_place() -> None:
    desired, policy = _table()
    assert desired.structure is not None
    for rules in ((), desired.structure.rules[:-1], (*desired.structure.rules, FOREIGN_RULE)):
        observed = desired.copy()
        observed.structure = Structure(desired.structure.sets, desired.structure.chains, rules)
        tx = planner.plan(desired, observed, table=TABLE, policy=policy)
        assert tx.rewrite_rules and not tx.recreate and tx.element_changes == 0
        commands = tx.to_json()["nftables"]
        assert "flush" in commands[0] and len(commands) == 1 + len(desired.structure.rules)


def test_damaged_sets_or_chains_replace_the_table_in_one_batch() -> None:
    desired, policy = _table()
    observed = desired.copy()
    observed.structure = None
    tx = planner.plan(desired, observed, table=TABLE, policy=policy)
    assert tx.recreate
    commands = tx.to_json()["nftables"]
    # add; delete; add: valid whether or not the table is there, and atomic.
    assert [next(iter(c)) for c in commands[:3]] == ["add", "delete", "add"]
    assert all("table" in c[v] for c, v in zip(commands[:3], ["add", "delete", "add"], strict=True))
    added = [c["add"]["element"] for c in commands if "element" in c.get("add", {})]
    assert {a["name"] for a in added} == {SOURCES4, L4_24}
    assert "add table inet masqd" in tx.to_script()


def test_a_dormant_table_is_woken_by_add_table_first() -> None:
    desired, policy = _table()
    assert desired.structure is not None
    observed = desired.copy()
    observed.structure = dataclasses.replace(desired.structure, table_flags=("dormant",))
    tx = planner.plan(desired, observed, table=TABLE, policy=policy)
    assert tx.clear_table_flags and not tx.recreate and not tx.rewrite_rules
    assert not tx.empty and tx.element_changes == 0
    assert tx.to_json()["nftables"] == [{"add": {"table": {"family": "inet", "name": TABLE}}}]
    assert tx.to_script().startswith(f"add table inet {TABLE}")
    assert same(planner.simulate(tx, observed), desired)


def test_a_chain_with_another_hook_priority_type_or_policy_replaces_the_table() -> None:
    desired, policy = _table()
    assert desired.structure is not None
    chain = ruleset.CHAIN
    for changed in (
        (chain, "filter", "postrouting", 100, "accept"),
        (chain, "nat", "output", 100, "accept"),
        (chain, "nat", "postrouting", 99, "accept"),
        (chain, "nat", "postrouting", 100, "drop"),
    ):
        observed = desired.copy()
        observed.structure = dataclasses.replace(desired.structure, chains=frozenset({changed}))
        tx = planner.plan(desired, observed, table=TABLE, policy=policy)
        assert tx.recreate, chain


def test_deletes_go_before_adds_and_carry_no_comment() -> None:
    desired, policy = _table()
    observed = desired.copy()
    observed.sets[L4_24]["198.18.1.2"] = Element("198.18.1.2", "198.18.0.0/24", "old/owner/eth0")
    tx = planner.plan(desired, observed, table=TABLE, policy=policy, touched={"198.18.1.2"})
    commands = tx.to_json()["nftables"]
    assert [next(iter(c)) for c in commands] == ["delete", "create"]
    assert commands[0]["delete"]["element"]["elem"] == [{"concat": ["198.18.1.2", "198.18.0.0"]}]
    assert commands[1]["create"]["element"]["elem"][0]["elem"]["comment"] == "net1/c1/eth0"
    script = tx.to_script().splitlines()
    assert script == [
        'delete element inet masqd local4_24 { 198.18.1.2 . 198.18.0.0 comment "old/owner/eth0" }',
        'create element inet masqd local4_24 { 198.18.1.2 . 198.18.1.0 comment "net1/c1/eth0" }',
    ]


def test_a_new_prefix_length_adds_its_set_and_rule_and_an_unused_one_goes() -> None:
    policy = Policy()
    a, b = ("net1", "a", "eth0"), ("net1", "b", "eth0")
    one = {a: AttachmentRecord((("198.18.1.2", "198.18.1.0/24"),), 1)}
    two = {**one, b: AttachmentRecord((("198.18.2.2", "198.18.0.0/16"),), 2)}
    before, after = desired_table(one, policy), desired_table(two, policy)
    tx = planner.plan(after, before, table=TABLE, policy=policy, touched={"198.18.2.2"})
    assert tx.add_sets == (L4_16,) and tx.rewrite_rules and not tx.recreate
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in tx.to_json()["nftables"]]
    # New set first, then the rules that refer to it, then its elements.
    assert verbs[0] == ("add", "set") and verbs[1] == ("flush", "chain")
    assert verbs[-2:] == [("create", "element"), ("create", "element")]
    assert "add set inet masqd local4_16 { type ipv4_addr . ipv4_addr; }" in tx.to_script()
    assert same(planner.simulate(tx, before), after)
    # Its last holder gone: the rules are rewritten without it, then the set is deleted.
    back = planner.plan(before, after, table=TABLE, policy=policy, touched={"198.18.2.2"})
    assert back.delete_sets == (L4_16,) and back.rewrite_rules
    commands = back.to_json()["nftables"]
    chain = {"family": "inet", "table": TABLE, "name": "postrouting"}
    assert commands[0] == {"flush": {"chain": chain}}
    assert commands[-1] == {"delete": {"set": {"family": "inet", "table": TABLE, "name": L4_16}}}
    assert all(c.get("delete", {}).get("element", {}).get("name") != L4_16 for c in commands)
    assert same(planner.simulate(back, after), before)


def test_a_shared_address_moves_between_local_sets_in_one_transaction() -> None:
    policy = Policy()
    a, b = ("net1", "a", "eth0"), ("net1", "b", "eth0")
    older = {a: AttachmentRecord((("198.18.1.3", "198.18.1.0/24"),), 1)}
    both = {**older, b: AttachmentRecord((("198.18.1.3", "198.18.0.0/16"),), 2)}
    before, after = desired_table(older, policy), desired_table(both, policy)
    tx = planner.plan(after, before, table=TABLE, policy=policy, touched={"198.18.1.3"})
    assert tx.add_sets == (L4_16,) and tx.delete_sets == (L4_24,)
    assert set(tx.add) == {SOURCES4, L4_16}
    # Only the sources element's comment (its new owner); the /24 element goes with its set.
    assert set(tx.delete) == {SOURCES4}
    assert same(planner.simulate(tx, before), after)


def test_transaction_is_a_value() -> None:
    tx = Transaction(TABLE, Policy())
    assert tx.empty and tx.element_changes == 0 and tx.to_script() == ""
    assert Transaction(TABLE, Policy(), add={SOURCES4: (Element("198.18.1.2"),)}) == Transaction(
        TABLE, Policy(), add={SOURCES4: (Element("198.18.1.2"),)}
    )

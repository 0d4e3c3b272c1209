"""Pure planning: desired vs observed -> one transaction.

No I/O, no clock, no logging, no globals: everything here is a function of its arguments, so
it is property-tested alone (`plan(d, d)` is empty; simulating `plan(d, o)` on `o` gives `d`).

The planner picks the cheapest of three tiers that reaches the desired table:
- element changes only (the normal case: a setup adds a handful of elements);
- local sets added or removed (a prefix length came into use or went out of it) and the
  chain's rules rewritten in place (flush chain, add its few rules), with the element
  changes: also the repair when someone flushed the chain or inserted a rule;
- the whole table replaced atomically (`add table; delete table; add table; ...` in one batch)
  when a fixed set or the chain is missing, foreign or of the wrong type (or a local set is).

`simulate` and `simulate_in_place` compute what a transaction leaves behind, without a
kernel: the reconciler keeps its mirror of the kernel with the second.
"""

from __future__ import annotations

from collections.abc import Iterable

from masqd.planning import ruleset
from masqd.planning.ruleset import (
    Element,
    Policy,
    Structure,
    TableState,
    is_local_set,
    local_order,
    set_entry,
)
from masqd.planning.transaction import Transaction


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


def simulate(tx: Transaction, observed: TableState) -> TableState:
    """What the kernel holds after `tx` commits on top of `observed` (a new value)."""
    result = observed.copy()
    structure = ruleset.desired_structure(tx.policy, tx.local_sets)
    simulate_in_place(tx, result, desired_structure=structure)
    return result


def simulate_in_place(tx: Transaction, state: TableState, *, desired_structure: Structure) -> None:
    """`simulate`, mutating `state`: the reconciler keeps its mirror of the kernel this way
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

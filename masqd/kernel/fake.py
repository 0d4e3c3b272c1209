"""An in-memory nftables for tests, with the kernel's semantics for what masqd does.

`FakeBackend` implements `backend.Backend`. It runs exactly the bytes `KernelBackend` hands
libnftables, `Transaction.batches(nft.BATCH_ELEMENTS)`, each batch parsed as JSON, so a
mistake in that encoding fails the fake's tests too. It lists its table back in the kernel's
JSON shape through `ruleset.parse_table`, the parser masqd uses on the real listing. What it
keeps faithful (each point checked against nftables 1.0.6 on a 6.x kernel, and by
tests/test_nft_kernel.py, which runs the same scenarios on both):

- a batch is all or nothing: any failing command leaves the table and the generation as
  they were; the batches of a big transaction before a failing one stay committed;
- the generation moves by one per commit that queued anything in the kernel; a batch of
  no-ops (re-adding elements or the table) leaves it alone, while re-adding an existing set
  or chain moves it although nothing changes;
- deleting an element, set, chain or table that is not there fails with ENOENT
  ("No such file or directory"); element commands on a missing table or set too;
- adding an element that is there is a no-op, and keeps the element's old comment;
  creating one (`create element`, which masqd's transactions use) fails with EEXIST;
- the `local<family>_<plen>` sets are plain (hash) concatenated sets: an element is the
  exact pair (address . network address), so a second network address for an address is a
  second element; an overlapping `exempt` CIDR fails in nft itself ("interval overlaps with
  an existing one"), as does deleting one that is not there exactly ("element does not
  exist"). See "element semantics" below;
- deleting a set that a rule refers to fails with EBUSY, unless an earlier command of the
  batch removed those rules (flush chain);
- `add table; delete table; add table` recreates whether the table existed or not.
- a rule carries a handle (numbered per table, never reused) and its comment, as listed;
  `delete rule` names one by handle and fails with ENOENT when it is not there.

Tests also tamper with it (as a person with `nft` would), make the next applies fail, or
slow them down, and compare `dump()`s: sorted text of the whole table.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from masqd.kernel import nft
from masqd.kernel.backend import (
    Applied,
    EventSink,
    EventSource,
    NftError,
    Observation,
    Stage,
    paused_events,
)
from masqd.planning import ruleset
from masqd.planning.ruleset import EXEMPT_SETS, Element, TableState, is_local_set, is_our_set
from masqd.planning.transaction import Transaction

ENOENT = "Error: Could not process rule: No such file or directory"
EEXIST = "Error: Could not process rule: File exists"
EBUSY = "Error: Could not process rule: Device or resource busy"
OVERLAP = "Error: interval overlaps with an existing one"
NO_ELEMENT = "Error: element does not exist"
FAILURE = "Error: Could not process rule: Operation not permitted"  # what fail_next raises
EOPNOTSUPP = "Error: Could not process rule: Operation not supported"


@dataclass
class _Set:
    type: Any
    flags: tuple[str, ...]
    # masqd's sets hold parsed elements, in insertion order (a tampered local set may hold
    # two for one address); a foreign set keeps its raw JSON values.
    elements: list[Element] = field(default_factory=list)
    raw: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class _Rule:
    expr: Any  # the expression list
    handle: int  # as the kernel numbers them: per table, never reused
    comment: str | None = None


@dataclass
class _Chain:
    spec: dict[str, Any]  # type, hook, prio, policy (absent for a regular chain)
    rules: list[_Rule] = field(default_factory=list)


@dataclass
class _Table:
    sets: dict[str, _Set] = field(default_factory=dict)
    chains: dict[str, _Chain] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # "dormant": no chain of the table is hooked
    last_handle: int = 0

    def copy(self) -> _Table:
        return _Table(
            {n: _Set(s.type, s.flags, list(s.elements), list(s.raw)) for n, s in self.sets.items()},
            {n: _Chain(dict(c.spec), list(c.rules)) for n, c in self.chains.items()},
            self.flags,
            self.last_handle,
        )


class FakeBackend:
    """`backend.Backend` over an in-memory table named `table` (family inet)."""

    def __init__(self, *, table: str = "masqd") -> None:
        self.table = table
        self._tables: dict[str, _Table] = {}
        self._generation = 1  # a fresh namespace's ruleset starts at 1
        self.apply_delay = 0.0  # seconds each apply takes, to let requests pile up
        self.applied: list[Transaction] = []  # every transaction that committed
        self.attempts = 0  # every call of apply, failed ones included
        self.observes = 0
        self.closed = False
        self._failures: list[str] = []
        self.stage: Stage | None = None  # called at the points KernelBackend calls it
        self.no_events = False  # `subscribe` fails, as without the kernel's event socket
        self._events: FakeEvents | None = None

    # ---- Backend -------------------------------------------------------------------------

    async def observe(self) -> Observation:
        self._check_open()
        self.observes += 1
        await asyncio.sleep(0)
        self._stage("observe")
        observation = Observation(ruleset.parse_table(self.table, self.listing()), self._generation)
        self._stage("listed")
        return observation

    async def apply(self, tx: Transaction) -> Applied:
        """Commit `tx` as KernelBackend does, a whole-table one with events paused."""
        return await paused_events(self._events, tx, lambda: self._commit(tx), self.generation)

    async def _commit(self, tx: Transaction) -> Applied:
        self._check_open()
        self.attempts += 1
        await asyncio.sleep(self.apply_delay)
        if self._failures:
            raise NftError(self._failures.pop(0))
        before = self._generation
        commits = 0
        # The very bytes KernelBackend hands libnftables, batch by batch: each batch all or
        # nothing, and the ones before a failing batch stay committed, as in the kernel.
        # (nft.BATCH_ELEMENTS read now: a test that makes the kernel's batches small makes
        # the fake's small too.)
        for payload in tx.batches(nft.BATCH_ELEMENTS):
            self._stage("commit")
            self.execute(json.loads(payload))
            commits += 1
        self.applied.append(tx)
        return Applied(self._generation, before, commits)

    async def generation(self) -> int:
        self._check_open()
        return self._generation

    async def open(self) -> None:
        # No sockets. A closed fake opens again: the same kernel, for a restarted daemon.
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    def _stage(self, point: str) -> None:
        if self.stage is not None:
            self.stage(point)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("FakeBackend used after close()")

    # ---- failure injection ---------------------------------------------------------------

    def fail_next(self, count: int = 1, message: str = FAILURE) -> None:
        """Make the next `count` applies raise NftError(message), changing nothing."""
        self._failures.extend([message] * count)

    def heal(self) -> None:
        """Drop the injected failures still pending: nftables works again."""
        self._failures.clear()

    @property
    def failures_pending(self) -> int:
        return len(self._failures)

    # ---- running nftables JSON (all or nothing) ------------------------------------------

    def execute(self, payload: dict[str, Any]) -> None:
        """Run a JSON batch as the kernel would: every command, or none of them."""
        work = {name: t.copy() for name, t in self._tables.items()}
        changed = False
        touched: set[str] = set()
        for cmd in payload["nftables"]:
            if len(cmd) != 1:
                raise NftError(f"Error: malformed command {cmd!r}")
            ((verb, obj),) = cmd.items()
            changed |= self._command(work, verb, obj)
            touched.add(_table_named(obj))
        if changed:
            self._tables = work
            self._generation += 1
            if self._events is not None:
                self._events.committed(self._generation, self.table in touched)

    async def run_json(self, payload: dict[str, Any]) -> str:
        """`Backend.run_json`: a batch of changes (`execute`), or one `list table` command,
        answered as nftables does (ENOENT for a table that is not there)."""
        self._check_open()
        await asyncio.sleep(0)
        commands = payload.get("nftables")
        if isinstance(commands, list) and len(commands) == 1 and "list" in commands[0]:
            spec = commands[0]["list"].get("table", {})
            name = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(name, str) or name not in self._tables:
                raise NftError(f"{ENOENT} (list table inet {name})")
            return json.dumps({"nftables": self.listing(name)})
        self.execute(payload)
        return ""

    async def subscribe(self, sink: EventSink) -> EventSource:
        """`Backend.subscribe`: every commit from then on is told to `sink`, in memory, with
        the kernel's meaning (see `FakeEvents`). `no_events` makes it fail as a kernel
        without the event socket would."""
        self._check_open()
        if self.no_events:
            raise OSError("the fake has no events (no_events is set)")
        self._events = FakeEvents(sink)
        return self._events

    def _command(self, work: dict[str, _Table], verb: str, obj: dict[str, Any]) -> bool:
        """One command on the working copy; True when the kernel would queue a transaction
        for it (which moves the generation at commit), as it does for most changes, but
        also for re-adding a set or chain that is there, and not for re-adding elements."""
        if len(obj) != 1:
            raise NftError(f"Error: malformed object {obj!r}")
        ((kind, spec),) = obj.items()
        if spec.get("family", "inet") != "inet":
            raise NftError(f"Error: the fake knows only family inet, got {spec.get('family')!r}")
        if kind == "table":
            return self._table_cmd(work, verb, spec["name"], _flags(spec.get("flags")))
        name = spec.get("table")
        table = work.get(name) if isinstance(name, str) else None
        if table is None:
            raise NftError(f"{ENOENT} ({verb} {kind} in missing table {name!r})")
        handler = {
            ("add", "set"): self._add_set,
            ("add", "chain"): self._add_chain,
            ("add", "rule"): self._add_rule,
            ("delete", "rule"): self._delete_rule,
            ("flush", "chain"): self._flush_chain,
            ("flush", "set"): self._flush_set,
            ("delete", "set"): self._delete_set,
            ("delete", "chain"): self._delete_chain,
            ("add", "element"): self._add_elements,
            ("create", "element"): self._create_elements,
            ("delete", "element"): self._delete_elements,
        }.get((verb, kind))
        if handler is None:
            raise NftError(f"Error: the fake does not implement {verb} {kind}")
        return handler(table, spec)

    def _table_cmd(
        self, work: dict[str, _Table], verb: str, name: str, flags: tuple[str, ...] = ()
    ) -> bool:
        if verb == "add":
            # As the kernel does, `add` of a table that exists sets its flags to the ones given
            # (none when none are: that is how a dormant table wakes up).
            if name in work:
                if work[name].flags == flags:
                    return False
                work[name].flags = flags
                return True
            work[name] = _Table(flags=flags)
            return True
        if verb == "delete":
            if name not in work:
                raise NftError(f"{ENOENT} (delete table inet {name})")
            del work[name]
            return True
        if verb == "flush":
            if name not in work:
                raise NftError(f"{ENOENT} (flush table inet {name})")
            table = work[name]
            changed = False
            for s in table.sets.values():
                changed |= bool(s.elements or s.raw)
                s.elements.clear()
                s.raw.clear()
            for c in table.chains.values():
                changed |= bool(c.rules)
                c.rules.clear()
            return changed
        raise NftError(f"Error: the fake does not implement {verb} table")

    @staticmethod
    def _add_set(table: _Table, spec: dict[str, Any]) -> bool:
        name = spec["name"]
        flags = tuple(spec.get("flags", ()))
        current = table.sets.get(name)
        if current is not None:
            if ruleset.canonical(current.type) != ruleset.canonical(spec["type"]) or (
                current.flags != flags
            ):
                raise NftError(f"{EEXIST} (set {name} exists with another type)")
            return True  # the kernel queues a set update all the same
        table.sets[name] = new = _Set(spec["type"], flags)
        held = _identities(name, new)
        for value in spec.get("elem", ()):
            _add_element(name, new, value, held)
        return True

    @staticmethod
    def _add_chain(table: _Table, spec: dict[str, Any]) -> bool:
        name = spec["name"]
        current = table.chains.get(name)
        if current is not None:
            hooked = {k: spec[k] for k in ("type", "hook", "prio") if k in spec}
            if any(current.spec.get(k) != v for k, v in hooked.items()):
                raise NftError(f"{EOPNOTSUPP} (chain {name} exists with another hook)")
            if "policy" in spec:
                current.spec["policy"] = spec["policy"]
            return True  # the kernel queues a chain update all the same
        table.chains[name] = _Chain(
            {k: spec[k] for k in ("type", "hook", "prio", "policy") if k in spec}
        )
        return True

    @staticmethod
    def _add_rule(table: _Table, spec: dict[str, Any]) -> bool:
        chain = _existing_chain(table, spec["chain"], "add rule to missing chain")
        table.last_handle += 1
        expr = json.loads(json.dumps(spec["expr"]))
        chain.rules.append(_Rule(expr, table.last_handle, spec.get("comment")))
        return True

    @staticmethod
    def _delete_rule(table: _Table, spec: dict[str, Any]) -> bool:
        """`delete rule ... handle N`: ENOENT for a handle the chain does not hold."""
        chain = table.chains.get(spec["chain"])
        handle = spec.get("handle")
        if chain is None or not any(r.handle == handle for r in chain.rules):
            raise NftError(f"{ENOENT} (delete rule handle {handle} of chain {spec['chain']!r})")
        chain.rules = [r for r in chain.rules if r.handle != handle]
        return True

    @staticmethod
    def _flush_chain(table: _Table, spec: dict[str, Any]) -> bool:
        chain = _existing_chain(table, spec["name"], "flush missing chain")
        changed = bool(chain.rules)
        chain.rules.clear()
        return changed

    @staticmethod
    def _delete_chain(table: _Table, spec: dict[str, Any]) -> bool:
        if table.chains.pop(spec["name"], None) is None:
            raise NftError(f"{ENOENT} (delete missing chain {spec['name']!r})")
        return True

    @staticmethod
    def _flush_set(table: _Table, spec: dict[str, Any]) -> bool:
        s = _existing_set(table, spec, "flush missing set")
        changed = bool(s.elements or s.raw)
        s.elements.clear()
        s.raw.clear()
        return changed

    @staticmethod
    def _delete_set(table: _Table, spec: dict[str, Any]) -> bool:
        name = spec["name"]
        if name not in table.sets:
            raise NftError(f"{ENOENT} (delete missing set {name!r})")
        reference = json.dumps(f"@{name}")
        if any(reference in json.dumps(r.expr) for c in table.chains.values() for r in c.rules):
            raise NftError(f"{EBUSY} (set {name} is in use by a rule)")
        del table.sets[name]
        return True

    @staticmethod
    def _add_elements(table: _Table, spec: dict[str, Any]) -> bool:
        s = _existing_set(table, spec, "add element to missing set")
        changed = False
        held = _identities(spec["name"], s)
        for value in spec["elem"]:
            changed |= _add_element(spec["name"], s, value, held)
        return changed

    @staticmethod
    def _create_elements(table: _Table, spec: dict[str, Any]) -> bool:
        """`create element`: `add element` that fails with EEXIST for an element that is
        there (NLM_F_EXCL), so it always moves the generation or fails."""
        s = _existing_set(table, spec, "create element in missing set")
        held = _identities(spec["name"], s)
        for value in spec["elem"]:
            if not _add_element(spec["name"], s, value, held):
                raise NftError(f"{EEXIST} (create element {value!r} in {spec['name']})")
        return True

    @staticmethod
    def _delete_elements(table: _Table, spec: dict[str, Any]) -> bool:
        s = _existing_set(table, spec, "delete element from missing set")
        for value in spec["elem"]:
            _delete_element(spec["name"], s, value)
        return True

    # ---- listing -------------------------------------------------------------------------

    def listing(self, name: str | None = None) -> list[dict[str, Any]]:
        """Table `name` (masqd's by default) in the shape `nft -j list table inet <name>`
        gives (no metainfo); empty when it is not there."""
        name = self.table if name is None else name
        table = self._tables.get(name)
        if table is None:
            return []
        head: dict[str, Any] = {"family": "inet", "name": name}
        if table.flags:
            head["flags"] = list(table.flags)
        out: list[dict[str, Any]] = [{"table": head}]
        for set_name, s in table.sets.items():
            spec: dict[str, Any] = {
                "family": "inet",
                "name": set_name,
                "table": name,
                "type": s.type,
            }
            if s.flags:
                spec["flags"] = list(s.flags)
            elems = (
                [ruleset.element_json(set_name, e) for e in s.elements]
                if _ours(set_name, s)
                else list(s.raw)
            )
            if elems:
                spec["elem"] = elems
            out.append({"set": spec})
        for chain, c in table.chains.items():
            out.append({"chain": {"family": "inet", "table": name, "name": chain, **c.spec}})
            for r in c.rules:
                rule = {"family": "inet", "table": name, "chain": chain, "handle": r.handle}
                if r.comment is not None:
                    rule["comment"] = r.comment
                out.append({"rule": rule | {"expr": r.expr}})
        return out

    def state(self) -> TableState:
        return ruleset.parse_table(self.table, self.listing())

    def dump(self) -> str:
        return dump_table(self.state())

    # ---- tampering: what a person with `nft` might do ------------------------------------

    def _tamper(self, *commands: dict[str, Any]) -> None:
        self.execute({"nftables": list(commands)})

    def delete_element(self, set_name: str, key: str) -> None:
        """`nft delete element inet <table> <set> { key }`: the element stored under `key`."""
        table = self._tables.get(self.table)
        held = table.sets[set_name].elements if table and set_name in table.sets else []
        elem = next((e for e in held if e.key == key), None) or Element(key, key)
        value = ruleset.element_json(set_name, elem, with_comment=False)
        spec = {"family": "inet", "table": self.table, "name": set_name, "elem": [value]}
        self._tamper({"delete": {"element": spec}})

    def flush_set(self, set_name: str) -> None:
        self._tamper({"flush": {"set": {"family": "inet", "table": self.table, "name": set_name}}})

    def flush_chain(self, chain: str = ruleset.CHAIN) -> None:
        self._tamper({"flush": {"chain": {"family": "inet", "table": self.table, "name": chain}}})

    def drop_table(self) -> None:
        self._tamper({"delete": {"table": ruleset.table_ref(self.table)}})

    def add_rule(self, expr: list[Any] | None = None, chain: str = ruleset.CHAIN) -> None:
        """A foreign rule appended to `chain` (by default an `accept` in masqd's own chain)."""
        rule = {
            "family": "inet",
            "table": self.table,
            "chain": chain,
            "expr": expr if expr is not None else [{"accept": None}],
        }
        self._tamper({"add": {"rule": rule}})

    def add_chain(self, name: str) -> None:
        self._tamper({"add": {"chain": {"family": "inet", "table": self.table, "name": name}}})

    def set_table_flags(self, *flags: str) -> None:
        """`nft add table inet <table> '{ flags dormant; }'`."""
        self._tamper({"add": {"table": ruleset.table_ref(self.table) | {"flags": list(flags)}}})

    def set_chain_policy(self, policy: str, chain: str = ruleset.CHAIN) -> None:
        """`nft add chain inet <table> <chain> '{ policy drop; }'`."""
        spec = {"family": "inet", "table": self.table, "name": chain, "policy": policy}
        self._tamper({"add": {"chain": spec}})


# ---- element semantics --------------------------------------------------------------------
#
# sources: a hash set; an element is its address.
# local<family>_<plen>: a hash set of (address . network address); an element is that pair,
#   so the same address with another network address is another element.
# exempt: an interval set that nft 1.0.6 itself keeps free of overlaps, and whose deletes
#   must name an interval exactly.


def _table_named(obj: dict[str, Any]) -> str:
    """The table a command's object is in (a table command's own name)."""
    ((kind, spec),) = obj.items()
    name = spec.get("name") if kind == "table" else spec.get("table")
    return name if isinstance(name, str) else ""


class FakeEvents:
    """The fake's `EventSource`: each commit is queued as the kernel multicasts a batch, and
    handed to the sink on the loop (`pump`, as `EventWatcher` reads its socket). While
    paused, commits are not seen at all, as after leaving the kernel's event group."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._queued: list[tuple[int, bool]] = []
        self._wake = asyncio.Event()
        self._paused = False
        self._running = False
        self.batches = 0
        self.table_batches = 0
        self.listings_skipped = 0

    def committed(self, generation: int, touches_table: bool) -> None:
        if self._paused:
            return
        self._queued.append((generation, touches_table))
        self._wake.set()

    async def run(self) -> None:
        self._running = True
        try:
            while True:
                self.pump()
                await self._wake.wait()
                self._wake.clear()
        finally:
            self._running = False

    def pump(self) -> None:
        queued, self._queued = self._queued, []
        for generation, touches_table in queued:
            self.batches += 1
            if touches_table:
                self.table_batches += 1
                self._sink.table_changed(generation)
            elif self._sink.other_tables_changed(generation):
                self.listings_skipped += 1

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.pump()

    def status(self) -> dict[str, Any]:
        return {
            "subscribed": self._running,
            "batches": self.batches,
            "table_batches": self.table_batches,
            "listings_skipped": self.listings_skipped,
            "overflows": 0,
        }


def _ours(set_name: str, s: _Set) -> bool:
    """Whether the fake keeps this set's elements parsed: one of masqd's sets, of its type
    (a look-alike of another type keeps raw values, as the parser reads only ours)."""
    if not is_our_set(set_name):
        return False
    kind, flags = ruleset.set_type(set_name)
    return ruleset.canonical(kind) == ruleset.canonical(s.type) and tuple(flags) == s.flags


def _same(set_name: str, held: Element, elem: Element) -> bool:
    if is_local_set(set_name):
        return held.key == elem.key and held.subnet == elem.subnet
    return held.key == elem.key


def _identity(set_name: str, elem: Element) -> tuple[str, str | None]:
    """What `_same` compares."""
    return (elem.key, elem.subnet) if is_local_set(set_name) else (elem.key, None)


def _existing_chain(table: _Table, name: str, doing: str) -> _Chain:
    """The chain `name`; ENOENT, as the kernel answers, when the table has none."""
    chain = table.chains.get(name)
    if chain is None:
        raise NftError(f"{ENOENT} ({doing} {name!r})")
    return chain


def _existing_set(table: _Table, spec: dict[str, Any], doing: str) -> _Set:
    """The set `spec` names; ENOENT, as the kernel answers, when the table has none."""
    s = table.sets.get(spec["name"])
    if s is None:
        raise NftError(f"{ENOENT} ({doing} {spec['name']!r})")
    return s


def _identities(set_name: str, s: _Set) -> set[tuple[str, str | None]]:
    return {_identity(set_name, e) for e in s.elements}


def _add_element(
    set_name: str, s: _Set, value: Any, held: set[tuple[str, str | None]] | None = None
) -> bool:
    """Add `value` unless the set holds it. `held`: the set's `_identities`, kept up to date
    here, so that a batch of 100,000 elements is not quadratic."""
    if not _ours(set_name, s):
        if value in s.raw:
            return False
        s.raw.append(value)
        return True
    if held is None:
        held = _identities(set_name, s)
    changed = False
    for key, elem in ruleset.parse_elements(set_name, [value]).items():
        if _identity(set_name, elem) in held:
            continue
        if set_name in EXEMPT_SETS:
            net = ipaddress.ip_network(key)
            for other in s.elements:
                if ipaddress.ip_network(other.key).overlaps(net):
                    raise NftError(f"{OVERLAP} ({set_name} {key} overlaps {other.key})")
        s.elements.append(elem)
        held.add(_identity(set_name, elem))
        changed = True
    return changed


def _delete_element(set_name: str, s: _Set, value: Any) -> None:
    if not _ours(set_name, s):
        if value not in s.raw:
            raise NftError(f"{ENOENT} (delete {value!r} from {set_name})")
        s.raw.remove(value)
        return
    for key, elem in ruleset.parse_elements(set_name, [value]).items():
        index = next((i for i, h in enumerate(s.elements) if _same(set_name, h, elem)), None)
        if index is None:
            missing = NO_ELEMENT if set_name in EXEMPT_SETS else ENOENT
            raise NftError(f"{missing} (delete {key} from {set_name})")
        del s.elements[index]


# ---- dumps ----------------------------------------------------------------------------------


def _flags(listed: Any) -> tuple[str, ...]:
    if listed is None:
        return ()
    return tuple(listed) if isinstance(listed, list) else (str(listed),)


def dump_table(state: TableState) -> str:
    """A table as sorted text, one object per line, for comparisons in tests.

    Works on any TableState, so a kernel observation and the fake dump the same way.
    """
    if state.structure is None:
        return "(no table)"
    lines: list[str] = []
    if state.structure.table_flags:
        lines.append(f"table flags {','.join(state.structure.table_flags)}")
    for name, kind, flags in sorted(state.structure.sets):
        lines.append(f"set {name} type {kind} flags {','.join(flags) or '-'}")
    for chain in sorted(state.structure.chains, key=repr):
        lines.append("chain " + " ".join(str(part) for part in chain))
    # Rule order matters in a chain: keep it, numbered.
    for index, rule in enumerate(state.structure.rules):
        lines.append(f"rule {index:03d} {rule}")
    for set_name in sorted(state.sets):
        for elem in state.sets[set_name].values():
            subnet = f" . {elem.subnet}" if elem.subnet else ""
            comment = f' comment "{elem.comment}"' if elem.comment else ""
            lines.append(f"element {set_name} {elem.key}{subnet}{comment}")
    return "\n".join(sorted(lines))

"""One nftables transaction as a value, and its encodings.

Adding to it never fails; it is checked when the kernel (or the fake) runs it. It encodes as
the JSON batch libnftables takes (`encode`, `batches`), and prints as an `nft -f` script for
logs and `masqctl diff` (`to_script`). A transaction is one atomic batch unless it is too big
for libnftables to take in one piece (tens of thousands of element changes): then `batches`
splits it, the structure and the first elements first, and every batch leaves a working
table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from masqd.planning import ruleset
from masqd.planning.ruleset import (
    Element,
    Policy,
)

_ENCODE_CHUNK = 4096  # elements joined at a time: their fragments are freed chunk by chunk


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


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

"""The desired attachments and their owner index.

`DesiredState` is the only holder of what the runtime asked for. It keeps, incrementally and
in O(IPs of the attachment) per change:
- `attachments`: key -> record (IPs with their subnets, setup sequence number);
- `owners`: address -> the attachments that hold it, with the subnet each one gave;
- `elements`: the set elements the kernel should hold, by set name (what
  `desired_table` computes from scratch; a property test keeps the two in agreement).
  A local set (`local4_<plen>`) is there exactly while it holds an element, so its names are
  the local sets the table needs;
- `dirty`: the element keys changed since the reconciler last took them.

An address stays in the table while any attachment holds it; its local element follows the
most recently set-up holder. Every change is also written to the journal (see `journal`), and
every change bumps `version`, which the API awaits to know its change reached the kernel.

All methods run on the event loop thread; nothing here awaits, so changes are serialised.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator

from masqd.models import AttachmentKeyT, key_problem
from masqd.planning.desired import elements_for_owner
from masqd.planning.records import AttachmentRecord, address_subnet, cidrs_of
from masqd.planning.ruleset import SOURCE_SETS, Element, local_family, sources_set
from masqd.state.journal import Entry, Journal

log = logging.getLogger(__name__)


class CapacityExceeded(Exception):
    """A new attachment would exceed --max-attachments."""


class DesiredState:
    def __init__(self, *, journal: Journal | None = None, max_attachments: int = 100_000) -> None:
        self.attachments: dict[AttachmentKeyT, AttachmentRecord] = {}
        # address -> its holders: the owner's key alone when one attachment holds it, the
        # usual case (its record has the subnet), which spares a dict per address (about
        # 50 MiB at 100,000 dual-stack attachments); {owner key: subnet} when several do.
        # Dicts keep insertion order and an owner is re-inserted on every setup, so the last
        # entry is the most recent holder.
        self.owners: dict[str, AttachmentKeyT | dict[AttachmentKeyT, str]] = {}
        self.elements: dict[str, dict[str, Element]] = {name: {} for name in SOURCE_SETS}
        self.dirty: set[str] = set()
        self.version = 0
        self.max_attachments = max_attachments
        self._seq = 0
        self._journal = journal
        # Keys whose last journal record replayed is a delete: adoption must not bring them
        # back from the table (see `daemon.restore.recover_from_table`).
        self.replayed_deletes: set[AttachmentKeyT] = set()

    # ---- reads ---------------------------------------------------------------------------

    def get(self, key: AttachmentKeyT) -> AttachmentRecord | None:
        return self.attachments.get(key)

    def items(
        self, network: str | None = None
    ) -> Iterator[tuple[AttachmentKeyT, AttachmentRecord]]:
        for key, record in self.attachments.items():
            if network is None or key[0] == network:
                yield key, record

    def __len__(self) -> int:
        return len(self.attachments)

    def holders(self, address: str) -> dict[AttachmentKeyT, str]:
        """The attachments holding `address` with the subnet each gave, most recent last."""
        held = self.owners.get(address)
        if held is None:
            return {}
        if isinstance(held, tuple):
            return {held: self._subnet_of(held, address)}
        return dict(held)

    # ---- changes -------------------------------------------------------------------------

    def put(self, key: AttachmentKeyT, ips: Iterable[str]) -> bool:
        """Set (or replace) an attachment's IPs, given canonical 'address/prefix' strings.

        Returns False when the attachment already has exactly these IPs (nothing changes, no
        journal record). Raises CapacityExceeded, changing nothing, when a new attachment
        would exceed the limit.
        """
        pairs = tuple(address_subnet(ip) for ip in ips)
        previous = self.attachments.get(key)
        if previous is not None and previous.ips == pairs:
            return False
        if previous is None and len(self.attachments) >= self.max_attachments:
            raise CapacityExceeded(
                f"the daemon holds {len(self.attachments)} attachments and --max-attachments "
                f"is {self.max_attachments}: a new attachment needs another removed first"
            )
        self._set(key, pairs)
        if self._journal is not None:
            self._journal.record_put(key, cidrs_of(pairs))
        return True

    def delete(self, key: AttachmentKeyT) -> AttachmentRecord | None:
        """Remove an attachment; the removed record, or None if it was not there."""
        record = self._remove(key)
        if record is not None and self._journal is not None:
            self._journal.record_delete(key)
        return record

    @property
    def seq(self) -> int:
        """The setup sequence number of the latest setup (records carry theirs)."""
        return self._seq

    def gc(
        self, network: str, valid: set[tuple[str, str]], *, set_up_by: int | None = None
    ) -> list[tuple[AttachmentKeyT, AttachmentRecord]]:
        """Remove every attachment of `network` whose (container ID, ifname) is not in `valid`
        (with `set_up_by`: only those set up at or before that sequence number)."""
        stale = [
            (k, r)
            for k, r in self.items(network)
            if (k[1], k[2]) not in valid and (set_up_by is None or r.seq <= set_up_by)
        ]
        for key, _ in stale:
            self.delete(key)
        return stale

    def replay(
        self, entries: Iterable[Entry], *, at_last_marker: Callable[[Entry], None] | None = None
    ) -> list[str]:
        """Rebuild from journal records, without journalling them again; the problems found.

        `at_last_marker` is called at the marker the loader flagged as the last (see
        `journal.Entry`), with the state as the kernel held it then. A record whose key or
        IPs are not valid any more is skipped and reported, never raised.
        """
        problems: list[str] = []
        for entry in entries:
            if entry.op == "synced":
                if entry.last and at_last_marker is not None:
                    at_last_marker(entry)
                continue
            # Recorded rules: a key journalled before a newer naming rule keeps working.
            problem = key_problem(*entry.key, recorded=True)
            if problem is not None:
                problems.append(f"journal record for {entry.key}: {problem}; skipped")
                continue
            try:
                if entry.op == "put":
                    self.load(entry.key, entry.ips)
                    self.replayed_deletes.discard(entry.key)
                else:
                    self.unload(entry.key)
                    self.replayed_deletes.add(entry.key)
            except ValueError as exc:
                problems.append(f"journal record for {entry.key}: {exc}; skipped")
        return problems

    def load(self, key: AttachmentKeyT, ips: Iterable[str]) -> None:
        """Put without journalling: for replaying the journal itself."""
        pairs = tuple(address_subnet(ip) for ip in ips)
        self._set(key, pairs)

    def unload(self, key: AttachmentKeyT) -> None:
        self._remove(key)

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def restore_dirty(self, keys: set[str]) -> None:
        """Give back keys taken by a sync that failed."""
        self.dirty |= keys

    # ---- owner index ---------------------------------------------------------------------

    def _set(self, key: AttachmentKeyT, pairs: tuple[tuple[str, str], ...]) -> None:
        # Network names and interface names repeat across attachments: one string each.
        key = (sys.intern(key[0]), key[1], sys.intern(key[2]))
        previous = self.attachments.pop(key, None)
        if previous is not None:
            self._release(key, previous, keep={a for a, _ in pairs})
        self._seq += 1
        self.attachments[key] = AttachmentRecord(pairs, self._seq)
        for address, subnet in pairs:
            held = self.owners.get(address)
            if held is None or held == key:
                self.owners[address] = key
            else:
                if isinstance(held, tuple):
                    held = self.owners[address] = {held: self._subnet_of(held, address)}
                held.pop(key, None)
                held[key] = subnet  # last = most recent
            self._refresh(address)
        self.version += 1

    def _remove(self, key: AttachmentKeyT) -> AttachmentRecord | None:
        record = self.attachments.pop(key, None)
        if record is None:
            return None
        self._release(key, record, keep=set())
        self.version += 1
        return record

    def _release(self, key: AttachmentKeyT, record: AttachmentRecord, *, keep: set[str]) -> None:
        for address, _ in record.ips:
            if address in keep:
                continue
            held = self.owners.get(address)
            if held is None:
                continue
            if isinstance(held, tuple):
                if held == key:
                    del self.owners[address]
            else:
                held.pop(key, None)
                if len(held) == 1:
                    self.owners[address] = next(iter(held))
            self._refresh(address)

    def _refresh(self, address: str) -> None:
        """Recompute the elements of one address from its holders."""
        sources = sources_set(address)
        holders = self.owners.get(address)
        if holders:
            if isinstance(holders, tuple):
                owner, subnet = holders, self._subnet_of(holders, address)
            else:
                owner = next(reversed(holders))
                subnet = holders[owner]
            (_, src_elem), (local, local_elem) = elements_for_owner(address, owner, subnet)
            previous = self.elements[sources].get(address)
            if previous != src_elem:
                self.elements[sources][address] = src_elem
                self.dirty.add(address)
            held = self.elements.setdefault(local, {})
            if previous is not None and address not in held:
                # An address has a local element exactly when it has a sources element:
                # the deciding owner's prefix length changed, so it is in another local set.
                self._drop_local(address)
            if held.get(address) != local_elem:
                held[address] = local_elem
                self.dirty.add(address)
        else:
            if self.elements[sources].pop(address, None) is not None:
                self.dirty.add(address)
            self._drop_local(address)

    def _drop_local(self, address: str) -> None:
        """Remove an address's local element, wherever it is; a local set left empty goes too.

        Looked for in the family's local sets (one per prefix length in use, a handful) rather
        than kept in an index: that index cost 20 MiB at 100,000 dual-stack attachments.
        """
        family = 6 if ":" in address else 4
        for name in [n for n in self.elements if local_family(n) == family]:
            held = self.elements[name]
            if held.pop(address, None) is not None:
                if not held:
                    del self.elements[name]
                self.dirty.add(address)
                return

    def _subnet_of(self, key: AttachmentKeyT, address: str) -> str:
        subnet = self.attachments[key].subnet_of(address)
        assert subnet is not None, (key, address)
        return subnet

"""What the reconciler knows of the kernel's table, and how it judges drift.

The mirror is the table as the kernel holds it, as far as masqd knows; the known generation
is one at which the mirror is exact, or None. After a commit of ours it moves to the
commit's generation only if nothing else committed since the generation the sync planned
from (`Applied.exclusive_since`); otherwise it is None until a listing, so the periodic
resync, which skips its listing when the generation has not moved, and an event's "already
known" never trust a mirror that missed a commit.

nftables events (`events`) arrive through `table_changed` (a batch touched our table: full
sync, unless it is a generation we already know, such as our own transaction's echo),
`other_tables_changed` (a batch elsewhere: the known generation moves on without a listing,
when it is exactly the next one) and `events_lost`. Events that touch our table while a
sync runs are held, and judged once the sync has written (they may be its own echo). The
generation poll (`watch_generation`) stays as the safety net; before it concludes that the
generation moved under us it reads the events waiting (`EventControl.pump`), which may show
that the move was elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from masqd.kernel.backend import Applied, Backend
from masqd.planning import ruleset
from masqd.planning.ruleset import TableState
from masqd.reconcile.errors import kernel_boundary
from masqd.reconcile.runner import Reason, SyncRunner

log = logging.getLogger(__name__)


class EventControl(Protocol):
    """What the view asks of the nftables event watcher (`events.EventWatcher`)."""

    def pump(self) -> None: ...


class KernelView:
    def __init__(self, backend: Backend, table: str, runner: SyncRunner) -> None:
        self.backend = backend
        self.table = table
        self._runner = runner
        self.mirror: TableState | None = None
        self.known_generation: int | None = None
        # The mirror came from the journal's last marker (`seed`) and no sync has succeeded
        # since: the records replayed after the marker may or may not be in the kernel.
        self.seeded = False
        self.syncing = False
        self._held: list[int | None] = []  # events that touched our table during a sync
        self.events: EventControl | None = None  # the nftables event watcher, if any

    @property
    def exact(self) -> bool:
        """The mirror is exact at a known generation: a partial sync may plan from it."""
        return self.mirror is not None and self.known_generation is not None

    def seed(self, mirror: TableState, generation: int) -> None:
        self.mirror, self.known_generation, self.seeded = mirror, generation, True

    def forget(self) -> None:
        self.mirror, self.known_generation, self.seeded = None, None, False

    async def listing(self) -> TableState:
        """A fresh listing of the kernel's table (KernelUnavailable when it cannot be had)."""
        with kernel_boundary():
            observation = await self.backend.observe()
        return observation.table

    async def observe(self, *, must_list: bool) -> TableState:
        """The kernel's table. Unless `must_list`, the listing is skipped when the ruleset
        generation has not moved since our last look: nothing was committed, so the mirror is
        exact, and an idle daemon holding 100,000 attachments does not list them every
        minute."""
        if (
            not must_list
            and self.exact
            and await self.backend.generation() == self.known_generation
        ):
            assert self.mirror is not None
            return self.mirror
        observation = await self.backend.observe()
        self.known_generation = observation.generation
        return observation.table

    def committed(self, applied: Applied, basis: int | None) -> None:
        """Our transaction, planned from generation `basis`, is in the kernel."""
        if applied.exclusive_since(basis):
            self.known_generation = applied.generation
        else:
            # Someone else committed between the picture we planned from and our commit:
            # the mirror is exact at no generation we know. Nothing may trust it (not the
            # periodic resync, not an event's "already seen") until a listing.
            self.known_generation = None
            self._runner.request_full(Reason.CONCURRENT)

    def sync_ended(self) -> None:
        """Judge the events held while the sync ran, now that it has written."""
        self.syncing = False
        held, self._held = self._held, []
        for generation in held:
            self.table_changed(generation)

    # ---- drift watch ---------------------------------------------------------------------

    async def watch_generation(self, interval: float) -> None:
        """Poll the ruleset generation; a move we did not make triggers a full sync."""
        while True:
            await asyncio.sleep(interval)
            if self.syncing or self.known_generation is None or self._runner.full_needed:
                continue
            try:
                generation = await self.backend.generation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("reading the ruleset generation failed: %s", exc)
                continue
            if generation != self.known_generation and self.events is not None:
                # The events of the batches behind this generation are already queued (the
                # kernel sends them before the commit returns): they may show it was elsewhere.
                self.events.pump()
            if not self.syncing and generation != self.known_generation:
                log.info(
                    "ruleset generation moved (%s -> %s): checking table inet %s",
                    self.known_generation,
                    generation,
                    self.table,
                )
                self._runner.request_full(Reason.GENERATION)

    # ---- nftables events (see `events.EventSink`) ------------------------------------------

    def table_changed(self, generation: int | None) -> None:
        """A committed batch touched our table (generation None: unknown)."""
        if self.syncing:
            # Perhaps our own transaction: known only once the sync has written it.
            self._held.append(generation)
            return
        known = self.known_generation
        if generation is not None and known is not None and generation <= known:
            return  # our own transaction, or seen by a listing since
        self._runner.request_full(Reason.EVENT)

    def other_tables_changed(self, generation: int) -> bool:
        """A committed batch touched only other tables. If it made exactly the generation after
        the one we know, our mirror is still exact at the new one: no listing needed. True
        when the known generation moved on."""
        if self.syncing or self._runner.full_needed or self.known_generation != generation - 1:
            return False
        self.known_generation = generation
        return True

    def events_lost(self) -> None:
        self._runner.request_full(Reason.EVENTS_LOST)

    # ---- drift judgement -----------------------------------------------------------------

    def drifted(
        self, listed: TableState, written: TableState, desired: TableState, in_flight: set[str]
    ) -> bool:
        """True when a fresh listing differs from what masqd had last written by something
        masqd did not do (see `drifted_since_restart` for a mirror seeded from the journal)."""
        if self.seeded:
            return drifted_since_restart(listed, written, desired, in_flight=in_flight)
        return not same_table(listed, written)


def same_table(a: TableState, b: TableState) -> bool:
    return a.structure == b.structure and a.sets == b.sets


def drifted_since_restart(
    observed: TableState, written: TableState, desired: TableState, *, in_flight: set[str]
) -> bool:
    """True when the first listing after a restart differs from the journal's last marker
    (`written`) by something masqd did not do.

    The keys in `in_flight` are those of the records replayed after that marker: their
    transaction may have committed before the daemon was killed (SIGKILL between the commit
    and the marker), so they may hold their old value or the desired one, and the structure
    may be the old or the desired one. A restart that finds its own last transaction in the
    kernel is no drift.
    """
    if observed.structure not in (written.structure, desired.structure):
        return True
    empty: dict[str, ruleset.Element] = {}
    for name in observed.sets.keys() | written.sets.keys():
        have, was = observed.sets.get(name, empty), written.sets.get(name, empty)
        if have == was:
            continue
        want = desired.sets.get(name, empty)
        for key in have.keys() | was.keys():
            value = have.get(key)
            if value != was.get(key) and not (key in in_flight and value == want.get(key)):
                return True
    return False

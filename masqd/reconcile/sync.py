"""One sync: plan, journal, apply, judge; and what follows from how it ended.

Two kinds of sync:
- partial: plan only the element keys that changed since the last sync, against the mirror
  of the kernel kept in memory (`view`). Its cost does not depend on the table's size.
- full: list the table (unless the trigger allows trusting an unmoved generation), plan
  everything, and trust the listing as the new mirror. A full sync that finds the kernel
  differing from what masqd last wrote counts a drift repair.

The journal's part (records durable before the kernel has the change, put back if the sync
fails, compaction and the marker afterwards) is `Journal.cycle`. The event pause around a
whole-table transaction is the backend's (`backend.paused_events`); when it says a change
slipped by unseen (`Applied.missed_events`), the sync asks for a full one.

A kernel error never escapes: it is logged and counted, waiters keep waiting (bounded by
their own timeout, see `barrier`), readiness goes false, and the runner schedules a full sync
after a backoff (see `runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from masqd.kernel.backend import Backend, NftError
from masqd.metrics import Metrics
from masqd.planning import planner
from masqd.planning.desired import DesiredTables
from masqd.planning.ruleset import Policy, TableState
from masqd.reconcile.barrier import AppliedBarrier
from masqd.reconcile.runner import Reason, SyncRunner, Trigger
from masqd.reconcile.stats import SyncStats
from masqd.reconcile.view import KernelView
from masqd.state.desired import DesiredState
from masqd.state.journal import Cycle, Journal, JournalError, Settled

log = logging.getLogger(__name__)


@dataclass
class _Taken:
    """What one sync took from the desired state: given back if the sync fails."""

    version: int
    dirty: set[str]


@dataclass
class Parts:
    """The reconciler's parts that a sync works with."""

    state: DesiredState
    backend: Backend
    view: KernelView
    runner: SyncRunner
    barrier: AppliedBarrier
    stats: SyncStats
    metrics: Metrics
    journal: Journal | None


class SyncStep:
    def __init__(
        self,
        parts: Parts,
        tables: DesiredTables,
        *,
        wall: Callable[[], float],
        timer: Callable[[], float],
    ) -> None:
        self._p = parts
        self.tables = tables  # replaced on a policy change
        self.applied_policy: Policy | None = None  # the policy of the last successful sync
        self.first_done = asyncio.Event()
        self.synced = asyncio.Event()  # set, then replaced, by every successful sync
        self.started: float | None = None  # loop time the sync in flight started
        self._wall = wall
        self._timer = timer  # times journal appends (inline or thread); tests inject one

    async def run(self) -> bool:
        """One sync; True when it succeeded. Never raises but for cancellation."""
        p = self._p
        loop = asyncio.get_running_loop()
        trigger = p.runner.take(mirror_exact=p.view.exact)
        self.started = started = loop.time()
        p.view.syncing = True
        taken = _Taken(p.state.version, set())
        try:
            drifted = await self._sync(trigger, taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc, trigger, taken.dirty)
            return False
        finally:
            self.started = None
            p.view.sync_ended()
            elapsed = loop.time() - started
            p.stats.finished(p.metrics, kind=trigger.kind, elapsed=elapsed, wall=self._wall)
        p.runner.succeeded(trigger)
        if drifted:
            p.stats.drift_repaired(p.metrics)
            log.warning(
                "repaired drift in table inet %s (trigger: %s)", p.view.table, trigger.reason
            )
        self._succeeded(taken.version)
        return True

    async def _sync(self, trigger: Trigger, taken: _Taken) -> bool:
        """Plan, journal, apply. True when a full sync found the kernel differing from what
        masqd had last written (drift)."""
        p, view = self._p, self._p.view
        last_written = view.mirror
        if trigger.full:
            mirror = await view.observe(must_list=trigger.must_list)
        else:
            assert view.mirror is not None
            mirror = view.mirror
        listed = mirror is not last_written
        # The generation this sync plans from (see `Applied.exclusive_since`).
        basis = view.known_generation
        # Taken after the last await before planning, so that the plan, the journal records
        # (taken as the journal's cycle begins, below) and the version acknowledged
        # afterwards describe the same changes.
        taken.version = p.state.version
        taken.dirty = dirty = p.state.take_dirty()
        tables = self.tables
        desired = tables.baseline(p.state.elements)
        drifted = (
            listed
            and last_written is not None
            and view.drifted(mirror, last_written, desired, dirty)
        )
        # Without a fresh listing the mirror is exact and only the changed keys can differ:
        # comparing 400,000 elements every resync was most of an idle daemon's CPU.
        touched = dirty if not listed else None
        tx = planner.plan(desired, mirror, table=view.table, policy=tables.policy, touched=touched)
        if listed:
            # After the commit the kernel holds the desired elements as planned: keep those
            # objects instead of the listing's copies (one copy of 100,000s of elements, not two).
            planned = {name: dict(elems) for name, elems in desired.sets.items()}
        # Durable before the kernel has it: an acknowledged change survives a crash.
        async with self._journal_cycle() as cycle:
            if not tx.empty:
                applied = await p.backend.apply(tx)
                if applied.missed_events:
                    # Made with events paused (a whole-table transaction), and something
                    # committed before they were back: no event will say what.
                    p.runner.request_full(Reason.PAUSED_EVENTS)
                assert desired.structure is not None
                planner.simulate_in_place(tx, mirror, desired_structure=desired.structure)
                view.committed(applied, basis)
            if listed:
                mirror = TableState(mirror.structure, planned)
            view.mirror = mirror
            view.seeded = False
            self.applied_policy = tables.policy
            state = p.state
            exact = not p.runner.full_needed and view.known_generation is not None
            cycle.settle(
                Settled(
                    generation=view.known_generation if exact else None,
                    fingerprint=tables.fingerprint,
                    attachments=len(state),
                    quiet=state.version == taken.version,
                    records=lambda: [(k, tuple(r.cidrs())) for k, r in state.items()],
                )
            )
        return drifted

    def _journal_cycle(self) -> contextlib.AbstractAsyncContextManager[Cycle]:
        journal = self._p.journal
        return journal.cycle(self._timer) if journal is not None else _no_journal()

    def _succeeded(self, version: int) -> None:
        p = self._p
        p.stats.succeeded(p.metrics, p.view.mirror, now=self._wall())
        p.barrier.settle(version)
        synced, self.synced = self.synced, asyncio.Event()
        synced.set()
        if not self.first_done.is_set():
            self.first_done.set()
            log.info(
                "first sync done: table inet %s holds %d attachments' addresses",
                p.view.table,
                len(p.state.owners),
            )

    def _failed(self, exc: Exception, trigger: Trigger, dirty: set[str]) -> None:
        p = self._p
        expected = isinstance(exc, (NftError, OSError, JournalError))
        error = str(exc) if expected else repr(exc)
        p.stats.failed(p.metrics, error)
        p.state.restore_dirty(dirty)
        p.barrier.fail(error, journal=isinstance(exc, JournalError))
        delay = p.runner.failed(trigger)
        if delay is None:
            # Most likely a stale mirror: go again at once, but with a full sync.
            log.info("partial sync failed (%s); retrying with a full sync", error)
            return
        logger = log.error if expected else log.exception
        logger(
            "%s sync failed (attempt %d), retrying in %.1fs: %s",
            trigger.kind,
            p.runner.failures,
            delay,
            error,
        )


@contextlib.asynccontextmanager
async def _no_journal() -> AsyncIterator[Cycle]:
    yield Cycle()

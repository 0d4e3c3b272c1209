"""The loop that keeps the kernel's table equal to the desired state: the composition of
the reconciler's parts, and the one face the API, the daemon and the migrator see.

One serialised writer. Its parts, each with one job:
- `runner.SyncRunner`: when to sync (wakes coalesce, full syncs by `Reason`, periodic
  resync, backoff, a minimum interval), on the loop's clock;
- `view.KernelView`: the mirror of the kernel's table, the generation it is exact at, the
  nftables events and the generation poll, and drift judgement;
- `sync.SyncStep`: one sync (plan, journal, apply, judge) and what follows from its end;
- `barrier.AppliedBarrier`: `commit`, "answer once the kernel holds my change";
- `planning.desired.DesiredTables`: the desired table for the policy (pure);
- `stats.SyncStats`: counters, status JSON and metrics.

Kernel errors reach callers only as the reconcile layer's own types (`errors`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from masqd.kernel.backend import Backend
from masqd.metrics import Metrics
from masqd.planning import planner, ruleset
from masqd.planning.desired import DesiredTables
from masqd.planning.ruleset import Policy, TableState
from masqd.planning.transaction import Transaction
from masqd.reconcile.barrier import AppliedBarrier
from masqd.reconcile.runner import Reason, SyncRunner
from masqd.reconcile.stats import SyncStats
from masqd.reconcile.sync import Parts, SyncStep
from masqd.reconcile.view import EventControl, KernelView
from masqd.state.desired import DesiredState
from masqd.state.journal import Journal


class Reconciler:
    def __init__(
        self,
        *,
        state: DesiredState,
        backend: Backend,
        table: str,
        policy: Policy,
        metrics: Metrics,
        journal: Journal | None = None,
        resync_interval: float = 60.0,
        generation_poll_interval: float = 0.25,
        min_interval: float = 0.0,
        wall_clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.state = state
        self.table = table
        self.metrics = metrics
        metrics.count_attachments(lambda: len(state))
        self.generation_poll_interval = generation_poll_interval
        self.stats = SyncStats()
        self.runner = SyncRunner(resync_interval=resync_interval, min_interval=min_interval)
        self.view = KernelView(backend, table, self.runner)
        self.barrier = AppliedBarrier(self.request)
        parts = Parts(
            state, backend, self.view, self.runner, self.barrier, self.stats, metrics, journal
        )
        self._step = SyncStep(parts, DesiredTables(policy), wall=wall_clock, timer=timer)
        self.first_sync_done = self._step.first_done

    # ---- what the API and daemon use -----------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self.first_sync_done.is_set()
            and not self.runner.backing_off
            and self.stats.last_result == "ok"
        )

    @property
    def policy(self) -> Policy:
        return self._step.tables.policy

    @property
    def applied_policy(self) -> Policy | None:
        """The policy of the last successful sync."""
        return self._step.applied_policy

    @property
    def mirror(self) -> TableState | None:
        return self.view.mirror

    @property
    def events(self) -> EventControl | None:
        """The nftables event watcher, if there is one (the daemon sets it)."""
        return self.view.events

    @events.setter
    def events(self, events: EventControl | None) -> None:
        self.view.events = events

    def seed(self, mirror: TableState, generation: int) -> None:
        """Start from a picture of the kernel taken before a restart (see `journal.Entry`).

        The first sync still checks the ruleset generation, and lists the table if it moved.
        """
        self.view.seed(mirror, generation)

    def forget_mirror(self) -> None:
        """Undo `seed`: the next sync lists the table."""
        self.view.forget()

    def baseline(self, elements: dict[str, dict[str, ruleset.Element]]) -> TableState:
        """The table the current policy gives with these attachment elements."""
        return self._step.tables.baseline(elements)

    def sync_age(self) -> float:
        """Seconds the sync in flight has been running; 0 when none is."""
        started = self._step.started
        return 0.0 if started is None else asyncio.get_running_loop().time() - started

    def request(self) -> int:
        """Ask for a sync of the current desired state; the version to wait for."""
        self.runner.wake()
        return self.state.version

    def request_full(self, reason: Reason, *, must_list: bool = True) -> None:
        self.runner.request_full(reason, must_list=must_list)

    def set_policy(self, policy: Policy) -> None:
        self._step.tables = DesiredTables(policy)
        self.request_full(Reason.POLICY)

    async def commit(self, timeout: float) -> int:  # noqa: ASYNC109
        """Sync the current desired state; return once the kernel holds it (SyncUnavailable
        when it does not within `timeout`). See `barrier`."""
        return await self.barrier.commit(timeout)

    async def wait_applied(self, version: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the kernel holds desired state `version` (or a later one)."""
        await self.barrier.wait(version, timeout)

    async def wait_synced(self) -> None:
        """Return once the next successful sync has finished."""
        await self._step.synced.wait()

    async def wait_policy_applied(self, policy: Policy, timeout: float) -> None:  # noqa: ASYNC109
        """Return once a successful sync has put `policy` into the kernel (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while self.applied_policy != policy:
                await self._step.synced.wait()

    async def listing(self) -> TableState:
        """A fresh listing of the kernel's table (KernelUnavailable when it cannot be had)."""
        return await self.view.listing()

    async def diff(self) -> Transaction:
        """What a full sync would change now, planned against a fresh listing of the kernel
        (not the mirror, which may be stale); nothing is applied. For `masqctl diff`."""
        listed = await self.listing()
        tables = self._step.tables
        desired = tables.baseline(self.state.elements)
        return planner.plan(desired, listed, table=self.table, policy=tables.policy)

    def status(self) -> dict[str, Any]:
        return self.stats.status(
            ready=self.ready,
            mirror=self.view.mirror,
            generation=self.view.known_generation,
            applied=self.barrier.version,
        )

    # ---- the loops -----------------------------------------------------------------------

    async def run(self) -> None:
        self.runner.start()
        while True:
            await self.runner.wait()
            await self.sync_once()

    async def sync_once(self) -> bool:
        """One sync; True when it succeeded. Never raises but for cancellation."""
        return await self._step.run()

    async def watch_generation(self) -> None:
        """Poll the ruleset generation; a move we did not make triggers a full sync."""
        await self.view.watch_generation(self.generation_poll_interval)

    # ---- nftables events (see `events.EventSink`) ------------------------------------------

    def table_changed(self, generation: int | None) -> None:
        self.view.table_changed(generation)

    def other_tables_changed(self, generation: int) -> bool:
        return self.view.other_tables_changed(generation)

    def events_lost(self) -> None:
        self.view.events_lost()

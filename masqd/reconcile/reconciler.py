"""The loop that keeps the kernel's table equal to the desired state.

One serialised writer. It waits on a trigger: the desired state changed (`request`), the
ruleset generation moved under us (`watch_generation`, or an nftables event), the periodic
full resync, or a retry after a failure. Requests that arrive while a transaction is in
flight pile up and go into the next one together, so bursts coalesce by themselves.

Two kinds of sync:
- partial: plan only the element keys that changed since the last sync, against the mirror
  of the kernel kept in memory. Its cost does not depend on the table's size.
- full: list the table, plan everything, and trust the listing as the new mirror. Used at
  start-up, on suspected drift, periodically, and after any failure.

The known generation is one at which the mirror is exact, or None. After a commit of ours
it moves to the commit's generation only if nothing else committed since the generation the
sync planned from (`Applied.exclusive_since`); otherwise it is None until a listing, so the
periodic resync, which skips its listing when the generation has not moved, and an event's
"already known" never trust a mirror that missed a commit.

nftables events (`events`) arrive through `table_changed` (a batch touched our table: full
sync, unless it is a generation we already know, such as our own transaction's echo),
`other_tables_changed` (a batch elsewhere: the known generation moves on without a listing,
when it is exactly the next one) and `events_lost`. The generation poll stays as the safety
net; before it concludes that the generation moved under us it reads the events waiting
(`events.pump`), which may show that the move was elsewhere. A whole-table transaction of our
own is made with the event group left (`events.pause`): its echo would be one message per
element, and the generation read afterwards tells whether anyone else committed meanwhile.

A kernel error never escapes: it is logged and counted, waiters keep waiting (bounded by
their own timeout), readiness goes false, and the next attempt is a full sync after a
backoff. A partial sync that fails is retried at once as a full sync, since a stale mirror
(someone deleted an element we were about to delete, or added one we were about to create)
is its usual cause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from masqd.kernel.nft import Applied, Backend, NftError
from masqd.metrics import Metrics
from masqd.planning import planner, ruleset
from masqd.planning.desired import exempt_elements, policy_fingerprint
from masqd.planning.ruleset import Policy, TableState
from masqd.planning.transaction import Transaction
from masqd.reconcile.barrier import AppliedBarrier
from masqd.reconcile.errors import kernel_boundary
from masqd.state.desired import DesiredState
from masqd.state.journal import Journal, JournalError

log = logging.getLogger(__name__)

RETRY_MIN = 0.1
RETRY_MAX = 5.0
INLINE_JOURNAL_LINES = 64  # journal appends up to this many records may run on the loop
SLOW_JOURNAL_WRITE = 0.001  # seconds: an append slower than this sends the next to a thread


class EventControl(Protocol):
    """What the reconciler asks of the nftables event watcher (`events.EventWatcher`)."""

    def pump(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class SyncStats:
    total: int = 0
    full: int = 0
    partial: int = 0
    failures: int = 0
    drift_repairs: int = 0
    last_time: float | None = None
    last_kind: str | None = None
    last_result: str | None = None  # "ok" or "error"
    last_error: str | None = None
    last_duration: float | None = None
    last_ok_time: float | None = None


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
        wall_clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.state = state
        self.backend = backend
        self.table = table
        self.journal = journal
        self.metrics = metrics
        metrics.count_attachments(lambda: len(state))
        self.resync_interval = resync_interval
        self.generation_poll_interval = generation_poll_interval
        self._wall = wall_clock
        self._timer = timer  # times journal appends (inline or thread); tests inject one
        self.stats = SyncStats()
        self.policy = policy
        self.applied_policy: Policy | None = None  # the policy of the last successful sync
        # Desired structures by the local sets in use (a handful of prefix lengths at most):
        # a sync looks its structure up instead of building it.
        self._structures: dict[frozenset[str], ruleset.Structure] = {}
        self._fingerprint = policy_fingerprint(policy)
        self._synced = asyncio.Event()  # set, then replaced, by every successful sync
        self._mirror: TableState | None = None  # what the kernel holds, as far as we know
        self._known_generation: int | None = None
        # The mirror came from the journal's last marker (`seed`) and no sync has succeeded
        # since: the records replayed after the marker may or may not be in the kernel.
        self._seeded = False
        self._wake = asyncio.Event()
        self._full_needed = True
        self._full_reason = "startup"
        self._retry_at: float | None = None
        self._consecutive_failures = 0
        self._syncing = False
        self._sync_started: float | None = None
        self._taken = _Taken(-1, set(), [])
        self._last_journal_write = 0.0  # seconds the last journal append took
        self.barrier = AppliedBarrier(self.request)
        self._next_resync = 0.0
        self.first_sync_done = asyncio.Event()
        # Events that touched our table while a sync ran: judged once it has written.
        self._events_during_sync: list[int | None] = []
        # The nftables event watcher, if there is one (the daemon sets it).
        self.events: EventControl | None = None

    # ---- what the API and daemon use -----------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self.first_sync_done.is_set()
            and self._retry_at is None
            and (self.stats.last_result == "ok")
        )

    @property
    def mirror(self) -> TableState | None:
        return self._mirror

    def seed(self, mirror: TableState, generation: int) -> None:
        """Start from a picture of the kernel taken before a restart (see `journal.Entry`).

        The first sync still checks the ruleset generation, and lists the table if it moved.
        """
        self._mirror = mirror
        self._known_generation = generation
        self._seeded = True

    def forget_mirror(self) -> None:
        """Undo `seed`: the next sync lists the table."""
        self._mirror = None
        self._known_generation = None
        self._seeded = False

    def baseline(self, elements: dict[str, dict[str, ruleset.Element]]) -> TableState:
        """The table the current policy gives with these attachment elements."""
        sets = dict(elements)
        sets.update(exempt_elements(self.policy))
        return TableState(self._structure_for(sets), sets)

    def _structure_for(self, sets: dict[str, dict[str, ruleset.Element]]) -> ruleset.Structure:
        """The desired structure for these desired elements: the policy's, with a local set
        for each local set name among them."""
        names = frozenset(name for name in sets if ruleset.is_local_set(name))
        structure = self._structures.get(names)
        if structure is None:
            structure = ruleset.desired_structure(self.policy, names)
            if len(self._structures) > 64:
                self._structures.clear()  # prefix lengths churned: forget old combinations
            self._structures[names] = structure
        return structure

    def _desired(self, policy: Policy) -> TableState:
        sets = self.state.table_sets(policy)
        return TableState(self._structure_for(sets), sets)

    def sync_age(self) -> float:
        """Seconds the sync in flight has been running; 0 when none is."""
        if self._sync_started is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._sync_started

    def request(self) -> int:
        """Ask for a sync of the current desired state; the version to wait for."""
        self._wake.set()
        return self.state.version

    def request_full(self, reason: str) -> None:
        self._full_needed = True
        self._full_reason = reason
        self._wake.set()

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._structures = {}
        self._fingerprint = policy_fingerprint(policy)
        self.request_full("policy")

    async def commit(self, timeout: float) -> int:  # noqa: ASYNC109
        """Sync the current desired state; return once the kernel holds it (SyncUnavailable
        when it does not within `timeout`). See `barrier`."""
        return await self.barrier.commit(timeout)

    async def wait_applied(self, version: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the kernel holds desired state `version` (or a later one)."""
        await self.barrier.wait(version, timeout)

    async def wait_synced(self) -> None:
        """Return once the next successful sync has finished."""
        await self._synced.wait()

    async def wait_policy_applied(self, policy: Policy, timeout: float) -> None:  # noqa: ASYNC109
        """Return once a successful sync has put `policy` into the kernel (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while self.applied_policy != policy:
                await self._synced.wait()

    async def diff(self) -> Transaction:
        """What a full sync would change now, planned against a fresh listing of the kernel
        (not the mirror, which may be stale); nothing is applied. For `masqctl diff`."""
        listed = await self.listing()
        desired = self._desired(self.policy)
        return planner.plan(desired, listed, table=self.table, policy=self.policy)

    async def listing(self) -> TableState:
        """A fresh listing of the kernel's table (KernelUnavailable when it cannot be had)."""
        with kernel_boundary():
            observation = await self.backend.observe()
        return observation.table

    def status(self) -> dict[str, Any]:
        s = self.stats
        mirror = self._mirror
        return {
            "ready": self.ready,
            "syncs": {
                "total": s.total,
                "full": s.full,
                "partial": s.partial,
                "failures": s.failures,
                "drift_repairs": s.drift_repairs,
            },
            "last_sync": {
                "time": s.last_time,
                "kind": s.last_kind,
                "result": s.last_result,
                "error": s.last_error,
                "duration_seconds": s.last_duration,
                "last_success_time": s.last_ok_time,
            },
            "kernel_elements": _family_counts(mirror) if mirror else {"ipv4": 0, "ipv6": 0},
            "generation": self._known_generation,
            "applied_version": self.barrier.version,
        }

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_resync = loop.time() + self.resync_interval
        while True:
            await self._next_trigger()
            await self.sync_once()

    async def _next_trigger(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._retry_at is not None:
                if now >= self._retry_at:
                    return
                # Backing off: new requests wait for the retry, which will carry them.
                await asyncio.sleep(self._retry_at - now)
                continue
            if self._full_needed or self._wake.is_set():
                return
            if now >= self._next_resync:
                self._full_needed, self._full_reason = True, "resync"
                return
            try:
                async with asyncio.timeout(self._next_resync - now):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def sync_once(self) -> bool:
        """One sync; True when it succeeded. Never raises but for cancellation."""
        loop = asyncio.get_running_loop()
        self._wake.clear()
        full = self._full_needed or self._mirror is None or self._known_generation is None
        reason = self._full_reason if full else "change"
        kind = "full" if full else "partial"
        started = loop.time()
        self._syncing = True
        self._sync_started = started
        self._full_needed = False
        self._taken = _Taken(self.state.version, set(), [])
        try:
            drifted = await self._sync(full=full, reason=reason, taken=self._taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            taken = self._taken
            self._on_failure(
                exc, kind=kind, dirty=taken.dirty, pending=taken.pending, partial=not full
            )
            return False
        finally:
            self._syncing = False
            self._sync_started = None
            self._judge_held_events()
            elapsed = loop.time() - started
            self.metrics.sync_duration.labels(kind=kind).observe(elapsed)
            self.metrics.last_sync.set(self._wall())
            self.stats.last_duration = elapsed
            self.stats.last_time = self._wall()
            self.stats.last_kind = kind
            self.stats.total += 1
            if full:
                self.stats.full += 1
            else:
                self.stats.partial += 1
        if full:
            self._next_resync = loop.time() + self.resync_interval
        if drifted:
            self.stats.drift_repairs += 1
            self.metrics.drift_repairs.inc()
            log.warning("repaired drift in table inet %s (trigger: %s)", self.table, reason)
        self._on_success(self._taken.version)
        return True

    async def _observe(self, reason: str) -> TableState:
        """The kernel's table. A periodic resync skips the listing when the ruleset generation
        has not moved since our last look: nothing was committed, so the mirror is exact, and
        an idle daemon holding 100,000 attachments does not list them every minute."""
        trusted = self._mirror is not None and self._known_generation is not None
        if (
            reason in ("resync", "startup")
            and trusted
            and await self.backend.generation() == self._known_generation
        ):
            assert self._mirror is not None
            return self._mirror
        observation = await self.backend.observe()
        self._known_generation = observation.generation
        return observation.table

    async def _sync(self, *, full: bool, reason: str, taken: _Taken) -> bool:
        """Plan, journal, apply. True when a full sync found the kernel differing from what
        masqd had last written (drift)."""
        last_written = self._mirror
        if full:
            mirror = await self._observe(reason)
        else:
            assert self._mirror is not None
            mirror = self._mirror
        listed = mirror is not last_written
        # The generation this sync plans from (see `Applied.exclusive_since`).
        basis = self._known_generation
        # Taken after the last await before planning, so that the plan, the journal records
        # written below and the version acknowledged afterwards describe the same changes.
        taken.version = self.state.version
        taken.dirty = dirty = self.state.take_dirty()
        taken.pending = pending = self.journal.take_pending() if self.journal else []
        policy = self.policy
        desired = self._desired(policy)
        drifted = False
        if listed and last_written is not None:
            drifted = (
                _drifted_since_restart(mirror, last_written, desired, in_flight=dirty)
                if self._seeded
                else not _same_table(mirror, last_written)
            )
        # Without a fresh listing the mirror is exact and only the changed keys can differ:
        # comparing 400,000 elements every resync was most of an idle daemon's CPU.
        tx = planner.plan(
            desired, mirror, table=self.table, policy=policy, touched=dirty if not listed else None
        )
        if listed:
            # After the commit the kernel holds the desired elements as planned: keep those
            # objects instead of the listing's copies (one copy of 100,000s of elements, not two).
            planned = {name: dict(elems) for name, elems in desired.sets.items()}
        if pending and self.journal is not None:
            # Durable before the kernel has it: an acknowledged change survives a crash.
            await self._write_journal(self.journal, pending)
        if not tx.empty:
            applied = await self._apply(tx)
            assert desired.structure is not None
            planner.simulate_in_place(tx, mirror, desired_structure=desired.structure)
            if applied.exclusive_since(basis):
                self._known_generation = applied.generation
            else:
                # Someone else committed between the picture we planned from and our commit:
                # the mirror is exact at no generation we know. Nothing may trust it (not the
                # periodic resync, not an event's "already seen") until a listing.
                self._known_generation = None
                self.request_full("concurrent change")
        if listed:
            mirror = TableState(mirror.structure, planned)
        self._mirror = mirror
        self._seeded = False
        self.applied_policy = policy
        if self.journal is not None:
            await self._journal_housekeeping(self.journal, taken)
        return drifted

    async def _write_journal(self, journal: Journal, pending: list[bytes]) -> None:
        """Append and fsync `pending`. A few records on a fast file system (the default state
        directory is tmpfs: microseconds) are written right here, since a hand-off to a
        thread and back costs a setup about 0.35 ms; anything big goes to a thread, and so
        does everything after an append that was slow (a disk), until one is fast again."""
        started = self._timer()
        if len(pending) <= INLINE_JOURNAL_LINES and self._last_journal_write < SLOW_JOURNAL_WRITE:
            journal.write_pending(pending)
        else:
            await asyncio.to_thread(journal.write_pending, pending)
        self._last_journal_write = self._timer() - started

    async def _apply(self, tx: Transaction) -> Applied:
        """Apply `tx`; a whole-table one with the event group left (see the module's doc)."""
        events = self.events if tx.recreate else None
        if events is None:
            return await self.backend.apply(tx)
        events.pause()
        try:
            applied = await self.backend.apply(tx)
        finally:
            events.resume()
        if await self.backend.generation() != applied.generation:
            self.request_full("a change while nftables events were paused")
        return applied

    async def _journal_housekeeping(self, journal: Journal, taken: _Taken) -> None:
        """Compact the journal when it has grown, and mark what the kernel now holds.

        The marker is true when every record in the files is in the kernel: records of changes
        made since this sync planned are still in memory, so it holds, unless a snapshot was
        just written from a state that includes them. Compaction therefore waits for a quiet
        moment (state unchanged since planning) unless the journal is far past its limit.
        """
        marker_true = not self._full_needed and self._known_generation is not None
        quiet = self.state.version == taken.version
        if journal.needs_compaction(len(self.state), overdue=not quiet):
            records = [(k, tuple(r.cidrs())) for k, r in self.state.items()]
            marker_true = marker_true and quiet
            try:
                await asyncio.to_thread(journal.compact, records)
            except OSError as exc:
                # The old snapshot and journal still hold everything: only slower replays.
                log.error("journal compaction failed, the journal keeps growing: %s", exc)
                return
        if marker_true and self._known_generation is not None:
            try:
                journal.write_marker(self._known_generation, self._fingerprint)
            except JournalError as exc:
                # The kernel has the changes already; a missing marker costs the next
                # start-up a listing of the table, no more.
                log.warning("journal: sync marker not written: %s", exc)

    def _on_success(self, version: int) -> None:
        s = self.stats
        s.last_result, s.last_error = "ok", None
        s.last_ok_time = self._wall()
        self._consecutive_failures = 0
        self._retry_at = None
        self.metrics.last_successful_sync.set(s.last_ok_time)
        if self._mirror is not None:
            for family, count in _family_counts(self._mirror).items():
                self.metrics.kernel_elements.labels(family=family).set(count)
        self.barrier.settle(version)
        synced, self._synced = self._synced, asyncio.Event()
        synced.set()
        if not self.first_sync_done.is_set():
            self.first_sync_done.set()
            log.info(
                "first sync done: table inet %s holds %d attachments' addresses",
                self.table,
                len(self.state.owners),
            )

    def _on_failure(
        self, exc: Exception, *, kind: str, dirty: set[str], pending: list[bytes], partial: bool
    ) -> None:
        s = self.stats
        s.failures += 1
        s.last_result = "error"
        s.last_error = str(exc) if isinstance(exc, (NftError, OSError, JournalError)) else repr(exc)
        self.metrics.sync_failures.inc()
        self.state.restore_dirty(dirty)
        if pending and self.journal is not None:
            # Not written: put the records back in front of anything newer.
            self.journal.requeue(pending)
        self.barrier.fail(s.last_error, journal=isinstance(exc, JournalError))
        self._full_needed, self._full_reason = True, "retry"
        if partial and self._consecutive_failures == 0:
            # Most likely a stale mirror: go again at once, but with a full sync.
            log.info("partial sync failed (%s); retrying with a full sync", s.last_error)
            self._consecutive_failures = 1
            self._retry_at = None
            self._wake.set()
            return
        self._consecutive_failures += 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** (self._consecutive_failures - 1))
        self._retry_at = asyncio.get_running_loop().time() + delay
        expected = isinstance(exc, (NftError, OSError, JournalError))
        logger = log.error if expected else log.exception
        logger(
            "%s sync failed (attempt %d), retrying in %.1fs: %s",
            kind,
            self._consecutive_failures,
            delay,
            s.last_error,
        )

    # ---- drift watch ---------------------------------------------------------------------

    async def watch_generation(self) -> None:
        """Poll the ruleset generation; a move we did not make triggers a full sync."""
        while True:
            await asyncio.sleep(self.generation_poll_interval)
            if self._syncing or self._known_generation is None or self._full_needed:
                continue
            try:
                generation = await self.backend.generation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("reading the ruleset generation failed: %s", exc)
                continue
            if generation != self._known_generation and self.events is not None:
                # The events of the batches behind this generation are already queued (the
                # kernel sends them before the commit returns): they may show it was elsewhere.
                self.events.pump()
            if not self._syncing and generation != self._known_generation:
                log.info(
                    "ruleset generation moved (%s -> %s): checking table inet %s",
                    self._known_generation,
                    generation,
                    self.table,
                )
                self.request_full("generation")

    # ---- nftables events (see `events`) ----------------------------------------------------

    def table_changed(self, generation: int | None) -> None:
        """A committed batch touched our table (generation None: unknown)."""
        if self._syncing:
            # Perhaps our own transaction: known only once the sync has written it.
            self._events_during_sync.append(generation)
            return
        known = self._known_generation
        if generation is not None and known is not None and generation <= known:
            return  # our own transaction, or seen by a listing since
        self.request_full("nftables event")

    def other_tables_changed(self, generation: int) -> bool:
        """A committed batch touched only other tables. If it made exactly the generation after
        the one we know, our mirror is still exact at the new one: no listing needed. True
        when the known generation moved on."""
        if self._syncing or self._full_needed or self._known_generation != generation - 1:
            return False
        self._known_generation = generation
        return True

    def events_lost(self) -> None:
        self.request_full("nftables events lost")

    def _judge_held_events(self) -> None:
        held, self._events_during_sync = self._events_during_sync, []
        for generation in held:
            self.table_changed(generation)


@dataclass
class _Taken:
    """What one sync took from the desired state: given back if the sync fails."""

    version: int
    dirty: set[str]
    pending: list[bytes]


def _same_table(a: TableState, b: TableState) -> bool:
    return a.structure == b.structure and a.sets == b.sets


def _drifted_since_restart(
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


def _family_counts(table: TableState) -> dict[str, int]:
    counts = {"ipv4": 0, "ipv6": 0}
    for name, elems in table.sets.items():
        family = ruleset.parse_local_set(name)
        v6 = name in (ruleset.SOURCES6, ruleset.EXEMPT6) or (family is not None and family[0] == 6)
        counts["ipv6" if v6 else "ipv4"] += len(elems)
    return counts

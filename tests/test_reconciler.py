"""The reconciler on the fake backend: coalescing, failure and recovery, stale mirrors, drift.

On fake loop time (looptime): the backoff, the periodic resync, the generation poll and the
fake's apply delay run on the loop's clock, which jumps to the next timer whenever every
task waits, so the gaps measured here are exact however busy the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from masqd.kernel.fake import FakeBackend, dump_table
from masqd.kernel.nft import Applied, NftError
from masqd.metrics import Metrics
from masqd.planning import planner
from masqd.planning.ruleset import SOURCES4, SOURCES6, Policy
from masqd.planning.transaction import Transaction
from masqd.reconcile.errors import SyncUnavailable
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import DesiredState
from masqd.state.journal import Journal

pytestmark = pytest.mark.looptime

TABLE = "masqd"
POLICY = Policy()
A = ("net1", "a", "eth0")
B = ("net1", "b", "eth0")


class Rig:
    """A reconciler over a fake backend, its loops running as tasks."""

    def __init__(
        self,
        backend: FakeBackend,
        *,
        journal: Journal | None = None,
        resync_interval: float = 60.0,
        generation_poll_interval: float = 0.25,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.backend = backend
        self.metrics = Metrics()
        self.state = DesiredState(journal=journal)
        self.reconciler = Reconciler(
            state=self.state,
            backend=backend,
            table=TABLE,
            policy=POLICY,
            metrics=self.metrics,
            journal=journal,
            resync_interval=resync_interval,
            generation_poll_interval=generation_poll_interval,
            timer=timer,
        )

    def desired_dump(self) -> str:
        return dump_table(self.reconciler.baseline(self.state.elements))

    async def put(self, key: tuple[str, str, str], ips: list[str]) -> None:
        """What the API's PUT does: change, request, wait for the kernel."""
        self.state.put(key, ips)
        await self.reconciler.wait_applied(self.reconciler.request(), 5.0)

    async def delete(self, key: tuple[str, str, str]) -> None:
        self.state.delete(key)
        await self.reconciler.wait_applied(self.reconciler.request(), 5.0)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def running(rig: Rig, *, watch: bool = False) -> AsyncIterator[Rig]:
    tasks = [asyncio.create_task(rig.reconciler.run())]
    if watch:
        tasks.append(asyncio.create_task(rig.reconciler.watch_generation()))
    try:
        await asyncio.wait_for(rig.reconciler.first_sync_done.wait(), 5)
        yield rig
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait for a condition on state that signals no event of its own."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0.01)


@pytest.fixture
def rig(fake_backend: FakeBackend) -> Rig:
    return Rig(fake_backend, generation_poll_interval=0.02)


# ---- the ordinary path ------------------------------------------------------------------


async def test_the_first_sync_creates_the_table_and_makes_ready(rig: Rig) -> None:
    assert not rig.reconciler.ready
    async with running(rig):
        assert rig.reconciler.ready
        assert rig.backend.dump() == rig.desired_dump()
        assert rig.reconciler.stats.full == 1 and rig.reconciler.stats.failures == 0


async def test_an_acknowledged_change_is_in_the_kernel(rig: Rig) -> None:
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24", "2001:db8:1::2/64"])
        state = rig.backend.state()
        assert "198.18.1.2" in state.sets[SOURCES4] and "2001:db8:1::2" in state.sets[SOURCES6]
        assert rig.backend.dump() == rig.desired_dump()
        last = rig.backend.applied[-1]
        assert not last.recreate and not last.delete and last.element_changes == 4
        assert rig.reconciler.stats.partial >= 1
        await rig.delete(A)
        assert rig.backend.state().sets[SOURCES4] == {}
        # A version already applied is answered at once.
        await rig.reconciler.wait_applied(0, 0.001)


async def test_concurrent_requests_during_a_slow_apply_are_coalesced(rig: Rig) -> None:
    async with running(rig):
        rig.backend.apply_delay = 0.05
        before = len(rig.backend.applied)
        n = 60
        await asyncio.gather(
            *(rig.put(("net1", f"c{i}", "eth0"), [f"198.18.1.{i + 2}/24"]) for i in range(n))
        )
        applies = len(rig.backend.applied) - before
        assert applies <= 4, applies  # the first request's apply, then one for all the rest
        assert len(rig.backend.state().sets[SOURCES4]) == n
        assert rig.backend.dump() == rig.desired_dump()


async def test_requests_that_change_nothing_apply_nothing(rig: Rig) -> None:
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        attempts = rig.backend.attempts
        await rig.put(A, ["198.18.1.2/24"])
        await rig.delete(B)
        assert rig.backend.attempts == attempts


# ---- failures -----------------------------------------------------------------------------


async def test_failure_backs_off_reports_unready_and_recovers(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    real_apply = rig.backend.apply

    async def timed_apply(tx: Transaction) -> Applied:
        times.append(loop.time())
        return await real_apply(tx)

    rig.backend.apply = timed_apply  # type: ignore[method-assign]
    async with running(rig):
        rig.backend.fail_next(4, "Error: Could not process rule: Cannot allocate memory")
        rig.state.put(A, ["198.18.1.2/24"])
        version = rig.reconciler.request()
        with pytest.raises(SyncUnavailable, match="Cannot allocate memory"):
            await rig.reconciler.wait_applied(version, 0.15)
        assert not rig.reconciler.ready
        assert rig.reconciler.status()["ready"] is False
        assert rig.reconciler.stats.last_result == "error"
        # Still retrying in the background; the change lands once nftables takes it again.
        await rig.reconciler.wait_applied(version, 5)
        assert rig.reconciler.ready
        assert rig.backend.failures_pending == 0
        assert "198.18.1.2" in rig.backend.state().sets[SOURCES4]
        assert rig.reconciler.stats.failures == 4
        assert rig.sample("masqd_sync_failures_total") == 4
    # The partial sync's failure is retried at once (as a full sync), later ones back off:
    # attempts at ~0, 0, +0.1, +0.2, +0.4 s after the first failure.
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert len(gaps) == 4, gaps
    assert gaps[0] < 0.05 and gaps[1] > 0.09 and gaps[2] > 0.18 and gaps[3] > 0.36, gaps


async def test_an_unexpected_exception_does_not_kill_the_loop(rig: Rig) -> None:
    calls = 0
    real_apply = rig.backend.apply

    async def flaky(tx: Transaction) -> Applied:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        if calls == 3:
            raise KeyError("bug")
        return await real_apply(tx)

    rig.backend.apply = flaky  # type: ignore[method-assign]
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        assert rig.reconciler.stats.failures == 2
        assert rig.reconciler.ready
        assert rig.backend.dump() == rig.desired_dump()


async def test_a_stale_mirror_fails_the_partial_sync_and_a_full_sync_repairs(rig: Rig) -> None:
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        await rig.put(B, ["198.18.1.3/24"])
        # Behind masqd's back (and with no generation watch running, unnoticed):
        rig.backend.delete_element(SOURCES4, "198.18.1.2")
        stats = rig.reconciler.stats
        failures, full = stats.failures, stats.full
        await rig.delete(A)  # the partial plan deletes 198.18.1.2: ENOENT
        assert stats.failures == failures + 1
        assert stats.full == full + 1
        assert rig.backend.dump() == rig.desired_dump()
        assert stats.drift_repairs == 1
        assert rig.reconciler.ready


# ---- drift --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b.flush_set(SOURCES4),
        lambda b: b.delete_element("local4_24", "198.18.1.2"),
        lambda b: b.add_rule(),
        lambda b: b.flush_chain(),
        lambda b: b.drop_table(),
        lambda b: b.add_chain("foreign"),
        lambda b: b.set_table_flags("dormant"),
        lambda b: b.set_chain_policy("drop"),
    ],
    ids=[
        "flush set",
        "delete element",
        "add rule",
        "flush chain",
        "drop table",
        "add chain",
        "dormant table",
        "chain policy drop",
    ],
)
async def test_tampering_is_repaired_and_counted(
    rig: Rig, tamper: Callable[[FakeBackend], None]
) -> None:
    async with running(rig, watch=True):
        await rig.put(A, ["198.18.1.2/24", "2001:db8:1::2/64"])
        good = rig.backend.dump()
        tamper(rig.backend)
        assert rig.backend.dump() != good
        await eventually(lambda: rig.backend.dump() == good, within=2)
        await eventually(lambda: rig.reconciler.stats.drift_repairs == 1)
        assert rig.sample("masqd_drift_repairs_total") == 1
        assert rig.reconciler.ready


async def test_diff_shows_a_dormant_table(rig: Rig) -> None:
    """What `masqctl diff` shows: the flags are a difference, cleared by `add table`."""
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        assert (await rig.reconciler.diff()).empty
        rig.backend.set_table_flags("dormant")
        tx = await rig.reconciler.diff()
        assert tx.clear_table_flags and not tx.recreate and tx.element_changes == 0
        assert tx.to_script().startswith("add table inet masqd")


async def test_a_periodic_resync_repairs_what_nobody_announced(fake_backend: FakeBackend) -> None:
    rig = Rig(fake_backend, resync_interval=0.1)
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        good = rig.backend.dump()
        rig.backend.flush_set(SOURCES4)  # no generation watch: only the resync finds it
        await eventually(lambda: rig.backend.dump() == good)
        assert rig.reconciler.stats.drift_repairs == 1


async def test_an_idle_resync_does_not_list_the_table(fake_backend: FakeBackend) -> None:
    rig = Rig(fake_backend, resync_interval=0.05)
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        observes = rig.backend.observes
        full = rig.reconciler.stats.full
        await eventually(lambda: rig.reconciler.stats.full >= full + 3)
        # The generation did not move: the mirror is exact, no listing needed.
        assert rig.backend.observes == observes


# ---- the journal --------------------------------------------------------------------------


async def test_changes_are_journalled_before_they_are_acknowledged(
    fake_backend: FakeBackend, tmp_path: Path
) -> None:
    journal = Journal(tmp_path)
    rig = Rig(fake_backend, journal=journal)
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        fake_backend.fail_next(2)
        rig.state.put(B, ["198.18.1.3/24"])
        await rig.reconciler.wait_applied(rig.reconciler.request(), 5)
        await rig.delete(A)
    journal.close()
    replayed = DesiredState()
    replayed.replay(Journal(tmp_path).load().entries)
    assert set(replayed.attachments) == {B}


async def test_status_reports_counts_and_the_last_sync(rig: Rig) -> None:
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24", "2001:db8:1::2/64"])
        status = rig.reconciler.status()
        assert status["ready"] is True
        assert status["syncs"]["total"] >= 2 and status["syncs"]["failures"] == 0
        assert status["last_sync"]["result"] == "ok"
        assert status["kernel_elements"] == {"ipv4": 2, "ipv6": 2}
        assert status["generation"] == await rig.backend.generation()


async def test_the_mirror_matches_the_kernel_after_every_sync(rig: Rig) -> None:
    async with running(rig):
        for n in range(10):
            await rig.put(("net1", f"c{n % 4}", "eth0"), [f"198.18.{n % 3}.{n + 2}/{16 + n % 9}"])
            mirror = rig.reconciler.mirror
            assert mirror is not None
            assert dump_table(mirror) == rig.backend.dump()
        observed = (await rig.backend.observe()).table
        desired = rig.reconciler.baseline(rig.state.elements)
        assert planner.plan(desired, observed, table=TABLE, policy=POLICY).empty


async def test_nft_errors_are_classified() -> None:
    assert NftError("Error: Could not process rule: No such file or directory").kind == "enoent"
    assert NftError("Error: Could not process rule: File exists").kind == "eexist"
    assert NftError("Error: syntax error").kind == "other"


class _TimedJournal(Journal):
    """Records which thread each append ran on; each append takes `delay` seconds of `clock`
    (fake time: the choice must not depend on how fast this machine's fsync is today)."""

    def __init__(self, directory: Path, delay: float) -> None:
        super().__init__(directory)
        self.delay = delay
        self.clock = 0.0
        self.threads: list[str] = []

    def now(self) -> float:
        return self.clock

    def write_pending(self, lines: list[bytes], *, sync: bool = True) -> None:
        if lines and sync:
            self.threads.append(threading.current_thread().name)
            self.clock += self.delay
        super().write_pending(lines, sync=sync)


async def test_small_fast_journal_appends_run_on_the_loop_and_slow_ones_move_off_it(
    tmp_path: Path,
) -> None:
    journal = _TimedJournal(tmp_path, delay=0.0)
    rig = Rig(FakeBackend(table=TABLE), journal=journal, timer=journal.now)
    main = threading.current_thread().name
    async with running(rig):
        await rig.put(A, ["198.18.1.2/24"])
        assert journal.threads == [main]  # tmpfs-fast: no hand-off
        journal.delay = 0.005  # a slow disk
        await rig.put(B, ["198.18.1.3/24"])  # on the loop: it was not known to be slow
        await rig.put(A, ["198.18.1.4/24"])
        journal.delay = 0.0
        await rig.put(B, ["198.18.1.5/24"])  # fast again: back on the loop
        await rig.put(A, ["198.18.1.6/24"])
    assert journal.threads[1] == main and journal.threads[2] != main
    assert journal.threads[3] != main and journal.threads[4] == main

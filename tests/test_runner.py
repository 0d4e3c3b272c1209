"""The bounded-frequency runner on a manual loop clock: reasons, the must-list flag,
coalescing, backoff, the periodic resync and the minimum interval. The loop's `time()` is
replaced by a clock the test moves, so nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from masqd.kernel.fake import FakeBackend
from masqd.metrics import Metrics
from masqd.planning.ruleset import Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.reconcile.runner import RETRY_MAX, RETRY_MIN, Reason, SyncRunner, Trigger
from masqd.state.desired import DesiredState


class Clock:
    """The running loop's clock, moved only by `advance`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 1000.0
        self._loop = loop

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(10):  # let every timer now due, and what it wakes, run
            await asyncio.sleep(0)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Clock]:
    loop = asyncio.get_running_loop()
    clock = Clock(loop)
    monkeypatch.setattr(loop, "time", lambda: clock.now)
    yield clock


async def _due(runner: SyncRunner) -> asyncio.Task[None]:
    task = asyncio.create_task(runner.wait())
    for _ in range(10):
        await asyncio.sleep(0)
    return task


def test_reasons_say_what_the_log_lines_say() -> None:
    assert f"{Reason.EVENT}" == "nftables event"
    assert str(Reason.PAUSED_EVENTS) == "a change while nftables events were paused"
    assert Reason("concurrent change") is Reason.CONCURRENT


async def test_the_first_sync_is_a_full_one_that_may_trust_a_seeded_mirror(clock: Clock) -> None:
    runner = SyncRunner(resync_interval=60)
    assert (await _due(runner)).done()
    assert runner.take(mirror_exact=True) == Trigger(True, Reason.STARTUP, must_list=False)
    runner.succeeded(Trigger(True, Reason.STARTUP, False))
    runner.wake()
    assert runner.take(mirror_exact=True) == Trigger(False, Reason.CHANGE, must_list=False)
    runner.wake()
    trigger = runner.take(mirror_exact=False)  # no exact mirror: a full sync after all
    assert trigger.full and trigger.kind == "full"


async def test_must_list_is_set_by_any_full_request_and_kept_until_a_sync_takes_it(
    clock: Clock,
) -> None:
    runner = SyncRunner(resync_interval=60)
    runner.take(mirror_exact=True)  # the start-up
    runner.request_full(Reason.EVENT)
    runner.request_full(Reason.RESYNC, must_list=False)  # does not undo the event's
    assert runner.take(mirror_exact=True) == Trigger(True, Reason.RESYNC, must_list=True)
    runner.request_full(Reason.RESYNC, must_list=False)
    assert runner.take(mirror_exact=True).must_list is False


async def test_the_periodic_resync_comes_on_the_loop_clock_and_may_skip_its_listing(
    clock: Clock,
) -> None:
    runner = SyncRunner(resync_interval=60)
    trigger = runner.take(mirror_exact=True)
    runner.succeeded(trigger)
    waiting = await _due(runner)
    await clock.advance(59.9)
    assert not waiting.done()
    await clock.advance(0.2)
    assert waiting.done()
    assert runner.take(mirror_exact=True) == Trigger(True, Reason.RESYNC, must_list=False)


async def test_failures_back_off_exponentially_and_requests_wait_for_the_retry(
    clock: Clock,
) -> None:
    runner = SyncRunner(resync_interval=3600)
    full = runner.take(mirror_exact=True)
    delays = [runner.failed(full) for _ in range(8)]
    assert delays == [min(RETRY_MAX, RETRY_MIN * 2**n) for n in range(8)]
    assert runner.failures == 8 and runner.backing_off and runner.full_needed
    runner.wake()  # a request during the backoff does not cut it short
    waiting = await _due(runner)
    await clock.advance(RETRY_MAX - 0.01)
    assert not waiting.done()
    await clock.advance(0.02)
    assert waiting.done()
    assert runner.take(mirror_exact=True) == Trigger(True, Reason.RETRY, must_list=True)
    runner.succeeded(full)
    assert runner.failures == 0 and not runner.backing_off


async def test_a_failed_partial_sync_is_retried_at_once_as_a_full_one(clock: Clock) -> None:
    runner = SyncRunner(resync_interval=3600)
    runner.succeeded(runner.take(mirror_exact=True))
    runner.wake()
    partial = runner.take(mirror_exact=True)
    assert not partial.full
    assert runner.failed(partial) is None
    assert (await _due(runner)).done()
    retry = runner.take(mirror_exact=True)
    assert retry == Trigger(True, Reason.RETRY, must_list=True)
    assert runner.failed(retry) == RETRY_MIN * 2  # the second failure in a row backs off


async def test_the_minimum_interval_spaces_sync_starts_and_coalesces_wakes(clock: Clock) -> None:
    runner = SyncRunner(resync_interval=3600, min_interval=1.0)
    runner.succeeded(runner.take(mirror_exact=True))
    await clock.advance(0.25)
    runner.wake()
    runner.wake()
    waiting = await _due(runner)
    await clock.advance(0.5)  # 0.75 s since the last start
    assert not waiting.done()
    runner.request_full(Reason.GENERATION)
    await clock.advance(0.3)
    assert waiting.done()
    assert runner.take(mirror_exact=True) == Trigger(True, Reason.GENERATION, must_list=True)


async def test_a_trusted_resync_skips_the_listing_and_a_must_list_one_does_not() -> None:
    backend = FakeBackend(table="masqd")
    state = DesiredState()
    reconciler = Reconciler(
        state=state, backend=backend, table="masqd", policy=Policy(), metrics=Metrics()
    )
    assert await reconciler.sync_once()
    listed = backend.observes
    reconciler.request_full(Reason.RESYNC, must_list=False)
    assert await reconciler.sync_once()
    assert backend.observes == listed  # the generation had not moved: the mirror is exact
    reconciler.request_full(Reason.EVENT)
    assert await reconciler.sync_once()
    assert backend.observes == listed + 1
    assert reconciler.stats.full == 3

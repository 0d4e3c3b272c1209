"""The applied-version barrier on its own: commit asks for a sync and waits for its version,
a journal failure fails waiters at once, any other failure only on timeout (with the last
error), and the kernel errors are classified into the reconcile layer's own type."""

from __future__ import annotations

import asyncio

import pytest

from masqd.kernel.nft import NftError
from masqd.reconcile.barrier import AppliedBarrier
from masqd.reconcile.errors import KernelUnavailable, SyncUnavailable, kernel_boundary


class Requests:
    def __init__(self) -> None:
        self.version = 0
        self.count = 0

    def __call__(self) -> int:
        self.count += 1
        return self.version


async def test_commit_requests_a_sync_and_returns_once_its_version_is_applied() -> None:
    requests = Requests()
    barrier = AppliedBarrier(requests)
    requests.version = 3
    commit = asyncio.create_task(barrier.commit(30.0))
    await asyncio.sleep(0)
    assert requests.count == 1
    barrier.settle(2)  # an older version: still waiting
    await asyncio.sleep(0)
    assert not commit.done()
    barrier.settle(4)  # a later one covers it
    assert await commit == 3
    assert barrier.version == 4


async def test_an_applied_version_returns_at_once() -> None:
    barrier = AppliedBarrier(Requests())
    barrier.settle(5)
    await barrier.wait(5, 0.0)  # no timeout, no waiting


async def test_a_journal_failure_fails_every_waiter_at_once() -> None:
    requests = Requests()
    requests.version = 1
    barrier = AppliedBarrier(requests)
    waiters = [asyncio.create_task(barrier.commit(3600.0)) for _ in range(3)]
    await asyncio.sleep(0)
    barrier.fail("[Errno 28] No space left on device", journal=True)
    for waiter in waiters:
        with pytest.raises(SyncUnavailable, match=r"^journal error: .*No space left"):
            await waiter


async def test_a_kernel_failure_is_reported_only_at_the_timeout_with_the_last_error() -> None:
    requests = Requests()
    requests.version = 1
    barrier = AppliedBarrier(requests)
    barrier.fail("nftables said no", journal=False)
    with pytest.raises(SyncUnavailable, match=r"^not confirmed in the kernel within 0.01s: nft"):
        await barrier.commit(0.01)
    barrier.settle(0)  # a success clears the error
    with pytest.raises(SyncUnavailable, match="the reconciler is busy"):
        await barrier.commit(0.01)


async def test_a_timed_out_waiter_is_forgotten() -> None:
    barrier = AppliedBarrier(Requests())
    with pytest.raises(SyncUnavailable):
        await barrier.wait(1, 0.01)
    assert barrier._waiters == []


@pytest.mark.parametrize("raised", [NftError("Error: Could not process rule"), OSError(5, "EIO")])
def test_kernel_errors_become_kernel_unavailable_with_their_message(raised: Exception) -> None:
    with pytest.raises(KernelUnavailable) as caught, kernel_boundary():
        raise raised
    assert str(caught.value) == str(raised)
    assert caught.value.__cause__ is raised


def test_other_errors_pass_the_boundary_unchanged() -> None:
    with pytest.raises(ValueError, match="not the kernel"), kernel_boundary():
        raise ValueError("not the kernel")

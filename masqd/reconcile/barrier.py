"""The applied-version barrier: "answer once the kernel holds my change".

Every caller that changes the desired state (the API, the DEL spool, the migrator) then
calls `commit`: it asks for a sync and waits, bounded by the caller's apply timeout, until a
successful sync has put that version of the desired state (or a later one) into the
kernel. One protocol, so the three cannot drift apart in how they wait or what they report.

The reconciler tells the barrier how each sync ended (`settle`, `fail`). A journal failure
fails everyone waiting at once: nothing reached the kernel, and the journal may stay full
for long. Any other failure leaves waiters waiting, since the retry may still make it in
time; on timeout they get the last error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from masqd.reconcile.errors import SyncUnavailable


class AppliedBarrier:
    def __init__(self, request: Callable[[], int]) -> None:
        self._request = request  # asks for a sync; gives the desired state's version
        self.version = -1  # the newest desired-state version the kernel is known to hold
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._error: str | None = None  # the last sync's error, until one succeeds
        self._journal_failed = False  # the last sync failed writing the journal

    async def commit(self, timeout: float) -> int:  # noqa: ASYNC109
        """Ask for a sync of the current desired state and return once the kernel holds it
        (its version); raises SyncUnavailable, saying why, when it does not within
        `timeout` seconds or the journal failed."""
        version = self._request()
        await self.wait(version, timeout)
        return version

    async def wait(self, version: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the kernel holds desired state `version` (or a later one)."""
        if self.version >= version:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (version, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            reason = self._error or "the reconciler is busy"
            if self._journal_failed:
                raise SyncUnavailable(f"journal error: {reason}") from None
            raise SyncUnavailable(
                f"not confirmed in the kernel within {timeout:g}s: {reason}"
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def settle(self, version: int) -> None:
        """A sync succeeded with desired state `version`: wake whoever waited for it."""
        self._error, self._journal_failed = None, False
        self.version = max(self.version, version)
        still_waiting = []
        for entry in self._waiters:
            waited_version, future = entry
            if waited_version <= self.version:
                if not future.done():
                    future.set_result(None)
            else:
                still_waiting.append(entry)
        self._waiters[:] = still_waiting

    def fail(self, error: str, *, journal: bool) -> None:
        """A sync failed with `error` (`journal`: writing the journal failed)."""
        self._error, self._journal_failed = error, journal
        if journal:
            # Nothing reached the kernel, and the journal may stay full for long: say so to
            # everyone waiting now rather than after their timeout. The changes stay desired
            # and are retried; a client's retry waits for them to be durable.
            failure = SyncUnavailable(f"journal error: {error}")
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(failure)

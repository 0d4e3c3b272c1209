"""When the reconciler syncs: a bounded-frequency runner, in the shape of kube-proxy's.

It knows nothing of the kernel. Triggers are a wake (the desired state changed), a full
sync asked for with a `Reason`, the periodic resync, and the retry after a failure. Wakes
that arrive while a sync runs pile up into the next one, so bursts coalesce by themselves;
`min_interval` (0 by default) bounds how often syncs may start at all. A failure backs off
exponentially, from RETRY_MIN to RETRY_MAX, and new requests wait for the retry, which will
carry them; a failed partial sync is retried at once, as a full one, since a stale mirror
is its usual cause.

Whether a full sync must list the table is a flag of its own (`Trigger.must_list`): only the
start-up and the periodic resync may skip the listing, when the ruleset generation shows that
nothing committed since the mirror was exact. Any other request for a full sync sets it, and
it stays set until a sync takes it.

Time is the event loop's clock (`loop.time()`) only, so tests can run it on fake time.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

RETRY_MIN = 0.1
RETRY_MAX = 5.0


class Reason(enum.StrEnum):
    """Why a sync runs; its value is what the log lines say."""

    STARTUP = "startup"
    RESYNC = "resync"
    CHANGE = "change"  # a partial sync of the desired state's changes
    RETRY = "retry"
    POLICY = "policy"
    GENERATION = "generation"
    EVENT = "nftables event"
    EVENTS_LOST = "nftables events lost"
    CONCURRENT = "concurrent change"
    PAUSED_EVENTS = "a change while nftables events were paused"


@dataclass(frozen=True)
class Trigger:
    """One sync to run: full or partial, why, and whether it must list the table."""

    full: bool
    reason: Reason
    must_list: bool

    @property
    def kind(self) -> str:
        return "full" if self.full else "partial"


class SyncRunner:
    def __init__(self, *, resync_interval: float, min_interval: float = 0.0) -> None:
        self.resync_interval = resync_interval
        self.min_interval = min_interval
        self._wake = asyncio.Event()
        self._full_needed = True  # the first sync is a full one
        self._full_reason = Reason.STARTUP
        self._must_list = False  # the start-up may trust a mirror seeded from the journal
        self._retry_at: float | None = None
        self._failures = 0  # consecutive
        self._next_resync = 0.0
        self._last_start: float | None = None

    @property
    def full_needed(self) -> bool:
        return self._full_needed

    @property
    def backing_off(self) -> bool:
        return self._retry_at is not None

    def wake(self) -> None:
        """The desired state changed: sync it (partially, unless a full sync is due)."""
        self._wake.set()

    def request_full(self, reason: Reason, *, must_list: bool = True) -> None:
        self._full_needed = True
        self._full_reason = reason
        self._must_list = self._must_list or must_list
        self._wake.set()

    def start(self) -> None:
        """Schedule the first periodic resync, one interval from now."""
        self._next_resync = asyncio.get_running_loop().time() + self.resync_interval

    async def wait(self) -> None:
        """Return once a sync is due.

        A timer that fired means its deadline has come; the clock is not compared with it
        again. asyncio runs a timer up to its clock resolution early, so the clock read then
        may be a hair short of the deadline, and a fake clock (the tests'), which moves only
        while the loop waits, would stay short of it for ever: a busy loop of tiny sleeps.
        """
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._retry_at is not None:
                if now < self._retry_at:
                    # Backing off: new requests wait for the retry, which will carry them.
                    await asyncio.sleep(self._retry_at - now)
                return
            if self._full_needed or self._wake.is_set():
                earliest = self._earliest_start()
                if now < earliest:
                    await asyncio.sleep(earliest - now)
                return
            if now < self._next_resync:
                try:
                    async with asyncio.timeout(self._next_resync - now):
                        await self._wake.wait()
                    continue  # woken: a sync is due, unless min_interval holds it back
                except TimeoutError:
                    pass
            self._full_needed, self._full_reason = True, Reason.RESYNC
            return

    def _earliest_start(self) -> float:
        if self._last_start is None:
            return 0.0
        return self._last_start + self.min_interval

    def take(self, *, mirror_exact: bool) -> Trigger:
        """The sync to run now; everything asked so far goes into it. `mirror_exact`: the
        mirror is exact at a known generation, so a partial sync can work from it."""
        self._wake.clear()
        self._last_start = asyncio.get_running_loop().time()
        full = self._full_needed or not mirror_exact
        trigger = Trigger(full, self._full_reason if full else Reason.CHANGE, self._must_list)
        self._full_needed, self._must_list = False, False
        return trigger

    def succeeded(self, trigger: Trigger) -> None:
        self._failures = 0
        self._retry_at = None
        if trigger.full:
            self._next_resync = asyncio.get_running_loop().time() + self.resync_interval

    @property
    def failures(self) -> int:
        """Consecutive failed syncs."""
        return self._failures

    def failed(self, trigger: Trigger) -> float | None:
        """A sync failed: the next is a full one, after the returned backoff (seconds), or at
        once (None) when a partial sync failed for the first time."""
        self.request_full(Reason.RETRY)
        if not trigger.full and self._failures == 0:
            self._failures = 1
            self._retry_at = None
            return None
        self._failures += 1
        delay: float = min(RETRY_MAX, RETRY_MIN * 2 ** (self._failures - 1))
        self._retry_at = asyncio.get_running_loop().time() + delay
        return delay

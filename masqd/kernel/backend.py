"""The backend seam: what the rest of masqd asks of nftables, and the values it gets back.

`Backend` is implemented by `nft.KernelBackend` (the real kernel) and `fake.FakeBackend`
(in memory, for tests). Besides observing the table, applying a transaction and reading the
ruleset generation, a backend offers the two capabilities the daemon used to type-check the
kernel backend for:
- `subscribe(sink)`: an `EventSource` that tells `sink` about committed batches (the kernel's
  nftables event socket, see `events`; the fake's commits, in memory). A backend pauses its
  own subscription around its whole-table transactions (`paused_events`), and says in
  `Applied.missed_events` when something committed before it was back;
- `run_json(payload)`: run any nftables JSON batch and answer its JSON output, which the
  migration of the CNI plugins' legacy rules (`migrate`) lists and deletes with.

This module imports nothing of the kernel's (no ctypes, no pyroute2): the layers above it
name these types without loading the kernel's libraries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from masqd.planning.ruleset import TableState
from masqd.planning.transaction import Transaction


class NftError(Exception):
    """nftables refused a command. `kind` classifies it: 'enoent', 'eexist', 'other'."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        lowered = message.lower()
        if "no such file or directory" in lowered:
            self.kind = "enoent"
        elif "file exists" in lowered:
            self.kind = "eexist"
        else:
            self.kind = "other"


@dataclass(frozen=True)
class Observation:
    table: TableState
    generation: int


@dataclass(frozen=True)
class Applied:
    """What a commit of ours did to the ruleset generation.

    `before` was read just before the first batch, `generation` just after the last; each of
    our `commits` (batches) moved it by one.

    `missed_events`: the backend made this transaction with its event subscription paused
    (a whole-table one, see `paused_events`), and the generation moved past `generation`
    before the subscription was back: a change that no event will tell about.
    """

    generation: int
    before: int
    commits: int
    missed_events: bool = False

    def exclusive_since(self, basis: int | None) -> bool:
        """True when nothing but this transaction committed since generation `basis`: the one
        the plan was made from (a listing's, or the mirror's known one). Only then is the
        mirror plus this transaction exactly what the kernel holds.

        Judging from `before` alone misses a commit that landed between the listing and
        `before` (issue 14). `before == basis` is checked as well as the sum: a batch of ours
        that changed nothing (adding what is there) moves no generation, and would otherwise
        hide a foreign commit of one.
        """
        return (
            basis is not None and self.before == basis and self.generation == basis + self.commits
        )


# Called by a backend at fixed points of its work, with the point's name, so that tests can
# commit something of their own exactly there (tests/test_drift_race.py): "observe" before a
# listing, "listed" after it (the window between a listing and the commit planned from it),
# "commit" just before each batch of a transaction (after the generation read before it).
Stage = Callable[[str], None]


class EventSink(Protocol):
    """What an event source tells (the reconciler)."""

    def table_changed(self, generation: int | None) -> None: ...

    def other_tables_changed(self, generation: int) -> bool: ...

    def events_lost(self) -> None: ...


class EventSource(Protocol):
    """Committed nftables batches, told to an `EventSink` (see `events.EventWatcher`)."""

    async def run(self) -> None:
        """Watch until cancelled; returns (after logging) if the source fails."""

    def pump(self) -> None:
        """Handle every batch already waiting, now."""

    def pause(self) -> None:
        """Stop listening, around a whole-table transaction of our own (its echo is huge)."""

    def resume(self) -> None:
        """Listen again; what was cut by pausing counts as lost."""

    def status(self) -> dict[str, Any]: ...


class Backend(Protocol):
    async def observe(self) -> Observation: ...

    async def apply(self, tx: Transaction) -> Applied: ...

    async def generation(self) -> int: ...

    async def subscribe(self, sink: EventSink) -> EventSource:
        """Events about the backend's ruleset, told to `sink` once the source runs. Raises
        OSError when there are none to be had (then the generation poll is all there is).
        The backend's whole-table transactions are then made with the source paused
        (`paused_events`)."""
        ...

    async def run_json(self, payload: dict[str, Any]) -> str:
        """Run an nftables JSON batch (all or nothing); its JSON output, may be empty.
        Raises NftError."""
        ...

    async def open(self) -> None:
        """Open what the backend talks to the kernel through, before any listener accepts."""

    async def close(self) -> None: ...


async def paused_events(
    events: EventSource | None,
    tx: Transaction,
    commit: Callable[[], Awaitable[Applied]],
    generation: Callable[[], Awaitable[int]],
) -> Applied:
    """Run `commit`, a backend's transaction `tx`; a whole-table one (`tx.recreate`) with the
    backend's own event subscription paused. Its echo would be one message per element
    (400,000 at 100,000 attachments): the event loop took seconds to read it, the kernel a
    second to send it. The generation read once the subscription is back tells whether
    anyone else committed meanwhile (`Applied.missed_events`)."""
    if events is None or not tx.recreate:
        return await commit()
    events.pause()
    try:
        applied = await commit()
    finally:
        events.resume()
    if await generation() != applied.generation:
        applied = dataclasses.replace(applied, missed_events=True)
    return applied

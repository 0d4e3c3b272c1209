"""nftables events: parsing, and what the reconciler does with them.

- `BatchParser` on hand-made datagrams (the corners) and on the kernel's own (the real
  shapes: a namespace, a subscribed socket, `nft` commands).
- A reconciler on the real kernel with events and without the generation poll: tampering
  is repaired from the event alone; its own transactions cause no extra listing; a change to
  another table moves the known generation on without a listing (so the periodic resync
  skips its listing too); lost events force a full sync.
- The generation poll, when it sees a move, reads the waiting events first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from masqd.kernel.events import NFPROTO_INET, BatchParser, EventWatcher
from masqd.kernel.nft import KernelBackend, Observation
from masqd.metrics import Metrics
from masqd.planning.ruleset import SOURCES4, Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.reconcile.runner import Reason
from masqd.state.desired import DesiredState
from tests.netns import netns, nft

TABLE = "masqd"

# ---- hand-made datagrams ----------------------------------------------------------------

NFNL_SUBSYS_NFTABLES = 10
NEWTABLE, NEWCHAIN, NEWRULE, NEWSET, NEWSETELEM, NEWGEN, DELSETELEM = 0, 3, 6, 9, 12, 15, 14
NFPROTO_IPV4 = 2


def _attr(attr_type: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), attr_type) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _msg(kind: int, family: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_NFTABLES << 8 | kind, 0, 0, 0) + body


def obj(kind: int, table: str, family: int = NFPROTO_INET) -> bytes:
    return _msg(kind, family, _attr(1, table.encode() + b"\0") + _attr(2, b"x\0"))


def gen(generation: int) -> bytes:
    return _msg(NEWGEN, 0, _attr(1, struct.pack(">I", generation)) + _attr(2, b"\0\0\0\1"))


def test_a_batch_is_closed_by_newgen_and_says_whether_it_touched_our_table() -> None:
    parser = BatchParser(TABLE)
    batches = parser.feed(obj(NEWSETELEM, TABLE) + gen(7) + obj(NEWRULE, "other") + gen(8))
    assert [(b.generation, b.touches_table, b.complete) for b in batches] == [
        (7, True, True),
        (8, False, True),
    ]


def test_a_batch_may_span_datagrams() -> None:
    parser = BatchParser(TABLE)
    assert parser.feed(obj(NEWCHAIN, "other")) == []
    assert parser.feed(obj(DELSETELEM, TABLE)) == []
    (batch,) = parser.feed(gen(3))
    assert batch.touches_table


@pytest.mark.parametrize(
    ("message", "ours"),
    [
        (obj(NEWTABLE, TABLE), True),
        (obj(NEWSET, TABLE), True),
        (obj(NEWSET, TABLE, family=NFPROTO_IPV4), False),  # `table ip masqd` is not ours
        (obj(NEWSET, TABLE + "x"), False),
        (obj(NEWSET, TABLE[:-1]), False),
        (_msg(NEWRULE, NFPROTO_INET, _attr(2, b"chain\0")), True),  # no table name: suspect
        (_msg(NEWRULE, NFPROTO_INET, b""), True),
    ],
    ids=["table", "set", "other-family", "longer-name", "prefix", "no-table-attr", "no-attrs"],
)
def test_which_messages_name_our_table(message: bytes, ours: bool) -> None:
    (batch,) = BatchParser(TABLE).feed(message + gen(2))
    assert batch.touches_table is ours


def test_lost_messages_make_the_batch_incomplete_and_suspect() -> None:
    parser = BatchParser(TABLE)
    parser.feed(obj(NEWRULE, "other"))
    parser.lost()
    (batch,) = parser.feed(gen(5))
    assert batch.touches_table and not batch.complete
    (next_batch,) = parser.feed(obj(NEWRULE, "other") + gen(6))
    assert not next_batch.touches_table and next_batch.complete


def test_malformed_datagrams_never_raise() -> None:
    parser = BatchParser(TABLE)
    truncated = gen(9)[:-6]
    assert parser.feed(truncated) == []
    assert parser.feed(b"\x01\x02") == []
    newgen_without_id = _msg(NEWGEN, 0, _attr(2, b"\0\0\0\1"))
    (batch,) = parser.feed(newgen_without_id)
    assert batch.generation is None and batch.touches_table


# ---- the kernel's datagrams -------------------------------------------------------------


@pytest.mark.kernel
async def test_kernel_events_parse_as_expected() -> None:
    with netns("ev") as ns:
        backend = KernelBackend(table=TABLE, netns=f"/var/run/netns/{ns}")
        sock = await backend.open_event_socket()
        try:
            parser = BatchParser(TABLE)
            batches = []
            for command in (
                "add table inet masqd",
                "add table ip masqd",
                "add table inet other",
                "add set inet masqd s { type ipv4_addr; }",
                "add element inet masqd s { 198.18.0.1 }",
                "add chain inet other c",
                "flush ruleset",
            ):
                nft(ns, *command.split())
                await asyncio.sleep(0)
                while True:
                    try:
                        batches += parser.feed(sock.recv(65536))
                    except BlockingIOError:
                        break
            generation = await backend.generation()
        finally:
            sock.close()
            await backend.close()
    assert [b.touches_table for b in batches] == [True, False, False, True, True, False, True]
    generations = [b.generation for b in batches]
    assert generations == list(range(generation - 6, generation + 1))


# ---- a reconciler driven by events ------------------------------------------------------


class CountingBackend(KernelBackend):
    """Counts listings and generation reads, so tests can tell when the reconciler listed
    the table and how often its poll looked."""

    listings = 0
    generation_reads = 0

    async def observe(self) -> Observation:
        self.listings += 1
        return await super().observe()

    async def generation(self) -> int:
        self.generation_reads += 1
        return await super().generation()


@dataclass
class Rig:
    ns: str
    backend: CountingBackend
    state: DesiredState
    reconciler: Reconciler
    watcher: EventWatcher | None

    async def setup(self, n: int) -> None:
        self.state.put(("net", f"c{n}", "eth0"), [f"198.18.60.{n}/24"])
        await self.reconciler.wait_applied(self.reconciler.request(), 5)

    async def settled(self) -> None:
        """Every event the kernel has queued read and judged, then one more sync done: a
        wrongly judged echo asks for a full sync (a listing), which that sync would be, or
        follow. The barrier for "nothing else happened", in place of a sleep. The kernel
        queues a commit's events before the commit returns, so none is still on its way."""
        assert self.watcher is not None
        self.watcher.pump()
        synced = asyncio.ensure_future(self.reconciler.wait_synced())
        self.reconciler.request()  # nothing changed: a partial sync that lists nothing
        await asyncio.wait_for(synced, 5)

    async def until(self, condition: Callable[[], Awaitable[bool]]) -> float:
        """Seconds until `condition` holds (at most 10: generous, for a busy machine)."""
        started = time.monotonic()
        while not await condition():
            assert time.monotonic() - started < 10, "condition not met in time"
            await asyncio.sleep(0.002)
        return time.monotonic() - started


def _reconciler(ns: str, poll: float) -> tuple[CountingBackend, DesiredState, Reconciler]:
    """A reconciler over a counting kernel backend in `ns`, polling the generation every
    `poll` seconds."""
    backend = CountingBackend(table=TABLE, netns=f"/var/run/netns/{ns}")
    state = DesiredState()
    reconciler = Reconciler(
        state=state,
        backend=backend,
        table=TABLE,
        policy=Policy(),
        metrics=Metrics(),
        generation_poll_interval=poll,
    )
    return backend, state, reconciler


@contextlib.asynccontextmanager
async def rig(*, events: bool = True, poll: float = 3600.0) -> AsyncIterator[Rig]:
    with netns("ev") as ns:
        backend, state, reconciler = _reconciler(ns, poll)
        watcher = None
        async with asyncio.TaskGroup() as tasks:
            if events:
                # Through the backend, which pauses it around its whole-table transactions.
                watcher = await backend.subscribe(reconciler)
                assert isinstance(watcher, EventWatcher)
                reconciler.events = watcher
                watch = tasks.create_task(watcher.run())
            run = tasks.create_task(reconciler.run())
            poller = tasks.create_task(reconciler.watch_generation())
            await reconciler.first_sync_done.wait()
            try:
                yield Rig(ns, backend, state, reconciler, watcher)
            finally:
                for task in (run, poller, *([watch] if events else [])):
                    task.cancel()
        await backend.close()


@pytest.mark.kernel
async def test_tampering_is_repaired_from_the_event_alone() -> None:
    async with rig() as r:
        for n in range(1, 4):
            await r.setup(n)
        nft(r.ns, "delete", "element", "inet", TABLE, SOURCES4, "{ 198.18.60.2 }")

        async def repaired() -> bool:
            listing = nft(r.ns, "list", "set", "inet", TABLE, SOURCES4).stdout
            return "198.18.60.2" in listing

        took = await r.until(repaired)
        assert took < 0.5
        # The kernel holds the repair a moment before the sync's bookkeeping is done.
        await r.until(lambda: _true(r.reconciler.stats.drift_repairs == 1))
        assert r.watcher is not None and r.watcher.stats.table_batches >= 1


@pytest.mark.kernel
async def test_own_transactions_cause_no_listing() -> None:
    async with rig() as r:
        listings = r.backend.listings
        for n in range(1, 21):
            await r.setup(n)
        await r.settled()  # every echo judged
        assert r.backend.listings == listings
        assert r.reconciler.stats.full == 1  # the start-up sync only
        assert r.watcher is not None and r.watcher.stats.table_batches >= 20


@pytest.mark.kernel
async def test_changes_elsewhere_move_the_generation_on_without_listing() -> None:
    async with rig() as r:
        await r.setup(1)
        listings = r.backend.listings
        nft(r.ns, "add", "table", "inet", "someone_else")
        nft(r.ns, "add", "chain", "inet", "someone_else", "c")

        async def caught_up() -> bool:
            return r.reconciler.status()["generation"] == await r.backend.generation()

        await r.until(caught_up)
        assert r.backend.listings == listings
        assert r.watcher is not None and r.watcher.stats.listings_skipped == 2
        # The periodic resync sees an unmoved generation, and skips its listing too.
        r.reconciler.request_full(Reason.RESYNC, must_list=False)
        await r.until(lambda: _true(r.reconciler.stats.full == 2))
        assert r.backend.listings == listings


async def _true(value: bool) -> bool:
    return value


@pytest.mark.kernel
async def test_whole_table_transactions_are_made_with_events_paused() -> None:
    """The echo of a whole-table transaction (one message per element) is never read: the
    repair of a deleted table is followed by no batch but the deletion's, and no listing."""
    async with rig() as r:
        for n in range(1, 4):
            await r.setup(n)
        assert r.watcher is not None
        batches, listings, full = (
            r.watcher.stats.batches,
            r.backend.listings,
            r.reconciler.stats.full,
        )
        nft(r.ns, "delete", "table", "inet", TABLE)
        await r.until(lambda: _true(r.reconciler.stats.drift_repairs == 1))
        await r.settled()  # any echo read and judged
        assert r.watcher.stats.batches == batches + 1  # the deletion
        assert r.backend.listings == listings + 1  # the repair's own listing, nothing after
        assert r.reconciler.stats.full == full + 1
        assert "198.18.60.3" in nft(r.ns, "list", "set", "inet", TABLE, SOURCES4).stdout


@pytest.mark.kernel
async def test_a_change_made_while_events_are_paused_is_found_by_the_generation() -> None:
    async with rig() as r:
        await r.setup(1)
        assert r.watcher is not None
        resume = r.watcher.resume

        def tamper_then_resume() -> None:
            # After our transaction committed, before the event group is joined again.
            nft(r.ns, "add", "element", "inet", TABLE, SOURCES4, "{ 198.18.61.9 }")
            r.watcher.resume = resume  # type: ignore[method-assign]
            resume()

        r.watcher.resume = tamper_then_resume  # type: ignore[method-assign]
        nft(r.ns, "delete", "table", "inet", TABLE)

        async def stray_gone() -> bool:
            listing = nft(r.ns, "list", "set", "inet", TABLE, SOURCES4, check=False).stdout
            return (
                r.watcher is not None
                and r.watcher.resume is resume
                and ("198.18.61.9" not in listing and "198.18.60.1" in listing)
            )

        await r.until(stray_gone)
        # The deleted table, then the stray (counted once its sync's bookkeeping is done).
        await r.until(lambda: _true(r.reconciler.stats.drift_repairs == 2))


@pytest.mark.kernel
async def test_lost_events_force_a_full_sync() -> None:
    async with rig() as r:
        await r.setup(1)
        assert r.watcher is not None
        # A receive buffer too small for what comes next.
        r.watcher._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        elements = ", ".join(f"198.19.{i // 250}.{i % 250 + 1}" for i in range(3000))
        nft(
            r.ns,
            "-f",
            "-",
            input="add table inet someone_else\n"
            "add set inet someone_else s { type ipv4_addr; }\n"
            f"add element inet someone_else s {{ {elements} }}\n",
        )
        full = r.reconciler.stats.full
        await r.until(lambda: _true(r.reconciler.stats.full > full))
        assert r.watcher.stats.overflows >= 1
        assert r.reconciler.stats.drift_repairs == 0  # listed, found nothing to repair


@pytest.mark.kernel
async def test_the_generation_poll_reads_waiting_events_before_listing() -> None:
    """Events are read only when the poll asks (no reader on the loop): a change elsewhere
    then costs no listing either."""
    with netns("ev") as ns:
        backend, _, reconciler = _reconciler(ns, poll=0.02)
        watcher = await backend.subscribe(reconciler)
        assert isinstance(watcher, EventWatcher)
        reconciler.events = watcher
        try:
            async with asyncio.TaskGroup() as tasks:
                run = tasks.create_task(reconciler.run())
                await reconciler.first_sync_done.wait()
                poller = tasks.create_task(reconciler.watch_generation())
                listings = backend.listings
                nft(ns, "add", "table", "inet", "someone_else")
                deadline = time.monotonic() + 10
                while reconciler.status()["generation"] != await backend.generation():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                polled = backend.generation_reads
                while backend.generation_reads < polled + 5:  # a few more polls
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert backend.listings == listings
                assert watcher.stats.listings_skipped == 1
                # Without events to explain it, a move is checked with a listing.
                reconciler.events = None
                nft(ns, "add", "table", "inet", "someone_else_again")
                while backend.listings == listings:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                run.cancel()
                poller.cancel()
        finally:
            watcher._sock.close()
            await backend.close()

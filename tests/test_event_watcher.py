"""`EventWatcher` on a datagram socket pair, without root: what it tells its sink for the
kernel's datagrams (hand-made as in test_events.py), and that a socket that fails ends the
watch without raising (the generation poll remains). The kernel's own datagrams and the
reconciler on real events are in test_events.py (kernel)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from masqd.kernel.events import EventWatcher
from tests.test_events import NEWSETELEM, NFPROTO_IPV4, gen, obj

TABLE = "masqd"


class Sink:
    def __init__(self, *, moves_on: bool = True) -> None:
        self.changed: list[int | None] = []
        self.elsewhere: list[int] = []
        self.lost = 0
        self.moves_on = moves_on
        self.told = asyncio.Event()

    def table_changed(self, generation: int | None) -> None:
        self.changed.append(generation)
        self.told.set()

    def other_tables_changed(self, generation: int) -> bool:
        self.elsewhere.append(generation)
        self.told.set()
        return self.moves_on

    def events_lost(self) -> None:
        self.lost += 1
        self.told.set()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    yield ours, kernel
    ours.close()
    kernel.close()


async def test_the_watcher_tells_changes_to_our_table_and_elsewhere(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    sink = Sink()
    watcher = EventWatcher(ours, table=TABLE, sink=sink)
    kernel.send(obj(NEWSETELEM, "other") + gen(7))  # waiting before the watch starts
    task = asyncio.create_task(watcher.run())
    async with asyncio.timeout(10):
        while not sink.elsewhere:
            await sink.told.wait()
            sink.told.clear()
    assert sink.elsewhere == [7] and sink.changed == []
    kernel.send(obj(NEWSETELEM, TABLE) + gen(8))
    kernel.send(obj(NEWSETELEM, TABLE, family=NFPROTO_IPV4) + gen(9))  # another family's
    async with asyncio.timeout(10):
        while len(sink.changed) + len(sink.elsewhere) < 3:
            await sink.told.wait()
            sink.told.clear()
    assert sink.changed == [8] and sink.elsewhere == [7, 9]
    status = watcher.status()
    assert status == {
        "subscribed": True,
        "batches": 3,
        "table_batches": 1,
        "listings_skipped": 2,
        "overflows": 0,
    }
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watcher.status()["subscribed"] is False


async def test_a_failing_socket_ends_the_watch_without_raising(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    sink = Sink()
    watcher = EventWatcher(ours, table=TABLE, sink=sink)
    watcher.pause()  # leaving the group fails on this socket (not netlink): only logged
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0)
    watcher.resume()  # joining the group fails here: the socket is broken for the watcher
    await asyncio.wait_for(task, 10)  # returns, having logged; no exception
    assert ours.fileno() == -1  # closed by the watcher

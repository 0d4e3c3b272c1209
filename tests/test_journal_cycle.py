"""`Journal.cycle`, one sync's turn of the journal on its own: records are durable on entry,
put back if anything inside fails, and after `settle` the journal compacts when grown and
writes the marker only when it is true."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from masqd.state.journal import Journal, Settled

KEY = ("net", "a", "eth0")
IPS = ("198.18.1.2/24",)


def _settled(generation: int | None, *, quiet: bool = True, attachments: int = 1) -> Settled:
    return Settled(generation, "fp", attachments, quiet, lambda: [(KEY, IPS)])


def _ops(journal: Journal) -> list[str]:
    return [entry.op for entry in journal.load().entries]


async def test_records_are_durable_on_entry_and_the_marker_follows_settle(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(KEY, IPS)
    async with journal.cycle() as cycle:
        assert _ops(Journal(tmp_path)) == ["put"]  # before the kernel would get it
        cycle.settle(_settled(7))
    loaded = Journal(tmp_path).load()
    assert [e.op for e in loaded.entries] == ["put", "synced"]
    assert loaded.entries[-1].generation == 7 and loaded.complete


async def test_no_marker_when_the_generation_is_unknown(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(KEY, IPS)
    async with journal.cycle() as cycle:
        cycle.settle(_settled(None))
    assert _ops(journal) == ["put"]


async def test_a_failure_inside_puts_the_records_back_ahead_of_newer_ones(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(KEY, IPS)
    with pytest.raises(RuntimeError, match="the kernel said no"):
        async with journal.cycle():
            journal.record_delete(KEY)  # a change made while the sync ran
            raise RuntimeError("the kernel said no")
    assert _ops(journal) == ["put"]  # written once, not marked
    assert len(journal.take_pending()) == 2  # the put again, then the delete


async def test_a_grown_journal_is_compacted_and_marked_only_when_quiet(tmp_path: Path) -> None:
    journal = Journal(tmp_path, compact_min=2)
    for n in range(3):
        journal.record_put(("net", f"c{n}", "eth0"), IPS)
    async with journal.cycle() as cycle:
        cycle.settle(_settled(5, quiet=True))
    assert journal.load().entries[0].op == "put" and _ops(journal).count("synced") == 1
    assert journal.journal_path.read_bytes().count(b"\n") == 1  # only the marker after it

    for n in range(12):  # far past the limit: compacted even though not quiet
        journal.record_put(("net", f"d{n}", "eth0"), IPS)
    async with journal.cycle() as cycle:
        cycle.settle(_settled(6, quiet=False))
    assert journal.journal_path.read_bytes() == b""  # compacted, and no marker
    assert "synced" not in _ops(journal)


async def test_appends_move_to_a_thread_after_a_slow_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    ticks = itertools.count(step=1)  # every append "takes" a second on this timer
    threads: list[str] = []
    write = journal.write_pending

    def recording(records: list[bytes], *, sync: bool = True) -> None:
        if sync:
            threads.append(threading.current_thread().name)
        write(records, sync=sync)

    journal.write_pending = recording  # type: ignore[method-assign]
    for _ in range(2):
        journal.record_put(KEY, IPS)
        async with journal.cycle(lambda: float(next(ticks))):
            pass
    main = threading.current_thread().name
    assert threads[0] == main and threads[1] != main

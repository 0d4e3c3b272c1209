"""The journal: what survives a restart, what a torn or corrupted file loses (one line, said
out loud), and compaction that keeps the content."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqd.state import journal as journal_module
from masqd.state.desired import DesiredState
from masqd.state.journal import FORMAT_VERSION, Entry, Journal, _line

A = ("net1", "a", "eth0")
B = ("net1", "b", "eth0")
C = ("net2", "c", "eth1")


def write(journal: Journal) -> None:
    journal.write_pending(journal.take_pending())


def replay(directory: Path) -> tuple[DesiredState, list[str]]:
    """A fresh desired state from the journal, as the daemon loads it at start-up."""
    loaded = Journal(directory).load()
    state = DesiredState()
    problems = state.replay(loaded.entries)
    return state, loaded.problems + problems


def attachments(state: DesiredState) -> dict[tuple[str, str, str], tuple[tuple[str, str], ...]]:
    return {k: r.ips for k, r in state.attachments.items()}


def test_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24", "2001:db8:1::2/64"])
    journal.record_put(B, ["198.18.1.3/24"])
    journal.record_delete(A)
    write(journal)
    journal.close()
    loaded = Journal(tmp_path).load()
    assert loaded.found and loaded.problems == []
    assert loaded.entries == [
        Entry("put", A, ("198.18.1.2/24", "2001:db8:1::2/64")),
        Entry("put", B, ("198.18.1.3/24",)),
        Entry("del", A),
    ]


def test_an_empty_directory_loads_as_nothing_found(tmp_path: Path) -> None:
    loaded = Journal(tmp_path / "missing").load()
    assert not loaded.found and loaded.entries == [] and loaded.problems == []


def test_files_are_not_writable_by_others(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24"])
    write(journal)
    journal.compact([(A, ("198.18.1.2/24",))])
    assert stat.S_IMODE(os.stat(journal.journal_path).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(journal.snapshot_path).st_mode) & 0o022 == 0
    journal.close()


def _torn_journal(directory: Path) -> Journal:
    """Two puts, then a crash mid-write: the last record lost its end."""
    journal = Journal(directory)
    journal.record_put(A, ["198.18.1.2/24"])
    journal.record_put(B, ["198.18.1.3/24"])
    write(journal)
    journal.close()
    data = journal.journal_path.read_bytes()
    journal.journal_path.write_bytes(data[: len(data) - 7])
    return journal


def test_a_torn_last_line_is_detected_and_skipped(tmp_path: Path) -> None:
    _torn_journal(tmp_path)
    loaded = Journal(tmp_path).load()
    assert loaded.entries == [Entry("put", A, ("198.18.1.2/24",))]
    assert len(loaded.problems) == 1 and "line 2" in loaded.problems[0]


def test_a_corrupted_middle_line_is_skipped_and_reported(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for key, ip in ((A, "198.18.1.2/24"), (B, "198.18.1.3/24"), (C, "198.18.2.2/24")):
        journal.record_put(key, [ip])
    write(journal)
    journal.close()
    lines = journal.journal_path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"198.18.1.3", b"198.18.1.4")  # checksum no longer matches
    journal.journal_path.write_bytes(b"".join(lines))
    loaded = Journal(tmp_path).load()
    assert [e.key for e in loaded.entries] == [A, C]
    assert len(loaded.problems) == 1
    assert "line 2" in loaded.problems[0] and "checksum" in loaded.problems[0]


@pytest.mark.parametrize(
    "payload",
    [
        {"op": "put", "k": ["n", "c"], "ips": ["198.18.1.2/24"]},
        {"op": "put", "k": ["n", "c", "e"], "ips": []},
        {"op": "put", "k": ["n", "c", "e"], "ips": [5]},
        {"op": "frob", "k": ["n", "c", "e"]},
        {"k": ["n", "c", "e"]},
        ["not", "an", "object"],
    ],
)
def test_well_formed_lines_with_bad_records_are_skipped(tmp_path: Path, payload: object) -> None:
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24"])
    write(journal)
    journal.close()
    with journal.journal_path.open("ab") as out:
        out.write(_line(payload))
    loaded = Journal(tmp_path).load()
    assert [e.key for e in loaded.entries] == [A]
    assert len(loaded.problems) == 1


def test_a_snapshot_of_an_unknown_format_is_reported(tmp_path: Path) -> None:
    (tmp_path / "attachments.snapshot").write_bytes(_line({"format": FORMAT_VERSION + 1}))
    loaded = Journal(tmp_path).load()
    assert loaded.found and any("unknown format" in p for p in loaded.problems)


def test_compaction_keeps_the_content_and_appends_go_on(tmp_path: Path) -> None:
    journal = Journal(tmp_path, compact_min=3)
    state = DesiredState(journal=journal)
    for n in range(6):
        state.put(("net1", f"c{n}", "eth0"), [f"198.18.1.{n + 2}/24"])
    for n in range(4):
        state.delete(("net1", f"c{n}", "eth0"))
    write(journal)
    assert journal.needs_compaction(len(state))
    journal.compact((k, tuple(r.cidrs())) for k, r in state.items())
    assert journal.journal_path.read_bytes() == b""
    assert not journal.needs_compaction(len(state))
    state.put(("net1", "c9", "eth0"), ["198.18.1.99/24"])
    write(journal)  # goes to the new, empty journal file
    journal.close()
    replayed, problems = replay(tmp_path)
    assert problems == []
    assert attachments(replayed) == attachments(state)


def test_a_crash_between_snapshot_and_truncation_loses_nothing(tmp_path: Path) -> None:
    """The snapshot is renamed in before the journal is emptied: replaying the old journal
    over the new snapshot must give the same attachments (puts and deletes are idempotent)."""
    journal = Journal(tmp_path)
    state = DesiredState(journal=journal)
    state.put(A, ["198.18.1.2/24"])
    state.put(B, ["198.18.1.3/24"])
    state.delete(A)
    state.put(C, ["198.18.1.3/16"])
    write(journal)
    old_journal = journal.journal_path.read_bytes()
    journal.compact((k, tuple(r.cidrs())) for k, r in state.items())
    journal.close()
    journal.journal_path.write_bytes(old_journal)  # as if the truncation never happened
    replayed, problems = replay(tmp_path)
    assert problems == []
    assert attachments(replayed) == attachments(state)


def test_requeued_records_go_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24"])
    failed = journal.take_pending()
    journal.record_delete(A)
    journal.requeue(failed)
    write(journal)
    journal.close()
    assert [e.op for e in Journal(tmp_path).load().entries] == ["put", "del"]


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "del"]),
        st.sampled_from([A, B, C]),
        st.sampled_from(["198.18.1.2/24", "198.18.1.2/16", "198.18.1.3/24", "2001:db8::2/64"]),
    ),
    max_size=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops, st.integers(0, 30))
def test_replay_rebuilds_the_state_and_is_idempotent(
    tmp_path_factory: pytest.TempPathFactory,
    operations: list[tuple[str, tuple[str, str, str], str]],
    cut: int,
) -> None:
    directory = tmp_path_factory.mktemp("journal")
    journal = Journal(directory)
    state = DesiredState(journal=journal)
    for index, (op, key, ip) in enumerate(operations):
        if op == "put":
            state.put(key, [ip])
        else:
            state.delete(key)
        if index == cut:
            write(journal)  # batches of any size
    write(journal)
    journal.close()
    replayed, problems = replay(directory)
    assert problems == []
    assert attachments(replayed) == attachments(state)
    assert replayed.elements == state.elements
    # Replaying the same records again on top changes nothing.
    replayed.replay(Journal(directory).load().entries)
    assert attachments(replayed) == attachments(state)


def test_streaming_in_chunks_flags_the_last_readable_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are decoded a few lines at a time; the marker that describes the kernel is the
    last one that can be read, wherever the chunks fall, and replay seeds from it alone."""
    monkeypatch.setattr(journal_module, "CHUNK_LINES", 2)
    journal = Journal(tmp_path)
    journal.compact([(A, ("198.18.1.2/24",))])  # a snapshot, then the journal
    journal.record_put(B, ["198.18.1.3/24"])
    write(journal)
    journal.write_marker(7, "fp")
    journal.record_put(C, ["198.18.2.3/24"])
    write(journal)
    journal.write_marker(8, "fp")
    journal.record_delete(B)
    write(journal)
    journal.close()
    with (tmp_path / "attachments.journal").open("ab") as out:
        out.write(_line({"op": "synced", "gen": 9, "fp": "fp"})[:-3] + b"xx\n")  # corrupt

    loaded = Journal(tmp_path).load()
    assert [(e.op, e.generation) for e in loaded.entries if e.last] == [("synced", 8)]
    assert len(loaded.problems) == 1 and "checksum" in loaded.problems[0]
    seen: list[tuple[int | None, set[tuple[str, str, str]]]] = []
    state = DesiredState()

    def at_marker(entry: Entry) -> None:
        seen.append((entry.generation, set(state.attachments)))

    assert (
        state.replay(Journal(tmp_path).stream(journal_module.Loaded()), at_last_marker=at_marker)
        == []
    )
    assert seen == [(8, {A, B, C})]
    assert set(state.attachments) == {A, C}


# ---- completeness (issue 10, item 7) ----------------------------------------------------


def history(directory: Path) -> Journal:
    """Three batches with sync markers between them, as a running daemon leaves them."""
    journal = Journal(directory)
    for index, key in enumerate((A, B, C)):
        journal.record_put(key, [f"198.18.1.{index + 2}/24"])
        write(journal)
        journal.write_marker(index + 1, "fp")
    journal.close()
    return journal


def test_a_journal_as_the_daemon_leaves_it_is_complete(tmp_path: Path) -> None:
    history(tmp_path)
    loaded = Journal(tmp_path).load()
    assert loaded.complete, loaded.incomplete
    assert [e.seq for e in loaded.entries] == [1, 2, 3, 4, 5, 6]


def test_a_zero_byte_journal_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "attachments.journal").write_bytes(b"")
    loaded = Journal(tmp_path).load()
    assert loaded.found and not loaded.complete and "empty" in loaded.incomplete


def test_a_journal_emptied_after_writes_is_not_complete(tmp_path: Path) -> None:
    history(tmp_path).journal_path.write_bytes(b"")
    loaded = Journal(tmp_path).load()
    assert not loaded.complete and "record 6 was written" in loaded.incomplete


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_a_journal_cut_at_a_line_boundary_is_not_complete(tmp_path: Path, keep: int) -> None:
    """Cut right after a record or right after an earlier marker: every line that is left
    reads, but the end file says more was written."""
    path = history(tmp_path).journal_path
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:keep]))
    loaded = Journal(tmp_path).load()
    assert loaded.problems == [] and not loaded.complete
    assert "record 6 was written" in loaded.incomplete


def test_a_journal_missing_lines_in_the_middle_is_not_complete(tmp_path: Path) -> None:
    path = history(tmp_path).journal_path
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[4:]))
    loaded = Journal(tmp_path).load()
    assert loaded.problems == [] and not loaded.complete
    assert loaded.incomplete == "records 3 to 4 are missing"


def test_a_journal_cut_mid_record_is_not_complete(tmp_path: Path) -> None:
    path = history(tmp_path).journal_path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loaded = Journal(tmp_path).load()
    assert not loaded.complete


def test_numbering_goes_on_across_restarts_and_compaction(tmp_path: Path) -> None:
    history(tmp_path)
    journal = Journal(tmp_path)
    state = DesiredState(journal=journal)
    assert state.replay(journal.stream(journal_module.Loaded())) == []
    journal.compact((k, tuple(r.cidrs())) for k, r in state.items())
    loaded = Journal(tmp_path).load()
    assert loaded.complete, loaded.incomplete  # a snapshot and an empty journal
    state.delete(A)
    write(journal)
    journal.close()
    loaded = Journal(tmp_path).load()
    assert loaded.complete, loaded.incomplete
    assert [e.seq for e in loaded.entries if e.seq is not None] == [7]


def test_a_snapshot_missing_records_is_not_complete(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.compact([(A, ("198.18.1.2/24",)), (B, ("198.18.1.3/24",))])
    journal.close()
    lines = journal.snapshot_path.read_bytes().splitlines(keepends=True)
    journal.snapshot_path.write_bytes(b"".join(lines[:2]))
    loaded = Journal(tmp_path).load()
    assert not loaded.complete and "1 of its 2" in loaded.incomplete


def test_an_older_journal_is_complete_when_it_ends_with_a_marker(tmp_path: Path) -> None:
    """Written before sequence numbers: no `n`, no end file. Trusted as before when it ends
    the way a sync leaves it; the first append numbers on from 1."""
    path = tmp_path / "attachments.journal"
    put = _line({"op": "put", "k": list(A), "ips": ["198.18.1.2/24"]})
    marker = _line({"op": "synced", "gen": 3, "fp": "fp"})
    path.write_bytes(put + marker)
    assert Journal(tmp_path).load().complete
    path.write_bytes(put)
    loaded = Journal(tmp_path).load()
    assert not loaded.complete and "older masqd" in loaded.incomplete
    path.write_bytes(put + marker)
    journal = Journal(tmp_path)
    assert journal.load().complete
    journal.record_delete(A)
    write(journal)
    journal.write_marker(4, "fp")
    journal.close()
    loaded = Journal(tmp_path).load()
    assert loaded.complete, loaded.incomplete
    assert [e.seq for e in loaded.entries] == [None, None, 1, 2]


# ---- a failed append (issue 10, item 6) -------------------------------------------------


def test_a_failed_append_is_cut_back_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC partway through an append: the half written is cut off, and the retried records
    follow the last whole one, so replay reads every record."""
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24"])
    write(journal)
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 20:
            return real_write(fd, bytes(data[:20]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    journal.record_delete(A)
    journal.record_put(B, ["198.18.1.3/24"])
    failed = journal.take_pending()
    with pytest.raises(journal_module.JournalError, match="No space left"):
        journal.write_pending(failed)
    monkeypatch.undo()
    assert journal.journal_path.read_bytes().count(b"\n") == 1  # the half record is gone
    journal.requeue(failed)
    write(journal)
    journal.close()
    loaded = Journal(tmp_path).load()
    assert loaded.problems == [] and loaded.complete
    assert [(e.op, e.key, e.seq) for e in loaded.entries] == [
        ("put", A, 1),
        ("del", A, 2),
        ("put", B, 3),
    ]


def test_a_torn_tail_left_by_a_crash_is_cut_before_appending(tmp_path: Path) -> None:
    _torn_journal(tmp_path)
    journal = Journal(tmp_path)
    assert len(journal.load().problems) == 1
    journal.record_put(C, ["198.18.2.2/24"])
    write(journal)
    journal.close()
    loaded = Journal(tmp_path).load()
    assert loaded.problems == [] and [e.key for e in loaded.entries] == [A, C]

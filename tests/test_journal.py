"""The journal: what survives a restart, what a torn or corrupted file loses (one line, said
out loud), and compaction that keeps the content."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqd import journal as journal_module
from masqd.journal import FORMAT_VERSION, Entry, Journal, _line
from masqd.state import DesiredState

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


def test_a_torn_last_line_is_detected_and_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_put(A, ["198.18.1.2/24"])
    journal.record_put(B, ["198.18.1.3/24"])
    write(journal)
    journal.close()
    # A crash mid-write: the last record lost its end.
    data = journal.journal_path.read_bytes()
    journal.journal_path.write_bytes(data[: len(data) - 7])
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
    journal.write_pending([*journal.take_pending(), _line(payload)])
    journal.close()
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

"""The DEL spool, the daemon's reading side: entries in the documented format read back, and
nothing in the directory can make the reader crash. The plugin's writing side is tested in
cni/spool_test.go, and tests/test_cni.py checks that what it writes is what this side reads."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from masqd.state import spool
from tests.spool_entries import write_entry


def _write(directory: Path, name: str, content: bytes | str) -> Path:
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_a_spooled_delete_reads_back_with_its_key(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    path = write_entry(directory, "net1", "ctr1", "eth0", now=100.0)
    scan = spool.read_spooled_deletes(directory)
    assert scan.problems == ()
    assert [(e.key, e.spooled_at, e.path) for e in scan.entries] == [
        (("net1", "ctr1", "eth0"), 100.0, path)
    ]


def test_the_same_attachment_spooled_twice_is_one_entry_with_the_later_time(tmp_path: Path) -> None:
    directory = str(tmp_path)
    first = write_entry(directory, "n", "c", "eth0", now=1.0)
    second = write_entry(directory, "n", "c", "eth0", now=2.0)
    assert first == second
    (entry,) = spool.read_spooled_deletes(directory).entries
    assert entry.spooled_at == 2.0


def test_entries_come_back_oldest_first(tmp_path: Path) -> None:
    directory = str(tmp_path)
    for i, when in enumerate((30.0, 10.0, 20.0)):
        write_entry(directory, "n", f"c{i}", "eth0", now=when)
    entries = spool.read_spooled_deletes(directory).entries
    assert [e.container_id for e in entries] == ["c1", "c2", "c0"]


def test_keys_that_differ_only_in_where_the_separator_falls_get_different_files() -> None:
    assert spool.entry_name("a.b", "c", "d") != spool.entry_name("a", "b.c", "d")
    assert spool.entry_name("n", "c", "eth0") == spool.entry_name("n", "c", "eth0")


def test_a_missing_directory_is_an_empty_spool(tmp_path: Path) -> None:
    scan = spool.read_spooled_deletes(str(tmp_path / "absent"))
    assert scan.entries == () and scan.problems == ()


def _record(container_id: object, **overrides: object) -> str:
    record = {"version": 1, "network": "n", "container_id": container_id, "ifname": "eth0"}
    record["spooled_at"] = 1.0
    record.update(overrides)
    return json.dumps(record)


def test_garbage_is_reported_and_never_crashes_the_reader(tmp_path: Path) -> None:
    good = write_entry(str(tmp_path), "n", "good", "eth0")
    contents: dict[str, tuple[bytes | str, str]] = {
        "a": ("{not json", "not valid JSON"),
        "b": ("[1, 2]", "not a JSON object"),
        "c": (b"\xff\xfe", "not valid JSON"),
        "d": (_record("d", version=9), "format version"),
        "e": (_record(5), "must be strings"),
        "f": (_record(""), "must not be empty"),
        "g": (_record("g", spooled_at="yesterday"), "spooled_at"),
        "h": (_record("someone-else"), "does not match"),
        "i": (b" " * (spool.MAX_ENTRY_BYTES + 1), "larger"),
    }
    expected: dict[str, str] = {}
    for cid, (content, reason) in contents.items():
        expected[str(_write(tmp_path, spool.entry_name("n", cid, "eth0"), content))] = reason
    a_directory = tmp_path / spool.entry_name("n", "j", "eth0")
    a_directory.mkdir()
    expected[str(a_directory)] = "cannot read"
    a_symlink = tmp_path / spool.entry_name("n", "k", "eth0")
    a_symlink.symlink_to(good)
    expected[str(a_symlink)] = "cannot open"
    foreign = _write(tmp_path, "README", "hello")

    scan = spool.read_spooled_deletes(str(tmp_path))

    assert [e.path for e in scan.entries] == [good]
    found = {p.path: (p.reason, p.removable) for p in scan.problems}
    for path, reason in expected.items():
        assert reason in found[path][0], (path, found[path])
        assert found[path][1] is True
    assert found[str(foreign)] == ("not a spool entry (unexpected name)", False)
    assert len(scan.problems) == len(expected) + 1


def test_temporary_files_are_skipped_while_fresh_and_reported_once_abandoned(
    tmp_path: Path,
) -> None:
    fresh = _write(tmp_path, ".tmp-del-x.json.1", "{")
    old = _write(tmp_path, ".tmp-del-y.json.2", "{")
    long_ago = time.time() - spool.STALE_TEMP_SECONDS - 10
    os.utime(old, (long_ago, long_ago))
    scan = spool.read_spooled_deletes(str(tmp_path))
    assert scan.entries == ()
    assert [(p.path, p.removable) for p in scan.problems] == [(str(old), True)]
    assert fresh.exists()


def test_remove_is_idempotent(tmp_path: Path) -> None:
    path = write_entry(str(tmp_path), "n", "c", "eth0")
    spool.remove(path)
    spool.remove(path)  # already gone: fine
    assert os.listdir(tmp_path) == []


def test_ensure_spool_dir_makes_the_directory_private(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool.ensure_spool_dir(str(directory))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    os.chmod(directory, 0o755)  # ours, readable by others: tightened
    spool.ensure_spool_dir(str(directory))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_spool_others_could_write_is_refused_not_fixed(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "spool"
    write_entry(str(directory), "n", "c", "eth0")
    os.chmod(directory, mode)
    with pytest.raises(spool.UnsafeSpool, match="lets others write it"):
        spool.ensure_spool_dir(str(directory))
    with pytest.raises(spool.UnsafeSpool, match="nothing in it is applied"):
        spool.read_spooled_deletes(str(directory))
    assert stat.S_IMODE(os.stat(directory).st_mode) == mode
    assert len(os.listdir(directory)) == 1


def test_a_symlinked_spool_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    write_entry(str(target), "n", "c", "eth0")
    os.chmod(target, 0o755)
    (tmp_path / "spool").symlink_to(target)
    for call in (spool.ensure_spool_dir, spool.read_spooled_deletes):
        with pytest.raises(spool.UnsafeSpool, match="symbolic link"):
            call(str(tmp_path / "spool"))
    with pytest.raises(spool.UnsafeSpool, match="symbolic link"):
        spool.remove(str(tmp_path / "spool" / spool.entry_name("n", "c", "eth0")))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert os.listdir(target) == [spool.entry_name("n", "c", "eth0")]


@pytest.mark.kernel  # needs root, to give the directory away
def test_a_spool_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    write_entry(str(directory), "n", "c", "eth0")
    os.chown(directory, 65534, 65534)
    with pytest.raises(spool.UnsafeSpool, match="owned by uid 65534"):
        spool.read_spooled_deletes(str(directory))
    with pytest.raises(spool.UnsafeSpool, match="owned by uid 65534"):
        spool.ensure_spool_dir(str(directory))


def test_the_spool_sits_beside_the_socket() -> None:
    # cni/spool_test.go pins the same paths for the plugin.
    assert spool.spool_dir_for("/run/masqd/masqd.sock") == "/run/masqd/spool"
    assert spool.spool_dir_for("/tmp/x/y.sock") == "/tmp/x/spool"


def _settle(directory: Path) -> None:
    """Wait until the directory's last change is older than the watcher's granularity window."""
    age = time.time() - os.stat(directory).st_mtime
    if age < spool.MTIME_GRANULARITY_SECONDS:
        time.sleep(spool.MTIME_GRANULARITY_SECONDS - age + 0.01)


def test_watcher_reports_writes_and_removals_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    watcher = spool.SpoolWatcher(str(directory))
    assert watcher.poll() is True  # the first look always counts as a change
    assert watcher.poll() is False  # absent, still absent

    path = write_entry(str(directory), "n", "c", "eth0")
    assert watcher.poll() is True
    _settle(directory)
    watcher.poll()  # may repeat once for a change inside the granularity window
    assert watcher.poll() is False

    spool.remove(path)
    assert watcher.poll() is True
    _settle(directory)
    watcher.poll()
    assert watcher.poll() is False


def test_watcher_does_not_miss_a_change_within_one_clock_tick(tmp_path: Path) -> None:
    # A coarse filesystem clock can give two changes the same mtime: model it by putting the
    # directory's mtime back after the second write.
    now = [0.0]
    watcher = spool.SpoolWatcher(str(tmp_path), clock=lambda: now[0])
    write_entry(str(tmp_path), "n", "c1", "eth0")
    first = os.stat(tmp_path)
    now[0] = first.st_mtime + 0.001  # sampled one millisecond after the write
    assert watcher.poll() is True
    write_entry(str(tmp_path), "n", "c2", "eth0")
    os.utime(tmp_path, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert watcher.poll() is True  # same mtime, but the last sample was too close to it
    now[0] = first.st_mtime + 10  # later samples are far from the change
    assert watcher.poll() is True  # the recheck left over from the poll above
    assert watcher.poll() is False

"""The DEL spool: what the plugin writes is what the daemon reads, and nothing in the directory
can make the reader crash."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from masqd import cni, spool


def _write(directory: Path, name: str, content: bytes | str) -> Path:
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_a_spooled_delete_reads_back_with_its_key(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    path = spool.spool_delete(directory, "net1", "ctr1", "eth0", now=100.0)
    scan = spool.read_spooled_deletes(directory)
    assert scan.problems == ()
    assert [(e.key, e.spooled_at, e.path) for e in scan.entries] == [
        (("net1", "ctr1", "eth0"), 100.0, path)
    ]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(directory) == [os.path.basename(path)]  # no temporary file left


def test_a_first_spool_makes_the_socket_directory_as_the_daemon_would(tmp_path: Path) -> None:
    spool.spool_delete(str(tmp_path / "run" / "spool"), "n", "c", "eth0")
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "spool").st_mode) == 0o700


def test_the_same_attachment_spooled_twice_is_one_entry_with_the_later_time(tmp_path: Path) -> None:
    directory = str(tmp_path)
    first = spool.spool_delete(directory, "n", "c", "eth0", now=1.0)
    second = spool.spool_delete(directory, "n", "c", "eth0", now=2.0)
    assert first == second
    (entry,) = spool.read_spooled_deletes(directory).entries
    assert entry.spooled_at == 2.0


def test_entries_come_back_oldest_first(tmp_path: Path) -> None:
    directory = str(tmp_path)
    for i, when in enumerate((30.0, 10.0, 20.0)):
        spool.spool_delete(directory, "n", f"c{i}", "eth0", now=when)
    entries = spool.read_spooled_deletes(directory).entries
    assert [e.container_id for e in entries] == ["c1", "c2", "c0"]


def test_keys_that_differ_only_in_where_the_separator_falls_get_different_files() -> None:
    assert spool.entry_name("a.b", "c", "d") != spool.entry_name("a", "b.c", "d")
    assert spool.entry_name("n", "c", "eth0") == spool.entry_name("n", "c", "eth0")


def test_a_full_spool_refuses_new_attachments_but_still_refreshes_known_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool, "MAX_ENTRIES", 2)
    directory = str(tmp_path)
    spool.spool_delete(directory, "n", "c1", "eth0")
    spool.spool_delete(directory, "n", "c2", "eth0")
    with pytest.raises(spool.SpoolFull):
        spool.spool_delete(directory, "n", "c3", "eth0")
    spool.spool_delete(directory, "n", "c1", "eth0")  # replaces, does not grow
    assert spool.count_entries(directory) == 2


def test_an_entry_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bytes"):
        spool.spool_delete(str(tmp_path), "n", "c" * spool.MAX_ENTRY_BYTES, "eth0")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        spool.spool_delete(str(tmp_path), "n", "c", "eth0")
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_is_an_empty_spool(tmp_path: Path) -> None:
    scan = spool.read_spooled_deletes(str(tmp_path / "absent"))
    assert scan.entries == () and scan.problems == ()
    assert spool.count_entries(str(tmp_path / "absent")) == 0


def _record(container_id: object, **overrides: object) -> str:
    record = {"version": 1, "network": "n", "container_id": container_id, "ifname": "eth0"}
    record["spooled_at"] = 1.0
    record.update(overrides)
    return json.dumps(record)


def test_garbage_is_reported_and_never_crashes_the_reader(tmp_path: Path) -> None:
    good = spool.spool_delete(str(tmp_path), "n", "good", "eth0")
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


def test_remove_and_cancel_are_idempotent(tmp_path: Path) -> None:
    path = spool.spool_delete(str(tmp_path), "n", "c", "eth0")
    assert spool.cancel_delete(str(tmp_path), "n", "c", "eth0") is True
    assert spool.cancel_delete(str(tmp_path), "n", "c", "eth0") is False
    spool.remove(path)  # already gone: fine


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
    spool.spool_delete(str(directory), "n", "c", "eth0")
    os.chmod(directory, mode)
    with pytest.raises(spool.UnsafeSpool, match="lets others write it"):
        spool.ensure_spool_dir(str(directory))
    with pytest.raises(spool.UnsafeSpool, match="nothing in it is applied"):
        spool.read_spooled_deletes(str(directory))
    assert stat.S_IMODE(os.stat(directory).st_mode) == mode
    assert len(os.listdir(directory)) == 1


def test_a_symlinked_spool_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    spool.spool_delete(str(target), "n", "c", "eth0")
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
    spool.spool_delete(str(directory), "n", "c", "eth0")
    os.chown(directory, 65534, 65534)
    with pytest.raises(spool.UnsafeSpool, match="owned by uid 65534"):
        spool.read_spooled_deletes(str(directory))
    with pytest.raises(spool.UnsafeSpool, match="owned by uid 65534"):
        spool.ensure_spool_dir(str(directory))


def test_plugin_and_daemon_agree_on_where_the_spool_is() -> None:
    for sock in ("/run/masqd/masqd.sock", "/tmp/x/y.sock"):
        assert cni.spool_dir(sock) == spool.spool_dir_for(sock)
    assert spool.spool_dir_for("/run/masqd/masqd.sock") == "/run/masqd/spool"


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

    path = spool.spool_delete(str(directory), "n", "c", "eth0")
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
    spool.spool_delete(str(tmp_path), "n", "c1", "eth0")
    first = os.stat(tmp_path)
    now[0] = first.st_mtime + 0.001  # sampled one millisecond after the write
    assert watcher.poll() is True
    spool.spool_delete(str(tmp_path), "n", "c2", "eth0")
    os.utime(tmp_path, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert watcher.poll() is True  # same mtime, but the last sample was too close to it
    now[0] = first.st_mtime + 10  # later samples are far from the change
    assert watcher.poll() is True  # the recheck left over from the poll above
    assert watcher.poll() is False

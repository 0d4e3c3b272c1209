"""The journal against a hostile disk, with real daemons (issue 10, items 6 and 7).

- A full disk (a 256 KiB tmpfs) partway through an append: the DELETE gets 503 saying
  "journal error", the half record is cut back off, a retry once space is freed succeeds, and
  after a restart the attachment stays deleted.
- A journal that cannot prove it is complete (0 bytes, cut at a line boundary, cut in the
  middle of a record): start-up adopts from the table what the journal does not name, and
  every element in the kernel survives.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd.planning.ruleset import SOURCES4
from masqd.state.journal import JOURNAL
from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, kernel_table, running_masqd

pytestmark = pytest.mark.kernel

PAGE = 4096
LONG_ID = "x" * 118  # as long as the element comment allows with "net" and "eth0": a delete
# record of about 170 bytes


@contextlib.contextmanager
def tiny_tmpfs(size: str = "256k") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mqdfs", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def fill(directory: Path) -> Path:
    """Take every free page of the file system; the filler, to remove to free them."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(b"\0" * PAGE)
            except OSError:
                break
    return filler


def room_in_last_page(path: Path) -> int:
    return -path.stat().st_size % PAGE


def align_journal(daemon: MasqdProcess, journal: Path, target: range) -> None:
    """Set up padding attachments until the journal's last page has `target` bytes free, so
    that the next record straddles a page boundary: on a full tmpfs its first part is
    written and the rest fails with ENOSPC."""
    cost: int | None = None  # what a setup adds to the journal besides its container ID
    for index in range(200):
        room = room_in_last_page(journal)
        if room in target:
            return
        prefix = f"p{index}-"
        wanted = 64 if cost is None else room - cost - (target.start + target.stop) // 2
        longest = 128 - len("pad//eth0")  # the owner comment "pad/ID/eth0" fits in 128 bytes
        cid = prefix + "y" * max(0, min(longest, wanted) - len(prefix))
        before = journal.stat().st_size
        assert daemon.client.put_attachment("pad", cid, "eth0", ["198.18.90.2/24"]).status == 200
        cost = journal.stat().st_size - before - len(cid)
    raise AssertionError("could not place the journal's end where wanted")


def test_a_full_disk_mid_append_loses_no_delete() -> None:
    with (
        tiny_tmpfs() as fs,
        running_masqd(
            resync_interval=3600,
            extra_args=["--state-dir", str(fs / "state"), "--apply-timeout", "60"],
        ) as daemon,
    ):
        client = daemon.client
        assert client.put_attachment("net", LONG_ID, "eth0", ["198.18.91.2/24"]).status == 200
        journal = fs / "state" / JOURNAL
        align_journal(daemon, journal, range(20, 140))
        size = journal.stat().st_size
        filler = fill(fs)

        started = time.monotonic()
        resp = client.delete_attachment("net", LONG_ID, "eth0")
        assert resp.status == 503 and resp.is_json_error(), resp.body
        # Answered when the append failed, not when the 60 s apply timeout ran out.
        assert time.monotonic() - started < 30
        assert "journal error" in resp.json["error"], resp.json
        assert "No space left on device" in resp.json["error"]
        # The part of the record that fit was cut back off: whole records only.
        assert journal.stat().st_size == size
        assert journal.read_bytes().endswith(b"\n")

        filler.unlink()
        resp = client.delete_attachment("net", LONG_ID, "eth0")
        assert resp.status == 200, resp.body
        assert "198.18.91.2" not in kernel_table(daemon.ns).sets[SOURCES4]

        daemon.kill(signal.SIGKILL)
        daemon.start()
        assert client.get_attachment("net", LONG_ID, "eth0").status == 404
        assert "198.18.91.2" not in kernel_table(daemon.ns).sets[SOURCES4]
        assert daemon.status()["journal_problems"] == []


SETUPS = {f"c{n}": f"198.18.92.{n}/24" for n in range(1, 7)}


def _spoil_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _spoil_cut_at_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) // 2]))


def _spoil_cut_mid_record(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 5])


@pytest.mark.parametrize(
    "spoil", [_spoil_zero_bytes, _spoil_cut_at_line, _spoil_cut_mid_record],
    ids=["zero-bytes", "cut-at-line", "cut-mid-record"],
)  # fmt: skip
def test_a_journal_cut_short_does_not_empty_the_table(
    daemon_factory: DaemonFactory, spoil: object
) -> None:
    daemon = daemon_factory()
    for cid, ip in SETUPS.items():
        assert daemon.client.put_attachment("net", cid, "eth0", [ip]).status == 200
    assert daemon.client.delete_attachment("net", "c6", "eth0").status == 200
    held = set(kernel_table(daemon.ns).sets[SOURCES4])
    daemon.kill(signal.SIGKILL)
    assert callable(spoil)
    spoil(Path(daemon.state_dir) / JOURNAL)
    daemon.start()

    assert set(kernel_table(daemon.ns).sets[SOURCES4]) == held
    listed = {a["container_id"] for a in daemon.client.attachments()}
    assert listed == {f"c{n}" for n in range(1, 6)}
    status = daemon.status()
    assert status["journal_incomplete"]
    assert status["syncs"]["failures"] == 0
    warnings = [
        line for line in daemon.log_path.read_text().splitlines() if "not proven complete" in line
    ]
    assert len(warnings) == 1, warnings


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
def test_a_journal_as_the_daemon_leaves_it_is_trusted(
    daemon_factory: DaemonFactory, sig: signal.Signals
) -> None:
    """No adoption, no warning after an ordinary stop or a crash: the journal proves itself."""
    daemon = daemon_factory()
    for cid, ip in SETUPS.items():
        assert daemon.client.put_attachment("net", cid, "eth0", [ip]).status == 200
    daemon.kill(sig)
    daemon.start()
    status = daemon.status()
    assert status["journal_incomplete"] is None and status["adopted"] is None
    assert len(daemon.client.attachments()) == len(SETUPS)
    assert "not proven complete" not in daemon.log_path.read_text()

"""One daemon per state directory (issue 10, item 8): the lock, and two real daemons."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from masqd.state.statedir import LOCK_FILE, StateDirBusy, StateDirLock
from tests.conftest import DaemonFactory


def test_a_second_lock_names_the_holder(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    first.acquire()
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(StateDirBusy, match=rf"in use by another masqd \(pid {os.getpid()},"):
        StateDirLock(tmp_path).acquire()
    first.release()
    again = StateDirLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_a_dead_holder_leaves_no_lock(tmp_path: Path) -> None:
    """The file stays, but the kernel dropped the lock with its holder (SIGKILL)."""
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'%d\\n' % os.getpid())\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(StateDirBusy, match=f"pid {holder.pid}"):
            StateDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    lock = StateDirLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.mark.kernel
def test_a_second_daemon_on_one_state_directory_refuses_to_start(
    daemon_factory: DaemonFactory,
) -> None:
    first = daemon_factory()
    assert first.client.put_attachment("net", "c1", "eth0", ["198.18.50.2/24"]).status == 200
    second = daemon_factory(ns=first.ns, start=False, extra_args=["--state-dir", first.state_dir])
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=30) == 1
    log = second.log_path.read_text()
    assert first.proc is not None
    errors = [line for line in log.splitlines() if "cannot start: " in line]
    assert len(errors) == 1, log
    assert f"is in use by another masqd (pid {first.proc.pid}," in errors[0]
    assert "Traceback" not in log
    # The first one never noticed: no drift repaired, still ready, its socket still answers.
    status = first.status()
    assert status["ready"] is True and status["syncs"]["drift_repairs"] == 0
    assert len(first.client.attachments()) == 1

    # Once the holder is gone (even by SIGKILL), the state directory is free again.
    first.kill(signal.SIGKILL)
    second.start()
    assert len(second.client.attachments()) == 1

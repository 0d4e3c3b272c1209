"""One daemon per state directory: an exclusive lock held for the daemon's whole life.

Two daemons on one state directory each take the other's changes to the table for drift and
repair it back, tens of times a second, and both append to one journal. The first to start
takes `flock(LOCK_EX)` on `masqd.lock` in the state directory and writes its pid there; a
second one finds the lock taken and refuses to start, naming that pid.

flock, not the pid in the file, decides: the kernel drops the lock when its holder dies
(SIGKILL included), so a stale file never blocks a restart. The file is never unlinked:
removing it while another daemon opens it would let both hold a lock, each on its own file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from masqd.paths import StartupError

LOCK_FILE = "masqd.lock"


class StateDirBusy(StartupError):
    """Another live process holds the state directory's lock."""


class StateDirLock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise StateDirBusy naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"pid {holder}" if holder is not None else "pid not written yet"
            raise StateDirBusy(
                f"state directory {self.path.parent} is in use by another masqd ({who}, "
                f"lock {self.path}); refusing to start"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

"""The DEL spool, reading side: deletes the CNI plugin could not deliver, waiting for the daemon.

A runtime's DEL must not fail because masqd is down (restarting, upgrading, crashed), yet the
attachment must not stay masqueraded for ever. So `masqd-cni` writes the DEL here, beside the
socket (`<dirname(socket)>/spool/`, so plugin and daemon agree without more configuration),
and the daemon applies the spool at start-up before it reports ready, and again whenever the
directory changes while it runs.

Format: one JSON file per attachment key, named after a hash of the key, so a repeated DEL of
the same attachment rewrites one file instead of growing the spool:

    del-<sha256 of the key, 32 hex digits>.json
    {"version": 1, "network": "...", "container_id": "...", "ifname": "...", "spooled_at": 1.7e9}

A file is written to a dot-prefixed temporary name in the same directory, fsynced, then
renamed into place, so a reader never sees half an entry.

Bounds: the plugin (cni/spool.go, the writing side) keeps at most 4096 entries and refuses
a new one when full rather than evicting an older one; an entry is at most `MAX_ENTRY_BYTES`.
docs/cni.md specifies the format for both sides.

Trust: whoever can write the spool can make the daemon delete attachments, bypassing the
socket's peer-credential check, and the socket may sit in a shared directory such as /tmp.
So the daemon reads the spool only through a descriptor opened without following a symlink,
and only when that directory is owned by root (or the daemon's user) and writable by its
owner alone (`UnsafeSpool` otherwise: nothing in it is applied, and nothing is changed
through it; the daemon reports the problem). Entries are opened, listed and removed
relative to that descriptor, never by a path that could be swapped meanwhile.

This side is synchronous: the daemon calls it from a thread or directly (each call is a few
system calls on a directory that is almost always empty).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from masqd import paths
from masqd.models import AttachmentKeyT

SPOOL_DIRNAME = "spool"
FORMAT_VERSION = 1
ENTRY_PREFIX = "del-"
ENTRY_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
MAX_ENTRY_BYTES = 4096
# A temporary file older than this belongs to a writer that died between create and rename.
STALE_TEMP_SECONDS = 60.0
# File timestamps come from the kernel's coarse clock (one jiffy, up to 10 ms): a change made
# within this window after a directory was sampled may leave its mtime unchanged.
MTIME_GRANULARITY_SECONDS = 0.05


class UnsafeSpool(Exception):
    """The spool directory is not the daemon's alone: nothing in it may be applied."""


@dataclass(frozen=True)
class SpooledDelete:
    """One undelivered DEL, as read back from the spool."""

    network: str
    container_id: str
    ifname: str
    spooled_at: float
    path: str

    @property
    def key(self) -> AttachmentKeyT:
        return (self.network, self.container_id, self.ifname)


@dataclass(frozen=True)
class SpoolProblem:
    """A file in the spool that is not a valid entry.

    `removable` is true for files this module owns (a corrupt entry, a stale temporary file):
    the reader should log and remove them. Foreign files are only reported, never removed.
    """

    path: str
    reason: str
    removable: bool


@dataclass(frozen=True)
class SpoolScan:
    entries: tuple[SpooledDelete, ...]
    problems: tuple[SpoolProblem, ...]


def spool_dir_for(socket_path: str) -> str:
    """Where plugin and daemon keep the spool for the daemon listening on `socket_path`."""
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), SPOOL_DIRNAME)


def entry_name(network: str, container_id: str, ifname: str) -> str:
    """The file name of the entry for one attachment key (the same key, the same file)."""
    # JSON keeps the three parts unambiguous whatever characters they hold.
    digest = hashlib.sha256(json.dumps([network, container_id, ifname]).encode()).hexdigest()
    return f"{ENTRY_PREFIX}{digest[:32]}{ENTRY_SUFFIX}"


def ensure_spool_dir(spool_dir: str) -> None:
    """Create the spool directory if needed and make sure it is private (0700).

    Raises UnsafeSpool, changing nothing, when the directory is a symlink, someone else's,
    or writable by others: entries may have been planted there.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(spool_dir, 0o700)  # mkdir never follows a symlink at the last component
    with _open_spool(spool_dir) as fd:
        if fd is None:
            raise UnsafeSpool(f"{spool_dir}: vanished while it was being created")
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours and not writable by others: only tighten it


def read_spooled_deletes(spool_dir: str, *, now: float | None = None) -> SpoolScan:
    """Every valid entry (oldest first) and every file that is not one. Never raises for content.

    Read-only: the caller applies each entry, then `remove(entry.path)`; it logs each problem
    and removes the `removable` ones. A missing directory is an empty spool. UnsafeSpool is
    raised when the directory cannot be trusted, OSError when it cannot be listed.
    """
    wall = time.time() if now is None else now
    entries: list[SpooledDelete] = []
    problems: list[SpoolProblem] = []
    with _open_spool(spool_dir) as fd:
        if fd is None:
            return SpoolScan((), ())
        with os.scandir(fd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            _scan_one(spool_dir, fd, name, wall, entries, problems)
    entries.sort(key=lambda e: (e.spooled_at, e.path))
    return SpoolScan(tuple(entries), tuple(problems))


def _scan_one(
    spool_dir: str,
    fd: int,
    name: str,
    wall: float,
    entries: list[SpooledDelete],
    problems: list[SpoolProblem],
) -> None:
    path = os.path.join(spool_dir, name)
    if name.startswith(TEMP_PREFIX):
        try:
            age = wall - os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return  # renamed into place since the listing
        if age > STALE_TEMP_SECONDS:
            reason = f"abandoned temporary file ({age:.0f}s old)"
            problems.append(SpoolProblem(path, reason, True))
        return
    if not _is_entry_name(name):
        problems.append(SpoolProblem(path, "not a spool entry (unexpected name)", False))
        return
    parsed = _read_entry(path, fd, name)
    if isinstance(parsed, str):
        problems.append(SpoolProblem(path, parsed, True))
    elif parsed is not None:
        entries.append(parsed)


def remove(path: str) -> None:
    """Remove an applied entry or a removable problem file; already gone is fine.

    Through the spool directory's descriptor, checked like a read: UnsafeSpool when the
    directory is no longer the daemon's alone.
    """
    with _open_spool(os.path.dirname(path)) as fd:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.basename(path), dir_fd=fd)


@contextlib.contextmanager
def _open_spool(spool_dir: str) -> Iterator[int | None]:
    """A descriptor of the spool directory, checked (None when it does not exist)."""
    try:
        fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if os.path.islink(spool_dir) else "not a directory"
            raise UnsafeSpool(f"{spool_dir} is {what}; nothing in it is applied") from None
        raise
    try:
        problem = paths.dir_problem(os.fstat(fd), shared_ok=False)
        if problem is not None:
            raise UnsafeSpool(f"{spool_dir}: {problem}; nothing in it is applied")
        yield fd
    finally:
        os.close(fd)


class SpoolWatcher:
    """Tells the daemon when the spool directory may have changed; poll it about once a second.

    Any entry written, replaced or removed renames or unlinks a name in the directory, which
    changes the directory's mtime. Because that mtime comes from a coarse clock, a change made
    just after a sample can keep the same mtime: a directory modified within
    `MTIME_GRANULARITY_SECONDS` of the previous sample is therefore reported as changed once
    more. The first poll always reports a change. `clock` is the wall clock the filesystem
    stamps mtimes with (injected for tests).
    """

    def __init__(self, spool_dir: str, *, clock: Callable[[], float] = time.time) -> None:
        self.spool_dir = spool_dir
        self._clock = clock
        self._last: tuple[int, int] | None = None
        self._recheck = True

    def poll(self) -> bool:
        sampled_at = self._clock()
        try:
            st = os.lstat(self.spool_dir)  # a symlink put there is a change, not followed
            signature = (st.st_ino, st.st_mtime_ns)
            modified_at = st.st_mtime
        except FileNotFoundError:
            signature, modified_at = (0, 0), 0.0
        changed = self._recheck or signature != self._last
        self._last = signature
        self._recheck = sampled_at - modified_at < MTIME_GRANULARITY_SECONDS
        return changed


def _is_entry_name(name: str) -> bool:
    return name.startswith(ENTRY_PREFIX) and name.endswith(ENTRY_SUFFIX)


def _read_entry(path: str, dir_fd: int, name: str) -> SpooledDelete | str | None:
    """The entry `name` in the directory `dir_fd` (at `path`), a reason why it is not one, or
    None when it vanished meanwhile."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot open: {exc.strerror}"
    try:
        data = os.read(fd, MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)
    if len(data) > MAX_ENTRY_BYTES:
        return f"larger than {MAX_ENTRY_BYTES} bytes"
    try:
        record = json.loads(data)
    except ValueError:
        return "not valid JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("version") != FORMAT_VERSION:
        return f"unknown format version {record.get('version')!r}"
    network, container_id, ifname = (record.get(k) for k in ("network", "container_id", "ifname"))
    if not (isinstance(network, str) and isinstance(container_id, str) and isinstance(ifname, str)):
        return "network, container_id and ifname must be strings"
    if not (network and container_id and ifname):
        return "network, container_id and ifname must not be empty"
    spooled_at = record.get("spooled_at")
    if isinstance(spooled_at, bool) or not isinstance(spooled_at, (int, float)):
        return "spooled_at must be a number"
    if os.path.basename(path) != entry_name(network, container_id, ifname):
        return "file name does not match its key"
    return SpooledDelete(network, container_id, ifname, float(spooled_at), path)

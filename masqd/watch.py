"""Noticing that a config file changed: inotify on its directory, then a look at its content.

In a cluster the config is a ConfigMap mounted as a directory, and no one sends SIGHUP. The
kubelet updates it by writing a new timestamped directory, pointing a new symlink at it and
renaming that symlink over `..data` (through which `masqd.toml -> ..data/masqd.toml`
resolves): the file itself is never written, and a watch on the file would see nothing, or
watch an inode that is about to go. Editors often write a new file and rename it over the old
one, with the same effect. So the watch is on the file's *directory* (and on the directory
its symlinks resolve to), where every one of these shows up as an event.

Events say that something happened near the file, not what it now holds. After a burst of
them settles (`SETTLE` of quiet, at most `MAX_SETTLE` in all, on the event loop's clock),
the watcher hashes each file's content and calls `on_change` only when a digest differs
from the last one it saw (or from what the loader read): the kubelet's five events, a
`touch`, or a rewrite with the same bytes cost no reload. A regular file being created is
not looked at until it is closed after writing (IN_CLOSE_WRITE), so a half-written file is
never read. A file that disappears is not treated as a change: its last content stays in
force until it is back (or SIGHUP applies whatever is left).

The inotify calls themselves are in `kernel.inotify`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence

from masqd.kernel.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    Event,
    Inotify,
)

log = logging.getLogger(__name__)

# Not IN_MODIFY: a write in progress is not a config yet; its IN_CLOSE_WRITE will come.
DIR_MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)

SETTLE = 0.1  # quiet time after the last event before the files are read
MAX_SETTLE = 1.0  # ... but no longer than this after the first, however busy the directory

Digest = str | None  # sha256 of a file's content; None: absent; "error: ..." unreadable


def file_digest(path: str) -> Digest:
    """What `path` holds now, as a digest (following symlinks)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"error: {exc.strerror}"


class ConfigWatcher:
    """Calls `on_change()` when the content of any of `paths` changed, from inotify events on
    their directories. `baseline`: the digests the files had when last read (the loader's)."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        on_change: Callable[[], None],
        baseline: Mapping[str, Digest] | None = None,
        settle: float = SETTLE,
        max_settle: float = MAX_SETTLE,
    ) -> None:
        self.paths = tuple(dict.fromkeys(os.path.abspath(p) for p in paths))
        self.on_change = on_change
        self.settle = settle
        self.max_settle = max_settle
        given = {os.path.abspath(p): d for p, d in (baseline or {}).items()}
        self.digests: dict[str, Digest] = {
            p: given[p] if p in given else file_digest(p) for p in self.paths
        }
        self._watched: dict[str, int] = {}  # directory -> watch descriptor
        self._unwatchable: set[str] = set()  # directories already reported as missing

    async def run(self) -> None:
        inotify = Inotify()
        loop = asyncio.get_running_loop()
        pending = asyncio.Event()
        loop.add_reader(inotify.fd, pending.set)
        try:
            self._update_watches(inotify)
            self._check()  # what changed between the loader's read and the watches
            while True:
                await pending.wait()
                pending.clear()
                if not self._relevant(inotify.read()):
                    continue
                await self._settle(inotify, pending)
                self._update_watches(inotify)
                self._check()
        finally:
            loop.remove_reader(inotify.fd)
            inotify.close()

    async def _settle(self, inotify: Inotify, pending: asyncio.Event) -> None:
        """Wait until the directory has been quiet for `settle` (a kubelet update and an
        editor's save are each a burst of events), at most `max_settle`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_settle
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(self.settle, left)):
                    await pending.wait()
            except TimeoutError:
                return
            pending.clear()
            self._relevant(inotify.read())

    def _relevant(self, events: Iterable[Event]) -> bool:
        """Whether the events may have changed a file's content. Also forgets watches the
        kernel dropped (their directory was deleted)."""
        relevant = False
        for event in events:
            if event.mask & IN_IGNORED:
                self._watched = {d: wd for d, wd in self._watched.items() if wd != event.wd}
                relevant = True
                continue
            if event.mask & IN_CREATE and not event.mask & IN_ISDIR:
                directory = next((d for d, wd in self._watched.items() if wd == event.wd), None)
                if directory is not None and _being_written(os.path.join(directory, event.name)):
                    continue  # its IN_CLOSE_WRITE follows
            relevant = True
        return relevant

    def _directories(self) -> list[str]:
        """Each file's directory, and the directory its symlinks lead to now."""
        dirs: list[str] = []
        for path in self.paths:
            dirs.append(os.path.dirname(path))
            dirs.append(os.path.dirname(os.path.realpath(path)))
        return list(dict.fromkeys(dirs))

    def _update_watches(self, inotify: Inotify) -> None:
        for directory in self._directories():
            if directory in self._watched:
                continue
            try:
                self._watched[directory] = inotify.add_watch(directory, DIR_MASK)
            except OSError as exc:
                if directory not in self._unwatchable:
                    self._unwatchable.add(directory)
                    level = logging.WARNING if exc.errno != errno.ENOENT else logging.INFO
                    log.log(
                        level,
                        "cannot watch %s for config changes (%s); SIGHUP still reloads",
                        directory,
                        exc.strerror,
                    )
            else:
                self._unwatchable.discard(directory)

    def _check(self) -> None:
        now = {path: file_digest(path) for path in self.paths}
        if now == self.digests:
            return
        gone = [p for p in self.paths if now[p] is None and self.digests[p] is not None]
        self.digests = now
        if gone:
            log.warning(
                "config file %s is gone; the running settings stay until it is back "
                "(SIGHUP applies what is left)",
                ", ".join(gone),
            )
            return
        self.on_change()


def _being_written(path: str) -> bool:
    """A new regular file of one link: created by open(), so IN_CLOSE_WRITE follows. (A
    symlink or a hard link appears whole, with no close to wait for.)"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1

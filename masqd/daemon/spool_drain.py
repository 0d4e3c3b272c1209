"""DELs the CNI plugin spooled while the daemon could not answer, applied to the state.

The plugin writes a file per DEL into the spool beside the socket (`state.spool`) when the
daemon is away. At start-up, before the first sync, they are applied to the desired state;
their files are removed once that sync is done. Later, the spool is polled: a DEL spooled
while the daemon runs (its socket was briefly unreachable) is applied, confirmed in the
kernel, and only then removed. A spool that someone else could write to is refused (anyone
who can write there can delete attachments), named in the log and in `/v1/status`.
"""

from __future__ import annotations

import asyncio
import logging

from masqd.models import AttachmentRef
from masqd.reconcile.errors import SyncUnavailable
from masqd.reconcile.reconciler import Reconciler
from masqd.state import spool
from masqd.state.desired import DesiredState

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class SpoolDrain:
    def __init__(
        self,
        *,
        directory: str,
        state: DesiredState,
        reconciler: Reconciler,
        apply_timeout: float,
        poll_interval: float = POLL_SECONDS,
    ) -> None:
        self.directory = directory
        self.state = state
        self.reconciler = reconciler
        self.apply_timeout = apply_timeout
        self.poll_interval = poll_interval
        self.problem: str | None = None  # why the spool is not applied, when it is not

    def prepare(self) -> None:
        """The spool directory beside the socket (checked by `paths.prepare_socket_dir`),
        private."""
        try:
            spool.ensure_spool_dir(self.directory)
        except spool.UnsafeSpool as exc:
            self._refused(str(exc))
        except OSError as exc:
            log.warning("DEL spool %s: %s", self.directory, exc)

    def apply(self) -> list[str]:
        """Apply spooled DELs to the desired state; the spool files to remove once applied."""
        try:
            scan = spool.read_spooled_deletes(self.directory)
        except spool.UnsafeSpool as exc:
            self._refused(str(exc))
            return []
        except OSError as exc:
            log.error("cannot read the DEL spool %s: %s", self.directory, exc)
            return []
        if self.problem is not None:
            log.info("DEL spool %s is the daemon's alone again", self.directory)
            self.problem = None
        done: list[str] = []
        for problem in scan.problems:
            log.warning("DEL spool: %s: %s", problem.path, problem.reason)
            if problem.removable:
                self.remove(problem.path)
        for entry in scan.entries:
            try:
                key = AttachmentRef(
                    network=entry.network, container_id=entry.container_id, ifname=entry.ifname
                ).as_tuple()
            except ValueError:
                log.warning("DEL spool: %s names no valid attachment; dropped", entry.path)
                self.remove(entry.path)
                continue
            removed = self.state.delete(key)
            log.info(
                "applied spooled DEL of %s (%s)",
                "/".join(key),
                "removed" if removed else "already absent",
            )
            done.append(entry.path)
        return done

    def remove(self, path: str) -> None:
        try:
            spool.remove(path)
        except spool.UnsafeSpool as exc:
            self._refused(str(exc))
        except OSError as exc:
            log.warning("cannot remove %s from the DEL spool: %s", path, exc)

    async def run(self) -> None:
        """Once the first sync is done: poll the spool, apply what arrives, and remove each
        file once the kernel has its DEL."""
        watcher = spool.SpoolWatcher(self.directory)
        await self.reconciler.first_sync_done.wait()
        retry = False  # entries applied but not confirmed: the directory may not change again
        while True:
            await asyncio.sleep(self.poll_interval)
            if not (watcher.poll() or retry):
                continue
            applied = self.apply()
            retry = False
            if not applied:
                continue
            try:
                await self.reconciler.commit(self.apply_timeout)
            except SyncUnavailable as exc:
                log.warning("spooled DELs not confirmed yet (%s); will retry", exc)
                retry = True
                continue
            for path in applied:
                self.remove(path)

    def _refused(self, problem: str) -> None:
        if problem != self.problem:
            log.error("DEL spool refused: %s", problem)
        self.problem = problem

"""`--adopt-cni-plugins-rules`: once the first sync is done, take over the CNI plugins'
legacy masquerade rules (see `migrate`). A failure keeps the legacy rules and is logged;
the daemon serves on."""

from __future__ import annotations

import asyncio
import logging

from masqd.migrate import AdoptionError, Migrator
from masqd.reconcile.errors import KernelUnavailable

log = logging.getLogger(__name__)


async def adopt_after_first_sync(migrator: Migrator, first_sync_done: asyncio.Event) -> None:
    await first_sync_done.wait()
    try:
        report = await migrator.adopt()
    except (AdoptionError, KernelUnavailable) as exc:
        log.error("adopting the CNI plugins' rules failed, legacy rules kept: %s", exc)
        return
    if not report.found:
        log.info("no table inet %s to adopt", migrator.table)

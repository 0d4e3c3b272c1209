"""Config reload: SIGHUP, or a change to the config file or the ip-masq-agent file.

A valid policy goes to the kernel in one transaction; an invalid file is refused with a log
line and changes nothing; settings that only a restart can change are named in the log. A
change to a config file is noticed by `watch` and reloaded the same way (a ConfigMap is
updated by the kubelet, and no one sends SIGHUP). Every refused reload is counted in
`masqd_config_reload_failures_total`.
"""

from __future__ import annotations

import asyncio
import logging

from masqd import logrepeat
from masqd.config import ConfigError, ConfigLoader, DaemonConfig, log_level, restart_needed
from masqd.metrics import Metrics
from masqd.planning.ruleset import Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.watch import ConfigWatcher

log = logging.getLogger(__name__)


class ConfigReloader:
    """Re-reads the config on request (`request`), one reload at a time (`run`)."""

    def __init__(
        self,
        *,
        config: DaemonConfig,
        loader: ConfigLoader | None,
        reconciler: Reconciler,
        metrics: Metrics,
    ) -> None:
        self.config = config  # the running settings: those a reload changed, the rest as started
        self.loader = loader  # None: the daemon was not started from a config file
        self.reconciler = reconciler
        self.metrics = metrics
        self._requested = asyncio.Event()
        self._cause = "SIGHUP"  # what asked for the pending reload, for the log

    def request(self, cause: str) -> None:
        self._cause = cause
        self._requested.set()

    def watched_files(self) -> list[str]:
        if self.loader is None:
            return []
        files = [self.loader.path]
        if self.loader.ip_masq_agent_path:
            files.append(self.loader.ip_masq_agent_path)
        return files

    async def watch(self) -> None:
        """Request a reload when a config file's content changes (see `watch`)."""
        files = self.watched_files()
        if not files:
            return
        assert self.loader is not None
        watcher = ConfigWatcher(
            files,
            baseline=self.loader.digests,
            on_change=lambda: self.request("config file changed"),
        )
        try:
            await watcher.run()
        except OSError as exc:
            log.warning("cannot watch the config files (%s); SIGHUP still reloads", exc)

    def reload(self, cause: str = "SIGHUP") -> Policy | None:
        """Re-read the config file; the new policy handed to the reconciler, or None when the
        file was refused or the policy did not change. Never raises for a bad file."""
        if self.loader is None:
            log.warning("%s: this daemon was not started from a config loader; ignored", cause)
            return None
        try:
            new = self.loader.load()
        except ConfigError as exc:
            self.metrics.config_reload_failures.inc()
            self.metrics.config_last_reload_successful.set(0)
            log.error(
                "%s: config refused, the running settings stay: %s",
                cause,
                "; ".join(str(p) for p in exc.problems),
            )
            return None
        self.metrics.config_last_reload_successful.set(1)
        for level, note in self.loader.take_notes():
            log.log(level, "%s", note)
        old = self.config
        stale = restart_needed(old, new)
        if stale:
            log.warning(
                "%s: changed settings that take effect only after a restart: %s",
                cause,
                ", ".join(stale),
            )
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(log_level(new.log_level))
            log.info("%s: log level %s", cause, new.log_level)
        # Keep the running values of what needs a restart, so status stays truthful.
        self.config = old.model_copy(
            update={
                "log_level": new.log_level,
                "exempt_destinations": new.exempt_destinations,
                "random_fully": new.random_fully,
            }
        )
        policy = new.policy
        if policy == self.reconciler.policy:
            log.info("%s: config %s re-read; policy unchanged", cause, self.loader.path)
            return None
        log.info(
            "%s: new policy from %s: %d exempt IPv4 and %d IPv6 destinations, "
            "fully-random %s; applying",
            cause,
            " and ".join(self.watched_files()),
            len(policy.exempt4),
            len(policy.exempt6),
            "on" if policy.random_fully else "off",
        )
        self.reconciler.set_policy(policy)
        return policy

    async def run(self) -> None:
        """Reload on each request, and log when the new policy is in the kernel."""
        while True:
            await self._requested.wait()
            self._requested.clear()
            cause = self._cause
            policy = self.reload(cause)
            if policy is None:
                continue
            try:
                await self.reconciler.wait_policy_applied(policy, self.config.apply_timeout)
            except TimeoutError:
                log.error(
                    "%s: the new policy is not in the kernel after %gs (%s); still trying",
                    cause,
                    self.config.apply_timeout,
                    self.reconciler.stats.last_error or "sync pending",
                )
            else:
                log.info(
                    "%s: policy applied to table inet %s",
                    cause,
                    self.config.table,
                    extra=logrepeat.ALWAYS,
                )

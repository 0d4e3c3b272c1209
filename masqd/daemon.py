"""The composition root: build the parts, run them, stop them in order.

Start-up, in order:
0. lock the state directory (`statedir`): a second daemon on it refuses to start;
1. open the nftables sockets (so they get low descriptor numbers) and fit the listeners'
   connection caps under the descriptor limit (`fdlimit`);
2. load the journal into the desired state (problems are reported, never fatal); unless the
   journal proves it is complete (see `journal`), while the table is in the kernel, adopt
   the attachments the table's element comments name and the journal does not (`planning.recovery`)
   rather than wipe what it holds;
3. apply DELs that the CNI plugin spooled while the daemon was away;
4. open the metrics port and the API socket (the one systemd passed, or our own), so
   requests queue meanwhile;
5. run the first sync: it lists the table, unless the journal's last sync marker shows the
   kernel unchanged since (same ruleset generation and policy), and changes only what
   differs, so a restart never takes a working rule away;
6. report ready (sd_notify READY=1, /readyz 200).

With `--adopt-cni-plugins-rules`, once the first sync is done the CNI plugins' legacy rules
are adopted (see `migrate`). SIGHUP re-reads the config file: a valid policy goes to the
kernel in one transaction, an invalid file is refused with a log line and changes nothing,
and settings that only a restart can change are named in the log. A change to the config
file, or to the ip-masq-agent file, is noticed by `watch` and reloaded the same way (a
ConfigMap is updated by the kubelet, and no one sends SIGHUP); every refused reload is
counted in `masqd_config_reload_failures_total`.

Shutdown (SIGTERM, SIGINT): tell systemd we are stopping, stop accepting requests, let the
loops finish, close the kernel backend. The table stays in the kernel: containers keep their
masquerade while the daemon is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from masqd import __version__, fdlimit, logrepeat, paths
from masqd.activation import listen_fds, unix_listener
from masqd.api.exporter import serve_metrics
from masqd.api.handlers import AccessPolicy, ApiContext, build_app
from masqd.api.server import LimitedSockSite
from masqd.config import (
    ConfigError,
    ConfigLoader,
    DaemonConfig,
    log_level,
    restart_needed,
    unknown_environment,
)
from masqd.kernel.events import EventWatcher
from masqd.kernel.memory import release_heap, tune_allocator
from masqd.kernel.nft import Backend, KernelBackend
from masqd.kernel.peergroups import peer_groups
from masqd.metrics import Metrics
from masqd.migrate import AdoptionError, Migrator
from masqd.models import AttachmentRef
from masqd.planning import recovery
from masqd.planning.desired import policy_fingerprint
from masqd.planning.ruleset import Policy
from masqd.reconcile.errors import KernelUnavailable, SyncUnavailable
from masqd.reconcile.reconciler import Reconciler
from masqd.sdnotify import Notifier, watchdog_loop
from masqd.state import spool
from masqd.state.desired import CapacityExceeded, DesiredState
from masqd.state.journal import Entry, Journal, Loaded
from masqd.state.statedir import StateDirLock
from masqd.watch import ConfigWatcher

log = logging.getLogger(__name__)

SPOOL_POLL_SECONDS = 1.0
STUCK_SYNC_SECONDS = 60.0


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        backend: Backend | None = None,
        metrics: Metrics | None = None,
        loader: ConfigLoader | None = None,
    ) -> None:
        self.config = config
        self.loader = loader  # re-reads the config file on SIGHUP
        self.metrics = metrics or Metrics()
        self.journal = Journal(Path(config.state_dir))
        self.lock = StateDirLock(Path(config.state_dir))
        self.state = DesiredState(journal=self.journal, max_attachments=config.max_attachments)
        self.backend = backend or KernelBackend(table=config.table, runner=config.nft_runner)
        self.reconciler = Reconciler(
            state=self.state,
            backend=self.backend,
            table=config.table,
            policy=config.policy,
            metrics=self.metrics,
            journal=self.journal,
            resync_interval=config.resync_interval,
        )
        self.notifier = Notifier()
        self.spool_dir = spool.spool_dir_for(config.socket)
        self.spool_problem: str | None = None  # why the spool is not applied, when it is not
        self.journal_problems: list[str] = []
        self.journal_found = False
        self.journal_incomplete: str | None = "not loaded"  # why it is not proven complete
        self.adopted: dict[str, int] | None = None
        self.events: EventWatcher | None = None
        self.metrics_address: str | None = None
        # Adoption of the CNI plugins' rules needs to run nftables JSON on the real kernel.
        self.migrator = (
            Migrator(
                state=self.state,
                reconciler=self.reconciler,
                nft=self.backend,
                masqd_table=config.table,
                apply_timeout=config.apply_timeout,
            )
            if isinstance(self.backend, KernelBackend)
            else None
        )
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._reload_cause = "SIGHUP"  # what asked for the pending reload, for the log

    # ---- start-up ----------------------------------------------------------------------

    def load_journal(self) -> None:
        loaded = Loaded()
        problems = self.state.replay(
            self.journal.stream(loaded), at_last_marker=self._seed_from_marker
        )
        self.journal_found = loaded.found
        self.journal_incomplete = None if loaded.complete else loaded.incomplete
        if not loaded.complete:
            # A journal that may miss records does not say what the kernel held: list it.
            self.reconciler.forget_mirror()
        loaded.problems += problems
        for problem in loaded.problems:
            log.error("journal: %s", problem)
        self.journal_problems = loaded.problems
        log.info(
            "journal loaded: %d attachments%s",
            len(self.state),
            "" if loaded.found else " (no journal found: starting empty)",
        )

    async def recover_from_table(self) -> None:
        """Take over the attachments that the kernel's table names and the journal does not
        (see `adopt`). Journalled like any setup, so the next start finds them there."""
        try:
            observation = await self.backend.observe()
        except Exception as exc:
            log.error("cannot list table inet %s to adopt it: %s", self.config.table, exc)
            return
        if observation.table.structure is None:
            if self.journal_found:
                log.warning(
                    "journal not proven complete (%s), and table inet %s is not in the kernel: "
                    "nothing to adopt, starting from what the journal holds",
                    self.journal_incomplete,
                    self.config.table,
                )
            return
        found = recovery.recover(observation.table)
        unreadable = list(found.unreadable)
        taken = 0
        # The journal speaks for every key it names, deleted ones included: the last record
        # readable for a key wins over the table (a delete journalled but not yet applied
        # when the daemon died must not come back). Only keys it never names are adopted.
        deleted, self.state.replayed_deletes = self.state.replayed_deletes, set()
        for key, ips in found.attachments.items():
            if self.state.get(key) is not None or key in deleted:
                continue
            try:
                self.state.put(key, ips)
            except CapacityExceeded:
                unreadable.append(f"{'/'.join(key)}: beyond --max-attachments")
                continue
            taken += 1
        self.adopted = {"attachments": taken, "unreadable": len(unreadable)}
        log.warning(
            "%s, but table inet %s is in the kernel: adopted %d attachments the journal does "
            "not name from its element comments; %d elements unreadable (they will be removed)",
            f"journal not proven complete ({self.journal_incomplete})"
            if self.journal_found
            else "no journal",
            self.config.table,
            taken,
            len(unreadable),
        )
        for item in unreadable[:20]:
            log.warning("not adopted: %s", item)

    async def subscribe_events(self) -> None:
        """Subscribe to nftables events (see `events`) before the first sync, so that its
        whole-table transaction is made with them paused, not read back message by message.
        Without them, the generation poll remains."""
        if not isinstance(self.backend, KernelBackend):
            return
        try:
            sock = await self.backend.open_event_socket()
        except OSError as exc:
            log.warning("cannot subscribe to nftables events (%s): polling only", exc)
            return
        self.events = EventWatcher(sock, table=self.config.table, sink=self.reconciler)
        self.reconciler.events = self.events

    async def watch_events(self) -> None:
        if self.events is None:
            return
        try:
            await self.events.run()
        finally:
            self.reconciler.events = None

    def _seed_from_marker(self, marker: Entry) -> None:
        """Everything replayed so far was in the kernel at the marker's generation: hand that
        picture to the reconciler, which trusts it only if the generation has not moved."""
        if marker.fingerprint != policy_fingerprint(self.reconciler.policy):
            return  # the policy changed since: the kernel's structure differs, list it
        assert marker.generation is not None
        elements = {name: dict(elems) for name, elems in self.state.elements.items()}
        self.reconciler.seed(self.reconciler.baseline(elements), marker.generation)
        self.state.take_dirty()

    def prepare_spool_dir(self) -> None:
        """The DEL spool beside the socket (checked by `paths.prepare_socket_dir`), private."""
        try:
            # Anyone who can write there can delete attachments: keep it private.
            spool.ensure_spool_dir(self.spool_dir)
        except spool.UnsafeSpool as exc:
            self._spool_refused(str(exc))
        except OSError as exc:
            log.warning("DEL spool %s: %s", self.spool_dir, exc)

    def _spool_refused(self, problem: str) -> None:
        if problem != self.spool_problem:
            log.error("DEL spool refused: %s", problem)
        self.spool_problem = problem

    def apply_spool(self) -> list[str]:
        """Apply spooled DELs to the desired state; the spool files to remove once applied."""
        try:
            scan = spool.read_spooled_deletes(self.spool_dir)
        except spool.UnsafeSpool as exc:
            self._spool_refused(str(exc))
            return []
        except OSError as exc:
            log.error("cannot read the DEL spool %s: %s", self.spool_dir, exc)
            return []
        if self.spool_problem is not None:
            log.info("DEL spool %s is the daemon's alone again", self.spool_dir)
            self.spool_problem = None
        done: list[str] = []
        for problem in scan.problems:
            log.warning("DEL spool: %s: %s", problem.path, problem.reason)
            if problem.removable:
                self._remove_spooled(problem.path)
        for entry in scan.entries:
            try:
                key = AttachmentRef(
                    network=entry.network, container_id=entry.container_id, ifname=entry.ifname
                ).as_tuple()
            except ValueError:
                log.warning("DEL spool: %s names no valid attachment; dropped", entry.path)
                self._remove_spooled(entry.path)
                continue
            removed = self.state.delete(key)
            log.info(
                "applied spooled DEL of %s (%s)",
                "/".join(key),
                "removed" if removed else "already absent",
            )
            done.append(entry.path)
        return done

    def open_api_socket(self) -> socket.socket:
        passed = listen_fds()
        if passed:
            log.info("serving the API on the socket passed by systemd")
            return passed[0]
        try:
            return unix_listener(self.config.socket)
        except OSError as exc:
            raise paths.StartupError(
                f"socket {self.config.socket}: {exc.strerror or exc}"
            ) from None

    # ---- run ---------------------------------------------------------------------------

    def healthy(self) -> bool:
        """For the watchdog: the loop runs (we are called) and no sync is stuck."""
        return self.reconciler.sync_age() < STUCK_SYNC_SECONDS

    def extra_status(self) -> dict[str, Any]:
        return {
            "journal_problems": self.journal_problems[:20],
            "journal_incomplete": self.journal_incomplete,
            "adopted": self.adopted,
            "events": self.events.status() if self.events else {"subscribed": False},
            "metrics_address": self.metrics_address,
            "socket": self.config.socket,
            "state_dir": self.config.state_dir,
            "spool": {"dir": self.spool_dir, "problem": self.spool_problem},
        }

    async def run(self) -> None:
        """Start, serve until a stop signal, stop. StartupError when the daemon cannot start."""
        paths.prepare_state_dir(self.config.state_dir)
        # Before anything reads the journal or opens the socket: a second daemon on this
        # state directory stops here (StateDirBusy, a StartupError), having changed nothing.
        self.lock.acquire()
        try:
            paths.prepare_socket_dir(self.config.socket)
            await self._run_locked()
        finally:
            self.lock.release()

    async def _run_locked(self) -> None:
        # Before any listener: the nftables sockets must get low descriptor numbers (see
        # nft.LibNftables), and the listeners' caps must fit the descriptor limit.
        await self.backend.open()
        guard, caps = fdlimit.prepare(
            api=self.config.max_connections, metrics=self.config.metrics_max_connections
        )
        tune_allocator()
        # Replaying 100,000 attachments allocates a million long-lived objects: collecting
        # while they are made cost half the load time, and freezing them afterwards keeps
        # every later full collection from walking them again.
        gc.disable()
        try:
            self.load_journal()
        finally:
            gc.enable()
            gc.freeze()
            release_heap()
        if self.journal_incomplete is not None:
            await self.recover_from_table()
        self.state.replayed_deletes = set()
        self.prepare_spool_dir()
        spooled = self.apply_spool()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")

        ctx = ApiContext(
            state=self.state,
            reconciler=self.reconciler,
            metrics=self.metrics,
            access=AccessPolicy(
                frozenset(self.config.allow_uid),
                frozenset(self.config.allow_gid),
                peer_groups=peer_groups,
            ),
            apply_timeout=self.config.apply_timeout,
            client_timeout=self.config.client_timeout,
            table=self.config.table,
            extra_status=self.extra_status,
            migrator=self.migrator,
        )
        api_runner = web.AppRunner(build_app(ctx), access_log=None, shutdown_timeout=2.0)
        await api_runner.setup()
        metrics_runner = await self._start_metrics(caps.metrics, guard)
        try:
            await LimitedSockSite(
                api_runner,
                self.open_api_socket(),
                max_connections=caps.api,
                send_timeout=self.config.client_timeout,
                guard=guard,
                on_refused=self.metrics.refusals("api"),
            ).start()
            await self.subscribe_events()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.reconciler.run(), name="reconciler")
                tasks.create_task(self.reconciler.watch_generation(), name="generation-watch")
                tasks.create_task(self.watch_events(), name="nft-events")
                tasks.create_task(self._announce_ready(spooled), name="ready")
                tasks.create_task(self._watch_spool(), name="spool-watch")
                tasks.create_task(watchdog_loop(self.notifier, self.healthy), name="watchdog")
                tasks.create_task(self._reload_loop(), name="reload")
                tasks.create_task(self._watch_config(), name="config-watch")
                if self.config.adopt_cni_plugins_rules:
                    tasks.create_task(self._adopt_at_startup(), name="adopt-cni-plugins")
                await self._stop.wait()
                log.info("stopping; table inet %s stays in the kernel", self.config.table)
                self.notifier.stopping()
                # Stop taking requests first, so none is left waiting on a reconciler
                # that is about to go away ...
                await api_runner.cleanup()
                if metrics_runner is not None:
                    await metrics_runner.cleanup()
                # ... then end the loops (a transaction in flight completes in its thread).
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            await api_runner.cleanup()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await self.backend.close()
            self.journal.close()
            self.notifier.close()

    async def _announce_ready(self, spooled: list[str]) -> None:
        await self.reconciler.first_sync_done.wait()
        for path in spooled:
            self._remove_spooled(path)
        self.notifier.ready(f"serving {len(self.state)} attachments")
        log.info("ready: %d attachments, table inet %s", len(self.state), self.config.table)
        while True:
            await asyncio.sleep(10)
            s = self.reconciler.stats
            health = "ready" if self.reconciler.ready else "NOT READY"
            self.notifier.status(
                f"{len(self.state)} attachments; {health}"
                f"; syncs {s.total}, failures {s.failures}, drift repairs {s.drift_repairs}"
            )

    async def _watch_spool(self) -> None:
        watcher = spool.SpoolWatcher(self.spool_dir)
        await self.reconciler.first_sync_done.wait()
        retry = False  # entries applied but not confirmed: the directory may not change again
        while True:
            await asyncio.sleep(SPOOL_POLL_SECONDS)
            if not (watcher.poll() or retry):
                continue
            applied = self.apply_spool()
            retry = False
            if not applied:
                continue
            try:
                await self.reconciler.commit(self.config.apply_timeout)
            except SyncUnavailable as exc:
                log.warning("spooled DELs not confirmed yet (%s); will retry", exc)
                retry = True
                continue
            for path in applied:
                self._remove_spooled(path)

    def _remove_spooled(self, path: str) -> None:
        try:
            spool.remove(path)
        except spool.UnsafeSpool as exc:
            self._spool_refused(str(exc))
        except OSError as exc:
            log.warning("cannot remove %s from the DEL spool: %s", path, exc)

    async def _start_metrics(
        self, max_connections: int, guard: fdlimit.Guard
    ) -> web.AppRunner | None:
        if not self.config.metrics_listen:
            return None
        runner, self.metrics_address = await serve_metrics(
            self.metrics,
            self.config.metrics_listen,
            ready=lambda: self.reconciler.ready,
            max_connections=max_connections,
            client_timeout=self.config.client_timeout,
            guard=guard,
        )
        log.info("metrics on http://%s/metrics", self.metrics_address)
        return runner

    # ---- SIGHUP, config changes and adoption -----------------------------------------------

    def request_reload(self, cause: str) -> None:
        self._reload_cause = cause
        self._reload.set()

    def watched_files(self) -> list[str]:
        if self.loader is None:
            return []
        files = [self.loader.path]
        if self.loader.ip_masq_agent_path:
            files.append(self.loader.ip_masq_agent_path)
        return files

    async def _watch_config(self) -> None:
        """Reload when a config file's content changes (see `watch`); SIGHUP remains."""
        files = self.watched_files()
        if not files:
            return
        assert self.loader is not None
        watcher = ConfigWatcher(
            files,
            baseline=self.loader.digests,
            on_change=lambda: self.request_reload("config file changed"),
        )
        try:
            await watcher.run()
        except OSError as exc:
            log.warning("cannot watch the config files (%s); SIGHUP still reloads", exc)

    def reload_config(self, cause: str = "SIGHUP") -> Policy | None:
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

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            cause = self._reload_cause
            policy = self.reload_config(cause)
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

    async def _adopt_at_startup(self) -> None:
        await self.reconciler.first_sync_done.wait()
        if self.migrator is None:
            log.error("--adopt-cni-plugins-rules needs the kernel backend; nothing adopted")
            return
        try:
            report = await self.migrator.adopt()
        except (AdoptionError, KernelUnavailable) as exc:
            log.error("adopting the CNI plugins' rules failed, legacy rules kept: %s", exc)
            return
        if not report.found:
            log.info("no table inet %s to adopt", self.migrator.table)


class _Shutdown(Exception):
    """Raised inside the task group to cancel its tasks on a stop signal."""


def main(argv: Sequence[str] | None = None) -> None:
    loader = ConfigLoader(argv)
    config = loader.load_or_exit()
    logging.basicConfig(
        level=log_level(config.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A fault that repeats must not flood the log (see logrepeat).
    logrepeat.install()
    # pyroute2 logs every netlink message at debug: far too much even for our debug.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        log.warning("not running as root: nftables needs CAP_NET_ADMIN")
    for level, note in loader.take_notes():
        log.log(level, "%s", note)
    for name in unknown_environment(loader.environ):
        log.warning("environment variable %s names no masqd setting; ignored", name)
    log.info(
        "masqd %s starting (table inet %s, socket %s, config %s%s)",
        __version__,
        config.table,
        config.socket,
        loader.path,
        "" if os.path.exists(loader.path) else ", absent",
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Daemon(config, loader=loader).run())
    except paths.StartupError as exc:
        # One line, no traceback: what is wrong and where (the log has the same line).
        log.critical("cannot start: %s", exc)
        logging.shutdown()
        sys.exit(1)
    # Everything is closed and on disk. Skip the interpreter's teardown: freeing a few million
    # objects one by one (and a last collection over those made since start-up) took 1.4 s
    # at 100,000 attachments, during which a restart's requests wait on the socket.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""`Daemon`: the parts wired together, and their life: `startup()`, `serve()`, `shutdown()`.

It is built from an injected backend, notifier and clock (the wall clock of the sync
timestamps in status and metrics; every wait is on the event loop's clock), so a test runs it
in-process on the fake backend without root (tests/inprocess.py); `main` builds it on the
kernel. Start-up, in order:
0. lock the state directory (`statedir`): a second daemon on it refuses to start;
1. open the nftables sockets (so they get low descriptor numbers) and fit the listeners'
   connection caps under the descriptor limit (`fdlimit`);
2. restore the desired state: the journal, then the table if the journal is not proven
   complete (`restore`);
3. apply the DELs that the CNI plugin spooled while the daemon was away (`spool_drain`);
4. open the metrics port and the API socket (the one systemd passed, or our own), so
   requests queue meanwhile, and subscribe to nftables events.
Then `serve()`:
5. the first sync: it lists the table, unless the journal's last sync marker shows the
   kernel unchanged since, and changes only what differs, so a restart never takes a
   working rule away;
6. report ready (sd_notify READY=1, /readyz 200), and run until `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from masqd import fdlimit, paths
from masqd.activation import listen_fds, unix_listener
from masqd.api.exporter import serve_metrics
from masqd.api.handlers import AccessPolicy, ApiContext, build_app
from masqd.api.server import LimitedSockSite
from masqd.config import ConfigLoader, DaemonConfig
from masqd.daemon.cni_adoption import adopt_after_first_sync
from masqd.daemon.reload import ConfigReloader
from masqd.daemon.restore import Restored, restore
from masqd.daemon.spool_drain import SpoolDrain
from masqd.kernel.backend import Backend, EventSource
from masqd.kernel.peergroups import peer_groups
from masqd.metrics import Metrics
from masqd.migrate import Migrator
from masqd.reconcile.reconciler import Reconciler
from masqd.sdnotify import Notifier, watchdog_loop
from masqd.state import spool
from masqd.state.desired import DesiredState
from masqd.state.journal import Journal
from masqd.state.statedir import StateDirLock

log = logging.getLogger(__name__)

STUCK_SYNC_SECONDS = 60.0
STATUS_SECONDS = 10.0  # how often systemd's status line is refreshed


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        backend: Backend,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        loader: ConfigLoader | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.journal = Journal(Path(config.state_dir))
        self.lock = StateDirLock(Path(config.state_dir))
        self.state = DesiredState(journal=self.journal, max_attachments=config.max_attachments)
        self.reconciler = Reconciler(
            state=self.state,
            backend=backend,
            table=config.table,
            policy=config.policy,
            metrics=self.metrics,
            journal=self.journal,
            resync_interval=config.resync_interval,
            wall_clock=clock,
        )
        self.spool = SpoolDrain(
            directory=spool.spool_dir_for(config.socket),
            state=self.state,
            reconciler=self.reconciler,
            apply_timeout=config.apply_timeout,
        )
        self.reloader = ConfigReloader(
            config=config, loader=loader, reconciler=self.reconciler, metrics=self.metrics
        )
        self.migrator = Migrator(
            state=self.state,
            reconciler=self.reconciler,
            nft=backend,
            masqd_table=config.table,
            apply_timeout=config.apply_timeout,
        )
        self.restored = Restored()
        self.events: EventSource | None = None
        self.metrics_address: str | None = None
        self._spooled: list[str] = []  # applied at start-up; removed once the first sync is done
        self._runners: list[web.AppRunner] = []  # the listeners: API, then metrics
        self._stop = asyncio.Event()

    # ---- the life of the daemon ------------------------------------------------------------

    async def startup(self) -> None:
        """Steps 0 to 4 (see the module's doc). StartupError when the daemon cannot start;
        `shutdown()` then undoes what was done."""
        # 0. The state directory, locked before anything reads the journal or opens the
        #    socket: a second daemon on it stops here (StateDirBusy), having changed nothing.
        paths.prepare_state_dir(self.config.state_dir)
        self.lock.acquire()
        paths.prepare_socket_dir(self.config.socket)
        # 1. The nftables sockets before any listener (they need low descriptor numbers, see
        #    nft.LibNftables); then the listeners' caps, fitted under the descriptor limit.
        await self.backend.open()
        guard, caps = fdlimit.prepare(
            api=self.config.max_connections, metrics=self.config.metrics_max_connections
        )
        # 2. The desired state: the journal, then the kernel's table if need be.
        self.restored = await restore(
            self.state, self.journal, self.reconciler, self.backend, self.config.table
        )
        # 3. The DELs spooled while the daemon was away (their files go after the first sync).
        self.spool.prepare()
        self._spooled = self.spool.apply()
        # 4. The listeners (requests queue until the first sync is done), then the events:
        #    the first sync's whole-table transaction is then made with them paused.
        await self._listen(caps.api, caps.metrics, guard)
        await self._subscribe_events()

    async def serve(self) -> None:
        """Steps 5 and 6, then the daemon's loops until `stop()`: they end only once no
        request is taken any more, so that none is left waiting on a reconciler gone away."""
        jobs: dict[str, Coroutine[Any, Any, None]] = {
            "reconciler": self.reconciler.run(),
            "generation-watch": self.reconciler.watch_generation(),
            "nft-events": self._watch_events(),
            "ready": self._announce_ready(),
            "spool-watch": self.spool.run(),
            "watchdog": watchdog_loop(self.notifier, self.healthy),
            "reload": self.reloader.run(),
            "config-watch": self.reloader.watch(),
        }
        if self.config.adopt_cni_plugins_rules:
            jobs["adopt-cni-plugins"] = adopt_after_first_sync(
                self.migrator, self.reconciler.first_sync_done
            )
        try:
            async with asyncio.TaskGroup() as tasks:
                for name, job in jobs.items():
                    tasks.create_task(job, name=name)
                await self._stop.wait()
                log.info("stopping; table inet %s stays in the kernel", self.config.table)
                # Tell systemd, and stop taking requests while the loops still run: a request
                # in flight gets its answer. Then end the loops (a transaction in flight
                # completes in its thread).
                await self._stop_listening()
                raise _Shutdown
        except* _Shutdown:
            pass

    async def shutdown(self) -> None:
        """Stop in order; safe after a start-up that failed half-way, and to repeat. The table
        stays in the kernel: containers keep their masquerade while the daemon is away."""
        # Stop taking requests (done already when `serve()` ran to its end).
        await self._stop_listening()
        # The nftables sockets, once no loop uses them.
        await self.backend.close()
        # Everything acknowledged is in the journal; close it.
        self.journal.close()
        self.notifier.close()
        # Last: another daemon may take the state directory from here on.
        self.lock.release()

    def stop(self) -> None:
        """Ask `serve()` to end (SIGTERM, SIGINT)."""
        self._stop.set()

    def request_reload(self, cause: str) -> None:
        """Re-read the config file (SIGHUP)."""
        self.reloader.request(cause)

    # ---- what the API and the watchdog read ----------------------------------------------

    def healthy(self) -> bool:
        """For the watchdog: the loop runs (we are called) and no sync is stuck."""
        return self.reconciler.sync_age() < STUCK_SYNC_SECONDS

    def extra_status(self) -> dict[str, Any]:
        return {
            "journal_problems": self.restored.problems[:20],
            "journal_incomplete": self.restored.incomplete,
            "adopted": self.restored.adopted,
            "events": self.events.status() if self.events else {"subscribed": False},
            "metrics_address": self.metrics_address,
            "socket": self.config.socket,
            "state_dir": self.config.state_dir,
            "spool": {"dir": self.spool.directory, "problem": self.spool.problem},
        }

    # ---- the steps -----------------------------------------------------------------------

    async def _listen(self, api_cap: int, metrics_cap: int, guard: fdlimit.Guard) -> None:
        config = self.config
        ctx = ApiContext(
            state=self.state,
            reconciler=self.reconciler,
            metrics=self.metrics,
            access=AccessPolicy(
                frozenset(config.allow_uid), frozenset(config.allow_gid), peer_groups=peer_groups
            ),
            apply_timeout=config.apply_timeout,
            client_timeout=config.client_timeout,
            table=config.table,
            extra_status=self.extra_status,
            migrator=self.migrator,
        )
        api = web.AppRunner(build_app(ctx), access_log=None, shutdown_timeout=2.0)
        await api.setup()
        self._runners.append(api)
        if config.metrics_listen:
            metrics, self.metrics_address = await serve_metrics(
                self.metrics,
                config.metrics_listen,
                ready=lambda: self.reconciler.ready,
                max_connections=metrics_cap,
                client_timeout=config.client_timeout,
                guard=guard,
            )
            self._runners.append(metrics)
            log.info("metrics on http://%s/metrics", self.metrics_address)
        site = LimitedSockSite(
            api,
            self._api_socket(),
            max_connections=api_cap,
            send_timeout=config.client_timeout,
            guard=guard,
            on_refused=self.metrics.refusals("api"),
        )
        await site.start()

    def _api_socket(self) -> socket.socket:
        passed = listen_fds()
        if passed:
            log.info("serving the API on the socket passed by systemd")
            return passed[0]
        try:
            return unix_listener(self.config.socket)
        except OSError as exc:
            problem = exc.strerror or exc
            raise paths.StartupError(f"socket {self.config.socket}: {problem}") from None

    async def _subscribe_events(self) -> None:
        # Before the first sync, so that its whole-table transaction is made with events
        # paused, not read back message by message. Without them the generation poll remains.
        try:
            self.events = await self.backend.subscribe(self.reconciler)
        except OSError as exc:
            log.warning("cannot subscribe to nftables events (%s): polling only", exc)
            return
        self.reconciler.events = self.events

    async def _watch_events(self) -> None:
        if self.events is None:
            return
        try:
            await self.events.run()
        finally:
            self.reconciler.events = None

    async def _announce_ready(self) -> None:
        await self.reconciler.first_sync_done.wait()
        for path in self._spooled:
            self.spool.remove(path)
        self.notifier.ready(f"serving {len(self.state)} attachments")
        log.info("ready: %d attachments, table inet %s", len(self.state), self.config.table)
        while True:
            await asyncio.sleep(STATUS_SECONDS)
            s = self.reconciler.stats
            health = "ready" if self.reconciler.ready else "NOT READY"
            self.notifier.status(
                f"{len(self.state)} attachments; {health}"
                f"; syncs {s.total}, failures {s.failures}, drift repairs {s.drift_repairs}"
            )

    async def _stop_listening(self) -> None:
        if self._runners:
            self.notifier.stopping()  # tell systemd first: it may start the next daemon
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


class _Shutdown(Exception):
    """Raised inside the task group to cancel its tasks on a stop signal."""

"""masqd's `Daemon` in the test's own process, on the fake backend: no root needed.

The same wiring `masqd` runs (`masqd.daemon.lifecycle.Daemon`, built by `ConfigLoader` from
flags), with the backend, the notifier and the clock injected: the real aiohttp server on a
real Unix socket in a temporary directory, the real journal and spool on disk, the real
reconciler, and `FakeBackend` instead of the kernel. `InProcessDaemon` runs it in a thread
with an event loop of its own, so that tests talk to it with the blocking `Client` (and
`masqctl`'s code) as they talk to the real process; `call` runs a function on the daemon's
loop (the fake is not thread-safe).

Tests that need the kernel's nftables use `MasqdProcess` (tests/daemon.py) instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from masqd.config import ConfigLoader
from masqd.daemon.lifecycle import Daemon
from masqd.kernel.fake import FakeBackend
from masqd.sdnotify import Notifier
from tests.daemon import Client

T = TypeVar("T")
START_TIMEOUT = 20.0


def short_tmp() -> Path:
    """A temporary directory whose paths fit a Unix socket address (108 bytes)."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="masqd-ip-", dir=parent))


def daemon_args(workdir: Path, *extra: str) -> list[str]:
    """masqd's flags for a daemon whose files are all under `workdir`."""
    return [
        "--config",
        str(workdir / "masqd.toml"),
        "--socket",
        str(workdir / "run" / "masqd.sock"),
        "--state-dir",
        str(workdir / "state"),
        "--metrics-listen",
        "",
        *extra,
    ]


def build_daemon(
    workdir: Path,
    *extra: str,
    backend: FakeBackend | None = None,
    notifier: Notifier | None = None,
    environ: dict[str, str] | None = None,
) -> Daemon:
    """A Daemon as `masqd` builds one from its flags (and no MASQD_* variable), on the fake.
    Its config file is `workdir`/masqd.toml, empty unless the test wrote one."""
    (workdir / "masqd.toml").touch()
    loader = ConfigLoader(daemon_args(workdir, *extra), environ=environ or {})
    config = loader.load()
    return Daemon(
        config,
        backend=backend if backend is not None else FakeBackend(table=config.table),
        notifier=notifier if notifier is not None else Notifier(environ={}),
        loader=loader,
    )


class InProcessDaemon:
    """A started `Daemon` on its own thread and loop; `stop()` ends it in order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.backend = daemon.backend
        assert isinstance(self.backend, FakeBackend)
        self.fake: FakeBackend = self.backend
        self.socket = daemon.config.socket
        self.client = Client(self.socket)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="masqd-inprocess", daemon=True)

    def start(self) -> None:
        """Start, and return once the first sync is done (ready); raise what start-up raised."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("the in-process daemon did not become ready")
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        daemon = self.daemon
        try:
            await daemon.startup()
            serving = asyncio.create_task(daemon.serve())
            first = asyncio.create_task(daemon.reconciler.first_sync_done.wait())
            await asyncio.wait([serving, first], return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            await serving
        finally:
            await daemon.shutdown()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the daemon's loop, between its steps; its result."""
        assert self.loop is not None
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    def run(self, coro: Any) -> Any:
        """Await `coro` on the daemon's loop; its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def dump(self) -> str:
        """The fake kernel's table as sorted text (`FakeBackend.dump`)."""
        return self.call(self.fake.dump)

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the in-process daemon did not stop"


@contextmanager
def running_inprocess(
    *extra: str,
    workdir: Path | None = None,
    backend: FakeBackend | None = None,
    notifier: Notifier | None = None,
) -> Iterator[InProcessDaemon]:
    """A ready in-process daemon with `extra` flags; stopped and its files removed after."""
    own = workdir is None
    workdir = short_tmp() if workdir is None else workdir
    try:
        d = InProcessDaemon(build_daemon(workdir, *extra, backend=backend, notifier=notifier))
        d.start()
        try:
            yield d
        finally:
            d.stop()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)

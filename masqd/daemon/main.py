"""`masqd`: the process around the daemon.

What is process-wide lives here, not in `Daemon` (which a test runs in-process): logging,
the allocator's tuning, the collector's freeze after start-up, the signal handlers, and
leaving through `os._exit` once everything is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from masqd import __version__, logrepeat, paths
from masqd.config import ConfigLoader, log_level, unknown_environment
from masqd.daemon.lifecycle import Daemon
from masqd.kernel.memory import release_heap, tune_allocator
from masqd.kernel.nft import KernelBackend

log = logging.getLogger("masqd.daemon")


async def run(daemon: Daemon) -> None:
    """The daemon's life, with the process-wide tuning around it."""
    # Signals first: a stop asked for during start-up ends the daemon as soon as it serves.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload, "SIGHUP")
    tune_allocator()
    # Replaying 100,000 attachments allocates a million long-lived objects: collecting while
    # they are made cost half the load time, and freezing them afterwards keeps every later
    # full collection from walking them again.
    gc.disable()
    try:
        try:
            await daemon.startup()
        finally:
            gc.enable()
            gc.freeze()
            release_heap()
        await daemon.serve()
    finally:
        await daemon.shutdown()


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
    backend = KernelBackend(table=config.table, runner=config.nft_runner)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(Daemon(config, backend=backend, loader=loader)))
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

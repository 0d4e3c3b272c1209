"""The sd_notify protocol: telling the service manager we are ready, alive, or stopping.

The protocol is one datagram of newline-separated `KEY=value` lines sent to the Unix socket
named by NOTIFY_SOCKET (a path, or an abstract address written with a leading '@'). It is
small enough that the standard library does it; libsystemd would be a C dependency for
twenty lines.

Notification is advisory. When NOTIFY_SOCKET is unset (not under systemd, or a unit without
Type=notify) every call is a no-op, and a failed send is logged once at debug and otherwise
ignored: the daemon must never stop doing its job because the service manager went away.
The socket is non-blocking so a stuck receiver cannot stall the event loop.

The watchdog is driven by `watchdog_loop`, which pings at half of WATCHDOG_USEC only while
the daemon says it is healthy, so a wedged reconciler gets the process restarted. Time comes
from the event loop's clock only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """The AF_UNIX address NOTIFY_SOCKET names, or None for a form we do not speak."""
    if value.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _environ_pid_matches(environ: Mapping[str, str], key: str) -> bool:
    """True when `key` is unset or names this process (the variable was meant for us)."""
    value = environ.get(key)
    if value is None:
        return True
    try:
        return int(value) == os.getpid()
    except ValueError:
        return False


class Notifier:
    """Sends sd_notify messages to the service manager, or nothing when there is none."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.debug("NOTIFY_SOCKET=%s is not a path or @abstract address: not notifying", raw)
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_for_us = _environ_pid_matches(env, "WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True if the manager got them."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failure_logged:
                # Once: a manager that is gone stays gone, and the log should not fill up.
                log.debug("sd_notify send failed (%s); further failures are not logged", exc)
                self._failure_logged = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup finished (for masqd: the first reconcile succeeded)."""
        return self.send("READY=1", *([_status_line(status)] if status is not None else []))

    def status(self, text: str) -> bool:
        """STATUS=: one line that `systemctl status` shows."""
        return self.send(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send("STOPPING=1", *([_status_line(status)] if status is not None else []))

    def watchdog_interval(self) -> float | None:
        """The full watchdog timeout in seconds (ping at half of it), or None if there is none.

        None when the watchdog is off, the variables were meant for another process
        (WATCHDOG_PID), or there is no socket to ping.
        """
        if self._address is None or not self._watchdog_for_us or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return "STATUS=" + " ".join(text.splitlines())


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping the watchdog at half its interval while `healthy()` holds; returns if there is none.

    When the daemon is unhealthy the pings stop, and systemd restarts the service once the
    watchdog timeout passes. Pinging resumes if health comes back before that.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    period = interval / 2
    loop = asyncio.get_running_loop()
    was_healthy = True
    deadline = loop.time()
    while True:
        is_healthy = healthy()
        if is_healthy:
            notifier.watchdog()
        if is_healthy != was_healthy:
            if is_healthy:
                log.info("daemon healthy again, watchdog pings resumed")
            else:
                log.warning(
                    "daemon unhealthy: watchdog pings withheld (systemd restarts us after %gs)",
                    interval,
                )
            was_healthy = is_healthy
        # Scheduled from a fixed origin so pings do not drift later and later; after a stalled
        # loop, ping at once rather than in a catch-up burst.
        deadline = max(deadline + period, loop.time())
        await asyncio.sleep(max(0.0, deadline - loop.time()))

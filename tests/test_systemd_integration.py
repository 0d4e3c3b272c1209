"""The real daemon as systemd runs it: socket-activated, notifying, with the unit's privileges.

`systemd-socket-activate` plays PID 1's part: it binds the API socket, hands it over on the
first connection (LISTEN_FDS), and passes NOTIFY_SOCKET and WATCHDOG_USEC. The daemon runs
inside a throwaway network namespace with what masqd.service grants it (CAP_NET_ADMIN only,
no_new_privs, MemoryDenyWriteExecute; see tests/sandbox.py), and the test listens on the
notification socket as systemd would.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import sandbox
from tests.daemon import MasqdProcess, masqueraded, short_workdir
from tests.netns import netns

WATCHDOG_USEC = 400_000  # pings expected every 0.2 s

pytestmark = [pytest.mark.kernel, sandbox.needs_unit_privileges]


@dataclass
class ActivatedMasqd(MasqdProcess):
    """masqd started the way masqd.socket + masqd.service start it."""

    notify_socket: str = ""
    watchdog_usec: int | None = WATCHDOG_USEC

    def argv(self) -> list[str]:
        plain = super().argv()
        assert plain[:4] == ["ip", "netns", "exec", self.ns]
        usec = self.watchdog_usec
        watchdog = [] if usec is None else [f"--setenv=WATCHDOG_USEC={usec}"]
        return [
            "ip", "netns", "exec", self.ns,
            "systemd-socket-activate", "--listen", self.socket,
            f"--setenv=NOTIFY_SOCKET={self.notify_socket}",
            *watchdog,
            "--",
            *sandbox.unit_privileges(*plain[4:]),
        ]  # fmt: skip


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket collecting what the daemon sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[tuple[float, dict[str, str]]] = []

    def _read(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        self.received.append((time.monotonic(), fields))
        return True

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        """The first message (received so far or arriving within `timeout`) carrying `key`."""
        deadline = time.monotonic() + timeout
        while True:
            for _, fields in self.received:
                if key in fields:
                    return fields
            if not self._read(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise AssertionError(f"no {key} within {timeout}s; got {self.received}")

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives during the next `seconds`."""
        start = len(self.received)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)
        return [fields for _, fields in self.received[start:]]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def activated() -> Iterator[tuple[ActivatedMasqd, NotifyListener]]:
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns("sd"))
        workdir = short_workdir()
        daemon = ActivatedMasqd(ns=ns, workdir=workdir, notify_socket=str(workdir / "notify"))
        stack.callback(daemon.close)
        listener = NotifyListener(daemon.notify_socket)
        stack.callback(listener.close)
        yield daemon, listener


def wait_listening(path: str, timeout: float = 5.0) -> None:
    """Until something listens on `path` (here: the activator, which then starts masqd)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_socket_activated_daemon_serves_notifies_and_leaves_the_table_on_stop(
    activated: tuple[ActivatedMasqd, NotifyListener],
) -> None:
    daemon, notify = activated
    daemon.start(wait=False)
    assert daemon.proc is not None

    # The socket listens before the daemon runs; the first connection starts the daemon, and
    # a request sent while it starts waits in the socket's backlog instead of failing.
    wait_listening(daemon.socket)
    assert daemon.client.get("/healthz").status == 200
    daemon.wait_ready()
    assert "serving the API on the socket passed by systemd" in daemon.log_tail(200)

    ready = notify.wait_for("READY", timeout=10)
    assert ready["READY"] == "1"
    assert "attachments" in ready.get("STATUS", "")

    # It runs with the unit's privileges, not as full root.
    status = proc_status(daemon.proc.pid)
    assert int(status["CapEff"], 16) == sandbox.CAP_NET_ADMIN_MASK
    assert int(status["CapBnd"], 16) == sandbox.CAP_NET_ADMIN_MASK
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"

    # Requests work end to end on the passed socket.
    ips = ["198.18.7.2/24", "2001:db8:7::2/64"]
    put = daemon.client.put_attachment("net1", "ctr1", "eth0", ips)
    assert put.status == 200, put.body
    assert {"198.18.7.2", "2001:db8:7::2"} <= masqueraded(daemon.ns)

    # Watchdog pings at half of WATCHDOG_USEC while healthy.
    pings = [m for m in notify.collect(1.0) if m.get("WATCHDOG") == "1"]
    assert 3 <= len(pings) <= 7, pings

    # SIGTERM (systemctl stop): STOPPING=1, a clean exit, and the table stays in the kernel.
    assert daemon.stop() == 0
    notify.wait_for("STOPPING", timeout=1)
    assert {"198.18.7.2", "2001:db8:7::2"} <= masqueraded(daemon.ns)


def test_without_a_watchdog_there_are_no_pings(
    activated: tuple[ActivatedMasqd, NotifyListener],
) -> None:
    daemon, notify = activated
    daemon.watchdog_usec = None
    daemon.start(wait=False)
    wait_listening(daemon.socket)
    daemon.wait_ready()
    notify.wait_for("READY", timeout=10)
    assert not [m for m in notify.collect(0.6) if "WATCHDOG" in m]
    assert daemon.stop() == 0
    notify.wait_for("STOPPING", timeout=1)

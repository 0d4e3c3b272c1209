"""sd_notify messages reach a real NOTIFY_SOCKET, and the watchdog pings only while healthy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd.sdnotify import Notifier, watchdog_loop


@contextlib.contextmanager
def receiver(address: str) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return messages


@pytest.fixture
def notify_path(tmp_path: Path) -> str:
    return str(tmp_path / "notify.sock")


def test_without_notify_socket_every_call_is_a_quiet_no_op() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval() is None


def test_ready_status_watchdog_stopping_arrive_on_a_path_socket(notify_path: str) -> None:
    with receiver(notify_path) as sock:
        notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path})
        assert notifier.ready(status="synced 3 attachments")
        assert notifier.status("resyncing")
        assert notifier.watchdog()
        assert notifier.stopping()
        got = [sock.recv(4096).decode() for _ in range(4)]
        notifier.close()
    assert got == [
        "READY=1\nSTATUS=synced 3 attachments",
        "STATUS=resyncing",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_abstract_address_written_with_at_sign() -> None:
    name = f"masqd-test-{uuid.uuid4().hex}"
    with receiver("\0" + name) as sock:
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


def test_status_text_cannot_inject_assignments(notify_path: str) -> None:
    with receiver(notify_path) as sock:
        notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path})
        notifier.status("line one\nREADY=1")
        assert sock.recv(4096) == b"STATUS=line one READY=1"
        notifier.close()


def test_send_failure_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="masqd.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("sd_notify send failed")
    assert caplog.records[0].levelno == logging.DEBUG
    notifier.close()


def test_full_receiver_queue_drops_messages_instead_of_blocking(notify_path: str) -> None:
    with receiver(notify_path):
        notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path})
        started = time.monotonic()
        # Nobody reads: the kernel queue fills (max_dgram_qlen) and sends must fail, not block.
        results = [notifier.watchdog() for _ in range(5000)]
        assert time.monotonic() - started < 2.0
        assert results[0] is True
        assert results[-1] is False
        notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_honours_usec_and_pid(
    notify_path: str, environ: dict[str, str], expected: float | None
) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path, **environ})
    assert notifier.watchdog_interval() == expected


def test_watchdog_interval_needs_a_socket() -> None:
    assert Notifier(environ={"WATCHDOG_USEC": "2000000"}).watchdog_interval() is None


@pytest.mark.looptime  # fake loop time: the sleeps below take no real time, and are exact
async def test_watchdog_loop_pings_at_half_interval_only_while_healthy(notify_path: str) -> None:
    healthy = True
    with receiver(notify_path) as sock:
        # 100 ms watchdog: a ping every 50 ms.
        notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "100000"})
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(watchdog_loop(notifier, lambda: healthy))
            await asyncio.sleep(0.325)  # pings at 0, 50, ..., 300 ms
            pings = drain(sock)
            assert set(pings) == {"WATCHDOG=1"}
            assert 4 <= len(pings) <= 8  # 7 on time; fewer if the machine is busy

            healthy = False
            await asyncio.sleep(0.2)
            assert drain(sock) == []

            healthy = True
            await asyncio.sleep(0.12)
            assert 1 <= len(drain(sock)) <= 4
            task.cancel()
        notifier.close()


@pytest.mark.looptime
async def test_watchdog_loop_returns_at_once_without_a_watchdog(notify_path: str) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": notify_path})
    await asyncio.wait_for(watchdog_loop(notifier, lambda: True), timeout=1.0)

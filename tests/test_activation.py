"""Socket activation with the real systemd-socket-activate, and the fallback listener's modes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd.activation import SocketInUseError, listen_fds, unix_listener

REPO = Path(__file__).resolve().parent.parent

# Runs as the activated process: reports what listen_fds() saw on every passed socket.
_CHILD = """
import json, os, socket
from masqd.activation import listen_fds
socks = listen_fds()
report = {
    "fds": [s.fileno() for s in socks],
    "families": [int(s.family) for s in socks],
    "types": [int(s.type) for s in socks],
    "inheritable": [os.get_inheritable(s.fileno()) for s in socks],
    "names": [s.getsockname() for s in socks],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
conn, _ = socks[0].accept()
conn.sendall(json.dumps(report).encode())
conn.close()
"""


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def socket_activate(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        ["systemd-socket-activate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=5)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
def test_sockets_passed_by_systemd_socket_activate_are_found(tmp_path: Path) -> None:
    first, second = str(tmp_path / "api.sock"), str(tmp_path / "other.sock")
    listen = ("-l", first, "-l", second, f"--setenv=PYTHONPATH={REPO}")
    command = (*listen, sys.executable, "-c", _CHILD)
    # systemd-socket-activate starts the child on the first connection, which then waits in
    # the passed socket's backlog until the child accepts it: the property the masqd.socket
    # unit relies on across restarts.
    with socket_activate(*command), connect(first) as client:
        report = json.loads(recv_all(client))
    assert report["fds"] == [3, 4]
    assert report["families"] == [socket.AF_UNIX] * 2
    assert report["types"] == [socket.SOCK_STREAM] * 2
    assert report["inheritable"] == [False, False]
    assert report["names"] == [first, second]
    assert report["env_left"] == []


def test_no_activation_variables_means_no_sockets() -> None:
    assert listen_fds(environ={}) == []


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    other = str(os.getpid() + 1)
    environ = {"LISTEN_PID": other, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "A": "1"}
    assert listen_fds(environ=environ) == []
    assert environ == {"A": "1"}


def test_variables_kept_when_asked() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(environ=environ, unset_environment=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


@pytest.mark.parametrize("count", ["one", "-1"])
def test_malformed_listen_fds_is_an_error(count: str) -> None:
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds(environ={"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count})


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_unix_listener_creates_private_directory_and_socket(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "run" / "masqd" / "masqd.sock"
    with unix_listener(str(path)) as server:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with connect(str(path)) as client:
            conn, _ = server.accept()
            conn.sendall(b"ok")
            assert client.recv(2) == b"ok"
            conn.close()


def test_unix_listener_honours_custom_modes(tmp_path: Path) -> None:
    path = tmp_path / "d" / "s.sock"
    with unix_listener(str(path), mode=0o600, dir_mode=0o700):
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unix_listener_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with unix_listener(str(tmp_path / "s.sock")):
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_stale_socket_file_from_a_dead_process_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays behind, as after a crash
    with unix_listener(path) as server, connect(path):
        server.accept()[0].close()


def test_live_socket_is_not_stolen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with unix_listener(path), pytest.raises(SocketInUseError):
        unix_listener(path)


def test_live_socket_with_a_full_backlog_is_not_stolen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with unix_listener(path, backlog=0), contextlib.ExitStack() as stack:
        # Fill the backlog so that a further connect would block.
        for _ in range(4):
            client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(path)
        with pytest.raises(SocketInUseError):
            unix_listener(path)


def test_a_path_that_is_not_a_socket_is_never_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        unix_listener(str(path))
    assert path.read_text() == "precious"

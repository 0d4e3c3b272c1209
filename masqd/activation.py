"""Where the API's listening socket comes from: systemd socket activation, or our own bind.

Under masqd.socket, systemd owns /run/masqd/masqd.sock and passes the listening socket to
the daemon (LISTEN_FDS, LISTEN_PID; descriptors from 3). Clients can connect while the
daemon restarts: their connections wait in the kernel's backlog, which is why the socket
unit exists. Without systemd the daemon binds the path itself with `unix_listener`.

The daemon does:

    socks = listen_fds()
    sock = socks[0] if socks else unix_listener(path)

Permissions are part of the security boundary (DESIGN: the socket is private, mode 0660),
so `unix_listener` never leaves the socket wider than asked, even for an instant, and never
deletes a path it does not recognise as a dead socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start right after stdio
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketInUseError(OSError):
    """Another process is serving on the socket path we were asked to bind."""


def listen_fds(
    *, environ: MutableMapping[str, str] | None = None, unset_environment: bool = True
) -> list[socket.socket]:
    """The sockets systemd passed to this process, in order; empty if none were.

    Like sd_listen_fds(3): the variables count only when LISTEN_PID names this process
    (otherwise they were meant for a parent and leaked to us). The descriptors are made
    close-on-exec, and by default the variables are removed so that no child process
    believes the sockets are its own. A malformed LISTEN_FDS is a broken unit: ValueError.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset_environment:
        for key in _ACTIVATION_VARS:
            env.pop(key, None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError as exc:
        raise ValueError(
            f"malformed socket activation variables LISTEN_PID={pid_text!r} "
            f"LISTEN_FDS={count_text!r}"
        ) from exc
    if pid != os.getpid():
        return []
    if count < 0:
        raise ValueError(f"malformed socket activation variable LISTEN_FDS={count_text!r}")
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        # fileno= lets Python read family, type and protocol from the descriptor itself.
        socks.append(socket.socket(fileno=fd))
    log.info("%d socket(s) passed by the service manager", count)
    return socks


def unix_listener(
    path: str, *, mode: int = 0o660, dir_mode: int = 0o750, backlog: int = socket.SOMAXCONN
) -> socket.socket:
    """A listening Unix stream socket bound at `path` with permission bits `mode`.

    The directory is created with `dir_mode` if it is missing (an existing directory is
    left as it is: it may be shared, like /tmp). A socket file that nobody listens on any
    more (left by a crash) is replaced; a live one raises SocketInUseError, and a path that
    is not a socket raises FileExistsError rather than being deleted.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=dir_mode)
        os.chmod(directory, dir_mode)  # makedirs' mode is filtered by the umask
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a umask that leaves only the owner, then widen to `mode`: the socket is
        # never connectable by anyone `mode` would not admit.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    log.info("listening on %s (mode %o)", path, mode)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "not a socket; refusing to replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live listener with a full backlog must not block us
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: the socket file of a process that is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale socket file %s (nobody listened on it)", path)
        return
    except BlockingIOError:
        pass  # backlog full: alive and busy
    finally:
        probe.close()
    raise SocketInUseError(errno.EADDRINUSE, "another process is serving on this socket", path)

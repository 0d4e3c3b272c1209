"""The supplementary groups of a Unix socket's peer (SO_PEERGROUPS, Linux 4.13): the groups
it had at connect().

Through libc's getsockopt: Python's takes at most 1,024 bytes (256 groups), and a user may be
in up to 65,536 groups. Here in `kernel`, the one package that calls the kernel through
ctypes; the API must not import `kernel`, so the daemon hands `peer_groups` to the API's
`AccessPolicy`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from typing import Protocol

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_FIRST_TRY = 64  # fits almost everyone; the kernel says how many when it does not
_libc = ctypes.CDLL(None, use_errno=True)


class HasFileno(Protocol):
    """A socket, or the `TransportSocket` asyncio hands out: fileno() is all it takes."""

    def fileno(self) -> int: ...


def peer_groups(sock: HasFileno) -> tuple[int, ...]:
    """The peer's supplementary group IDs (empty where the kernel cannot tell)."""
    count = _GROUPS_FIRST_TRY
    for _ in range(2):
        buf = (ctypes.c_uint32 * count)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        fd = sock.fileno()
        if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)) == 0:
            return tuple(buf[: size.value // ctypes.sizeof(ctypes.c_uint32)])
        err = ctypes.get_errno()
        if err != errno.ERANGE:
            log.warning("cannot read the peer's groups (SO_PEERGROUPS): %s", os.strerror(err))
            return ()
        count = size.value // ctypes.sizeof(ctypes.c_uint32)  # the size the kernel needs
    return ()

"""kernel.peergroups: a Unix socket peer's supplementary groups, read through libc.

The daemon's access check admits `allow_gid` members by these groups (tests/test_access.py
drives that end to end). Here the reader alone, on a socketpair, whose peer is this very
process: its groups are ours.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from masqd.kernel.peergroups import peer_groups


def test_a_socketpair_peer_has_our_supplementary_groups() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert sorted(peer_groups(a)) == sorted(os.getgroups())


def test_a_socket_of_another_family_gives_no_groups() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert peer_groups(tcp) == ()  # ENOPROTOOPT: the kernel cannot tell


# setgroups needs root; in a child process, so that this one keeps its groups.
_MANY_GROUPS = """
import os, socket, sys
from masqd.kernel.peergroups import peer_groups
os.setgroups(range(70000, 70000 + int(sys.argv[1])))
a, b = socket.socketpair()
print(len(peer_groups(a)), sorted(peer_groups(a)) == sorted(os.getgroups()))
"""


@pytest.mark.kernel
@pytest.mark.parametrize("count", [64, 65, 1000])
def test_more_groups_than_the_first_try_holds_are_read_whole(count: int) -> None:
    """The first getsockopt has room for 64; beyond, the kernel says the size it needs."""
    out = subprocess.run(
        [sys.executable, "-c", _MANY_GROUPS, str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert out == [str(count), "True"]

"""Throwaway network namespaces and the small topologies the kernel tests build in them.

Nothing here touches the root namespace: every link, address, route and ruleset is created
inside namespaces made here and removed on exit. Traffic only flows between them, from
198.18.0.0/15 and 2001:db8::/32.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

_counter = itertools.count()


def run(
    *cmd: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ns_run(
    ns: str, *cmd: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *cmd, input=input, check=check)


def new_name(role: str) -> str:
    # Short: names also become veth names (15 bytes at most).
    return f"mq{role[:3]}{os.getpid() % 10000}{next(_counter)}{uuid.uuid4().hex[:3]}"


@contextlib.contextmanager
def netns(role: str = "ns") -> Iterator[str]:
    """A fresh network namespace with loopback up; deleted afterwards."""
    name = new_name(role)
    run("ip", "netns", "add", name)
    try:
        ns_run(name, "ip", "link", "set", "lo", "up")
        ns_run(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
        # No duplicate address detection: fresh veths would drop IPv6 for ~2 s otherwise.
        ns_run(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        ns_run(name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        yield name
    finally:
        # Kill anything still running inside (a daemon that a failed test left behind).
        pids = run("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run("ip", "netns", "del", name, check=False)


def nft(
    ns: str, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return ns_run(ns, "nft", *args, input=input, check=check)


@dataclass
class Endpoint:
    """One end of a veth pair: which namespace, which interface, which addresses."""

    ns: str
    ifname: str
    ip4: str  # with prefix, e.g. 198.18.1.2/24
    ip6: str  # with prefix, e.g. 2001:db8:1::2/64

    @property
    def addr4(self) -> str:
        return self.ip4.split("/")[0]

    @property
    def addr6(self) -> str:
        return self.ip6.split("/")[0]


def veth(a: Endpoint, b: Endpoint) -> None:
    """Join two namespaces with a veth pair and configure both ends."""
    tmp_a, tmp_b = new_name("va"), new_name("vb")
    run(
        "ip",
        "link",
        "add",
        tmp_a,
        "netns",
        a.ns,
        "type",
        "veth",
        "peer",
        "name",
        tmp_b,
        "netns",
        b.ns,
    )
    for end, tmp in ((a, tmp_a), (b, tmp_b)):
        ns_run(end.ns, "ip", "link", "set", tmp, "name", end.ifname)
        ns_run(end.ns, "ip", "addr", "add", end.ip4, "dev", end.ifname)
        ns_run(end.ns, "ip", "-6", "addr", "add", end.ip6, "dev", end.ifname, "nodad")
        ns_run(end.ns, "ip", "link", "set", end.ifname, "up")


def enable_forwarding(ns: str) -> None:
    ns_run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns_run(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")


@dataclass
class Topology:
    """container(s) -- host (runs masqd, routes) -- outside.

    The host owns 198.18.<n>.1/24 and 2001:db8:<n>::1/64 towards container n, and
    198.19.0.1/24, 2001:db8:ff::1/64 towards the outside. The outside host routes the
    containers' ranges back through the host, so an unmasqueraded connection works too and
    the echo server's answer (the source address it saw) tells which of the two happened.
    """

    host: str
    outside: str
    containers: list[Endpoint] = field(default_factory=list)
    outside_end: Endpoint | None = None

    @property
    def host_outside4(self) -> str:
        return "198.19.0.1"

    @property
    def host_outside6(self) -> str:
        return "2001:db8:ff::1"


ECHO_PORT = 7777
_PROBE = (
    "import socket,sys\n"
    "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(float(sys.argv[3]))\n"
    "s.connect((sys.argv[1], int(sys.argv[2]))); print(s.recv(200).decode().strip())\n"
)
_ECHO_SERVER = (
    "import socket,threading,sys\n"
    "def serve(fam, addr):\n"
    "    s = socket.socket(fam, socket.SOCK_STREAM)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
    "    s.bind((addr, int(sys.argv[1]))); s.listen(512)\n"
    "    while True:\n"
    "        c, peer = s.accept(); c.sendall((peer[0] + '\\n').encode()); c.close()\n"
    "threading.Thread(target=serve, args=(socket.AF_INET6, '::'), daemon=True).start()\n"
    "serve(socket.AF_INET, '0.0.0.0')\n"
)


def start_echo_server(ns: str, port: int = ECHO_PORT) -> subprocess.Popen[bytes]:
    """A TCP server in `ns` that answers every connection with the source address it saw."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO_SERVER, str(port)]
    )
    for _ in range(100):
        out = ns_run(ns, "ss", "-Htln", check=False).stdout
        if f":{port} " in out and out.count(f":{port} ") >= 2:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("echo server did not start")


def probe(ns: str, dst: str, port: int = ECHO_PORT, timeout: float = 2.0) -> str | None:
    """Connect from `ns` to dst:port; the source address the server saw, or None if no answer."""
    proc = ns_run(ns, sys.executable, "-c", _PROBE, dst, str(port), str(timeout), check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


@contextlib.contextmanager
def topology(containers: int = 1) -> Iterator[Topology]:
    """The topology described in `Topology`; container n is 198.18.n.2/24, 2001:db8:n::2/64."""
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns("host"))
        outside = stack.enter_context(netns("out"))
        enable_forwarding(host)
        out_end = Endpoint(outside, "eth0", "198.19.0.2/24", "2001:db8:ff::2/64")
        veth(Endpoint(host, "uplink", "198.19.0.1/24", "2001:db8:ff::1/64"), out_end)
        ns_run(outside, "ip", "route", "add", "198.18.0.0/16", "via", "198.19.0.1")
        ns_run(outside, "ip", "-6", "route", "add", "2001:db8::/40", "via", "2001:db8:ff::1")
        topo = Topology(host=host, outside=outside, outside_end=out_end)
        for n in range(1, containers + 1):
            ctr = stack.enter_context(netns(f"c{n}"))
            end = Endpoint(ctr, "eth0", f"198.18.{n}.2/24", f"2001:db8:{n}::2/64")
            veth(Endpoint(host, f"ctr{n}", f"198.18.{n}.1/24", f"2001:db8:{n}::1/64"), end)
            ns_run(ctr, "ip", "route", "add", "default", "via", f"198.18.{n}.1")
            ns_run(ctr, "ip", "-6", "route", "add", "default", "via", f"2001:db8:{n}::1")
            topo.containers.append(end)
        server = start_echo_server(outside)
        stack.callback(server.wait)
        stack.callback(server.kill)
        yield topo

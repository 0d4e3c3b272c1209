"""Real packets: containers -- host (runs masqd) -- outside, each in its own namespace.

The outside host's echo server answers every TCP connection with the source address it saw,
and it routes the containers' ranges back through the host, so a connection works whether
or not it was masqueraded: the answer says which happened. Masqueraded connections arrive
from the host's uplink address (198.19.0.1, 2001:db8:ff::1); others from the container's
own address.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.daemon import Client, MasqdProcess, running_masqd
from tests.netns import Topology, nft, probe, start_echo_server, topology

pytestmark = pytest.mark.kernel

OUT4, OUT6 = "198.19.0.2", "2001:db8:ff::2"
HOST4, HOST6 = "198.19.0.1", "2001:db8:ff::1"


def wait_until_routed(topo: Topology, timeout: float = 10.0) -> None:
    """Fresh veths can drop the first packets (IPv6 neighbour discovery on links that just
    came up): wait until every container reaches the outside on both families."""
    deadline = time.monotonic() + timeout
    pending = {(c.ns, dst) for c in topo.containers for dst in (OUT4, OUT6)}
    with ThreadPoolExecutor(max_workers=len(pending)) as pool:
        while pending and time.monotonic() < deadline:
            tries = list(pending)
            answers = pool.map(lambda t: probe(t[0], t[1], timeout=1.0), tries)
            pending = {t for t, answer in zip(tries, answers, strict=True) if answer is None}
    assert not pending, f"no route to the outside from {sorted(pending)}"


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Topology, MasqdProcess]]:
    stack = contextlib.ExitStack()
    try:
        topo = stack.enter_context(topology(containers=3))
        wait_until_routed(topo)
        yield topo, stack.enter_context(running_masqd(topo.host))
    finally:
        # tests.netns.topology kills its echo server without reaping it; the ResourceWarning
        # that Popen gives for that is not about masqd.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            stack.close()


@pytest.fixture
def net(world: tuple[Topology, MasqdProcess]) -> Iterator[tuple[Topology, Client]]:
    """The shared topology, with no attachment left behind by the previous test."""
    topo, daemon = world
    client = daemon.client
    yield topo, client
    for a in client.attachments():
        assert client.delete_attachment(a["network"], a["container_id"], a["ifname"]).status == 200


def container_ips(topo: Topology, n: int, prefix4: int = 24, prefix6: int = 64) -> list[str]:
    c = topo.containers[n - 1]
    return [f"{c.addr4}/{prefix4}", f"{c.addr6}/{prefix6}"]


def seen_from(topo: Topology, n: int) -> tuple[str | None, str | None]:
    """The source addresses the outside server sees for IPv4 and IPv6 from container n."""
    ns = topo.containers[n - 1].ns
    return probe(ns, OUT4), probe(ns, OUT6)


def test_an_attached_container_reaches_the_outside_from_the_hosts_address(
    net: tuple[Topology, Client],
) -> None:
    topo, client = net
    assert seen_from(topo, 1) == ("198.18.1.2", "2001:db8:1::2")  # before: not masqueraded
    assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
    # The 200 means the kernel has it: the very next connection is masqueraded.
    assert seen_from(topo, 1) == (HOST4, HOST6)
    assert client.delete_attachment("net1", "c1", "eth0").status == 200
    assert seen_from(topo, 1) == ("198.18.1.2", "2001:db8:1::2")


def test_a_container_without_an_attachment_is_not_masqueraded(net: tuple[Topology, Client]) -> None:
    topo, client = net
    assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
    assert seen_from(topo, 2) == ("198.18.2.2", "2001:db8:2::2")
    assert seen_from(topo, 1) == (HOST4, HOST6)


def test_a_destination_inside_the_attachments_own_subnet_is_not_masqueraded(
    net: tuple[Topology, Client],
) -> None:
    """masqd exempts the subnet the attachment declares, whatever the links look like.

    On a real node a same-subnet peer usually sits on the same bridge and its traffic is
    switched, never reaching the host's postrouting hook, so it would prove nothing. Here
    every connection is routed through the host, so the exemption itself is what is tested:
    container 1 declares 198.18.0.0/15 (and 2001:db8::/32), subnets that hold the outside
    host (198.19.0.2, 2001:db8:ff::2) and container 2; its connections to them keep their
    source, while with a /24 (/64) the same connections are masqueraded.
    """
    topo, client = net
    server2 = start_echo_server(topo.containers[1].ns)
    try:
        c2 = topo.containers[1]
        wide = container_ips(topo, 1, prefix4=15, prefix6=32)
        assert client.put_attachment("net1", "c1", "eth0", wide).status == 200
        assert seen_from(topo, 1) == ("198.18.1.2", "2001:db8:1::2")
        c1 = topo.containers[0].ns
        assert (probe(c1, c2.addr4), probe(c1, c2.addr6)) == ("198.18.1.2", "2001:db8:1::2")
        # The same container with a narrow subnet: everything outside it is masqueraded,
        # to the address of the interface the packet leaves by.
        assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
        assert seen_from(topo, 1) == (HOST4, HOST6)
        assert (probe(c1, c2.addr4), probe(c1, c2.addr6)) == ("198.18.2.1", "2001:db8:2::1")
    finally:
        server2.kill()
        server2.wait()


def test_the_seeds_case_two_attachments_hold_one_address_and_one_is_torn_down(
    net: tuple[Topology, Client],
) -> None:
    """Containers A and B were both set up with 198.18.1.2 (say, B got A's address before
    A's teardown arrived). Tearing A down must not stop B's masquerade."""
    topo, client = net
    ips = container_ips(topo, 1)
    assert client.put_attachment("net1", "A", "eth0", ips).status == 200
    assert client.put_attachment("net1", "B", "eth0", ips).status == 200
    assert client.delete_attachment("net1", "A", "eth0").status == 200
    assert seen_from(topo, 1) == (HOST4, HOST6)
    assert client.delete_attachment("net1", "B", "eth0").status == 200
    assert seen_from(topo, 1) == ("198.18.1.2", "2001:db8:1::2")


def test_gc_keeps_valid_attachments_and_other_networks(net: tuple[Topology, Client]) -> None:
    topo, client = net
    assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
    assert client.put_attachment("net1", "c2", "eth0", container_ips(topo, 2)).status == 200
    assert client.put_attachment("net2", "c3", "eth0", container_ips(topo, 3)).status == 200
    resp = client.gc("net1", [("c1", "eth0")])
    assert resp.status == 200
    assert [a["container_id"] for a in resp.json["removed"]] == ["c2"]
    assert seen_from(topo, 1) == (HOST4, HOST6)  # valid: kept
    assert seen_from(topo, 2) == ("198.18.2.2", "2001:db8:2::2")  # not listed: removed
    assert seen_from(topo, 3) == (HOST4, HOST6)  # another network: untouched


def test_masquerade_continues_while_the_daemon_is_stopped(
    world: tuple[Topology, MasqdProcess], net: tuple[Topology, Client]
) -> None:
    topo, daemon = world
    _, client = net
    assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
    assert daemon.stop() == 0
    try:
        assert seen_from(topo, 1) == (HOST4, HOST6)
    finally:
        daemon.start()
    assert seen_from(topo, 1) == (HOST4, HOST6)


def test_a_dormant_table_is_woken_and_masquerade_resumes(
    world: tuple[Topology, MasqdProcess], net: tuple[Topology, Client]
) -> None:
    """`flags dormant` unhooks the chain while every set and rule stays: the daemon must see
    it as drift, count it, and clear the flag, so new connections are masqueraded again."""
    topo, daemon = world
    _, client = net
    assert client.put_attachment("net1", "c1", "eth0", container_ips(topo, 1)).status == 200
    assert seen_from(topo, 1) == (HOST4, HOST6)
    repairs = daemon.status()["syncs"]["drift_repairs"]
    nft(topo.host, "add", "table", "inet", "masqd", "{ flags dormant; }")
    deadline = time.monotonic() + 10
    while daemon.status()["syncs"]["drift_repairs"] == repairs:
        assert time.monotonic() < deadline, "the dormant table was not repaired within 10 s"
        time.sleep(0.01)
    assert "dormant" not in nft(topo.host, "list", "table", "inet", "masqd").stdout
    assert seen_from(topo, 1) == (HOST4, HOST6)
    assert daemon.status()["ready"] is True

"""podman with its CNI backend runs containers on a masqd network, end to end.

A private podman (tests/podman.py) runs inside a test namespace `host`, where masqd runs too;
an `outside` namespace answers every TCP connection with the source address it saw, and
routes the containers' ranges back, so a connection that is not masqueraded still works and
shows the container's own address. podman's network is made with `podman network create`
and the conflist edit docs/cni.md describes; podman's default network is never used. The
root namespace's ruleset, links and routes are compared before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from masqd.state import spool
from tests.daemon import MasqdProcess, masqueraded, running_masqd
from tests.netns import Endpoint, enable_forwarding, netns, ns_run, start_echo_server, veth
from tests.podman import (
    BUSYBOX,
    Podman,
    busybox_tar,
    containers_conf,
    masqd_conflist,
    root_network_snapshot,
    unavailable_reason,
    wait_for,
)

OUTSIDE4, OUTSIDE6 = "198.19.0.2", "2001:db8:ff::2"
HOST_OUTSIDE4, HOST_OUTSIDE6 = "198.19.0.1", "2001:db8:ff::1"
SUBNETS = ("198.18.64.0/24", "2001:db8:64::/64")
ECHO_PORT = 7777
SLEEP = ["sleep", "600"]


# ---- the conflist edit and the configuration (no kernel) --------------------------------


PODMAN_CONFLIST: dict[str, Any] = {  # as podman 4.3 writes it for `network create`
    "cniVersion": "0.4.0",
    "name": "mqnet",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni-podman1",
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.64.0/24"}]]},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "firewall", "backend": ""},
        {"type": "tuning"},
    ],
}


def test_conflist_edit_turns_off_the_bridge_masquerade_and_chains_masqd_cni_last() -> None:
    edited = masqd_conflist(PODMAN_CONFLIST, socket="/run/masqd/masqd.sock", daemon_wait=10)
    assert [p["type"] for p in edited["plugins"]] == [
        "bridge", "portmap", "firewall", "tuning", "masqd-cni"
    ]  # fmt: skip
    assert edited["plugins"][0]["ipMasq"] is False
    assert edited["plugins"][-1] == {
        "type": "masqd-cni",
        "socket": "/run/masqd/masqd.sock",
        "daemonWaitSeconds": 10,
    }
    assert PODMAN_CONFLIST["plugins"][0]["ipMasq"] is True  # the input is untouched
    assert "dataDir" not in edited["plugins"][0]["ipam"]
    moved = masqd_conflist(PODMAN_CONFLIST, socket="/s", daemon_wait=1, ipam_dir="/tmp/ipam")
    assert moved["plugins"][0]["ipam"]["dataDir"] == "/tmp/ipam"


def test_conflist_edit_refuses_a_conflist_it_cannot_edit_safely() -> None:
    twice = masqd_conflist(PODMAN_CONFLIST, socket="/s", daemon_wait=1)
    with pytest.raises(ValueError, match="already"):
        masqd_conflist(twice, socket="/s", daemon_wait=1)
    no_bridge = {**PODMAN_CONFLIST, "plugins": PODMAN_CONFLIST["plugins"][1:]}
    with pytest.raises(ValueError, match="one bridge"):
        masqd_conflist(no_bridge, socket="/s", daemon_wait=1)


def test_private_configuration_keeps_podman_off_the_machine_defaults(tmp_path: Path) -> None:
    conf = containers_conf(tmp_path, tmp_path / "bin", tmp_path / "net.d")
    assert 'network_backend = "cni"' in conf and 'runtime = "runc"' in conf
    assert "default_ulimits" in conf and "default_network" not in conf
    named = containers_conf(tmp_path, tmp_path / "bin", tmp_path / "net.d", "mqnet")
    assert 'default_network = "mqnet"' in named.split("[network]")[1]
    paths = [line.split('"')[1] for line in conf.splitlines() if line.count('"') >= 2]
    locations = [p for p in paths if p.startswith("/")]
    assert locations and all(p.startswith(str(tmp_path)) for p in locations), locations


@pytest.mark.skipif(not BUSYBOX.exists(), reason=f"needs {BUSYBOX}")
def test_busybox_root_filesystem_has_the_applets_the_tests_call() -> None:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(busybox_tar())) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["bin/busybox"].isfile() and names["bin/busybox"].mode & 0o111
    assert all(names[f"bin/{a}"].linkname == "busybox" for a in ("sh", "nc", "sleep"))


# ---- the real thing ---------------------------------------------------------------------

_UNAVAILABLE = unavailable_reason()


@dataclass
class PodmanNode:
    """host (masqd, podman, its bridge) -- outside (the echo server)."""

    host: str
    podman: Podman
    masqd: MasqdProcess
    network: str
    image: str

    def run(self, *args: str) -> str:
        """`podman run -d` on the masqd network; the container's full ID."""
        return self.podman.out("run", "-d", "--network", self.network, *args)

    def start_container(self, *command: str) -> str:
        return self.run(self.image, *(command or SLEEP))

    def attachments(self) -> dict[str, list[str]]:
        """container ID -> addresses, as the daemon's API lists this network."""
        return {
            a["container_id"]: a["ips"]
            for a in self.masqd.client.attachments(self.network)
            if a["ifname"] == "eth0"
        }

    def kernel_sources(self) -> set[str]:
        return masqueraded(self.host)

    def probe(self, container: str, dst: str) -> str:
        """The source address the outside server saw for a connection from `container`."""
        proc = self.podman.run("exec", container, "nc", "-w", "10", dst, str(ECHO_PORT))
        return proc.stdout.strip()

    def spooled(self) -> list[dict[str, Any]]:
        folder = Path(spool.spool_dir_for(self.masqd.socket))
        if not folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def veths(self) -> set[str]:
        out = ns_run(self.host, "ip", "-o", "link", "show", "type", "veth").stdout
        return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def bare(addresses: list[str]) -> set[str]:
    return {a.split("/")[0] for a in addresses}


@pytest.fixture(scope="module")
def root_before() -> Iterator[dict[str, str]]:
    """The root namespace before this module touched anything; checked again at the end."""
    if _UNAVAILABLE is not None:
        pytest.skip(_UNAVAILABLE)
    before = root_network_snapshot()
    yield before
    after = root_network_snapshot()
    if after != before:
        pytest.fail(f"the root namespace changed: {diff(before, after)}")


def diff(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (before[k], after[k]) for k in before if before[k] != after.get(k)}


@pytest.fixture(scope="module")
def node(
    root_before: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodmanNode]:
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns("phost"))
        outside = stack.enter_context(netns("pout"))
        enable_forwarding(host)
        veth(
            Endpoint(host, "uplink", f"{HOST_OUTSIDE4}/24", f"{HOST_OUTSIDE6}/64"),
            Endpoint(outside, "eth0", f"{OUTSIDE4}/24", f"{OUTSIDE6}/64"),
        )
        # Routes back to the containers: without masquerade the connection still works, and
        # the answer names the container's own address.
        ns_run(outside, "ip", "route", "add", "198.18.0.0/15", "via", HOST_OUTSIDE4)
        ns_run(outside, "ip", "-6", "route", "add", "2001:db8::/32", "via", HOST_OUTSIDE6)
        server = start_echo_server(outside, ECHO_PORT)
        stack.callback(server.wait)
        stack.callback(server.kill)
        masqd = stack.enter_context(running_masqd(host))
        podman = Podman(tmp_path_factory.mktemp("podman", numbered=True), host)
        stack.callback(podman.close)
        network = f"mqpod{os.getpid() % 100000}"
        podman.create_masqd_network(network, SUBNETS, masqd.socket, daemon_wait=2)
        stack.callback(forget_cni_cache, network)
        yield PodmanNode(host, podman, masqd, network, podman.import_busybox())


def forget_cni_cache(network: str) -> None:
    """libcni keeps each attachment's result in /var/lib/cni/results (podman 4.3 cannot move
    it) and deletes it on DEL; remove any that an interrupted run of this module left."""
    for leftover in Path("/var/lib/cni/results").glob(f"{network}-*"):
        leftover.unlink(missing_ok=True)


@pytest.fixture
def node_masqd(node: PodmanNode) -> Iterator[MasqdProcess]:
    """The node's daemon, running at the start and the end of every test (and named as a
    fixture, so a failing test's report carries its log)."""
    if node.masqd.proc is None or node.masqd.proc.poll() is not None:
        node.masqd.start()
    yield node.masqd
    if node.masqd.proc is None or node.masqd.proc.poll() is not None:
        node.masqd.start()


@pytest.mark.kernel
@pytest.mark.slow
def test_containers_are_masqueraded_on_v4_and_v6_under_podmans_ids(
    node: PodmanNode, node_masqd: MasqdProcess
) -> None:
    ids = [node.start_container() for _ in range(3)]
    assert set(ids) <= node.podman.container_ids()
    held = node.attachments()
    assert {i: held[i] for i in ids} == {i: node.podman.addresses(i, node.network) for i in ids}
    addresses = {a for i in ids for a in bare(held[i])}
    assert addresses <= node.kernel_sources()
    for container in ids:
        assert node.probe(container, OUTSIDE4) == HOST_OUTSIDE4
        assert node.probe(container, OUTSIDE6) == HOST_OUTSIDE6
    # The control: once masqd lets go of a container, the outside sees its own addresses.
    first = ids[0]
    assert node_masqd.client.delete_attachment(node.network, first, "eth0").status == 200
    own4, own6 = sorted(bare(held[first]), key=lambda a: ":" in a)
    assert node.probe(first, OUTSIDE4) == own4
    assert node.probe(first, OUTSIDE6) == own6
    node.podman.run("rm", "--force", "--time", "0", *ids)
    assert not set(ids) & set(node.attachments())
    assert not addresses & node.kernel_sources()


@pytest.mark.kernel
@pytest.mark.slow
def test_rm_stop_restart_and_a_container_that_exits_remove_their_attachments(
    node: PodmanNode, node_masqd: MasqdProcess, tmp_path: Path
) -> None:
    removed, stopped, restarted = (node.start_container() for _ in range(3))
    # Exits when the test says so, not after some guessed time.
    go = tmp_path / "go"
    go.mkdir()
    wait = "while [ ! -e /go/now ]; do sleep 0.1; done"
    exiting = node.run("-v", f"{go}:/go", node.image, "sh", "-c", wait)
    before = node.attachments()
    assert {removed, stopped, restarted, exiting} <= set(before)

    node.podman.run("rm", "--force", "--time", "0", removed)
    assert removed not in node.attachments()

    node.podman.run("stop", "--time", "0", stopped)
    assert node.podman.state(stopped) == "exited"
    assert stopped not in node.attachments()

    node.podman.run("restart", "--time", "0", restarted)
    assert node.podman.state(restarted) == "running"
    now = node.podman.addresses(restarted, node.network)
    assert node.attachments()[restarted] == now
    # host-local hands out the next free address, so the DEL of the old ones is visible.
    assert bare(now) != bare(before[restarted])
    assert not bare(before[restarted]) & node.kernel_sources()
    assert bare(now) <= node.kernel_sources()

    (go / "now").touch()
    wait_for(lambda: exiting not in node.attachments(), what="the exited container's DEL")
    assert node.podman.state(exiting) == "exited"
    gone = {removed, stopped, exiting}
    assert not {a for c in gone for a in bare(before[c])} & node.kernel_sources()
    node.podman.run("rm", "--force", "--time", "0", stopped, restarted, exiting)


@pytest.mark.kernel
@pytest.mark.slow
def test_a_del_while_the_daemon_is_down_is_applied_when_it_is_back(
    node: PodmanNode, node_masqd: MasqdProcess
) -> None:
    container = node.start_container()
    addresses = bare(node.attachments()[container])
    node_masqd.stop()
    node.podman.run("rm", "--force", "--time", "0", container)  # succeeds: the DEL is spooled
    assert [s["container_id"] for s in node.spooled()] == [container]
    assert addresses <= node.kernel_sources()  # nobody has touched the table yet
    node_masqd.start()  # ready only after the spool is applied
    assert container not in node.attachments()
    assert not addresses & node.kernel_sources()
    assert node.spooled() == []


@pytest.mark.kernel
@pytest.mark.slow
def test_an_add_while_the_daemon_is_down_fails_and_leaves_a_created_container(
    node: PodmanNode, node_masqd: MasqdProcess
) -> None:
    """podman does not retry code 11: the container stays `created`. podman's teardown of the
    failed setup runs the chain's DEL, so bridge and host-local give back the interface and
    addresses, and masqd-cni spools a DEL that is a no-op when the daemon is back."""
    veths = node.veths()
    node_masqd.stop()
    failed = node.podman.run(
        "run", "-d", "--name", "mq-failed-add", "--network", node.network, node.image, *SLEEP,
        check=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "masqd-cni" in failed.stderr, failed.stderr
    (container,) = node.podman.container_ids("name=mq-failed-add")
    assert node.podman.state(container) == "created"
    assert node.veths() == veths
    leases = node.podman.base / "ipam" / node.network
    assert not [p for p in leases.iterdir() if container in p.read_text(errors="replace")]
    assert [s["container_id"] for s in node.spooled()] == [container]

    node_masqd.start()
    assert node.spooled() == []
    assert container not in node.attachments()
    # Started again with the daemon up, it is attached like any other.
    node.podman.run("start", container)
    assert node.attachments()[container] == node.podman.addresses(container, node.network)
    node.podman.run("rm", "--force", "--time", "0", container)
    assert container not in node.attachments()


@pytest.mark.kernel
@pytest.mark.slow
def test_podmans_own_default_network_is_gone_and_its_place_taken(
    node: PodmanNode, node_masqd: MasqdProcess
) -> None:
    """With `default_network` naming the masqd network, a container started without
    --network is masqueraded by masqd too, and the "podman" network no longer exists."""
    assert node.podman.out("network", "ls", "--format", "{{.Name}}").split() == [node.network]
    container = node.podman.out("run", "-d", node.image, *SLEEP)
    assert node.attachments()[container] == node.podman.addresses(container, node.network)
    assert node.probe(container, OUTSIDE4) == HOST_OUTSIDE4
    node.podman.run("rm", "--force", "--time", "0", container)


@pytest.mark.kernel
@pytest.mark.slow
def test_the_root_namespace_is_untouched_while_containers_run(
    node: PodmanNode, node_masqd: MasqdProcess, root_before: dict[str, str]
) -> None:
    container = node.start_container()
    assert node.probe(container, OUTSIDE4) == HOST_OUTSIDE4
    now = root_network_snapshot()
    assert now == root_before, diff(root_before, now)
    # ...while the test namespace holds podman's bridge and firewall rules and masqd's table.
    ruleset = ns_run(node.host, "nft", "list", "ruleset").stdout
    assert "table inet masqd" in ruleset and "CNI-FORWARD" in ruleset
    node.podman.run("rm", "--force", "--time", "0", container)

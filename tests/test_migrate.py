"""Adoption of the CNI plugins' table `inet cni_plugins_masquerade` (masqd.migrate).

The legacy table is built exactly as pkg/ip/ipmasq_nftables_linux.go lays it out (the
expected dump of its own unit test): a commented table, a regular chain `masq_checks` with one
commented rule per attachment IP, and a base chain `postrouting` that returns for multicast
and jumps (`goto`) to `masq_checks`. Traffic flows through it before, during and after the
adoption, and every probe must come out masqueraded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from masqd import migrate
from masqd.migrate import (
    comment_for_instance,
    parse_comment,
    parse_legacy,
    rule_ip,
)
from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, masqctl, masqueraded, nft_listing
from tests.netns import Endpoint, Topology, nft, probe
from tests.test_policy import quiet_topology, start_daemon, wait_for

LEGACY = migrate.LEGACY_TABLE

# ---- the CNI plugins' comments ----------------------------------------------------------

# From containernetworking/plugins pkg/ip/ipmasq_nftables_linux_test.go: names -> comment.
UPSTREAM_COMMENTS = [
    (
        ("unit-test", "eth0", "one"),
        "6fd94d501e58f0aa-287fc69eff0574a2",
        "net: unit-test, if: eth0, id: one",
    ),
    (
        ("unit-test", "eth0", "two"),
        "6fd94d501e58f0aa-d750b2c8f0f25d5f",
        "net: unit-test, if: eth0, id: two",
    ),
    (
        ("unit-test", "eth0", "three"),
        "6fd94d501e58f0aa-a4d4adb82b669cfe",
        "net: unit-test, if: eth0, id: three",
    ),
    (
        ("alternate", "net1", "three"),
        "82783ef24bdc7036-acb19d111858e348",
        "net: alternate, if: net1, id: three",
    ),
    (
        ("unit-test", "eth0", "four"),
        "6fd94d501e58f0aa-e766de567ef6c543",
        "net: unit-test, if: eth0, id: four",
    ),
]
LONG_NETWORK = "n" * 60
LONG_ID = "c" * 64


@pytest.mark.parametrize(("names", "hashes", "text"), UPSTREAM_COMMENTS)
def test_comments_are_the_cni_plugins_own(
    names: tuple[str, str, str], hashes: str, text: str
) -> None:
    network, ifname, container_id = names
    comment = f"{hashes}, {text}"
    assert comment_for_instance(network, ifname, container_id) == comment
    assert parse_comment(comment) == (network, container_id, ifname)


def test_a_comment_cut_at_128_bytes_is_not_trusted() -> None:
    comment = comment_for_instance(LONG_NETWORK, "eth0", LONG_ID)
    assert len(comment) == 128
    reason = parse_comment(comment)
    assert isinstance(reason, str) and "cut at 128 bytes" in reason and LONG_NETWORK in reason


def test_a_complete_comment_of_exactly_128_bytes_is_read() -> None:
    # 33 (hashes) + 7 + network + 6 + 4 ("eth0") + 6 + id = 128 with a 64-byte ID.
    network = "x" * (128 - 33 - 7 - 6 - 4 - 6 - 64)
    comment = comment_for_instance(network, "eth0", LONG_ID)
    assert len(comment) == 128
    assert parse_comment(comment) == (network, LONG_ID, "eth0")


@pytest.mark.parametrize(
    ("comment", "words"),
    [
        (None, "no comment"),
        ("a rule someone added", "not in the CNI plugins' format"),
        ("6fd94d501e58f0aa-287fc69eff0574a2, net: other, if: eth0, id: one", "network name"),
        ("6fd94d501e58f0aa-287fc69eff0574a2, net: unit-test, if: eth1, id: one", "do not match"),
    ],
)
def test_unreadable_comments_say_why(comment: str | None, words: str) -> None:
    reason = parse_comment(comment)
    assert isinstance(reason, str) and words in reason


def _match(proto: str, field: str, op: str, right: Any) -> dict[str, Any]:
    return {
        "match": {
            "op": op,
            "left": {"payload": {"protocol": proto, "field": field}},
            "right": right,
        }
    }


def _prefix(cidr: str) -> dict[str, Any]:
    net = ipaddress.ip_network(cidr)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


MASQ: dict[str, Any] = {"masquerade": None}


def masq_rule(src: str, dst: Any, *, op: str = "!=", dst_proto: str | None = None) -> list[Any]:
    proto = "ip6" if ":" in src else "ip"
    right = _prefix(dst) if isinstance(dst, str) and "/" in dst else dst
    return [_match(proto, "saddr", "==", src), _match(dst_proto or proto, "daddr", op, right), MASQ]


@pytest.mark.parametrize(
    ("exprs", "ip"),
    [
        (masq_rule("10.22.0.5", "10.22.0.0/16"), "10.22.0.5/16"),
        (masq_rule("fd00::5", "fd00::/64"), "fd00::5/64"),
        (masq_rule("10.0.0.9", "10.0.0.9"), "10.0.0.9/32"),  # a /32 lists as an address
        (masq_rule("10.22.0.5", "10.22.0.0/16", op="=="), None),
        (masq_rule("10.22.0.5", "fd00::/64", dst_proto="ip6"), None),
        (masq_rule("10.23.0.5", "10.22.0.0/16"), None),  # the address outside its subnet
        ([*masq_rule("10.22.0.5", "10.22.0.0/16")[:2], {"accept": None}], None),
        (masq_rule("10.22.0.5", "10.22.0.0/16")[::2], None),
    ],
)
def test_rule_ip_reads_only_the_plugins_rule_shape(exprs: list[Any], ip: str | None) -> None:
    assert rule_ip(exprs) == ip


def test_parse_legacy_sorts_rules_into_readable_unreadable_and_foreign() -> None:
    good = comment_for_instance("net", "eth0", "c1")
    cut = comment_for_instance(LONG_NETWORK, "eth0", LONG_ID)
    rule4 = masq_rule("10.0.0.2", "10.0.0.0/24")
    rule5 = masq_rule("10.0.0.3", "10.0.0.0/24")

    def rule(chain: str, handle: int, expr: list[Any], comment: str | None = None) -> Any:
        body = {"family": "inet", "table": LEGACY, "chain": chain, "handle": handle, "expr": expr}
        if comment is not None:
            body["comment"] = comment
        return {"rule": body}

    listing = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": LEGACY, "handle": 1}},
        {"chain": {"family": "inet", "table": LEGACY, "name": "masq_checks", "handle": 1}},
        {"chain": {"family": "inet", "table": LEGACY, "name": "postrouting", "handle": 2}},
        {"chain": {"family": "inet", "table": LEGACY, "name": "mine", "handle": 3}},
        rule("masq_checks", 4, rule4, good),
        rule("masq_checks", 5, rule5, cut),
        rule("masq_checks", 6, [{"accept": None}], good),
        rule("postrouting", 7, [{"goto": {"target": "masq_checks"}}]),
    ]
    table = parse_legacy(listing)
    assert table.found
    assert [(r.handle, r.key, r.ip) for r in table.rules] == [
        (4, ("net", "c1", "eth0"), "10.0.0.2/24")
    ]
    assert [(u.handle, u.rule) for u in table.unreadable] == [
        (5, "ip saddr 10.0.0.3 ip daddr != 10.0.0.0/24 masquerade"),
        (6, "accept"),
    ]
    assert table.base_handles == (7,)
    assert table.foreign == ["chain mine"]
    assert not parse_legacy([{"metainfo": {}}]).found


# ---- the legacy table in a real kernel --------------------------------------------------


@dataclass(frozen=True)
class Legacy:
    """One attachment as the CNI plugins recorded it."""

    network: str
    ifname: str
    container_id: str
    ips: tuple[str, ...]


def legacy_script(attachments: Sequence[Legacy]) -> str:
    """The nft script of the plugins' table after one ADD per attachment (knftables' dump)."""
    t = f"inet {LEGACY}"
    table_comment = "Masquerading for plugins from github.com/containernetworking/plugins"
    chain_comment = (
        "Masquerade traffic from certain IPs to any (non-multicast) IP outside their subnet"
    )
    lines = [
        f'add table {t} {{ comment "{table_comment}" ; }}',
        f'add chain {t} masq_checks {{ comment "{chain_comment}" ; }}',
        f"add chain {t} postrouting {{ type nat hook postrouting priority 100 ; }}",
    ]
    for a in attachments:
        comment = comment_for_instance(a.network, a.ifname, a.container_id)
        for ip in a.ips:
            iface = ipaddress.ip_interface(ip)
            fam = "ip" if iface.version == 4 else "ip6"
            lines.append(
                f"add rule {t} masq_checks {fam} saddr == {iface.ip} "
                f'{fam} daddr != {iface.network} masquerade comment "{comment}"'
            )
    lines += [
        f"add rule {t} postrouting ip daddr == 224.0.0.0/4  return",
        f"add rule {t} postrouting ip6 daddr == ff00::/8  return",
        f"add rule {t} postrouting goto masq_checks",
    ]
    return "\n".join(lines) + "\n"


def legacy_rules(ns: str) -> list[dict[str, Any]]:
    rules = [o["rule"] for o in nft_listing(ns, LEGACY) if "rule" in o]
    return [r for r in rules if r["chain"] == "masq_checks"]


def legacy_exists(ns: str) -> bool:
    return f"table inet {LEGACY}" in nft(ns, "list", "tables").stdout


def of(ctr: Endpoint, network: str, container_id: str) -> Legacy:
    return Legacy(network, "eth0", container_id, (ctr.ip4, ctr.ip6))


class Prober:
    """Connects from containers to the outside in a loop (IPv4 and IPv6 in turn) and keeps
    what the outside saw, so a gap in masquerade during a migration shows up."""

    def __init__(self, topo: Topology, containers: Sequence[Endpoint]) -> None:
        assert topo.outside_end is not None
        self.targets = [
            (ctr, dst, want)
            for ctr in containers
            for dst, want in (
                (topo.outside_end.addr4, topo.host_outside4),
                (topo.outside_end.addr6, topo.host_outside6),
            )
        ]
        self.seen: list[tuple[str, str, str | None, str]] = []
        self._probed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for ctr, dst, want in self.targets:
                seen = (ctr.ns, dst, probe(ctr.ns, dst), want)
                with self._probed:
                    self.seen.append(seen)
                    self._probed.notify_all()

    def round(self, within: float = 60.0) -> None:
        """Wait for one more probe of every target (however slow the machine is)."""
        with self._probed:
            goal = len(self.seen) + len(self.targets)
            done = self._probed.wait_for(lambda: len(self.seen) >= goal, within)
        assert done, f"probes stalled at {len(self.seen)}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)

    def failures(self) -> list[tuple[str, str, str | None, str]]:
        return [s for s in self.seen if s[2] != s[3]]


class RulesetWatcher:
    """Lists the host's ruleset in a loop (each listing is one consistent snapshot) and
    records, per address, whether a legacy rule and whether masqd's sources set covered it.
    (`nft monitor` would be the natural tool, but 1.0.6 stops reporting at the first element
    of a concatenated interval set.)"""

    def __init__(self, ns: str, addresses: Sequence[str]) -> None:
        self.ns = ns
        self.addresses = list(addresses)
        self.snapshots: list[dict[str, tuple[bool, bool]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            listing = json.loads(nft(self.ns, "-j", "list", "ruleset").stdout)["nftables"]
            legacy: set[str] = set()
            ours: set[str] = set()
            for obj in listing:
                rule = obj.get("rule")
                if rule and rule["table"] == LEGACY and rule["chain"] == "masq_checks":
                    ip = rule_ip(rule["expr"])
                    if ip is not None:
                        legacy.add(ip.split("/")[0])
                spec = obj.get("set")
                if spec and spec["table"] == "masqd" and spec["name"] in ("sources4", "sources6"):
                    for elem in spec.get("elem", []):
                        ours.add(elem["elem"]["val"] if isinstance(elem, dict) else elem)
            self.snapshots.append({a: (a in legacy, a in ours) for a in self.addresses})

    @contextlib.contextmanager
    def running(self) -> Iterator[RulesetWatcher]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)

    def uncovered(self) -> list[dict[str, tuple[bool, bool]]]:
        """Snapshots in which some address was masqueraded by neither table."""
        return [snap for snap in self.snapshots if not all(any(v) for v in snap.values())]


def attachments(d: MasqdProcess) -> list[tuple[str, str, str, list[str]]]:
    return sorted(
        (a["network"], a["container_id"], a["ifname"], a["ips"]) for a in d.client.attachments()
    )


@pytest.mark.kernel
def test_startup_adoption_moves_every_rule_without_a_connection_left_unmasqueraded(
    daemon_factory: DaemonFactory,
) -> None:
    with quiet_topology(2) as topo:
        c1, c2 = topo.containers
        legacy = [of(c1, "unit-test", "ctr-one"), of(c2, "alternate", "ctr-two")]
        nft(topo.host, "-f", "-", input=legacy_script(legacy))
        assert len(legacy_rules(topo.host)) == 4
        for ctr in (c1, c2):  # the legacy table works (and neighbours are resolved)
            for dst, want in (
                ("198.19.0.2", topo.host_outside4),
                ("2001:db8:ff::2", topo.host_outside6),
            ):
                wait_for("the legacy masquerade", lambda: probe(ctr.ns, dst) == want)  # noqa: B023

        addresses = [c1.addr4, c1.addr6, c2.addr4, c2.addr6]
        watcher = RulesetWatcher(topo.host, addresses)
        with watcher.running(), Prober(topo, [c1, c2]).running() as p:
            p.round()  # some probes before, through the legacy table alone
            d = start_daemon(daemon_factory, ns=topo.host, extra_args=["--adopt-cni-plugins-rules"])
            wait_for("the legacy table to go", lambda: not legacy_exists(topo.host))
            p.round()  # and some after, through masqd's table alone
        assert len(p.seen) >= 8 and p.failures() == []

        # Every consistent picture of the kernel had each address masqueraded by one table.
        assert watcher.uncovered() == []
        assert watcher.snapshots[0] == dict.fromkeys(addresses, (True, False))
        assert watcher.snapshots[-1] == dict.fromkeys(addresses, (False, True))
        assert attachments(d) == [
            ("alternate", "ctr-two", "eth0", [c2.ip4, c2.ip6]),
            ("unit-test", "ctr-one", "eth0", [c1.ip4, c1.ip6]),
        ]
        assert masqueraded(d.ns) == {c1.addr4, c1.addr6, c2.addr4, c2.addr6}
        assert probe(c2.ns, "2001:db8:ff::2") == topo.host_outside6
        logged = "adopted 2 attachments (4 legacy rules deleted)"
        wait_for("the adoption's log line", lambda: logged in d.log_path.read_text())


@pytest.mark.kernel
def test_masqctl_adopt_leaves_an_unreadable_rule_in_place_and_reports_it(
    daemon_factory: DaemonFactory,
) -> None:
    with quiet_topology(2) as topo:
        c1, c2 = topo.containers
        d = start_daemon(daemon_factory, ns=topo.host)
        legacy = [of(c1, "unit-test", "ctr-one"), of(c2, LONG_NETWORK, LONG_ID)]
        nft(topo.host, "-f", "-", input=legacy_script(legacy))

        with Prober(topo, [c1, c2]).running() as p:
            p.round()
            out = masqctl(d.socket, "adopt-cni-plugins")
            p.round()
        assert out.returncode == 0, out.stderr
        assert p.failures() == []

        text = out.stdout
        assert "adopted 1 attachments; deleted 2 legacy rules" in text
        assert text.count("left in place:") == 2  # c2's IPv4 and IPv6 rules
        assert "cut at 128 bytes" in text and LONG_NETWORK in text
        assert "table inet cni_plugins_masquerade kept: 2 rules of chain masq_checks" in text

        remaining = legacy_rules(topo.host)
        cut = comment_for_instance(LONG_NETWORK, "eth0", LONG_ID)
        assert [r["comment"] for r in remaining] == [cut, cut]
        assert attachments(d) == [("unit-test", "ctr-one", "eth0", [c1.ip4, c1.ip6])]
        assert probe(c2.ns, "198.19.0.2") == topo.host_outside4  # still by the legacy rule

        # Again: nothing more to adopt, the unreadable rules are reported again, JSON form.
        report = json.loads(masqctl(d.socket, "--json", "adopt-cni-plugins").stdout)
        assert report["adopted"] == [] and len(report["left"]) == 2
        assert report["table_deleted"] is False


@pytest.mark.kernel
def test_adoption_merges_with_what_masqd_holds_and_deletes_an_emptied_table(
    daemon_factory: DaemonFactory,
) -> None:
    d = start_daemon(daemon_factory)
    assert d.client.put_attachment("net", "c1", "eth0", ["198.18.1.2/24"]).status == 200
    legacy = [
        Legacy("net", "eth0", "c1", ("198.18.1.2/24", "2001:db8:1::2/64")),
        Legacy("net", "eth0", "c2", ("198.18.2.2/24",)),
    ]
    nft(d.ns, "-f", "-", input=legacy_script(legacy))
    report = json.loads(masqctl(d.socket, "--json", "adopt-cni-plugins").stdout)
    assert report["deleted_rules"] == 3 and report["left"] == []
    assert report["table_deleted"] is True and not legacy_exists(d.ns)
    assert attachments(d) == [
        ("net", "c1", "eth0", ["198.18.1.2/24", "2001:db8:1::2/64"]),
        ("net", "c2", "eth0", ["198.18.2.2/24"]),
    ]
    # A table that a GC emptied (chains only) is deleted; none at all is "nothing to adopt".
    nft(d.ns, "-f", "-", input=legacy_script([]))
    report = json.loads(masqctl(d.socket, "--json", "adopt-cni-plugins").stdout)
    assert report["table_deleted"] is True and report["adopted"] == []
    assert masqctl(d.socket, "adopt-cni-plugins").stdout.strip() == (
        "no table inet cni_plugins_masquerade: nothing to adopt"
    )

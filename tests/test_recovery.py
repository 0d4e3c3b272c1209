"""Recovery: without a journal, the kernel's table gives the attachments back.

The pure part (`masqd.planning.recovery.recover`) is property-tested: recovering a table that
masqd wrote and planning the table again gives the same table. The daemon part runs the real daemon:
its journal is deleted while the table stays in the kernel, and the restart must take the
attachments over without removing a single element.
"""

from __future__ import annotations

import shutil
import signal
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd.planning.desired import desired_table
from masqd.planning.records import AttachmentRecord, address_subnet, cidrs_of
from masqd.planning.recovery import recover
from masqd.planning.ruleset import SOURCES4, SOURCES6, Element, Policy, TableState
from tests.conftest import DaemonFactory
from tests.daemon import kernel_table, nft_listing
from tests.netns import nft
from tests.test_resilience import restart, without_handles

# ---- the pure function ------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,11}", fullmatch=True)
ifnames = st.from_regex(r"eth[0-9]{1,2}|net[0-9]", fullmatch=True)
# Host addresses only: in a /30, .4n and .4n+3 are the subnet's network and broadcast.
v4 = st.tuples(st.integers(0, 3), st.integers(1, 254), st.sampled_from([16, 24, 30])).map(
    lambda t: f"198.18.{t[0]}.{(t[1] & 0xFC) | 1 if t[2] == 30 else t[1]}/{t[2]}"
)
v6 = st.tuples(st.integers(0, 3), st.integers(1, 0xFFFF), st.sampled_from([48, 64, 120])).map(
    lambda t: f"2001:db8:{t[0]}::{t[1] | 1:x}/{t[2]}"  # odd: never the subnet-router address
)
ips = st.lists(st.one_of(v4, v6), min_size=1, max_size=4, unique_by=lambda ip: ip.split("/")[0])
attachments = st.dictionaries(st.tuples(names, names, ifnames), ips, max_size=12)

LOCAL4_24 = "local4_24"
LOCAL6_64 = "local6_64"


def records(spec: dict[tuple[str, str, str], list[str]]) -> dict:  # type: ignore[type-arg]
    return {
        key: AttachmentRecord(tuple(address_subnet(ip) for ip in value), seq)
        for seq, (key, value) in enumerate(spec.items())
    }


@settings(max_examples=100, deadline=None)
@given(attachments)
def test_adopting_a_table_masqd_wrote_gives_the_same_table(spec: dict) -> None:  # type: ignore[type-arg]
    table = desired_table(records(spec), Policy())
    adopted = recover(table)
    assert adopted.unreadable == []
    again = desired_table(records({k: list(v) for k, v in adopted.attachments.items()}), Policy())
    assert again.sets == table.sets
    # Every adopted attachment is one of the originals, holding a subset of its IPs: the
    # addresses for which it was the deciding (most recent) owner.
    for key, adopted_ips in adopted.attachments.items():
        assert key in spec
        assert set(adopted_ips) <= {plan_ip(ip) for ip in spec[key]}


def plan_ip(ip: str) -> str:
    return cidrs_of([address_subnet(ip)])[0]


def test_dual_stack_owner_is_one_attachment() -> None:
    table = desired_table(
        records({("net", "ctr", "eth0"): ["198.18.1.2/24", "2001:db8:1::2/64"]}), Policy()
    )
    assert recover(table).attachments == {
        ("net", "ctr", "eth0"): ("198.18.1.2/24", "2001:db8:1::2/64")
    }


def test_no_table_adopts_nothing() -> None:
    result = recover(TableState(None))
    assert result.attachments == {} and result.unreadable == []


def _table(*elements: tuple[str, Element]) -> TableState:
    table = desired_table({}, Policy())
    for set_name, elem in elements:
        table.sets.setdefault(set_name, {})[elem.key] = elem
    return table


@pytest.mark.parametrize(
    ("elements", "reason"),
    [
        (
            [
                (SOURCES4, Element("198.18.1.2")),
                (LOCAL4_24, Element("198.18.1.2", "198.18.1.0/24")),
            ],
            "no owner comment",
        ),
        (
            [
                (SOURCES4, Element("198.18.1.2", None, "net/" + "c" * 120 + "~")),
                (LOCAL4_24, Element("198.18.1.2", "198.18.1.0/24", "net/" + "c" * 120 + "~")),
            ],
            "cut short",
        ),
        (
            [(SOURCES4, Element("198.18.1.2", None, "net/ctr/eth0"))],
            "no local4 element",
        ),
        (
            [(LOCAL6_64, Element("2001:db8::2", "2001:db8::/64", "net/ctr/eth0"))],
            "no sources6 element",
        ),
        (
            [
                (SOURCES4, Element("198.18.1.2", None, "net/ctr/eth0")),
                (LOCAL4_24, Element("198.18.1.2", "198.18.9.0/24", "net/ctr/eth0")),
            ],
            "outside its listed subnet",
        ),
        (
            [
                (SOURCES4, Element("198.18.1.2", None, "bad name!/ctr/eth0")),
                (LOCAL4_24, Element("198.18.1.2", "198.18.1.0/24", "bad name!/ctr/eth0")),
            ],
            "names no attachment",
        ),
    ],
    ids=["no-comment", "truncated", "no-local", "no-sources", "outside-subnet", "invalid-owner"],
)
def test_unreadable_elements_are_listed_not_guessed(
    elements: list[tuple[str, Element]], reason: str
) -> None:
    result = recover(_table(*elements))
    assert result.attachments == {}
    assert len(result.unreadable) == 1
    assert reason in result.unreadable[0]


def test_owner_with_too_many_ips_is_unreadable_whole() -> None:
    elements = []
    for n in range(1, 18):
        elements.append((SOURCES4, Element(f"198.18.1.{n}", None, "net/big/eth0")))
        elements.append((LOCAL4_24, Element(f"198.18.1.{n}", "198.18.1.0/24", "net/big/eth0")))
    elements.append((SOURCES4, Element("198.18.2.2", None, "net/ok/eth0")))
    elements.append((LOCAL4_24, Element("198.18.2.2", "198.18.2.0/24", "net/ok/eth0")))
    result = recover(_table(*elements))
    assert result.attachments == {("net", "ok", "eth0"): ("198.18.2.2/24",)}
    assert len(result.unreadable) == 17


def test_local_comment_decides_when_the_two_disagree() -> None:
    result = recover(
        _table(
            (SOURCES4, Element("198.18.1.2", None, "net/old/eth0")),
            (LOCAL4_24, Element("198.18.1.2", "198.18.1.0/24", "net/new/eth0")),
        )
    )
    assert result.attachments == {("net", "new", "eth0"): ("198.18.1.2/24",)}


# ---- the daemon -------------------------------------------------------------------------

SETUPS = {
    ("net-a", "ctr1", "eth0"): ["198.18.10.2/24", "2001:db8:10::2/64"],
    ("net-a", "ctr2", "eth0"): ["198.18.10.3/24"],
    ("net-b", "ctr3", "net1"): ["198.18.11.2/16"],
}


@pytest.mark.kernel
def test_restart_without_journal_adopts_the_table_and_removes_nothing(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory()
    for (network, ctr, ifname), addrs in SETUPS.items():
        assert daemon.client.put_attachment(network, ctr, ifname, addrs).status == 200
    before = without_handles(nft_listing(daemon.ns))
    daemon.kill(signal.SIGKILL)
    shutil.rmtree(daemon.state_dir)
    restart(daemon)

    status = daemon.status()
    assert status["adopted"] == {"attachments": 3, "unreadable": 0}
    assert "adopted 3 attachments" in daemon.log_path.read_text()
    got = {
        (a["network"], a["container_id"], a["ifname"]): a["ips"]
        for a in daemon.client.attachments()
    }
    assert got == SETUPS
    assert without_handles(nft_listing(daemon.ns)) == before
    assert status["syncs"]["failures"] == 0

    # The adopted attachments were journalled: the next restart finds them there.
    daemon.stop()
    restart(daemon, kill=False)
    assert daemon.status()["adopted"] is None
    assert len(daemon.client.attachments()) == 3


# Keys at the edge of the element comment (128 bytes as 'network/container_id/ifname'), and
# names that adoption could not read back, which a PUT must therefore refuse.
EDGE_SETUPS = {
    ("n" * 64, "c" * 48, "x" * 14): ["198.18.12.2/24"],  # exactly 128 bytes
    ("n" * 63, "c" * 49, "\u00e9" * 7): ["198.18.12.3/24", "2001:db8:12::3/64"],  # 128 bytes
    ("net-edge", "ctr", "e~th0"): ["198.18.12.4/24"],  # '~' inside the name is fine
}
REFUSED_KEYS = [
    ("net-edge", "ctr", "eth0~"),  # reads as a comment cut short
    ("n" * 64, "c" * 48, "x" * 15),  # 129 bytes: nftables would cut the comment
    ("net-edge", "c" * 128, "eth0"),
    ("net-edge", "ctr", "e\u200b0"),  # zero-width space
]


def quoted_path(network: str, container_id: str, ifname: str) -> str:
    return "/v1/attachments/" + "/".join(
        urllib.parse.quote(p, safe="") for p in (network, container_id, ifname)
    )


@pytest.mark.kernel
def test_every_accepted_attachment_comes_back_after_a_journal_loss(
    daemon_factory: DaemonFactory,
) -> None:
    """Issue 10, case 9: what the API accepts round-trips through the element comments."""
    daemon = daemon_factory()
    for key, addrs in EDGE_SETUPS.items():
        resp = daemon.client.put(quoted_path(*key), {"ips": addrs})
        assert resp.status == 200, (key, resp.body)
    for n, key in enumerate(REFUSED_KEYS):
        resp = daemon.client.put(quoted_path(*key), {"ips": [f"198.18.13.{n + 2}/24"]})
        assert resp.status == 400, (key, resp.body)
        assert resp.is_json_error()
    before = without_handles(nft_listing(daemon.ns))
    daemon.kill(signal.SIGKILL)
    shutil.rmtree(daemon.state_dir)
    restart(daemon)

    assert daemon.status()["adopted"] == {"attachments": len(EDGE_SETUPS), "unreadable": 0}
    got = {
        (a["network"], a["container_id"], a["ifname"]): a["ips"]
        for a in daemon.client.attachments()
    }
    assert got == EDGE_SETUPS
    assert without_handles(nft_listing(daemon.ns)) == before


@pytest.mark.kernel
def test_unreadable_elements_are_reported_and_removed(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    assert daemon.client.put_attachment("net", "ctr", "eth0", ["198.18.20.2/24"]).status == 200
    daemon.kill(signal.SIGKILL)
    shutil.rmtree(daemon.state_dir)
    # Someone's element without an owner comment.
    nft(daemon.ns, "add", "element", "inet", "masqd", "sources4", "{ 198.18.21.2 }")
    nft(daemon.ns, "add", "element", "inet", "masqd", "local4_24", "{ 198.18.21.2 . 198.18.21.0 }")
    restart(daemon)
    assert daemon.status()["adopted"] == {"attachments": 1, "unreadable": 1}
    assert set(kernel_table(daemon.ns).sets[SOURCES4]) == {"198.18.20.2"}
    assert SOURCES6 not in {k for k, v in kernel_table(daemon.ns).sets.items() if v}

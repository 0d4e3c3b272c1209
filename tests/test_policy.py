"""The policy: exempt destinations, fully-random masquerade, SIGHUP reload; and `masqctl diff`.

Real packets go from a container namespace through the host (running masqd) to an outside
namespace that answers with the source address it saw, so "masqueraded" means the outside
saw the host's address. The outside holds a second address, 198.19.1.2 / 2001:db8:ff:1::2,
which the tests exempt.
"""

from __future__ import annotations

import contextlib
import json
import signal
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from masqd.kernel.fake import FakeBackend
from masqd.metrics import Metrics
from masqd.planning import ruleset
from masqd.planning.ruleset import Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import DesiredState
from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, kernel_table, masqctl
from tests.netns import Topology, nft, ns_run, probe, topology

EXEMPT_NET4, EXEMPT_DST4 = "198.19.1.0/24", "198.19.1.2"
EXEMPT_NET6, EXEMPT_DST6 = "2001:db8:ff:1::/64", "2001:db8:ff:1::2"
OTHER_DST4, OTHER_DST6 = "198.19.0.2", "2001:db8:ff::2"
WAIT = 10.0


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def seen_from(ns: str, dst: str) -> str | None:
    """The source address the outside saw for a new connection from `ns` to `dst`. No answer
    at all (a SYN lost while neighbours resolve on a busy machine) is retried: the masquerade
    decision shows in the address, never in silence, since the outside routes back to the
    containers' own addresses too."""
    for _ in range(3):
        seen = probe(ns, dst)
        if seen is not None:
            return seen
    return None


def write_config(
    path: Path, *, exempt: list[str], random_fully: bool = False, extra: str = ""
) -> None:
    path.write_text(
        extra
        + textwrap.dedent(
            f"""
            [policy]
            exempt_destinations = {json.dumps(exempt)}
            random_fully = {"true" if random_fully else "false"}
            """
        )
    )


def listing(d: MasqdProcess) -> str:
    return nft(d.ns, "list", "table", "inet", d.table).stdout


def status_policy(d: MasqdProcess) -> dict[str, Any]:
    policy: dict[str, Any] = d.status()["policy"]
    return policy


def hup(d: MasqdProcess) -> None:
    d.kill(signal.SIGHUP, wait=False)


def log_has(d: MasqdProcess, text: str) -> bool:
    return text in d.log_path.read_text(errors="replace")


def start_daemon(
    daemon_factory: DaemonFactory,
    *,
    ns: str | None = None,
    extra_args: Sequence[str] = (),
    resync_interval: float = 60.0,
) -> MasqdProcess:
    """A ready daemon. Until it listens, tests.daemon's readiness poll drops sockets whose
    connect failed without closing them; their ResourceWarnings are not about masqd."""
    d = daemon_factory(
        ns=ns, start=False, extra_args=list(extra_args), resync_interval=resync_interval
    )
    d.start(wait=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        d.wait_ready()
    return d


@contextlib.contextmanager
def quiet_topology(containers: int = 1) -> Iterator[Topology]:
    """tests.netns.topology, whose teardown kills the echo server without reaping it (the
    ResourceWarning for that is ignored at teardown only)."""
    stack = contextlib.ExitStack()
    try:
        yield stack.enter_context(topology(containers))
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            stack.close()


@pytest.fixture
def topo() -> Iterator[Topology]:
    """One container behind the host; the outside also answers on the exempt addresses."""
    with quiet_topology(1) as t:
        ns_run(t.outside, "ip", "addr", "add", f"{EXEMPT_DST4}/32", "dev", "eth0")
        ns_run(t.outside, "ip", "-6", "addr", "add", f"{EXEMPT_DST6}/128", "dev", "eth0", "nodad")
        ns_run(t.host, "ip", "route", "add", f"{EXEMPT_DST4}/32", "via", OTHER_DST4)
        ns_run(t.host, "ip", "-6", "route", "add", f"{EXEMPT_DST6}/128", "via", OTHER_DST6)
        yield t


def start_with_container(
    daemon_factory: DaemonFactory, topo: Topology, config: Path, *, resync_interval: float = 60.0
) -> MasqdProcess:
    d = start_daemon(
        daemon_factory,
        ns=topo.host,
        extra_args=["--config", str(config)],
        resync_interval=resync_interval,
    )
    ctr = topo.containers[0]
    resp = d.client.put_attachment("net", "ctr1", "eth0", [ctr.ip4, ctr.ip6])
    assert resp.status == 200, resp.body
    return d


# ---- real packets -----------------------------------------------------------------------


@pytest.mark.kernel
def test_exempt_destination_is_not_masqueraded_until_a_sighup_removes_it(
    daemon_factory: DaemonFactory, topo: Topology, tmp_path: Path
) -> None:
    config = tmp_path / "masqd.toml"
    write_config(config, exempt=[EXEMPT_NET4, EXEMPT_NET6])
    d = start_with_container(daemon_factory, topo, config)
    ctr = topo.containers[0]

    assert seen_from(ctr.ns, EXEMPT_DST4) == ctr.addr4  # exempt: the outside sees the container
    assert seen_from(ctr.ns, EXEMPT_DST6) == ctr.addr6
    assert seen_from(ctr.ns, OTHER_DST4) == topo.host_outside4  # not exempt: masqueraded
    assert seen_from(ctr.ns, OTHER_DST6) == topo.host_outside6
    assert status_policy(d) == {
        "exempt_destinations": [EXEMPT_NET4, EXEMPT_NET6],
        "random_fully": False,
    }

    write_config(config, exempt=[])
    hup(d)
    wait_for(
        "the policy without exempt destinations",
        lambda: status_policy(d)["exempt_destinations"] == [],
    )
    wait_for(
        "empty exempt sets in the kernel",
        lambda: not any(kernel_table(d.ns).sets[s] for s in ruleset.EXEMPT_SETS),
    )
    assert seen_from(ctr.ns, EXEMPT_DST4) == topo.host_outside4
    assert seen_from(ctr.ns, EXEMPT_DST6) == topo.host_outside6
    wait_for("the log line", lambda: log_has(d, "SIGHUP: policy applied"))
    assert d.status()["ready"]


@pytest.mark.kernel
def test_an_invalid_config_on_sighup_changes_nothing(
    daemon_factory: DaemonFactory, topo: Topology, tmp_path: Path
) -> None:
    config = tmp_path / "masqd.toml"
    write_config(config, exempt=[EXEMPT_NET4, EXEMPT_NET6], random_fully=True)
    # Periodic syncs, which change nothing, give the barrier below its syncs to count.
    d = start_with_container(daemon_factory, topo, config, resync_interval=0.2)
    ctr = topo.containers[0]
    before, policy_before = listing(d), status_policy(d)
    generation_before = d.status()["generation"]

    # A host-bits CIDR on line 3: refused as a whole, the valid change beside it included.
    write_config(config, exempt=["198.19.1.2/24"], random_fully=False)
    hup(d)
    wait_for("the refusal in the log", lambda: log_has(d, "SIGHUP: config refused"))
    assert log_has(d, f"{config}:3: policy.exempt_destinations[0]: '198.19.1.2/24' has host bits")

    # A sync started by the refused reload would be done by the second sync from now (the
    # first may have been under way already): wait for that, not for a while.
    syncs = d.status()["syncs"]["total"]
    wait_for("two more syncs", lambda: d.status()["syncs"]["total"] >= syncs + 2)
    assert listing(d) == before
    assert status_policy(d) == policy_before
    assert d.status()["generation"] == generation_before
    assert seen_from(ctr.ns, EXEMPT_DST4) == ctr.addr4

    config.write_text("[policy\n")  # not even TOML
    hup(d)
    wait_for("the second refusal", lambda: log_has(d, "not valid TOML"))
    assert listing(d) == before and status_policy(d) == policy_before
    assert d.proc is not None and d.proc.poll() is None


@pytest.mark.kernel
def test_fully_random_appears_in_the_kernel_listing_when_enabled(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    config = tmp_path / "masqd.toml"
    write_config(config, exempt=[], random_fully=True)
    d = start_daemon(daemon_factory, extra_args=["--config", str(config)])
    assert listing(d).count("masquerade fully-random") == 2  # IPv4 and IPv6
    assert status_policy(d)["random_fully"] is True
    assert "fully-random: on" in masqctl(d.socket, "status").stdout

    write_config(config, exempt=[], random_fully=False)
    hup(d)
    wait_for("plain masquerade", lambda: "fully-random" not in listing(d))
    assert listing(d).count("masquerade") == 2


@pytest.mark.kernel
def test_sighup_names_settings_that_need_a_restart(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    config = tmp_path / "masqd.toml"
    write_config(config, exempt=[EXEMPT_NET4])
    d = start_daemon(daemon_factory, extra_args=["--config", str(config)])
    # (The test daemon's own flags set table and resync_interval: those would not change.)
    write_config(config, exempt=[EXEMPT_NET4], extra='max_attachments = 5\nnft_runner = "cli"\n')
    hup(d)
    wait_for(
        "the restart warning",
        lambda: log_has(d, "take effect only after a restart: max_attachments, nft_runner"),
    )
    assert d.status()["max_attachments"] == 100_000  # still the running value
    assert kernel_table(d.ns).sets[ruleset.EXEMPT4]


# ---- the policy change is one transaction (fake kernel) ---------------------------------


async def test_a_policy_change_is_applied_in_one_transaction() -> None:
    fake = FakeBackend(table="masqd")
    state = DesiredState()
    state.put(("net", "c1", "eth0"), ["198.18.1.2/24", "2001:db8:1::2/64"])
    rec = Reconciler(state=state, backend=fake, table="masqd", policy=Policy(), metrics=Metrics())
    assert await rec.sync_once()
    committed = len(fake.applied)

    new = Policy(exempt4=("10.0.0.0/8", "10.1.0.0/16"), exempt6=("fd00::/8",), random_fully=True)
    rec.set_policy(new)
    assert await rec.sync_once()
    assert len(fake.applied) == committed + 1
    table = fake.state()
    assert set(table.sets[ruleset.EXEMPT4]) == {"10.0.0.0/8"}  # collapsed: no overlap
    assert set(table.sets[ruleset.EXEMPT6]) == {"fd00::/8"}
    assert table.structure == ruleset.desired_structure(
        new, [n for n in table.sets if ruleset.is_local_set(n)]
    )
    assert rec.applied_policy == new
    await rec.wait_policy_applied(new, timeout=0.1)


# ---- masqctl diff -----------------------------------------------------------------------


async def test_diff_plans_against_a_fresh_listing_and_changes_nothing() -> None:
    fake = FakeBackend(table="masqd")
    state = DesiredState()
    state.put(("net", "c1", "eth0"), ["198.18.1.2/24"])
    rec = Reconciler(state=state, backend=fake, table="masqd", policy=Policy(), metrics=Metrics())
    assert await rec.sync_once()
    assert (await rec.diff()).empty

    # Someone deletes our element behind the daemon's back: the mirror does not know.
    fake.execute(
        {
            "nftables": [
                {
                    "delete": {
                        "element": {
                            "family": "inet",
                            "table": "masqd",
                            "name": "sources4",
                            "elem": ["198.18.1.2"],
                        }
                    }
                }
            ]
        }
    )
    before, commits = fake.dump(), len(fake.applied)
    tx = await rec.diff()
    assert not tx.empty
    assert (
        tx.to_script() == 'create element inet masqd sources4 { 198.18.1.2 comment "net/c1/eth0" }'
    )
    assert fake.dump() == before and len(fake.applied) == commits  # nothing applied


@pytest.mark.kernel
def test_masqctl_diff_on_a_daemon_in_sync_says_no_changes(daemon_factory: DaemonFactory) -> None:
    daemon = start_daemon(daemon_factory)
    assert daemon.client.put_attachment("net", "c1", "eth0", ["198.18.1.2/24"]).status == 200
    out = masqctl(daemon.socket, "diff")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no changes: the kernel's table matches the desired state"
    payload = json.loads(masqctl(daemon.socket, "--json", "diff").stdout)
    assert payload == {"commands": "", "empty": True, "element_changes": 0}

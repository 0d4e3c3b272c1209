"""Every benchmark still runs: each one at --quick sizes, its JSON and PNG checked.

The benchmarks are not tests and CI does not run them at full size; this keeps them from
rotting. Each runs in-process through the same entry point as `python -m bench NAME
--quick`, writing into a temporary directory (never over the published bench/results).
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import BENCHMARKS
from bench.__main__ import main, run_one
from bench.harness import REPO_ROOT
from tests.netns import netns, nft

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="benchmarks build network namespaces: root only"
)

COMMON_KEYS = {
    "benchmark",
    "quick",
    "params",
    "columns",
    "rows",
    "summary",
    "goals",
    "machine",
    "date",
}

# Row keys each benchmark must produce (the README's tables and plots read them).
ROW_KEYS: dict[str, set[str]] = {
    "setup-latency": {"attachments", "put_p50_ms", "put_p99_ms", "del_p50_ms"},
    "burst": {"setups", "wall_s", "setups_per_s", "transactions"},
    "core-target": {"attachments", "put_p50_ms", "put_p99_ms"},
    "startup": {"attachments", "start_to_ready_s", "repair_s", "rss_restarted_mib"},
    "idle-cpu": {"attachments", "window_s", "cpu_percent", "syncs"},
    "conn-rate": {"table", "attachments", "conn_per_s", "vs_0"},
    "per-op": {"impl", "attachments", "p50_ms", "del_p50_ms"},
    "cni-cold-start": {"op", "program", "median_ms", "p99_ms"},
    "nft-runner": {"runner", "elements", "p50_ms", "p99_ms"},
    "hostile": {"attack", "attachments", "put_p50_ms", "vs_quiet", "peak_rss_mib"},
}

GOALS: dict[str, set[str]] = {
    "setup-latency": {"setup p50 (worst size)", "setup p99 (worst size)"},
    "burst": {"burst rate (slowest size)"},
    "startup": {"start-up to ready", "RSS (largest reading)"},
    "idle-cpu": {"idle CPU"},
    "per-op": {
        "chain ADD: masqd-cni's share, p50 (worst size)",
        "chain DEL: masqd-cni's share, p50 (worst size)",
    },
    "cni-cold-start": {
        "masqd-cni VERSION median",
        "masqd-cni ADD median",
        "masqd-cni ADD p99",
        "masqd-cni DEL median",
        "masqd-cni DEL p99",
        "masqd-cni binary size",
    },
}


def test_every_benchmark_has_a_smoke_check() -> None:
    assert set(ROW_KEYS) == set(BENCHMARKS)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_run_writes_json_with_expected_keys_and_a_png(name: str, tmp_path: Path) -> None:
    if name == "cni-cold-start" and importlib.util.find_spec("bench.cni_cold_start") is None:
        pytest.skip("bench/cni_cold_start.py (the CNI plugin's measurement) is not in this tree")
    run_one(name, quick=True, out=tmp_path)

    data: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(data) >= COMMON_KEYS
    assert data["benchmark"] == name and data["quick"] is True and data["date"]
    assert data["rows"], "a benchmark must produce at least one row"
    for row in data["rows"]:
        assert ROW_KEYS[name] <= set(row), f"row {row} lacks {ROW_KEYS[name] - set(row)}"
    assert {g["name"] for g in data["goals"]} >= GOALS.get(name, set())
    if name == "conn-rate":
        # The daemon and the benchmark agree on the table's shape (bench/masqtable.py).
        origins = data["params"]["masqd_table"].values()
        assert all(o["source"] == "daemon" and o["same_shape_as_masqtable"] for o in origins)
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-benchmark"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.kernel
@needs_root
def test_replot_redraws_from_json_without_measuring(tmp_path: Path) -> None:
    run_one("burst", quick=True, out=tmp_path)
    (tmp_path / "burst.png").unlink()
    assert main(["burst", "--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "burst.png").read_bytes().startswith(b"\x89PNG")


# ---- the pieces the figures rest on, without a kernel ------------------------------------


def test_per_rule_comment_is_the_cni_plugins_hash_then_the_readable_part() -> None:
    from bench import perrule

    comment = perrule.comment_for_instance("mynet", "eth0", "abc")
    network_hash = hashlib.sha512(b"mynet").hexdigest()[:16]
    instance_hash = hashlib.sha512(b"eth0:abc").hexdigest()[:16]
    assert comment == f"{network_hash}-{instance_hash}, net: mynet, if: eth0, id: abc"
    assert len(perrule.comment_for_instance("n", "eth0", "x" * 300)) == 128


def test_per_rule_table_script_has_the_chains_then_a_rule_per_ip() -> None:
    from bench import perrule
    from bench.addresses import attachments

    lines = perrule.table_script(attachments(0, 2)).splitlines()
    assert lines[3] == "flush chain inet cni_plugins_masquerade postrouting"
    assert lines[6] == "add rule inet cni_plugins_masquerade postrouting goto masq_checks"
    assert lines[7].startswith(
        "add rule inet cni_plugins_masquerade masq_checks "
        "ip saddr == 198.18.0.1 ip daddr != 198.18.0.0/16 masquerade comment "
    )
    assert "ip6 saddr == 2001:db8::1 ip6 daddr != 2001:db8::/64 masquerade" in lines[8]
    assert len(lines) == 7 + 4


def _listed_table(ns: str) -> list[dict[str, Any]]:
    """The per-rule table as `nft -j` lists it, without handles (they differ run to run)."""
    listing = json.loads(nft(ns, "-j", "list", "table", "inet", "cni_plugins_masquerade").stdout)
    objects = [o for o in listing["nftables"] if "metainfo" not in o]
    for o in objects:
        for body in o.values():
            body.pop("handle", None)
    return objects


@pytest.mark.kernel
@needs_root
def test_the_prefilled_per_rule_table_is_what_the_upstream_plugin_writes(tmp_path: Path) -> None:
    """per-op prefills N containers' rules with a script (bench.perrule); the real bridge
    plugin with its nftables ipMasq must leave exactly that table for the same container."""
    from bench import cni_chain, perrule
    from bench.addresses import NETWORK, Attachment

    cni_chain.require_tools()
    conf = cni_chain.bridge_config("bridge ipMasq nftables", str(tmp_path / "ipam"))
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(cni_chain.CNI_TOOLS),
    }
    with netns("node") as node, netns("ctr") as ctr, netns("copy") as copy:
        proc = subprocess.run(
            ["ip", "netns", "exec", node, str(cni_chain.CNI_TOOLS / "bridge")],
            input=json.dumps(conf).encode(),
            env={**env, "CNI_NETNS": f"/run/netns/{ctr}"},
            capture_output=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ips = tuple(ip["address"] for ip in json.loads(proc.stdout)["ips"])
        nft(copy, "-f", "-", input=perrule.table_script([Attachment(NETWORK, "c1", "eth0", ips)]))
        assert _listed_table(copy) == _listed_table(node)


def test_benchmark_addresses_are_unique_host_addresses_of_the_benchmark_ranges() -> None:
    from bench.addresses import MAX_ATTACHMENTS, attachment, attachments

    every = [a.ips for a in attachments(0, MAX_ATTACHMENTS)]
    assert len({ips[0] for ips in every}) == len({ips[1] for ips in every}) == MAX_ATTACHMENTS
    assert MAX_ATTACHMENTS >= 100_000
    # Around the /16 boundary and a stride through the rest (parsing all would take seconds).
    sample = [*range(0, MAX_ATTACHMENTS, 997), 65532, 65533, 65534, 65535, MAX_ATTACHMENTS - 1]
    for i in sample:
        iface4, iface6 = (ipaddress.ip_interface(ip) for ip in attachment(i).ips)
        assert iface4 in ipaddress.ip_network("198.18.0.0/15") and iface4.network.prefixlen == 16
        assert iface4.ip not in (iface4.network.network_address, iface4.network.broadcast_address)
        assert iface6.ip in ipaddress.ip_network("2001:db8::/32")


def test_percentile_interpolates_between_closest_ranks() -> None:
    from bench.harness import percentile

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == 99.0


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _pids(namespace: str) -> list[str]:
    """The processes running in `namespace` (none once it is gone)."""
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return out.stdout.split()


def _own(names: set[str], pid: int) -> set[str]:
    """The namespaces a process made (tests.netns.new_name puts its pid in each name): other
    test runs on the machine make and remove namespaces of their own meanwhile."""
    return {name for name in names if re.fullmatch(rf"mq\D*{pid % 10000}\d+[0-9a-f]{{3}}", name)}


@pytest.mark.kernel
@needs_root
def test_a_benchmark_stopped_with_sigterm_leaves_no_namespace_behind(tmp_path: Path) -> None:
    before = _namespaces()
    command = [sys.executable, "-m", "bench", "setup-latency", "--quick", "--out", str(tmp_path)]
    quiet = subprocess.DEVNULL
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=quiet, stderr=quiet) as proc:
        try:
            deadline = time.monotonic() + 30
            # Its daemon running in one of its namespaces: stopped mid-run, not before.
            while True:
                created = _own(_namespaces() - before, proc.pid)
                if any(_pids(name) for name in created):
                    break
                assert proc.poll() is None and time.monotonic() < deadline, "no daemon running"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not created & _namespaces()

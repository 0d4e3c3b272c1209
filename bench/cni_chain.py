"""A CNI chain as a runtime runs it, timed from inside the node's namespace; and the node's
"existing containers" that the chain runs against.

The plugins are the real ones: upstream `bridge` and `host-local` (built by `make
test-tools` from the CNI plugins' Go module, a release with the nftables ipMasq backend) and
masqd-cni (cni/bin). Three variants of one network:

- `bridge`: bridge with `ipMasq: false` alone, no masquerade at all;
- `bridge+masqd-cni`: the same, then masqd-cni with bridge's result (masqd's way);
- `bridge ipMasq nftables`: bridge with `ipMasq: true, ipMasqBackend: nftables` (one rule
  per container IP in table `inet cni_plugins_masquerade`, the way masqd replaces).

The timing loop runs inside the node namespace (`python -m bench.cni_chain` under `ip netns
exec`, as bench.perrule's did), so every plugin costs what it costs under a runtime, without
a namespace switch added to each spawn. It reads a JSON spec on stdin and prints one JSON
sample per ADD/DEL pair.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import perrule
from bench.addresses import NETWORK, attachments
from bench.harness import REPO_ROOT

CNI_TOOLS = REPO_ROOT / ".venv" / "cni-tools"
MASQD_CNI = REPO_ROOT / "cni" / "bin" / "masqd-cni"
BRIDGE = "mqbench0"
SUBNET4 = ipaddress.IPv4Network("198.18.0.0/16")
SUBNET6 = ipaddress.IPv6Network("2001:db8::/64")
VARIANTS = ("bridge", "bridge+masqd-cni", "bridge ipMasq nftables")
CNI_VERSION = "1.1.0"


def require_tools() -> None:
    for path in (CNI_TOOLS / "bridge", CNI_TOOLS / "host-local", MASQD_CNI):
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} is missing: `make setup test-tools` builds it")


def bridge_config(variant: str, ipam_dir: str) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": CNI_VERSION,
        "name": NETWORK,
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipMasq": variant == "bridge ipMasq nftables",
        "ipam": {
            "type": "host-local",
            "dataDir": ipam_dir,
            "ranges": [[{"subnet": str(SUBNET4)}], [{"subnet": str(SUBNET6)}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        },
    }
    if conf["ipMasq"]:
        conf["ipMasqBackend"] = "nftables"
    return conf


def masqd_config(socket: str) -> dict[str, Any]:
    return {"cniVersion": CNI_VERSION, "name": NETWORK, "type": "masqd-cni", "socket": socket}


# ---- the node's existing containers -------------------------------------------------------


def lease_ips(i: int) -> tuple[str, str]:
    """The addresses host-local gives the i-th container (after the gateway, .1)."""
    return str(SUBNET4.network_address + 2 + i), str(SUBNET6.network_address + 2 + i)


def bridge_links() -> str:
    """`ip -batch` lines: the network's bridge (the plugin would make it on its first ADD)."""
    return f"link add {BRIDGE} type bridge\nlink set {BRIDGE} up\n"


# A Linux bridge holds at most 1,023 ports, so a node's containers beyond the first 1,000 sit
# on other bridges (other networks of the node): the timed network's bridge holds 1,000.
PORTS_PER_BRIDGE = 1000


def grow_links(start: int, stop: int) -> str:
    """`ip -batch` lines: a veth per container start..stop-1, on the bridge of its network."""
    lines = []
    for i in range(start, stop):
        group = i // PORTS_PER_BRIDGE
        bridge = BRIDGE if group == 0 else f"mqother{group}"
        if i % PORTS_PER_BRIDGE == 0 and group > 0:
            lines += [f"link add {bridge} type bridge", f"link set {bridge} up"]
        lines += [
            f"link add mqh{i} type veth peer name mqc{i}",
            f"link set mqh{i} master {bridge}",
            f"link set mqh{i} up",
        ]
    return "\n".join(lines) + "\n"


def grow_leases(ipam_dir: str, start: int, stop: int) -> None:
    """host-local's files for containers start..stop-1, as its disk store writes them."""
    directory = Path(ipam_dir, NETWORK)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        for ip in lease_ips(i):
            (directory / ip).write_text(f"c{i:07d}\r\neth0")
    if stop:
        v4, v6 = lease_ips(stop - 1)
        (directory / "last_reserved_ip.0").write_text(v4)
        (directory / "last_reserved_ip.1").write_text(v6)


def grow_per_rule_table(start: int, stop: int) -> str:
    """The upstream nftables ipMasq table with a rule per IP of containers start..stop-1."""
    return perrule.table_script(attachments(start, stop))


# ---- the timing loop, inside the node namespace -------------------------------------------


def _run(argv: list[str], command: str, conf: dict[str, Any], env: dict[str, str]) -> bytes:
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, **env}
    proc = subprocess.run(
        argv, input=json.dumps(conf).encode(), env=full, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {command} failed: {proc.stdout!r} {proc.stderr!r}")
    return proc.stdout


def one_round(
    variant: str, netns_path: str, container_id: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """ADD then DEL of one container through the variant's chain; seconds for each."""
    env = {
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_TOOLS),
    }
    bridge = [str(CNI_TOOLS / "bridge")]
    bridge_conf = bridge_config(variant, spec["ipam_dir"])
    chained = variant == "bridge+masqd-cni"
    t0 = time.perf_counter()
    result = json.loads(_run(bridge, "ADD", bridge_conf, env))
    t1 = time.perf_counter()
    if chained:
        _run([str(MASQD_CNI)], "ADD", {**masqd_config(spec["socket"]), "prevResult": result}, env)
    t2 = time.perf_counter()
    if chained:
        _run([str(MASQD_CNI)], "DEL", {**masqd_config(spec["socket"]), "prevResult": result}, env)
    t3 = time.perf_counter()
    _run(bridge, "DEL", {**bridge_conf, "prevResult": result}, env)
    t4 = time.perf_counter()
    return {
        "variant": variant,
        "add_s": t2 - t0,
        "del_s": t4 - t2,
        "bridge_add_s": t1 - t0,
        "masqd_cni_add_s": t2 - t1,
        "masqd_cni_del_s": t3 - t2,
    }


def run_rounds(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Variants interleaved round by round, so a busy moment of the machine hits all three."""
    samples = []
    for k, netns_paths in enumerate(spec["rounds"]):
        for variant, path in zip(VARIANTS, netns_paths, strict=True):
            samples.append(one_round(variant, path, f"chain{k:04d}{VARIANTS.index(variant)}", spec))
    return samples


def namespace_names(count: int, tag: str) -> list[str]:
    return [f"mqchain-{tag}-{i}" for i in range(count)]


def add_namespaces(names: Iterable[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)


def delete_namespaces(names: Iterable[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


if __name__ == "__main__":
    print(json.dumps(run_rounds(json.load(sys.stdin))))

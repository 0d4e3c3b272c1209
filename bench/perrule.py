"""The per-rule baseline: the CNI plugins' nftables ipMasq, reproduced through the `nft` binary.

This is what masqd replaces, copied from containernetworking/plugins
pkg/ip/ipmasq_nftables_linux.go and the knftables calls it makes:

- table `inet cni_plugins_masquerade` (with a comment), a regular chain `masq_checks` (with
  a comment) and a base chain `postrouting` (nat, hook postrouting, priority 100 = srcnat)
  holding `ip daddr == 224.0.0.0/4 return`, `ip6 daddr == ff00::/8 return` and
  `goto masq_checks`;
- one rule per attachment IP in `masq_checks`:
  `ip saddr == IP ip daddr != SUBNET masquerade comment "HASH, net: N, if: I, id: C"`, where
  HASH is sha512(network)[:16] + "-" + sha512(ifname + ":" + containerID)[:16] in hex and the
  comment is cut to 128 bytes (knftables.CommentLengthMax);
- an ADD lists the chain as JSON (`nft --json list chain ...`), keeps the rules whose comment
  starts with the instance hash, and runs one `nft -f -` transaction that adds the table and
  both chains, flushes and refills `postrouting`, deletes the stale rules by handle and adds
  one rule per IP of the attachment;
- knftables.New(), which the plugin calls on every ADD and DEL, first runs `nft --version`
  and `nft --check -f -` on `add table ... { comment "test" ; }`; timed separately here.

The timed part runs inside the namespace (`python -m bench.perrule ops ...` under
`ip netns exec`) so that every `nft` spawn costs what it costs a plugin, without the
namespace switch of `ip netns exec` added to each call.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bench.addresses import Attachment, attachment
from masqd.migrate import comment_for_instance, hash_for_instance

TABLE = "cni_plugins_masquerade"
CHAIN = "masq_checks"
TABLE_COMMENT = "Masquerading for plugins from github.com/containernetworking/plugins"
CHAIN_COMMENT = "Masquerade traffic from certain IPs to any (non-multicast) IP outside their subnet"


def _quote(text: str) -> str:
    # Go's %q for the printable ASCII these comments hold.
    return json.dumps(text)


def masq_rule(ip_with_prefix: str) -> str:
    """knftables.Concat(ip, "saddr", "==", IP, ip, "daddr", "!=", dstNet, "masquerade")."""
    iface = ipaddress.ip_interface(ip_with_prefix)
    family = "ip" if iface.version == 4 else "ip6"
    return f"{family} saddr == {iface.ip} {family} daddr != {iface.network} masquerade"


def _ensure_lines() -> list[str]:
    t = f"inet {TABLE}"
    return [
        f"add table {t} {{ comment {_quote(TABLE_COMMENT)} ; }}",
        f"add chain {t} {CHAIN} {{ comment {_quote(CHAIN_COMMENT)} ; }}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"flush chain {t} postrouting",
        f"add rule {t} postrouting ip daddr == 224.0.0.0/4  return",
        f"add rule {t} postrouting ip6 daddr == ff00::/8  return",
        f"add rule {t} postrouting goto {CHAIN}",
    ]


def _rule_lines(a: Attachment) -> list[str]:
    comment = _quote(comment_for_instance(a.network, a.ifname, a.container_id))
    return [f"add rule inet {TABLE} {CHAIN} {masq_rule(ip)} comment {comment}" for ip in a.ips]


def add_transaction(a: Attachment, stale_handles: Sequence[int]) -> str:
    """The `nft -f -` script of one setupIPMasqNFTables call."""
    lines = _ensure_lines()
    lines += [f"delete rule inet {TABLE} {CHAIN} handle {h}" for h in stale_handles]
    lines += _rule_lines(a)
    return "\n".join(lines) + "\n"


def table_script(attachments: Iterable[Attachment]) -> str:
    """The table as N successive ADDs leave it, written as one script (for prefilling)."""
    lines = _ensure_lines()
    for a in attachments:
        lines += _rule_lines(a)
    return "\n".join(lines) + "\n"


def _nft(
    *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["nft", *args], input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def list_chain() -> str | None:
    """`nft --json list chain` of masq_checks, or None when it does not exist yet."""
    proc = _nft("--json", "list", "chain", "inet", TABLE, CHAIN, check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None  # IsNotFound: the chain does not exist yet, which is fine
        raise RuntimeError(f"nft list chain failed: {proc.stderr.strip()}")
    return proc.stdout


def matching_rules(listing: str | None, comment_prefix: str) -> list[int]:
    """Handles of the listed rules whose comment starts with the prefix."""
    if listing is None:
        return []
    handles = []
    for obj in json.loads(listing)["nftables"]:
        rule = obj.get("rule")
        if rule is not None and str(rule.get("comment", "")).startswith(comment_prefix):
            handles.append(int(rule["handle"]))
    return handles


def find_rules(comment_prefix: str) -> list[int]:
    """findRules: list the chain, keep the rules whose comment starts with the prefix."""
    return matching_rules(list_chain(), comment_prefix)


def constructor_probe() -> None:
    """What knftables.New() runs before the plugin does anything."""
    _nft("--version")
    _nft("--check", "-f", "-", input=f'add table inet {TABLE} {{ comment "test" ; }}\n')


def cni_add(a: Attachment) -> dict[str, float]:
    """One ADD the CNI plugins' way; seconds spent listing (nft, then parsing) and applying."""
    t0 = time.perf_counter()
    listing = list_chain()
    t1 = time.perf_counter()
    stale = matching_rules(listing, hash_for_instance(a.network, a.ifname, a.container_id))
    t2 = time.perf_counter()
    _nft("-f", "-", input=add_transaction(a, stale))
    t3 = time.perf_counter()
    return {
        "list_s": t2 - t0,
        "list_nft_s": t1 - t0,
        "list_parse_s": t2 - t1,
        "apply_s": t3 - t2,
        "total_s": t3 - t0,
    }


def cni_del(a: Attachment) -> None:
    """teardownIPMasqNFTables: delete the instance's rules by handle."""
    handles = find_rules(hash_for_instance(a.network, a.ifname, a.container_id))
    if handles:
        script = "".join(f"delete rule inet {TABLE} {CHAIN} handle {h}\n" for h in handles)
        _nft("-f", "-", input=script)


def run_ops(first_index: int, repeat: int) -> list[dict[str, float]]:
    """`repeat` timed ADDs of new attachments, each undone (untimed) so the size stays put."""
    samples = []
    for k in range(repeat):
        a = attachment(first_index + k, prefix="op")
        t0 = time.perf_counter()
        constructor_probe()
        ctor = time.perf_counter() - t0
        sample = cni_add(a)
        sample["constructor_s"] = ctor
        samples.append(sample)
        cni_del(a)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perrule")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ops = sub.add_parser("ops", help="timed CNI-style ADDs inside the current namespace (JSON out)")
    ops.add_argument("--first-index", type=int, required=True)
    ops.add_argument("--repeat", type=int, required=True)
    args = parser.parse_args(argv)
    result: Any = run_ops(args.first_index, args.repeat)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The per-rule table: what the CNI plugins' nftables ipMasq leaves after N containers.

masqd replaces this. The benchmarks run the real upstream plugin for every timed ADD and DEL
(bench.cni_chain); this module only writes the table it would have left after N earlier
containers, in one `nft -f` script, because N real ADDs at 10,000 would take hours. The
shape is the plugin's (pkg/ip/ipmasq_nftables_linux.go, plugins v1.9), and
tests/test_bench_smoke.py compares it with what the real plugin writes:

- table `inet cni_plugins_masquerade` (with a comment), a regular chain `masq_checks` (with
  a comment) and a base chain `postrouting` (nat, hook postrouting, priority 100 = srcnat)
  holding `ip daddr == 224.0.0.0/4 return`, `ip6 daddr == ff00::/8 return` and
  `goto masq_checks`;
- one rule per attachment IP in `masq_checks`:
  `ip saddr == IP ip daddr != SUBNET masquerade comment "HASH, net: N, if: I, id: C"`, where
  HASH is sha512(network)[:16] + "-" + sha512(ifname + ":" + containerID)[:16] in hex and the
  comment is cut to 128 bytes (knftables.CommentLengthMax). Every ADD of the plugin lists
  this whole chain (which is why its cost grows with N).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from bench.addresses import Attachment
from masqd.migrate import comment_for_instance

__all__ = ["comment_for_instance", "masq_rule", "table_script"]

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


def table_script(attachments: Iterable[Attachment]) -> str:
    """The table as N successive ADDs leave it, written as one script (for prefilling)."""
    lines = _ensure_lines()
    for a in attachments:
        lines += _rule_lines(a)
    return "\n".join(lines) + "\n"

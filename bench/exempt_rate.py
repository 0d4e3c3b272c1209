"""exempt-rate: new TCP connections per second through NAT with 0 vs 5,000 exempt destinations.

The exempt sets are interval sets that the postrouting chain consults once per new flow
(`ip daddr @exempt4 return`), so their size must not slow connections. This measures it the
way `bench.conn_rate` measures the attachment count: a container namespace connects to an
outside namespace through a host namespace that masquerades it, with `bench.connload`'s
connect-and-reset load, and the connection rate is the measure.

The tables are the daemon's own: masqd runs in a throwaway namespace with a config file
holding the exempt list (0, or 5,000 IPv4 CIDRs, none of which matches the destination),
the measured container's attachment goes in through the API, and the kernel's listing of
the result is what the host namespace loads. The configurations run in interleaved rounds
and the median is reported, so a noisy neighbour on the shared cores affects both alike;
the ratio within one run is what counts (goal: within 10%).

The CIDRs are /31s with a gap between them, from 198.18.64.0 upwards: every one stays a
separate interval (none collapses into a neighbour), and none overlaps the topology's
addresses (containers in 198.18.1.0/24, the outside in 198.19.0.0/24).

`python -m bench.exempt_rate [--quick]` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import daemon
from bench.addresses import Attachment
from bench.conn_rate import interleaved_rounds
from bench.harness import clean_up_on_sigterm
from tests.netns import nft, ns_run, topology

NAME = "exempt-rate"
SIZES = (0, 5000)
GOAL_RATIO = 0.9
_FIRST = int(ipaddress.IPv4Address("198.18.64.0"))


def exempt_cidrs(count: int) -> list[str]:
    """`count` separate /31s from 198.18.64.0, two addresses apart (no two collapse)."""
    cidrs = [f"{ipaddress.IPv4Address(_FIRST + 4 * i)}/31" for i in range(count)]
    if count and ipaddress.ip_address("198.19.0.2") in ipaddress.ip_network(cidrs[-1]).supernet(1):
        raise ValueError("exempt list would reach the destination")
    return cidrs


def daemon_table(count: int, me: Attachment) -> tuple[str, dict[str, int]]:
    """The nft listing of masqd's table with `count` exempt CIDRs and attachment `me`, as the
    daemon writes it, and the number of elements in each exempt set."""
    with tempfile.TemporaryDirectory(prefix="masqd-exempt-") as tmp:
        config = Path(tmp) / "masqd.toml"
        config.write_text(
            "[policy]\nexempt_destinations = " + json.dumps(exempt_cidrs(count)) + "\n"
        )
        with daemon.running(("--config", str(config))) as d:
            d.put(me)
            listing = nft(d.ns, "list", "table", "inet", daemon.TABLE).stdout
            counts = d.element_counts()
    return listing, {"exempt4": counts.get("exempt4", 0), "exempt6": counts.get("exempt6", 0)}


def run(quick: bool = False, progress: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Measure; a dict with the parameters, one row per configuration, and the ratio."""

    def say(step: str, detail: str = "") -> None:
        if progress is not None:
            progress(step, detail)

    seconds = 0.5 if quick else 3.0
    rounds = 1 if quick else 5
    concurrency = 128
    configs: list[tuple[str, int]] = [("none", 0)] + [("masqd", n) for n in SIZES]
    started = time.monotonic()

    with topology(1) as topo:
        ctr = topo.containers[0]
        assert topo.outside_end is not None
        dst = topo.outside_end.addr4
        ns_run(ctr.ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        # Reset flows leave conntrack entries in CLOSE; let them go quickly.
        ns_run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close=1")
        me = Attachment("bench", "measured", "eth0", (ctr.ip4,))
        tables: dict[int, str] = {}
        sets: dict[int, dict[str, int]] = {}
        for n in SIZES:
            tables[n], sets[n] = daemon_table(n, me)
            say(f"daemon wrote the table with {n:,} exempt CIDRs", f"kernel sets: {sets[n]}")
            if sets[n]["exempt4"] != n:
                raise RuntimeError(f"expected {n} exempt4 elements, the kernel holds {sets[n]}")
        scripts = {("none", 0): ""} | {("masqd", n): tables[n] for n in SIZES}
        samples = interleaved_rounds(
            host=topo.host, container=ctr, outside=topo.outside, dst=dst,
            masqueraded_as=topo.host_outside4, tables={c: scripts[c] for c in configs},
            rounds=rounds, seconds=seconds, concurrency=concurrency, progress=say,
            unit="exempt CIDRs",
        )  # fmt: skip

    rows = []
    medians: dict[tuple[str, int], float] = {}
    for kind, n in configs:
        rates = [s["rate"] for s in samples[(kind, n)]]
        medians[(kind, n)] = statistics.median(rates)
        rows.append(
            {
                "table": kind,
                "exempt_cidrs": n,
                "conn_per_s": round(medians[(kind, n)], 1),
                "min": round(min(rates), 1),
                "max": round(max(rates), 1),
                "failed": int(sum(s["failed"] for s in samples[(kind, n)])),
            }
        )
    ratio = medians[("masqd", SIZES[-1])] / medians[("masqd", 0)]
    return {
        "benchmark": NAME,
        "quick": quick,
        "params": {
            "sizes": list(SIZES),
            "seconds": seconds,
            "rounds": rounds,
            "concurrency": concurrency,
            "statistic": "median of interleaved rounds",
            "exempt_sets": {str(n): sets[n] for n in SIZES},
            "cidrs": "separate /31s from 198.18.64.0, none matching the destination",
        },
        "rows": rows,
        "ratio": round(ratio, 3),
        "goal": f"rate with {SIZES[-1]:,} exempt CIDRs >= {GOAL_RATIO:.0%} of the rate with none",
        "goal_met": ratio >= GOAL_RATIO,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exempt_rate", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short rounds (a smoke test)")
    args = parser.parse_args(argv)

    def progress(step: str, detail: str = "") -> None:
        print(f"[{NAME}] {step}" + (f": {detail}" if detail else ""), file=sys.stderr, flush=True)

    json.dump(run(args.quick, progress), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    clean_up_on_sigterm()
    sys.exit(main())

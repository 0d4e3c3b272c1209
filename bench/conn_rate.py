"""conn-rate: new TCP connections per second through the host's NAT, set table vs per-rule chain.

A container namespace connects to an outside namespace through a host namespace that
masquerades it. The host holds either masqd's table (sets, DESIGN.md) or the CNI plugins'
per-rule table (one rule per attachment behind a goto, with hashed comments; see
`bench.perrule`), filled with N other attachments (IPv4 only, one rule each, which is the
per-rule table's most favourable case). In the per-rule table the measured container's
rule comes last, as the newest container's does. "none" (no NAT at all) is the ceiling.
The masqd table is the one the daemon writes for those attachments (see `_masqd_script`).

The kernel runs the nat postrouting chain once per new flow, so connections per second is
the measure. The configurations are run in interleaved rounds and the median is reported,
so that a noisy neighbour on the shared cores affects them all alike; ratios within one run
are what count. Tables are swapped with `nft -f` between measurements.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import daemon, masqtable, perrule, plotting
from bench.addresses import Attachment, fillers
from bench.harness import Progress, Result, module_command
from tests.netns import (
    Endpoint,
    enable_forwarding,
    netns,
    nft,
    ns_run,
    probe,
    start_echo_server,
    veth,
)

NAME = "conn-rate"
SINK_PORT = 9000
KINDS = ("masqd", "per-rule")


@dataclass(frozen=True)
class _Topology:
    host: str
    container: Endpoint
    outside: Endpoint
    host_outside4: str


@contextlib.contextmanager
def _topology() -> Iterator[_Topology]:
    """container -- host (NAT) -- outside, as in tests.netns.topology, plus an echo server
    (tests.netns.probe's peer) that is reaped on the way out."""
    with netns("host") as host, netns("out") as out, netns("c1") as c1:
        enable_forwarding(host)
        outside = Endpoint(out, "eth0", "198.19.0.2/24", "2001:db8:ff::2/64")
        veth(Endpoint(host, "uplink", "198.19.0.1/24", "2001:db8:ff::1/64"), outside)
        ns_run(out, "ip", "route", "add", "198.18.0.0/16", "via", "198.19.0.1")
        ctr = Endpoint(c1, "eth0", "198.18.1.2/24", "2001:db8:1::2/64")
        veth(Endpoint(host, "ctr1", "198.18.1.1/24", "2001:db8:1::1/64"), ctr)
        ns_run(c1, "ip", "route", "add", "default", "via", "198.18.1.1")
        echo = start_echo_server(out)
        try:
            yield _Topology(host, ctr, outside, "198.19.0.1")
        finally:
            echo.kill()
            echo.wait()


def _table(kind: str, n: int, me: Attachment) -> list[Attachment]:
    return [*fillers(n, avoid=frozenset({me.ip4.split("/")[0]}), dual_stack=False), me]


def _per_rule_script(n: int, me: Attachment) -> str:
    return perrule.table_script(_table("per-rule", n, me))


def _masqd_script(n: int, me: Attachment, progress: Progress) -> tuple[str, dict[str, Any]]:
    """The masqd table with n + 1 attachments as an nft script, and how it was made.

    With the daemon available it is the daemon's own table: the attachments go through the
    API in a throwaway namespace and the kernel's listing of the result is what gets loaded.
    The shape of that table is compared with `masqtable`'s layout, so a drift is reported.
    """
    items = _table("masqd", n, me)
    if not daemon.available():
        return masqtable.table_script(items), {"source": "bench/masqtable.py (no daemon)"}
    with daemon.running() as d:
        d.fill(items)
        listing = nft(d.ns, "list", "table", "inet", daemon.TABLE).stdout
        theirs = masqtable.shape(d.table_json())
    with netns("shape") as ns:
        nft(ns, "-f", "-", input=masqtable.table_script(items))
        ours = masqtable.shape(nft(ns, "--json", "list", "table", "inet", masqtable.TABLE).stdout)
    diffs = masqtable.shape_differences(ours, theirs)
    progress(
        f"daemon wrote the masqd table for {n + 1:,} attachments",
        "same shape as bench/masqtable.py" if not diffs else "differs: " + "; ".join(diffs),
    )
    return listing, {"source": "daemon", "same_shape_as_masqtable": not diffs, "differences": diffs}


def _measure(container_ns: str, dst: str, seconds: float, concurrency: int) -> dict[str, float]:
    cmd = module_command(
        "bench.connload",
        "load",
        "--dst",
        dst,
        "--port",
        str(SINK_PORT),
        "--seconds",
        str(seconds),
        "--concurrency",
        str(concurrency),
    )
    out = ns_run(container_ns, *cmd).stdout
    result: dict[str, float] = json.loads(out)
    return result


def wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while f":{port} " not in ns_run(ns, "ss", "-Htln").stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the connection sink is not listening on port {port}")
        time.sleep(0.05)


def interleaved_rounds(
    *,
    host: str,
    container: Endpoint,
    outside: str,
    dst: str,
    masqueraded_as: str,
    tables: dict[tuple[str, int], str],
    rounds: int,
    seconds: float,
    concurrency: int,
    progress: Callable[[str, str], None],
    unit: str,
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Connection-rate samples per (kind, size): each round loads every table in turn into
    the host (an empty script: no NAT at all), so all of them see the same machine load.

    In the first round a probe checks each table does what it should (the sink sees the
    host's address, or the container's own without NAT) before its rate counts.
    """
    samples: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in tables}
    budget = len(tables) * rounds * (seconds + 5) + 60
    serve = module_command(
        "bench.connload", "serve", "--port", str(SINK_PORT), "--max-seconds", str(budget)
    )
    sink = subprocess.Popen(["ip", "netns", "exec", outside, *serve])
    try:
        wait_listening(outside, SINK_PORT)
        for r in range(rounds):
            for (kind, n), script in tables.items():
                nft(host, "flush", "ruleset")
                if script:
                    nft(host, "-f", "-", input=script)
                if r == 0:
                    seen = probe(container.ns, dst)
                    want = masqueraded_as if script else container.addr4
                    if seen != want:
                        raise RuntimeError(f"{kind} at {n}: server saw {seen}, expected {want}")
                m = _measure(container.ns, dst, seconds, concurrency)
                samples[(kind, n)].append(m)
                progress(
                    f"round {r + 1}/{rounds} {kind} {n:,} {unit}",
                    f"{m['rate']:,.0f} conn/s ({m['failed']:.0f} failed)",
                )
    finally:
        sink.kill()
        sink.wait()
    return samples


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [0, 100] if quick else [0, 1000, 10000]
    seconds = 0.5 if quick else 3.0
    rounds = 1 if quick else 3
    concurrency = 128
    configs = [("none", 0)] + [(k, n) for n in sizes for k in KINDS]

    with _topology() as topo:
        ctr = topo.container
        dst = topo.outside.addr4
        ns_run(ctr.ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        # Reset flows leave conntrack entries in CLOSE; let them go quickly.
        ns_run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close=1")
        me = Attachment("bench", "measured", "eth0", (ctr.ip4,))
        scripts: dict[tuple[str, int], str] = {("none", 0): ""}
        origin: dict[str, Any] = {}
        for n in sizes:
            scripts[("masqd", n)], origin[str(n)] = _masqd_script(n, me, progress)
            scripts[("per-rule", n)] = _per_rule_script(n, me)
        samples = interleaved_rounds(
            host=topo.host, container=ctr, outside=topo.outside.ns, dst=dst,
            masqueraded_as=topo.host_outside4, tables={c: scripts[c] for c in configs},
            rounds=rounds, seconds=seconds, concurrency=concurrency, progress=progress,
            unit="attachments",
        )  # fmt: skip

    rows: list[dict[str, Any]] = []
    base = {k: statistics.median(s["rate"] for s in samples[(k, 0)]) for k in KINDS}
    ceiling = statistics.median(s["rate"] for s in samples[("none", 0)])
    for kind, n in configs:
        rates = [s["rate"] for s in samples[(kind, n)]]
        med = statistics.median(rates)
        rows.append(
            {
                "table": kind,
                "attachments": n,
                "conn_per_s": round(med, 1),
                "min": round(min(rates), 1),
                "max": round(max(rates), 1),
                "vs_0": round(med / base[kind], 3) if kind in base else 1.0,
                "vs_no_nat": round(med / ceiling, 3),
                "failed": int(sum(s["failed"] for s in samples[(kind, n)])),
            }
        )
    top = max(sizes)
    by: dict[tuple[str, int], float] = {
        (r["table"], r["attachments"]): r["conn_per_s"] for r in rows
    }
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "sizes": sizes,
            "seconds": seconds,
            "rounds": rounds,
            "concurrency": concurrency,
            "filler_stack": "ipv4",
            "statistic": "median of rounds",
        },
        columns=["table", "attachments", "conn_per_s", "min", "max", "vs_0", "vs_no_nat", "failed"],
        rows=rows,
    )
    result.summary[f"per-rule / masqd at {top:,}"] = round(
        by[("per-rule", top)] / by[("masqd", top)], 3
    )
    result.summary[f"masqd at {top:,} / masqd at 0"] = round(
        by[("masqd", top)] / by[("masqd", 0)], 3
    )
    result.params["masqd_table"] = origin
    result.summary["masqd table written by"] = origin[str(top)]["source"]
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    rows = result.rows
    rate = {(r["table"], r["attachments"]): r["conn_per_s"] for r in rows}
    for kind, other, color in (
        ("masqd", "per-rule", "tab:blue"),
        ("per-rule", "masqd", "tab:orange"),
    ):
        xs = plotting.column(rows, "attachments", table=kind)
        ys = plotting.column(rows, "conn_per_s", table=kind)
        label = "masqd (sets)" if kind == "masqd" else "CNI plugins (rule per attachment)"
        ax.plot(xs, ys, marker="o", color=color, label=label)
        for x, y in zip(xs, ys, strict=True):
            # The higher of the two points at x is labelled above, the lower one below.
            dy = 6 if y >= rate.get((other, x), 0.0) else -13
            ax.annotate(
                f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                fontsize=8, color=color,
            )  # fmt: skip
    ceiling = plotting.column(rows, "conn_per_s", table="none")
    if ceiling:
        ax.axhline(ceiling[0], color="grey", linestyle="--", linewidth=1, label="no NAT")
    ax.set_xlabel("attachments in the table")
    ax.set_ylabel("new TCP connections / s")
    ax.set_ylim(0, max(r["conn_per_s"] for r in rows) * 1.15)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    plotting.save(fig, result, path, "New connections per second through NAT")

"""burst: many setups at once from 64 concurrent clients, and how many transactions they became.

Each size starts from a fresh daemon holding nothing. 64 asyncio clients share the list of
new dual-stack attachments; every setup is a PUT on a fresh connection (one CNI plugin
invocation each) answered once the kernel holds it. Kernel transactions are read from
/v1/status `syncs` before and after; fewer transactions than setups means the reconciler
coalesced them.
"""

from __future__ import annotations

from pathlib import Path

from bench import daemon, plotting
from bench.addresses import attachments
from bench.harness import Progress, Result, ms, percentile

NAME = "burst"
CLIENTS = 64


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [100, 1000] if quick else [1000, 10000]
    rows = []
    for n in sizes:
        with daemon.running() as d:
            before = d.syncs()
            items = list(attachments(0, n))
            progress(f"burst of {n:,}", f"{CLIENTS} clients")
            wall, latencies = daemon.burst(d, items, CLIENTS)
            after = d.syncs()
            held = d.status().get("attachments")
        if held is not None and held != n:
            raise RuntimeError(f"daemon holds {held} attachments after a burst of {n}")
        transactions = after["total"] - before["total"]
        rate = n / wall
        progress(
            f"burst of {n:,} done", f"{wall:.2f} s, {rate:,.0f}/s, {transactions} transactions"
        )
        rows.append(
            {
                "setups": n,
                "wall_s": round(wall, 3),
                "setups_per_s": round(rate, 1),
                "transactions": transactions,
                "failed_syncs": after["failures"] - before["failures"],
                "setups_per_tx": round(n / transactions, 1) if transactions else 0.0,
                "p50_ms": ms(percentile(latencies, 50)),
                "p99_ms": ms(percentile(latencies, 99)),
            }
        )
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "sizes": sizes,
            "clients": CLIENTS,
            "dual_stack": True,
            "connection": "fresh per PUT",
        },
        columns=[
            "setups",
            "wall_s",
            "setups_per_s",
            "transactions",
            "setups_per_tx",
            "failed_syncs",
            "p50_ms",
            "p99_ms",
        ],
        rows=rows,
    )
    result.goal(
        "burst rate (slowest size)",
        min(r["setups_per_s"] for r in rows),
        2000.0,
        "setups/s",
        above=True,
    )
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax, ax2) = plotting.figure(ncols=2, width=9.0)
    labels = [f"{r['setups']:,}" for r in result.rows]
    rates = plotting.column(result.rows, "setups_per_s")
    bars = ax.bar(labels, rates, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:,.0f}/s" for v in rates], fontsize=8)
    plotting.goal_line(ax, 2000.0, "goal 2,000/s")
    ax.set_xlabel(f"setups from {CLIENTS} concurrent clients")
    ax.set_ylabel("setups / s")
    ax.legend(fontsize=8)
    tx = plotting.column(result.rows, "transactions")
    bars2 = ax2.bar(
        labels, plotting.column(result.rows, "setups"), color="lightgrey", label="setups"
    )
    bars3 = ax2.bar(labels, tx, color="tab:green", label="kernel transactions")
    ax2.bar_label(bars2, fontsize=8)
    ax2.bar_label(bars3, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("burst size")
    ax2.legend(fontsize=8)
    plotting.save(fig, result, path, "Bursts of setups: throughput and coalescing")

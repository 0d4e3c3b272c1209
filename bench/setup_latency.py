"""setup-latency: how long one PUT takes to be answered, against the number of attachments held.

The daemon is filled through its API by 64 concurrent clients up to each size in turn
(10, 100, ... 100,000 dual-stack attachments). At each size, single PUTs of new attachments
are timed one after another, each on a fresh connection as a CNI plugin makes it and each
answered only once the kernel holds it; each timed attachment is deleted again (untimed)
so the size stays what the row says. A few untimed PUTs warm the path first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import daemon, plotting
from bench.addresses import MAX_ATTACHMENTS, attachment, attachments
from bench.harness import Progress, Result, ms, percentile

NAME = "setup-latency"
WARMUP = 5
# Timed attachments come from the top of the address range, far from the fill's indices.
TIMED_BASE = MAX_ATTACHMENTS - 1000
DAEMON_ARGS = ("--max-attachments", "200000")


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [10, 100] if quick else [10, 100, 1000, 10000, 100000]
    samples = 20 if quick else 200
    concurrency = 64
    rows: list[dict[str, Any]] = []
    with daemon.running(DAEMON_ARGS) as d:
        filled = 0
        for n in sizes:
            fill_s = d.fill(
                list(attachments(filled, n)), concurrency=concurrency, progress=progress
            )
            progress("filled", f"{n:,} attachments in {fill_s:.1f} s")
            filled = n
            timed = [attachment(TIMED_BASE + k, prefix="t") for k in range(WARMUP + samples)]
            latencies = []
            for k, a in enumerate(timed):
                elapsed = d.put(a)
                d.delete(a)
                if k >= WARMUP:
                    latencies.append(elapsed)
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            progress(
                f"timed {samples} PUTs at {n:,}", f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
            )
            rows.append(
                {
                    "attachments": n,
                    "p50_ms": ms(p50),
                    "p99_ms": ms(p99),
                    "max_ms": ms(max(latencies)),
                    "mean_ms": ms(sum(latencies) / len(latencies)),
                    "fill_per_s": round((n - (rows[-1]["attachments"] if rows else 0)) / fill_s, 1),
                }
            )
        syncs = d.syncs()
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "sizes": sizes,
            "samples": samples,
            "warmup": WARMUP,
            "fill_concurrency": concurrency,
            "dual_stack": True,
            "connection": "fresh per PUT",
        },
        columns=["attachments", "p50_ms", "p99_ms", "max_ms", "mean_ms", "fill_per_s"],
        rows=rows,
        summary={"syncs at end": syncs.get("total", 0), "sync failures": syncs.get("failures", 0)},
    )
    worst_p50 = max(r["p50_ms"] for r in rows)
    worst_p99 = max(r["p99_ms"] for r in rows)
    ratio = rows[-1]["p50_ms"] / rows[0]["p50_ms"]
    result.summary[f"p50 ratio {sizes[-1]:,}/{sizes[0]:,}"] = round(ratio, 3)
    result.goal("setup p50 (worst size)", worst_p50, 3.0, "ms")
    result.goal("setup p99 (worst size)", worst_p99, 10.0, "ms")
    result.goal(f"p50 ratio {sizes[-1]:,}/{sizes[0]:,}", ratio, 1.5, "x")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    xs = plotting.column(result.rows, "attachments")
    ax.plot(xs, plotting.column(result.rows, "p50_ms"), marker="o", label="p50")
    ax.plot(xs, plotting.column(result.rows, "p99_ms"), marker="s", label="p99")
    plotting.goal_line(ax, 3.0, "p50 goal 3 ms")
    ax.axhline(10.0, color="tab:red", linestyle="--", linewidth=1, label="p99 goal 10 ms")
    ax.set_xscale("log")
    ax.set_xlabel("attachments already held")
    ax.set_ylabel("PUT answered after (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    plotting.save(fig, result, path, "Setup latency vs existing attachments")

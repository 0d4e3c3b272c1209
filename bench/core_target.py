"""core-target: the core issue's acceptance figures, measured as the issue words them.

1. 5,000 new dual-stack attachments set up by 32 concurrent clients on a fresh daemon, each
   PUT on a fresh connection and answered once the kernel holds it: the rate, and a check that
   all of them are applied (the API holds 5,000 and the kernel 10,000 elements per family).
2. A single setup at 20 attachments and at 5,000, on another fresh daemon filled to each size
   in turn, timed as setup-latency times it (one quiet PUT at a time, each deleted again):
   p50, p99 and the ratio of the two p50s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import daemon, plotting
from bench.addresses import attachments
from bench.harness import Progress, Result
from bench.setup_latency import PAUSE, time_size

NAME = "core-target"
CLIENTS = 32
RATE_GOAL = 500.0  # setups/s
RATIO_GOAL = 1.5


def _burst(n: int, progress: Progress) -> dict[str, Any]:
    with daemon.running() as d:
        progress(f"burst of {n:,}", f"{CLIENTS} clients")
        wall, _ = daemon.burst(d, list(attachments(0, n)), CLIENTS)
        held = d.status()["attachments"]
        kernel = d.status()["kernel_elements"]
    if held != n or kernel != {"ipv4": 2 * n, "ipv6": 2 * n}:
        raise RuntimeError(f"after {n} setups the daemon holds {held}, the kernel {kernel}")
    return {"setups": n, "clients": CLIENTS, "wall_s": round(wall, 3), "per_s": round(n / wall, 1)}


def run(*, quick: bool, progress: Progress) -> Result:
    burst_size, sizes = (200, [20, 200]) if quick else (5000, [20, 5000])
    samples, pause = (20, 0.01) if quick else (200, PAUSE)
    burst = _burst(burst_size, progress)
    progress("burst done", f"{burst['per_s']:,.0f} setups/s, all applied")
    rows: list[dict[str, Any]] = []
    with daemon.running() as d:
        filled = 0
        for n in sizes:
            d.fill(list(attachments(filled, n)), concurrency=CLIENTS)
            filled = n
            time.sleep(0.2 if quick else 2.0)
            timed = time_size(d, samples, pause)
            rows.append({"attachments": n, **timed})
            progress(f"single setups at {n:,}", f"PUT p50 {timed['put_p50_ms']:.2f} ms")
    ratio = rows[-1]["put_p50_ms"] / rows[0]["put_p50_ms"]
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={"burst": burst, "samples": samples, "pause_s": pause, "dual_stack": True},
        columns=["attachments", "put_p50_ms", "put_p99_ms", "del_p50_ms", "put_b2b_p50_ms"],
        rows=rows,
        summary={
            f"burst of {burst_size:,} from {CLIENTS} clients": f"{burst['per_s']:,.0f} setups/s",
            f"setup p50 {sizes[-1]:,} / {sizes[0]}": round(ratio, 3),
        },
    )
    result.goal(f"burst of {burst_size:,}", burst["per_s"], RATE_GOAL, "setups/s", above=True)
    result.goal(f"setup p50 ratio {sizes[-1]:,}/{sizes[0]}", ratio, RATIO_GOAL, "x")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax, ax2) = plotting.figure(ncols=2, width=9.0)
    burst = result.params["burst"]
    bars = ax.bar([f"{burst['setups']:,} setups"], [burst["per_s"]], color="tab:blue", width=0.4)
    ax.bar_label(bars, labels=[f"{burst['per_s']:,.0f}/s"], fontsize=8)
    plotting.goal_line(ax, RATE_GOAL, f"goal {RATE_GOAL:,.0f}/s")
    ax.set_ylabel("setups / s")
    ax.set_title(f"from {burst['clients']} concurrent clients", fontsize=9)
    ax.legend(fontsize=8)
    labels = [f"{r['attachments']:,} held" for r in result.rows]
    p50 = plotting.column(result.rows, "put_p50_ms")
    p99 = plotting.column(result.rows, "put_p99_ms")
    xs = range(len(labels))
    b50 = ax2.bar([x - 0.2 for x in xs], p50, width=0.4, label="PUT p50", color="tab:green")
    b99 = ax2.bar([x + 0.2 for x in xs], p99, width=0.4, label="PUT p99", color="tab:olive")
    ax2.bar_label(b50, labels=[f"{v:.2f}" for v in p50], fontsize=8)
    ax2.bar_label(b99, labels=[f"{v:.2f}" for v in p99], fontsize=8)
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("ms, one quiet setup")
    ax2.legend(fontsize=8)
    first, last = result.rows[0]["attachments"], result.rows[-1]["attachments"]
    title = f"Core targets: a burst of {burst['setups']:,}, one setup at {first:,} vs {last:,}"
    plotting.save(fig, result, path, title)

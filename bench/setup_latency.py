"""setup-latency: how long one PUT takes to be answered, against the number of attachments held.

The daemon is filled through its API by 64 concurrent clients up to each size in turn
(10, 100, ... 100,000 dual-stack attachments), then left to settle. At each size, single
PUTs of new attachments are timed one after another, each on a fresh connection as a CNI
plugin makes it and each answered only once the kernel holds it. Each timed attachment is
deleted again, so the size stays what the row says, and that DELETE is timed too (the
teardown half of a container's life). A short pause after every request lets the kernel
finish what the previous one left behind, so each figure is the cost of one request on a
quiet daemon (on this VM an idle machine alone adds about 1.5 ms to a request: waking
idle vCPUs and the daemon's threads). The same number of PUTs is then also timed back to
back, without pauses or deletes in between (`put_b2b_p50_ms`), the warm-machine figure.
A few untimed rounds warm the path first. A request answered with an error (say 503 after
the daemon's apply timeout) counts with the time it took, and is counted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import daemon, plotting
from bench.addresses import MAX_ATTACHMENTS, attachment, attachments
from bench.harness import Progress, Result, ms, percentile

NAME = "setup-latency"
WARMUP = 5
PAUSE = 0.05  # seconds of quiet after each timed request
# Timed attachments come from the top of the address range, far from the fill's indices.
TIMED_BASE = MAX_ATTACHMENTS - 1000
DAEMON_ARGS = ("--max-attachments", "200000")


def time_size(d: daemon.Daemon, samples: int, pause: float) -> dict[str, Any]:
    puts: list[float] = []
    dels: list[float] = []
    errors = 0
    for k in range(WARMUP + samples):
        a = attachment(TIMED_BASE + k, prefix="t")
        put_s, put_status = d.timed("PUT", a)
        time.sleep(pause)
        del_s, del_status = d.timed("DELETE", a)
        time.sleep(pause)
        if k >= WARMUP:
            puts.append(put_s)
            dels.append(del_s)
            errors += (not 200 <= put_status < 300) + (not 200 <= del_status < 300)
    # The same PUTs back to back, without pauses or deletes in between (then undone).
    burst = [attachment(TIMED_BASE + k, prefix="b") for k in range(samples)]
    back_to_back = [d.timed("PUT", a)[0] for a in burst]
    for a in burst:
        d.delete(a)
    return {
        "put_p50_ms": ms(percentile(puts, 50)),
        "put_p99_ms": ms(percentile(puts, 99)),
        "put_max_ms": ms(max(puts)),
        "del_p50_ms": ms(percentile(dels, 50)),
        "del_p99_ms": ms(percentile(dels, 99)),
        "errors": errors,
        "put_b2b_p50_ms": ms(percentile(back_to_back, 50)),
    }


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [10, 100] if quick else [10, 100, 1000, 10000, 100000]
    samples = 20 if quick else 200
    pause = 0.01 if quick else PAUSE
    settle = 0.2 if quick else 2.0
    concurrency = 64
    rows: list[dict[str, Any]] = []
    with daemon.running(DAEMON_ARGS) as d:
        filled = 0
        for n in sizes:
            items = list(attachments(filled, n))
            fill_s = d.fill(items, concurrency=concurrency, progress=progress)
            progress("filled", f"{n:,} attachments in {fill_s:.1f} s")
            filled = n
            time.sleep(settle)
            row: dict[str, Any] = {"attachments": n}
            row.update(time_size(d, samples, pause))
            row["fill_per_s"] = round(len(items) / fill_s, 1)
            rows.append(row)
            progress(
                f"timed {samples} PUT+DELETE at {n:,}",
                f"PUT p50 {row['put_p50_ms']:.2f} ms p99 {row['put_p99_ms']:.2f} ms; "
                f"DELETE p50 {row['del_p50_ms']:.2f} ms; {row['errors']} errors",
            )
        syncs = d.syncs()
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "sizes": sizes,
            "samples": samples,
            "warmup": WARMUP,
            "pause_s": pause,
            "settle_s": settle,
            "fill_concurrency": concurrency,
            "dual_stack": True,
            "connection": "fresh per request",
        },
        columns=["attachments", "put_p50_ms", "put_p99_ms", "put_max_ms", "del_p50_ms",
                 "del_p99_ms", "errors", "put_b2b_p50_ms", "fill_per_s"],
        rows=rows,
        summary={"syncs at end": syncs.get("total", 0), "sync failures": syncs.get("failures", 0)},
    )  # fmt: skip
    worst_p50 = max(r["put_p50_ms"] for r in rows)
    worst_p99 = max(r["put_p99_ms"] for r in rows)
    ratio = rows[-1]["put_p50_ms"] / rows[0]["put_p50_ms"]
    result.goal("setup p50 (worst size)", worst_p50, 3.0, "ms")
    result.goal("setup p99 (worst size)", worst_p99, 10.0, "ms")
    result.goal(f"setup p50 ratio {sizes[-1]:,}/{sizes[0]:,}", ratio, 1.5, "x")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    xs = plotting.column(result.rows, "attachments")
    ax.plot(xs, plotting.column(result.rows, "put_p50_ms"), marker="o", label="PUT p50")
    ax.plot(xs, plotting.column(result.rows, "put_p99_ms"), marker="s", label="PUT p99")
    ax.plot(
        xs,
        plotting.column(result.rows, "put_b2b_p50_ms"),
        marker=".",
        linestyle=":",
        color="tab:blue",
        label="PUT p50, back to back",
    )
    ax.plot(xs, plotting.column(result.rows, "del_p50_ms"), marker="^", linestyle="--",
            color="tab:grey", label="DELETE p50")  # fmt: skip
    plotting.goal_line(ax, 3.0, "p50 goal 3 ms")
    ax.axhline(10.0, color="tab:red", linestyle="--", linewidth=1, label="p99 goal 10 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("attachments already held")
    ax.set_ylabel("answered after (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    plotting.save(fig, result, path, "Setup (and teardown) latency vs existing attachments")

"""idle-cpu: CPU time an idle daemon holding 100,000 attachments uses, drift checks included.

After the fill the daemon is left alone for a settling pause (whatever the fill left to do,
such as a journal snapshot, is not idle work), then its utime + stime from /proc/PID/stat
are read once a second for 60 s. The daemon runs with its default resync interval, so any
periodic full resync that falls in the window is counted, as it would be on a node; the
syncs it made during the window are reported beside the CPU share.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import daemon, plotting
from bench.addresses import attachments
from bench.harness import Progress, Result

NAME = "idle-cpu"
DAEMON_ARGS = ("--max-attachments", "200000")


def run(*, quick: bool, progress: Progress) -> Result:
    n = 100 if quick else 100_000
    window = 2.0 if quick else 60.0
    settle = 0.5 if quick else 5.0
    with daemon.running(DAEMON_ARGS) as d:
        fill_s = d.fill(list(attachments(0, n)), progress=progress)
        progress("filled", f"{n:,} attachments in {fill_s:.1f} s; settling {settle:.0f} s")
        time.sleep(settle)
        syncs0 = d.syncs()
        t0, cpu0 = time.monotonic(), d.cpu_seconds()
        times, shares = [], []
        prev_t, prev_cpu = t0, cpu0
        while prev_t - t0 < window:
            time.sleep(min(1.0, window - (prev_t - t0)))
            now, cpu = time.monotonic(), d.cpu_seconds()
            times.append(round(now - t0, 2))
            shares.append(round(100.0 * (cpu - prev_cpu) / (now - prev_t), 2))
            prev_t, prev_cpu = now, cpu
            if len(times) % 10 == 0:
                progress(
                    "idle",
                    f"{now - t0:.0f}/{window:.0f} s, {100 * (cpu - cpu0) / (now - t0):.2f}% so far",
                )
        syncs1 = d.syncs()
        rss = d.rss_mib()
    elapsed, used = prev_t - t0, prev_cpu - cpu0
    share = 100.0 * used / elapsed
    rows = [
        {
            "attachments": n,
            "window_s": round(elapsed, 1),
            "cpu_s": round(used, 3),
            "cpu_percent": round(share, 3),
            "max_1s_percent": max(shares),
            "syncs": syncs1["total"] - syncs0["total"],
            "full_syncs": syncs1["full"] - syncs0["full"],
            "rss_mib": round(rss, 1),
        }
    ]
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "attachments": n,
            "window_s": window,
            "settle_s": settle,
            "sample_every_s": 1.0,
            "resync_interval": "daemon default",
        },
        columns=list(rows[0]),
        rows=rows,
        series={"t_s": times, "cpu_percent": shares},
    )
    result.goal("idle CPU", share, 1.0, "% of a core")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    row = result.rows[0]
    ax.plot(result.series["t_s"], result.series["cpu_percent"], marker=".", label="per second")
    ax.axhline(
        row["cpu_percent"],
        color="tab:blue",
        linestyle="--",
        linewidth=1,
        label=f"mean {row['cpu_percent']:.2f}%",
    )
    plotting.goal_line(ax, 1.0, "goal 1%")
    ax.set_xlabel("seconds idle")
    ax.set_ylabel("daemon CPU (% of one core)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{row['attachments']:,} attachments, {row['syncs']} syncs in the window", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plotting.save(fig, result, path, "Idle CPU")

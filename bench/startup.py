"""startup: restart to ready, and repair of a deleted table, at 100,000 attachments; daemon RSS.

A daemon is filled through its API, then stopped with SIGTERM (the table stays in the
kernel, the journal on disk) and started again: the time is from spawning the process to
/readyz answering 200, interpreter start-up and imports included. Then the whole table is
deleted behind the daemon's back (`nft delete table inet masqd`) and the time is taken
from that command's return until /v1/status reports a successful sync after it with every
element back; the kernel's listing is then checked independently (untimed). RSS is VmRSS
from /proc after the fill, after the restart and after the repair; the peak is the restarted
process's VmHWM at the end, so it covers the journal replay and the whole-table repair.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import daemon, plotting
from bench.addresses import attachments
from bench.harness import Progress, Result
from tests.netns import nft

NAME = "startup"
DAEMON_ARGS = ("--max-attachments", "200000")
REPAIR_TIMEOUT = 60.0


def _expected_counts(n: int) -> dict[str, int]:
    # Dual-stack attachments with distinct addresses (IPv4 in /16s, IPv6 in /64s): one element
    # per address in its sources set and in the local set of its prefix length.
    return {"sources4": n, "local4_16": n, "sources6": n, "local6_64": n}


def wait_repaired(d: daemon.Daemon, syncs_before: int, n: int) -> float:
    """Seconds until a sync after `syncs_before` succeeded with 2n elements in the kernel."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < REPAIR_TIMEOUT:
        st = d.status()
        elements = st.get("kernel_elements", {})
        done = (
            st["syncs"]["total"] > syncs_before
            and st.get("last_sync", {}).get("result") == "ok"
            and elements.get("ipv4") == 2 * n
            and elements.get("ipv6") == 2 * n
        )
        if done:
            return time.perf_counter() - t0
        time.sleep(0.002)
    raise RuntimeError(f"table not repaired within {REPAIR_TIMEOUT:.0f} s: {d.log_tail()}")


def _check_kernel(d: daemon.Daemon, n: int) -> None:
    counts = d.element_counts()
    want = _expected_counts(n)
    if any(counts.get(k) != v for k, v in want.items()):
        raise RuntimeError(f"kernel table has {counts}, expected {want}")


def run(*, quick: bool, progress: Progress) -> Result:
    n = 100 if quick else 100_000
    with daemon.running(DAEMON_ARGS) as d:
        fill_s = d.fill(list(attachments(0, n)), progress=progress)
        progress("filled", f"{n:,} attachments in {fill_s:.1f} s")
        rss_filled = d.rss_mib()
        t0 = time.perf_counter()
        d.stop()
        stop_s = time.perf_counter() - t0
        progress("stopped with SIGTERM", f"{stop_s:.2f} s")
        start_s = d.start()
        rss_restarted = d.rss_mib()
        held = d.status()["attachments"]
        if held != n:
            raise RuntimeError(f"daemon restarted holding {held} attachments, expected {n}")
        _check_kernel(d, n)
        progress("restarted", f"ready after {start_s:.2f} s, RSS {rss_restarted:.0f} MiB")

        before = d.syncs()["total"]
        nft(d.ns, "delete", "table", "inet", daemon.TABLE)
        repair_s = wait_repaired(d, before, n)
        _check_kernel(d, n)
        after = d.syncs()
        progress("table deleted and repaired", f"{repair_s:.2f} s")
        rss_end = d.rss_mib()
        rss_peak = d.peak_rss_mib()
    rows = [
        {
            "attachments": n,
            "start_to_ready_s": round(start_s, 3),
            "repair_s": round(repair_s, 3),
            "stop_s": round(stop_s, 3),
            "rss_filled_mib": round(rss_filled, 1),
            "rss_restarted_mib": round(rss_restarted, 1),
            "rss_end_mib": round(rss_end, 1),
            "rss_peak_mib": round(rss_peak, 1),
        }
    ]
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={"attachments": n, "dual_stack": True},
        columns=list(rows[0]),
        rows=rows,
        summary={
            "syncs after repair": after["total"],
            "drift repairs": after.get("drift_repairs", 0),
        },
    )
    rss = max(rss_filled, rss_restarted, rss_end)
    result.goal("start-up to ready", start_s, 3.0, "s")
    result.goal("RSS (largest reading)", rss, 200.0, "MiB")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax, ax2) = plotting.figure(ncols=2, width=9.0)
    row = result.rows[0]
    labels = ["start to ready", "repair after\ntable deleted", "stop (SIGTERM)"]
    values = [row["start_to_ready_s"], row["repair_s"], row["stop_s"]]
    bars = ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:grey"])
    ax.bar_label(bars, labels=[f"{v:.2f} s" for v in values], fontsize=8)
    plotting.goal_line(ax, 3.0, "start-up goal 3 s")
    ax.set_ylabel("seconds")
    ax.set_title(f"{row['attachments']:,} attachments", fontsize=9)
    ax.legend(fontsize=8)
    rss_labels = ["after fill", "after restart", "after repair", "peak\n(VmHWM)"]
    rss = [row["rss_filled_mib"], row["rss_restarted_mib"], row["rss_end_mib"]]
    rss.append(row.get("rss_peak_mib", 0.0))
    colors = ["tab:purple"] * 3 + ["plum"]
    bars2 = ax2.bar(rss_labels, rss, color=colors)
    ax2.bar_label(bars2, labels=[f"{v:.0f} MiB" for v in rss], fontsize=8)
    plotting.goal_line(ax2, 200.0, "goal 200 MiB")
    ax2.set_ylabel("daemon RSS (MiB)")
    ax2.legend(fontsize=8)
    plotting.save(fig, result, path, "Start-up, repair and memory")

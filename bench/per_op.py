"""per-op: the cost of one ADD, the CNI plugins' per-rule way vs one masqd PUT, by table size.

CNI plugins: a namespace is prefilled with the per-rule table N dual-stack ADDs would leave
(2N rules), then ADDs of new attachments run the plugin's algorithm through the `nft`
binary from inside the namespace (`bench.perrule`): list the chain as JSON, find stale
rules by comment prefix, one transaction ensuring table and chains, flushing and refilling
postrouting, deleting the stale rules and adding the new ones. The listing is split into the
`nft` run and the JSON parse (which the Go plugin does with encoding/json). The two probe
commands of knftables.New(), which the plugin also runs on every call, are timed separately
and not added in. Each timed ADD is undone (untimed) so the size stays N.

masqd: a daemon filled through its API to N; single PUTs of new attachments on fresh
connections, answered once the kernel holds them, each deleted again (untimed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import daemon, perrule, plotting
from bench.addresses import MAX_ATTACHMENTS, attachment, attachments
from bench.harness import Progress, Result, module_command, ms, percentile
from tests.netns import netns, nft, ns_run

NAME = "per-op"
TIMED_BASE = MAX_ATTACHMENTS - 1000
DAEMON_ARGS = ("--max-attachments", "200000")


def _cni_samples(n: int, repeat: int) -> list[dict[str, float]]:
    with netns("perop") as ns:
        if n:
            nft(ns, "-f", "-", input=perrule.table_script(attachments(0, n)))
        cmd = module_command(
            "bench.perrule", "ops", "--first-index", str(TIMED_BASE), "--repeat", str(repeat)
        )
        out = ns_run(ns, *cmd).stdout
    samples: list[dict[str, float]] = json.loads(out)
    return samples


def _row(impl: str, n: int, totals: list[float], **parts: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "impl": impl,
        "attachments": n,
        "p50_ms": ms(percentile(totals, 50)),
        "max_ms": ms(max(totals)),
    }
    row.update({k: ms(v) for k, v in parts.items()})
    return row


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [0, 100] if quick else [0, 1000, 10000]
    repeat = 3 if quick else 20
    rows = []
    for n in sizes:
        samples = _cni_samples(n, repeat)
        totals = [s["total_s"] for s in samples]
        row = _row(
            "cni-plugins",
            n,
            totals,
            list_ms=percentile([s["list_s"] for s in samples], 50),
            list_nft_ms=percentile([s["list_nft_s"] for s in samples], 50),
            list_parse_ms=percentile([s["list_parse_s"] for s in samples], 50),
            apply_ms=percentile([s["apply_s"] for s in samples], 50),
            constructor_ms=percentile([s["constructor_s"] for s in samples], 50),
        )
        rows.append(row)
        progress(f"CNI-plugins ADD at {n:,}", f"p50 {row['p50_ms']:.1f} ms ({repeat} ADDs)")

    with daemon.running(DAEMON_ARGS) as d:
        filled = 0
        for n in sizes:
            d.fill(list(attachments(filled, n)), progress=progress)
            filled = n
            totals = []
            for k in range(repeat + 2):
                a = attachment(TIMED_BASE + k, prefix="t")
                elapsed = d.put(a)
                d.delete(a)
                if k >= 2:  # two untimed warm-up PUTs
                    totals.append(elapsed)
            row = _row("masqd", n, totals)
            rows.append(row)
            progress(f"masqd PUT at {n:,}", f"p50 {row['p50_ms']:.2f} ms")

    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "sizes": sizes,
            "repeat": repeat,
            "dual_stack": True,
            "cni_total": "list + apply (constructor probes reported apart)",
        },
        columns=[
            "impl",
            "attachments",
            "p50_ms",
            "max_ms",
            "list_ms",
            "list_nft_ms",
            "list_parse_ms",
            "apply_ms",
            "constructor_ms",
        ],
        rows=rows,
    )
    by = {(r["impl"], r["attachments"]): r["p50_ms"] for r in rows}
    for n in sizes:
        result.summary[f"CNI / masqd at {n:,}"] = round(
            by[("cni-plugins", n)] / by[("masqd", n)], 1
        )
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    for impl, color, dy, label in (
        ("cni-plugins", "tab:orange", 6, "CNI plugins: list chain + nft -f transaction"),
        ("masqd", "tab:blue", -13, "masqd: one PUT, answered when in the kernel"),
    ):
        xs = plotting.column(result.rows, "attachments", impl=impl)
        ys = plotting.column(result.rows, "p50_ms", impl=impl)
        ax.plot(xs, ys, marker="o", color=color, label=label)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                f"{y:,.1f} ms", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                fontsize=8, color=color,
            )  # fmt: skip
    # A log scale: the two differ by up to three orders of magnitude.
    ax.set_yscale("log")
    top = max(r["p50_ms"] for r in result.rows)
    bottom = min(r["p50_ms"] for r in result.rows)
    ax.set_ylim(bottom / 3, top * 3)
    ax.set_xlabel("attachments already in the table")
    ax.set_ylabel("one ADD, p50 (ms, log scale)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3, which="both")
    plotting.save(fig, result, path, "Cost of one ADD: per-rule (CNI plugins) vs masqd")

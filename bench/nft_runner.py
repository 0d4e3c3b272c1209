"""nft-runner: one small transaction through libnftables in-process vs the `nft` binary.

The daemon's backend can run its JSON batches either way (`--nft-runner lib|cli`). This is
the measurement behind the default: in a fresh namespace holding a set of N addresses, the
same one-element JSON batches (add an element, then delete it) run through each runner,
alternating, so both see the same machine load. The `nft` binary pays a process start and
its own cache fill on every batch; libnftables pays neither.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import plotting
from bench.harness import (
    Progress,
    Result,
    clean_up_on_sigterm,
    module_command,
    ms,
    percentile,
)
from tests.netns import netns, nft, ns_run

NAME = "nft-runner"
TABLE = "runnerbench"


def _element(i: int) -> str:
    return f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def _batch(verb: str, i: int) -> dict[str, Any]:
    elem = {"family": "inet", "table": TABLE, "name": "sources4", "elem": [_element(i)]}
    return {"nftables": [{verb: {"element": elem}}]}


def measure(repeat: int, first: int) -> dict[str, list[float]]:
    """Inside the namespace: seconds per add+delete pair, by runner."""
    from masqd.kernel.nft import LibNftables, NftCli

    runners = {"libnftables": LibNftables(), "nft binary": NftCli()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for k in range(repeat):
        for name, runner in runners.items():
            i = first + k
            started = time.perf_counter()
            runner.run(_batch("add", i))
            runner.run(_batch("delete", i))
            times[name].append((time.perf_counter() - started) / 2)
    return times


def run(*, quick: bool, progress: Progress) -> Result:
    sizes = [0, 1000] if quick else [0, 10_000, 100_000]
    repeat = 5 if quick else 100
    rows = []
    for n in sizes:
        with netns("runner") as ns:
            nft(ns, "add", "table", "inet", TABLE)
            nft(ns, "add", "set", "inet", TABLE, "sources4", "{ type ipv4_addr; }")
            for start in range(0, n, 20_000):
                chunk = ", ".join(_element(i) for i in range(start, min(n, start + 20_000)))
                nft(ns, "-f", "-", input=f"add element inet {TABLE} sources4 {{ {chunk} }}\n")
            cmd = module_command("bench.nft_runner", "--repeat", str(repeat), "--first", str(n))
            times: dict[str, list[float]] = json.loads(ns_run(ns, *cmd).stdout)
        for runner, samples in times.items():
            rows.append({
                "runner": runner, "elements": n, "p50_ms": ms(percentile(samples, 50)),
                "p99_ms": ms(percentile(samples, 99)),
            })  # fmt: skip
        progress(f"{n:,} elements", ", ".join(f"{r['runner']} {r['p50_ms']:.2f} ms"
                                              for r in rows[-2:]))  # fmt: skip
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={"sizes": sizes, "repeat": repeat, "transaction": "one-element add or delete"},
        columns=["runner", "elements", "p50_ms", "p99_ms"],
        rows=rows,
    )
    by = {(r["runner"], r["elements"]): r["p50_ms"] for r in rows}
    for n in sizes:
        result.summary[f"nft binary / libnftables at {n:,}"] = round(
            by[("nft binary", n)] / by[("libnftables", n)], 1
        )
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    for runner, color in (("libnftables", "tab:blue"), ("nft binary", "tab:orange")):
        xs = plotting.column(result.rows, "elements", runner=runner)
        ys = plotting.column(result.rows, "p50_ms", runner=runner)
        ax.plot(xs, ys, marker="o", color=color, label=runner)
    ax.set_xlabel("elements already in the set")
    ax.set_ylabel("one-element transaction, p50 (ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    plotting.save(fig, result, path, "One small transaction: libnftables vs the nft binary")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.repeat, args.first)))


if __name__ == "__main__":
    clean_up_on_sigterm()
    main()

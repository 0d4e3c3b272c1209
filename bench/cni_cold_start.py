"""cni-cold-start: what one masqd-cni process costs, from spawn to exit, as a runtime runs it.

A runtime starts the plugin once per command, so its whole cost is a cold start. Measured in
one run, sample by sample interleaved:

- VERSION (runtimes call it whenever they load a network's conflist): masqd-cni, the
  upstream bridge plugin (the same CNI library), and the floor no plugin can go below, an
  empty static Go program (`func main() {}`) built the same way;
- ADD and DEL against a daemon (in a namespace of its own) holding `attachments` dual-stack
  attachments, filled through the API first: each round ADDs a new attachment with a
  prevResult as the bridge plugin prints it, then DELs it again, both timed, so the daemon's
  size stays what was asked;
- the size of the binary.

`python -m bench.cni_cold_start [ATTACHMENTS [SAMPLES]]` runs it alone; `make bench
ARGS=cni-cold-start` through the harness.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import addresses, daemon
from bench.harness import REPO_ROOT, Progress, clean_up_on_sigterm, percentile

PLUGIN = REPO_ROOT / "cni" / "bin" / "masqd-cni"
BRIDGE = REPO_ROOT / ".venv" / "cni-tools" / "bridge"
FIND_GO = REPO_ROOT / "cni" / "find-go.sh"
WARMUP = 5
GOAL_VERSION_MEDIAN_MS = 3.0
GOAL_OP_MEDIAN_MS = 6.0
GOAL_OP_P99_MS = 15.0
GOAL_SIZE_MIB = 10.0
# Timed attachments come from the top of the address range, far from the fill's indices.
TIMED_BASE = addresses.MAX_ATTACHMENTS - 2000
ENV = {"PATH": "/usr/bin:/bin"}


def prev_result(ips: tuple[str, ...], container_id: str) -> dict[str, Any]:
    """A 1.1.0 result as the bridge plugin prints it for a dual-stack container."""
    return {
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:2e:69:56:05:8a"},
            {"name": "veth5c0d9a1e", "mac": "6a:33:5e:08:78:91"},
            {
                "name": "eth0",
                "mac": "aa:2a:ca:ff:59:df",
                "sandbox": f"/var/run/netns/{container_id}",
            },
        ],
        "ips": [{"interface": 2, "address": ip} for ip in ips],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }


def time_process(argv: list[str], stdin: bytes, env: dict[str, str]) -> float:
    """Seconds from spawn to exit; raises if the process fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stdout!r} {proc.stderr!r}")
    return elapsed


def build_floor(workdir: Path) -> Path:
    """An empty static Go program, built as masqd-cni is (the floor of any Go plugin)."""
    go = subprocess.run(
        [str(FIND_GO), str(REPO_ROOT / ".venv")], capture_output=True, text=True, check=True
    ).stdout.strip()
    (workdir / "go.mod").write_text("module floor\n\ngo 1.22\n")
    (workdir / "main.go").write_text("package main\n\nfunc main() {}\n")
    out = workdir / "floor"
    subprocess.run(
        [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(out), "."],
        cwd=workdir,
        env={**ENV, "CGO_ENABLED": "0", "HOME": str(workdir), "GOFLAGS": "-buildvcs=false"},
        capture_output=True,
        check=True,
    )
    return out


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(latencies) * 1e3, 2),
        "p90_ms": round(percentile(latencies, 90) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
        "max_ms": round(max(latencies) * 1e3, 2),
    }


def conf(a: addresses.Attachment, socket_path: str, prev: bool) -> bytes:
    body: dict[str, Any] = {
        "cniVersion": "1.1.0",
        "name": a.network,
        "type": "masqd-cni",
        "socket": socket_path,
    }
    if prev:
        body["prevResult"] = prev_result(a.ips, a.container_id)
    return json.dumps(body).encode()


def op_env(command: str, a: addresses.Attachment) -> dict[str, str]:
    return {
        **ENV,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": a.container_id,
        "CNI_NETNS": f"/var/run/netns/{a.container_id}",
        "CNI_IFNAME": a.ifname,
        "CNI_PATH": "/opt/cni/bin",
    }


def run(attachments: int = 1000, samples: int = 200) -> dict[str, Any]:
    """Time VERSION (masqd-cni, bridge, the floor) and masqd-cni ADD and DEL with a daemon
    holding `attachments`; print and return the figures (milliseconds) and every sample."""
    for path in (PLUGIN, BRIDGE):
        if not path.exists():
            raise RuntimeError(f"{path} is missing: `make setup test-tools` builds it")
    progress = Progress("cni-cold-start")
    workdir = Path(tempfile.mkdtemp(prefix="masqd-cni-bench-"))
    try:
        floor = build_floor(workdir)
        version_argv = {"masqd-cni": [str(PLUGIN)], "bridge": [str(BRIDGE)], "floor": [str(floor)]}
        version: dict[str, list[float]] = {name: [] for name in version_argv}
        add: list[float] = []
        delete: list[float] = []
        with daemon.running() as d:
            fill_s = d.fill(list(addresses.attachments(0, attachments)), progress=progress)
            progress("filled", f"{attachments:,} attachments in {fill_s:.1f} s")
            for k in range(WARMUP + samples):
                for name, argv in version_argv.items():
                    env = {**ENV, "CNI_COMMAND": "VERSION"}
                    elapsed = time_process(argv, b'{"cniVersion": "1.1.0"}', env)
                    if k >= WARMUP:
                        version[name].append(elapsed)
                a = addresses.attachment(TIMED_BASE + k, prefix="cold")
                added = time_process([str(PLUGIN)], conf(a, d.socket, True), op_env("ADD", a))
                deleted = time_process([str(PLUGIN)], conf(a, d.socket, False), op_env("DEL", a))
                if k >= WARMUP:
                    add.append(added)
                    delete.append(deleted)
                if (k + 1) % 50 == 0:
                    progress("timed", f"{k + 1}/{WARMUP + samples} rounds")
            held = d.status()["attachments"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    size_mib = round(PLUGIN.stat().st_size / 2**20, 2)
    rows = [
        {"op": "VERSION", "program": "masqd-cni", **summary(version["masqd-cni"])},
        {"op": "VERSION", "program": "bridge (upstream)", **summary(version["bridge"])},
        {"op": "none", "program": "empty static Go program", **summary(version["floor"])},
        {"op": "ADD", "program": "masqd-cni", **summary(add)},
        {"op": "DEL", "program": "masqd-cni", **summary(delete)},
    ]
    by = {(r["op"], r["program"]): r for r in rows}
    v, a_, d_ = by[("VERSION", "masqd-cni")], by[("ADD", "masqd-cni")], by[("DEL", "masqd-cni")]
    goals = {
        "masqd-cni VERSION median": (v["median_ms"], GOAL_VERSION_MEDIAN_MS, "ms"),
        "masqd-cni ADD median": (a_["median_ms"], GOAL_OP_MEDIAN_MS, "ms"),
        "masqd-cni ADD p99": (a_["p99_ms"], GOAL_OP_P99_MS, "ms"),
        "masqd-cni DEL median": (d_["median_ms"], GOAL_OP_MEDIAN_MS, "ms"),
        "masqd-cni DEL p99": (d_["p99_ms"], GOAL_OP_P99_MS, "ms"),
        "masqd-cni binary size": (size_mib, GOAL_SIZE_MIB, "MiB"),
    }
    result: dict[str, Any] = {
        "attachments": attachments,
        "attachments_at_end": held,
        "samples": samples,
        "binary_mib": size_mib,
        "floor_median_ms": by[("none", "empty static Go program")]["median_ms"],
        "command": f"python -m bench.cni_cold_start {attachments} {samples}",
        "rows": rows,
        "goals": goals,
        "version_latencies_ms": [round(t * 1e3, 3) for t in version["masqd-cni"]],
        "add_latencies_ms": [round(t * 1e3, 3) for t in add],
        "del_latencies_ms": [round(t * 1e3, 3) for t in delete],
    }
    print(f"masqd-cni, daemon holding {attachments:,} attachments, {samples} samples each:")
    for r in rows:
        print(
            f"  {r['op']:8} {r['program']:26} median {r['median_ms']:6.2f} ms  "
            f"p90 {r['p90_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  max {r['max_ms']:6.2f}"
        )
    print(f"  binary: {size_mib} MiB")
    for name, (value, limit, unit) in goals.items():
        print(f"  goal {name} < {limit:g} {unit}: {value} {'met' if value < limit else 'MISSED'}")
    return result


if __name__ == "__main__":
    clean_up_on_sigterm()
    run(*[int(arg) for arg in sys.argv[1:3]])

"""masqd's benchmark suite: `python -m bench [NAME ...] [--quick]` (see bench/README.md).

Each benchmark is a module with `NAME`, `run(*, quick, progress) -> Result` and
`plot(result, path)`. They build everything they measure inside network namespaces they
create and remove, from 198.18.0.0/15 and 2001:db8::/32 only. Modules are imported only
when their benchmark runs, so listing or running one does not pay for the others.
"""

from __future__ import annotations

# Benchmark name -> module, in the order `python -m bench` runs them.
BENCHMARKS: dict[str, str] = {
    "setup-latency": "bench.setup_latency",
    "burst": "bench.burst",
    "core-target": "bench.core_target",
    "startup": "bench.startup",
    "idle-cpu": "bench.idle_cpu",
    "conn-rate": "bench.conn_rate",
    "per-op": "bench.per_op",
    "cni-cold-start": "bench.cold_start",
    "nft-runner": "bench.nft_runner",
    "hostile": "bench.hostile",
}

"""Every benchmark still runs: each one at --quick sizes, its JSON and PNG checked.

The benchmarks are not tests and CI does not run them at full size; this keeps them from
rotting. Each runs in-process through the same entry point as `python -m bench NAME
--quick`, writing into a temporary directory (never over the published bench/results).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import BENCHMARKS
from bench.__main__ import main, run_one

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="benchmarks build network namespaces: root only"),
]

COMMON_KEYS = {
    "benchmark",
    "quick",
    "params",
    "columns",
    "rows",
    "summary",
    "goals",
    "machine",
    "date",
}

# Row keys each benchmark must produce (the README's tables and plots read them).
ROW_KEYS: dict[str, set[str]] = {
    "setup-latency": {"attachments", "put_p50_ms", "put_p99_ms", "del_p50_ms"},
    "burst": {"setups", "wall_s", "setups_per_s", "transactions"},
    "startup": {"attachments", "start_to_ready_s", "repair_s", "rss_restarted_mib"},
    "idle-cpu": {"attachments", "window_s", "cpu_percent", "syncs"},
    "conn-rate": {"table", "attachments", "conn_per_s", "vs_0"},
    "per-op": {"impl", "attachments", "p50_ms"},
    "cni-cold-start": set(),
}

GOALS: dict[str, set[str]] = {
    "setup-latency": {"setup p50 (worst size)", "setup p99 (worst size)"},
    "burst": {"burst rate (slowest size)"},
    "startup": {"start-up to ready", "RSS (largest reading)"},
    "idle-cpu": {"idle CPU"},
}


def test_every_benchmark_has_a_smoke_check() -> None:
    assert set(ROW_KEYS) == set(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_run_writes_json_with_expected_keys_and_a_png(name: str, tmp_path: Path) -> None:
    if name == "cni-cold-start" and importlib.util.find_spec("bench.cni_cold_start") is None:
        pytest.skip("bench/cni_cold_start.py (the CNI plugin's measurement) is not in this tree")
    run_one(name, quick=True, out=tmp_path)

    data: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(data) >= COMMON_KEYS
    assert data["benchmark"] == name and data["quick"] is True and data["date"]
    assert data["rows"], "a benchmark must produce at least one row"
    for row in data["rows"]:
        assert ROW_KEYS[name] <= set(row), f"row {row} lacks {ROW_KEYS[name] - set(row)}"
    assert {g["name"] for g in data["goals"]} >= GOALS.get(name, set())
    if name == "conn-rate":
        # The daemon and the benchmark agree on the table's shape (bench/masqtable.py).
        origins = data["params"]["masqd_table"].values()
        assert all(o["source"] == "daemon" and o["same_shape_as_masqtable"] for o in origins)
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-benchmark"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_replot_redraws_from_json_without_measuring(tmp_path: Path) -> None:
    run_one("burst", quick=True, out=tmp_path)
    (tmp_path / "burst.png").unlink()
    assert main(["burst", "--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "burst.png").read_bytes().startswith(b"\x89PNG")

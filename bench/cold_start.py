"""cni-cold-start: the harness's side of bench/cni_cold_start.py (masqd-cni per process).

The measurement itself lives in bench/cni_cold_start.py (written with the CNI plugin), as
`run(attachments=1000, samples=200) -> dict`. This adapter calls it with tiny sizes under
--quick and turns its dict into the common `Result`: numbers become metric/value rows,
lists of numbers are kept as series, a list of row dicts becomes the table, the rest goes
to the parameters. It plots the latency distributions when there are some, else its
timing figures as bars.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bench import plotting
from bench.harness import Progress, Result

NAME = "cni-cold-start"
MODULE = "bench.cni_cold_start"
QUICK_ARGS = {"attachments": 10, "samples": 3}
# The adapter plots these sample lists, one histogram each.
SERIES_LABELS = {
    "version_latencies_ms": "VERSION",
    "add_latencies_ms": "ADD",
    "del_latencies_ms": "DEL",
}


def _load() -> Any:
    try:
        return importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == MODULE:
            raise RuntimeError("bench/cni_cold_start.py is not in this tree yet") from exc
        raise


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def to_result(data: dict[str, Any], *, quick: bool, params: dict[str, Any]) -> Result:
    rows: list[dict[str, Any]] = []
    columns = ["metric", "value"]
    series: dict[str, list[Any]] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows = list(value)
            columns = list(dict.fromkeys(k for r in rows for k in r))
        elif isinstance(value, list) and all(_is_number(v) for v in value):
            series[key] = value
        elif isinstance(value, int | float | bool) or value is None:
            extra[key] = value
        else:
            params[key] = value
    if not rows:
        rows = [{"metric": k, "value": v} for k, v in extra.items()]
        extra = {}
    return Result(NAME, quick, params, columns, rows, summary=extra, series=series)


def run(*, quick: bool, progress: Progress) -> Result:
    mod = _load()
    kwargs: dict[str, Any] = dict(QUICK_ARGS) if quick else {}
    progress(
        "measuring",
        "bench/cni_cold_start.run(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")",
    )
    data = mod.run(**kwargs)
    if not isinstance(data, dict):
        raise TypeError(f"{MODULE}.run() returned {type(data).__name__}, expected dict")
    goals = data.pop("goals", {})
    result = to_result(data, quick=quick, params=dict(kwargs))
    for name, (value, limit, unit) in goals.items():
        result.goal(name, float(value), float(limit), unit)
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax,) = plotting.figure()
    if result.series:
        everything = [v for values in result.series.values() for v in values]
        lo, hi = min(everything), max(everything)
        bins = min(40, max(5, len(everything) // 4))
        edges = [lo + i * (hi - lo) / bins for i in range(bins + 1)] if hi > lo else bins
        for key, values in result.series.items():
            ax.hist(values, bins=edges, alpha=0.6, label=SERIES_LABELS.get(key, key))
        for limit in sorted({g.limit for g in result.goals if g.unit == "ms"}):
            ax.axvline(limit, color="tab:red", linestyle=":", label=f"goal {limit:g} ms")
        ax.set_xlabel("ms from spawn to exit")
        ax.set_ylabel("processes")
        ax.legend(fontsize=8)
    else:  # no samples: the scalar timings as bars
        numbers = {
            str(r.get("metric", i)): r["value"]
            for i, r in enumerate(result.rows)
            if _is_number(r.get("value")) and str(r.get("metric", "")).endswith(("_ms", "_s"))
        }
        bars = ax.bar(list(numbers), list(numbers.values()), color="tab:blue")
        ax.bar_label(bars, fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylabel("value")
    plotting.save(fig, result, path, "masqd-cni from spawn to exit: VERSION, ADD, DEL")

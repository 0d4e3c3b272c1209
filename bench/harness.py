"""What every benchmark shares: the result record, progress lines, statistics, the table.

A benchmark returns one `Result`: the parameters it ran with, rows of measurements (one per
size or variant, the same keys in every row), a summary, and the goals it checked. The
runner in `__main__` prints it as a table and writes it as JSON, so the JSON file, the
printed table and the plot all come from the same record.

Progress goes to stderr, one line per step with counts and elapsed time, so a long run shows
it is alive without mixing with the table on stdout.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MACHINE_NOTE = "2 shared cores"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Goal:
    """One target from the issue, checked against a measured value: below or above a limit."""

    name: str
    value: float
    limit: float
    unit: str
    met: bool
    above: bool = False  # True: the value must exceed the limit (a rate); else stay under it


@dataclass
class Result:
    benchmark: str
    quick: bool
    params: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    series: dict[str, list[Any]] = field(default_factory=dict)  # raw data behind a plot
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""

    def goal(
        self, name: str, value: float, limit: float, unit: str, *, above: bool = False
    ) -> None:
        """Record goal `name`: value < limit, or value > limit when `above`."""
        met = value > limit if above else value < limit
        self.goals.append(Goal(name, value, limit, unit, met, above))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def clean_up_on_sigterm() -> None:
    """Make SIGTERM (`timeout`, a CI runner's cancel) raise SystemExit in the main thread, so
    that every `finally` runs: daemons are stopped and namespaces deleted, not leaked."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def machine_info() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
    git = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "commit": git.stdout.strip() or "unknown",
        "note": MACHINE_NOTE,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nft": nft.stdout.strip(),
    }


def stamp(result: Result) -> Result:
    result.machine = machine_info()
    result.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return result


class Progress:
    """One line per step on stderr: `[name +12.3s] step: detail`."""

    def __init__(self, name: str, *, stream: Any = None) -> None:
        self.name = name
        self.start = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, step: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.start
        line = f"[{self.name} +{elapsed:6.1f}s] {step}"
        if detail:
            line += f": {detail}"
        print(line, file=self.stream, flush=True)


def module_command(module: str, *args: str) -> list[str]:
    """argv running `python -m module args` from this tree, whatever the working directory
    (for processes started inside namespaces with `ip netns exec`)."""
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code, *args]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    cells = [list(columns)] + [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(result: Result) -> str:
    """The human-readable report of one result: header, table, summary, goals."""
    out = [f"== {result.benchmark}{' (quick)' if result.quick else ''} =="]
    out.append(format_table(result.columns, result.rows))
    for key, value in result.summary.items():
        out.append(f"{key}: {_cell(value)}")
    for g in result.goals:
        verdict = "met" if g.met else "MISSED"
        bound = ">" if g.above else "<"
        out.append(
            f"goal {g.name}: {_cell(g.value)} {g.unit} (want {bound} {_cell(g.limit)}) {verdict}"
        )
    return "\n".join(out)


def write_json(result: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")

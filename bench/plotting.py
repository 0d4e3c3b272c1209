"""Matplotlib on the Agg backend (no display), with the few conventions every figure shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.harness import Result


def figure(ncols: int = 1, width: float = 7.0) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, ncols, figsize=(width, 4.2), squeeze=False)
    return fig, list(axes[0])


def goal_line(ax: Axes, y: float, label: str) -> None:
    ax.axhline(y, color="tab:red", linestyle=":", linewidth=1.2, label=label)


def save(fig: Figure, result: Result, path: Path, title: str) -> None:
    note = f"{result.date}, {result.machine.get('note', '')}" + (" (quick)" if result.quick else "")
    fig.suptitle(f"{title}\n{note}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def column(rows: list[dict[str, Any]], key: str, **match: Any) -> list[Any]:
    """Values of `key` from the rows whose fields equal `match`."""
    return [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]

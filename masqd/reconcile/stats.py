"""The reconciler's record of its syncs: counters, the last sync, and the status JSON and
metrics built from them. Kept apart so the sync step only says what happened."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from masqd.metrics import Metrics
from masqd.planning import ruleset
from masqd.planning.ruleset import TableState


@dataclass
class SyncStats:
    total: int = 0
    full: int = 0
    partial: int = 0
    failures: int = 0
    drift_repairs: int = 0
    last_time: float | None = None
    last_kind: str | None = None
    last_result: str | None = None  # "ok" or "error"
    last_error: str | None = None
    last_duration: float | None = None
    last_ok_time: float | None = None

    def finished(
        self, metrics: Metrics, *, kind: str, elapsed: float, wall: Callable[[], float]
    ) -> None:
        """A sync of `kind` ended, after `elapsed` seconds; `wall` tells the time."""
        metrics.sync_duration.labels(kind=kind).observe(elapsed)
        metrics.last_sync.set(wall())
        self.last_duration = elapsed
        self.last_time = wall()
        self.last_kind = kind
        self.total += 1
        if kind == "full":
            self.full += 1
        else:
            self.partial += 1

    def succeeded(self, metrics: Metrics, mirror: TableState | None, *, now: float) -> None:
        self.last_result, self.last_error = "ok", None
        self.last_ok_time = now
        metrics.last_successful_sync.set(now)
        if mirror is not None:
            for family, count in family_counts(mirror).items():
                metrics.kernel_elements.labels(family=family).set(count)

    def failed(self, metrics: Metrics, error: str) -> None:
        self.failures += 1
        self.last_result, self.last_error = "error", error
        metrics.sync_failures.inc()

    def drift_repaired(self, metrics: Metrics) -> None:
        self.drift_repairs += 1
        metrics.drift_repairs.inc()

    def status(
        self, *, ready: bool, mirror: TableState | None, generation: int | None, applied: int
    ) -> dict[str, Any]:
        """The reconciler's part of `GET /v1/status`."""
        return {
            "ready": ready,
            "syncs": {
                "total": self.total,
                "full": self.full,
                "partial": self.partial,
                "failures": self.failures,
                "drift_repairs": self.drift_repairs,
            },
            "last_sync": {
                "time": self.last_time,
                "kind": self.last_kind,
                "result": self.last_result,
                "error": self.last_error,
                "duration_seconds": self.last_duration,
                "last_success_time": self.last_ok_time,
            },
            "kernel_elements": family_counts(mirror) if mirror else {"ipv4": 0, "ipv6": 0},
            "generation": generation,
            "applied_version": applied,
        }


def family_counts(table: TableState) -> dict[str, int]:
    counts = {"ipv4": 0, "ipv6": 0}
    for name, elems in table.sets.items():
        family = ruleset.parse_local_set(name)
        v6 = name in (ruleset.SOURCES6, ruleset.EXEMPT6) or (family is not None and family[0] == 6)
        counts["ipv6" if v6 else "ipv4"] += len(elems)
    return counts

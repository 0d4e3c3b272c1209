"""Prometheus metrics. The names are a contract with operators' dashboards and alerts.

Everything is registered on an injected `CollectorRegistry`, so tests read values with
`registry.get_sample_value(...)` and two daemons in one test process do not collide.
The exporter (`api.exporter`) is an aiohttp app on the daemon's own event loop (no extra
thread).

Label values come from small closed sets (route templates, known methods, status codes,
`full`/`partial`, `ipv4`/`ipv6`): a client sending odd methods or paths cannot grow the
number of series. The exposition leaves out prometheus-client's `*_created` samples: in the
text format each would be one more gauge series per labelled child, named outside the
contract, and nothing of ours reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from masqd import __version__

# Sync histogram from 1 ms: a one-element transaction on libnftables takes a few ms.
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

SYNC_KINDS = ("full", "partial")
FAMILIES = ("ipv4", "ipv6")
# Methods the API answers; any other is counted as "other" (aiohttp accepts any token).
API_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})
# Where a connection was refused before its request was read, and why (server.LimitedSockSite).
LISTENERS = ("api", "metrics")
REFUSALS = ("max_connections", "descriptors")


class Metrics:
    """The daemon's metric families, on one registry; `exposition` renders them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.attachments = Gauge(
            "masqd_attachments", "Attachments in the desired state.", registry=r
        )
        self.kernel_elements = Gauge(
            "masqd_kernel_elements",
            "Elements in the kernel's sets, by family (as last synced).",
            ["family"],
            registry=r,
        )
        self.sync_duration = Histogram(
            "masqd_sync_duration_seconds",
            "Time of one reconcile, from planning to the kernel's commit.",
            ["kind"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_failures = Counter(
            "masqd_sync_failures_total",
            "Reconciles that failed (nftables refused or errored).",
            registry=r,
        )
        self.drift_repairs = Counter(
            "masqd_drift_repairs_total",
            "Reconciles that repaired a difference made outside masqd (tampering, flushes).",
            registry=r,
        )
        self.last_sync = Gauge(
            "masqd_last_sync_timestamp_seconds",
            "Unix time of the last reconcile attempt.",
            registry=r,
        )
        self.last_successful_sync = Gauge(
            "masqd_last_successful_sync_timestamp_seconds",
            "Unix time of the last reconcile that succeeded.",
            registry=r,
        )
        self.api_requests = Counter(
            "masqd_api_requests_total",
            "API requests, by route, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.api_duration = Histogram(
            "masqd_api_request_duration_seconds",
            "API request latency, by route and status code.",
            ["route", "code"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.gc_removed = Counter(
            "masqd_gc_removed_attachments_total",
            "Attachments removed by garbage collection.",
            registry=r,
        )
        self.config_reload_failures = Counter(
            "masqd_config_reload_failures_total",
            "Config reloads (SIGHUP or a watched file's change) refused; the running settings "
            "stayed.",
            registry=r,
        )
        self.config_last_reload_successful = Gauge(
            "masqd_config_last_reload_successful",
            "1 when the last config reload was applied (or none was tried since start), "
            "0 when it was refused.",
            registry=r,
        )
        self.config_last_reload_successful.set(1)
        self.connections_refused = Counter(
            "masqd_connections_refused_total",
            "Connections answered 503 and closed before their request was read: at the "
            "listener's connection cap, or with the daemon short of file descriptors.",
            ["listener", "reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "masqd_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        # Every series exists from the start, so that rate() and alerts see a 0 first.
        for family in FAMILIES:
            self.kernel_elements.labels(family=family).set(0)
        for kind in SYNC_KINDS:
            self.sync_duration.labels(kind=kind)
        for listener in LISTENERS:
            for reason in REFUSALS:
                self.connections_refused.labels(listener=listener, reason=reason)

    def refusals(self, listener: str) -> Callable[[str], None]:
        """What a `LimitedSockSite` on `listener` calls with the reason of each refusal."""
        children = {
            r: self.connections_refused.labels(listener=listener, reason=r) for r in REFUSALS
        }
        return lambda reason: children[reason].inc()

    def count_attachments(self, count: Callable[[], int]) -> None:
        """Read `masqd_attachments` from `count` at every scrape: it moves with each setup
        and teardown at once, also while the kernel refuses changes."""
        self.attachments.set_function(count)

    def observe_request(self, *, route: str, method: str, code: int, seconds: float) -> None:
        method = method if method in API_METHODS else "other"
        self.api_requests.labels(route=route, method=method, code=str(code)).inc()
        self.api_duration.labels(route=route, code=str(code)).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


class _WithoutCreated:
    """The registry's families without their `*_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family

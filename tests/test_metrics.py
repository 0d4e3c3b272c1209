"""Metrics: the contract's names, types, labels and buckets, and values that move as they should.

Three layers:
- `Metrics` alone on a fresh registry: the families of issue 4 and nothing else, buckets
  from 1 ms, bounded label values, and `promtool check metrics` clean (lint included);
- the reconciler on the fake backend with the real `Metrics`: while nftables refuses every
  transaction, each attempt is counted, `masqd_attachments` follows the desired state at
  once and `masqd_kernel_elements` keeps what the kernel last took;
- the real daemon in a namespace, its /metrics fetched from inside that namespace (the
  daemon's 127.0.0.1 is the namespace's): promtool clean, the gauges after setups,
  teardowns and a GC, a 400 counted by route, method and code, a flushed set counted as a
  drift repair, and two ways the kernel makes a sync fail.

The kernel refusing a transaction, for real: a stale mirror (docs/operating.md, "Drift
repair"). The daemon is restarted from its journal in a fresh namespace brought to the
generation id its journal marker names, so it trusts its picture of the kernel without
listing; the next teardown's partial transaction deletes elements the kernel does not hold,
and nftables refuses it (ENOENT). No race is involved: the outcome is the same every run.

A table the daemon cannot repair: a table created with the `owner` flag belongs to the
netlink socket that created it; the kernel answers EPERM to anyone else who touches it and
deletes it when that socket closes. `hold_owned_table`, run in the daemon's namespace, swaps
masqd's table for such an empty one in one batch. (nft 1.0.6 prints truncated JSON for a
table with that flag, so there the sync fails at the listing, before its transaction.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from masqd import __version__
from masqd.api.handlers import ATTACHMENT
from masqd.kernel.fake import FakeBackend
from masqd.kernel.nft import GenerationReader, enter_netns
from masqd.metrics import SYNC_BUCKETS, Metrics
from masqd.planning import ruleset
from masqd.planning.ruleset import Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import DesiredState
from tests.conftest import DaemonFactory
from tests.daemon import REPO, MasqdProcess, kernel_table
from tests.flood import Flood
from tests.netns import netns, nft, ns_run

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")

# The contract of issue 4: family name (as exposed) -> (type, label names).
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "masqd_attachments": ("gauge", frozenset()),
    "masqd_kernel_elements": ("gauge", frozenset({"family"})),
    "masqd_sync_duration_seconds": ("histogram", frozenset({"kind"})),
    "masqd_sync_failures": ("counter", frozenset()),
    "masqd_drift_repairs": ("counter", frozenset()),
    "masqd_last_sync_timestamp_seconds": ("gauge", frozenset()),
    "masqd_last_successful_sync_timestamp_seconds": ("gauge", frozenset()),
    "masqd_api_requests": ("counter", frozenset({"route", "method", "code"})),
    "masqd_api_request_duration_seconds": ("histogram", frozenset({"route", "code"})),
    "masqd_gc_removed_attachments": ("counter", frozenset()),
    # Issue 13: config reloads (SIGHUP or a watched file's change).
    "masqd_config_reload_failures": ("counter", frozenset()),
    "masqd_config_last_reload_successful": ("gauge", frozenset()),
    "masqd_build_info": ("gauge", frozenset({"version"})),
    # Connections refused before their request (issue 12: counted, now exported).
    "masqd_connections_refused": ("counter", frozenset({"listener", "reason"})),
}
HISTOGRAM_LABELS = frozenset({"le"})


class Scrape:
    """One exposition, parsed: its families' types and label names, and sample values."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            names = self.labels.setdefault(family.name, set())
            for s in family.samples:
                names.update(set(s.labels) - HISTOGRAM_LABELS)
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name}

    def __call__(self, name: str, **labels: str) -> float:
        """The value, 0 for a series not exposed yet (a counter child not created yet)."""
        return self.value(name, **labels) or 0.0


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def populated_metrics() -> Metrics:
    """Every family with at least one child holding a value."""
    m = Metrics()
    m.count_attachments(lambda: 3)
    m.kernel_elements.labels(family="ipv4").set(6)
    m.sync_duration.labels(kind="full").observe(0.004)
    m.sync_duration.labels(kind="partial").observe(0.0007)
    m.sync_failures.inc()
    m.drift_repairs.inc()
    m.last_sync.set(1_700_000_001.5)
    m.last_successful_sync.set(1_700_000_000.25)
    m.observe_request(route=ATTACHMENT, method="PUT", code=400, seconds=0.002)
    m.observe_request(route="unmatched", method="GET", code=404, seconds=0.0001)
    m.gc_removed.inc(2)
    return m


# ---- the exposition alone ----------------------------------------------------------------


def test_exposition_has_exactly_the_contract_families_types_and_labels() -> None:
    scrape = Scrape(populated_metrics().exposition()[0].decode())
    assert scrape.types == {name: kind for name, (kind, _) in CONTRACT.items()}
    assert scrape.labels == {name: set(labels) for name, (_, labels) in CONTRACT.items()}
    # prometheus-client's *_created samples are left out (see masqd.metrics).
    assert "_created" not in scrape.text
    assert scrape("masqd_build_info", version=__version__) == 1
    assert scrape("masqd_attachments") == 3
    assert scrape("masqd_api_requests_total", route=ATTACHMENT, method="PUT", code="400") == 1
    assert scrape("masqd_gc_removed_attachments_total") == 2


def test_sync_histogram_buckets_start_at_one_millisecond() -> None:
    scrape = Scrape(populated_metrics().exposition()[0].decode())
    assert SYNC_BUCKETS[0] == 0.001 and list(SYNC_BUCKETS) == sorted(SYNC_BUCKETS)
    for kind in ("full", "partial"):
        buckets = sorted(
            float(dict(labels)["le"])
            for name, labels in scrape.samples
            if name == "masqd_sync_duration_seconds_bucket" and ("kind", kind) in labels
        )
        assert buckets == [*SYNC_BUCKETS, float("inf")]
    # 0.7 ms falls in the first bucket, 4 ms does not.
    assert scrape("masqd_sync_duration_seconds_bucket", kind="partial", le="0.001") == 1
    assert scrape("masqd_sync_duration_seconds_bucket", kind="full", le="0.001") == 0
    assert scrape("masqd_sync_duration_seconds_bucket", kind="full", le="0.005") == 1


def test_every_series_an_alert_reads_exists_before_the_first_event() -> None:
    """rate() and increase() need a first sample at 0, not a series appearing at 1."""
    scrape = Scrape(Metrics().exposition()[0].decode())
    assert scrape.value("masqd_sync_failures_total") == 0
    assert scrape.value("masqd_drift_repairs_total") == 0
    assert scrape.value("masqd_gc_removed_attachments_total") == 0
    assert scrape.value("masqd_kernel_elements", family="ipv4") == 0
    assert scrape.value("masqd_kernel_elements", family="ipv6") == 0
    for kind in ("full", "partial"):
        assert scrape.value("masqd_sync_duration_seconds_count", kind=kind) == 0


def test_methods_the_api_does_not_serve_share_one_label_value() -> None:
    m = Metrics()
    for method in ("BREW", "PROPFIND", "X" * 40, "GET"):
        m.observe_request(route="unmatched", method=method, code=405, seconds=0.0)
    scrape = Scrape(m.exposition()[0].decode())
    methods = scrape.label_values("masqd_api_requests_total", "method")
    assert methods == {"other", "GET"}
    assert scrape("masqd_api_requests_total", route="unmatched", method="other", code="405") == 3


def test_two_metrics_objects_do_not_share_values() -> None:
    a, b = Metrics(), Metrics()
    a.sync_failures.inc()
    assert a.registry.get_sample_value("masqd_sync_failures_total") == 1
    assert b.registry.get_sample_value("masqd_sync_failures_total") == 0


@needs_promtool
def test_exposition_passes_promtool_check_metrics() -> None:
    proc = promtool_check(populated_metrics().exposition()[0].decode())
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


# ---- the reconciler on the fake backend, with the real Metrics ---------------------------


async def test_a_refused_transaction_is_counted_while_attachments_follow_desired_state() -> None:
    backend = FakeBackend()
    metrics = Metrics()
    state = DesiredState()
    ticks = itertools.count(1000)
    reconciler = Reconciler(
        state=state,
        backend=backend,
        table="masqd",
        policy=Policy(),
        metrics=metrics,
        wall_clock=lambda: float(next(ticks)),
    )

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    task = asyncio.create_task(reconciler.run())
    try:
        await asyncio.wait_for(reconciler.first_sync_done.wait(), 5)
        state.put(("n", "a", "eth0"), ["198.18.60.2/24", "2001:db8:60::2/64"])
        await reconciler.wait_applied(reconciler.request(), 5)
        assert sample("masqd_attachments") == 1
        assert sample("masqd_kernel_elements", family="ipv4") == 2  # sources4 + local4_<plen>
        assert sample("masqd_kernel_elements", family="ipv6") == 2
        assert sample("masqd_sync_failures_total") == 0
        last_ok = sample("masqd_last_successful_sync_timestamp_seconds")

        backend.fail_next(1000, "Error: Could not process rule: Operation not permitted")
        state.put(("n", "b", "eth0"), ["198.18.60.3/24"])
        # The desired state moved: the gauge says so before any sync has run.
        assert sample("masqd_attachments") == 2
        reconciler.request()
        async with asyncio.timeout(5):
            while (sample("masqd_sync_failures_total") or 0) < 3:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)
        assert not reconciler.ready
        # The kernel did not take it: what it holds, and when it last took something, stay.
        assert sample("masqd_kernel_elements", family="ipv4") == 2
        assert sample("masqd_last_successful_sync_timestamp_seconds") == last_ok
        assert (sample("masqd_last_sync_timestamp_seconds") or 0) > (last_ok or 0)
        assert (sample("masqd_sync_duration_seconds_count", kind="partial") or 0) >= 1
        assert (sample("masqd_sync_duration_seconds_count", kind="full") or 0) >= 3

        backend.heal()
        failures = sample("masqd_sync_failures_total")
        await reconciler.wait_applied(state.version, 10)
        assert sample("masqd_sync_failures_total") == failures
        assert sample("masqd_kernel_elements", family="ipv4") == 4
        assert (sample("masqd_last_successful_sync_timestamp_seconds") or 0) > (last_ok or 0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- the real daemon in a namespace --------------------------------------------------------


def metrics_url(daemon: MasqdProcess, path: str = "/metrics") -> str:
    return f"http://{daemon.status()['metrics_address']}{path}"


def scrape(daemon: MasqdProcess) -> Scrape:
    """GET /metrics from inside the daemon's namespace, as a Prometheus there would."""
    proc = ns_run(daemon.ns, "curl", "-sSf", "--max-time", "5", metrics_url(daemon))
    return Scrape(proc.stdout)


def http_code(daemon: MasqdProcess, path: str) -> int:
    proc = ns_run(
        daemon.ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
        metrics_url(daemon, path),
    )  # fmt: skip
    return int(proc.stdout)


def poll(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.05)


def kernel_counts(ns: str) -> dict[str, int]:
    """Elements per family in the kernel's sets, counted as masqd_kernel_elements does."""
    sets = kernel_table(ns).sets
    v4 = {ruleset.SOURCES4, ruleset.EXEMPT4} | {n for n in sets if n.startswith("local4_")}
    v6 = {ruleset.SOURCES6, ruleset.EXEMPT6} | {n for n in sets if n.startswith("local6_")}
    return {
        "ipv4": sum(len(sets.get(n, {})) for n in v4),
        "ipv6": sum(len(sets.get(n, {})) for n in v6),
    }


def ips(n: int) -> list[str]:
    return [f"198.18.61.{n}/24", f"2001:db8:61::{n:x}/64"]


@pytest.mark.kernel
@needs_promtool
def test_the_daemons_metrics_pass_promtool_check_metrics(daemon: MasqdProcess) -> None:
    client = daemon.client
    assert client.put_attachment("net", "c1", "eth0", ips(1)).status == 200
    assert client.put_attachment("net", "c2", "eth0", ips(2)).status == 200
    assert client.put_attachment("net", "c3", "eth0", ["not-an-ip"]).status == 400
    assert client.get("/v1/nowhere").status == 404
    assert client.delete_attachment("net", "c2", "eth0").status == 200
    assert client.gc("net", []).status == 200
    result = scrape(daemon)
    proc = promtool_check(result.text)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), result.text
    assert result.types == {name: kind for name, (kind, _) in CONTRACT.items()}
    assert result("masqd_build_info", version=__version__) == 1
    # The other endpoints of the metrics listener.
    assert http_code(daemon, "/healthz") == 200
    assert http_code(daemon, "/readyz") == 200


@pytest.mark.kernel
def test_metrics_on_ipv6_loopback_report_an_address_a_url_can_hold(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(extra_args=["--metrics-listen", "[::1]:0"])
    assert daemon.status()["metrics_address"].startswith("[::1]:")
    assert scrape(daemon)("masqd_build_info", version=__version__) == 1


@pytest.mark.kernel
def test_attachments_and_kernel_elements_follow_setups_teardowns_and_gc(
    daemon: MasqdProcess,
) -> None:
    client = daemon.client
    before = scrape(daemon)
    assert before("masqd_attachments") == 0
    assert before("masqd_kernel_elements", family="ipv4") == 0
    started = time.time()
    for n in range(1, 5):
        assert client.put_attachment("net", f"c{n}", "eth0", ips(n)).status == 200
    # An acknowledged setup is in the kernel, and the metrics already say so.
    after_setups = scrape(daemon)
    assert after_setups("masqd_attachments") == 4
    assert kernel_counts(daemon.ns) == {"ipv4": 8, "ipv6": 8}  # sources + local, per IP
    for family, count in kernel_counts(daemon.ns).items():
        assert after_setups("masqd_kernel_elements", family=family) == count
    assert after_setups("masqd_sync_duration_seconds_count", kind="partial") >= 1
    assert started <= after_setups("masqd_last_successful_sync_timestamp_seconds") <= time.time()

    assert client.delete_attachment("net", "c4", "eth0").status == 200
    after_teardown = scrape(daemon)
    assert after_teardown("masqd_attachments") == 3
    assert after_teardown("masqd_kernel_elements", family="ipv4") == 6

    assert client.gc("net", [("c1", "eth0")]).status == 200
    after_gc = scrape(daemon)
    assert after_gc("masqd_attachments") == 1
    assert after_gc("masqd_gc_removed_attachments_total") == 2
    assert after_gc("masqd_kernel_elements", family="ipv6") == 2
    assert kernel_counts(daemon.ns) == {"ipv4": 2, "ipv6": 2}


@pytest.mark.kernel
def test_api_requests_are_counted_by_route_method_and_code(daemon: MasqdProcess) -> None:
    client = daemon.client
    assert client.put_attachment("net", "c1", "eth0", ips(1)).status == 200
    assert client.put_attachment("net", "c1", "eth0", ["198.18.61.300/24"]).status == 400
    assert client.put_attachment("net", "c1", "eth0", ["198.18.61.300/24"]).status == 400
    assert client.get("/v1/nowhere").status == 404
    assert client.request("PROPFIND", "/v1/attachments").status == 405
    counted = scrape(daemon)

    def requests(route: str, method: str, code: str) -> float:
        return counted("masqd_api_requests_total", route=route, method=method, code=code)

    assert requests(ATTACHMENT, "PUT", "400") == 2
    assert requests(ATTACHMENT, "PUT", "200") == 1
    # Unknown paths and methods land on fixed label values: no series per odd request.
    assert requests("unmatched", "GET", "404") == 1
    assert requests("unmatched", "other", "405") == 1
    # Latency by route and code: the two 400s and the 200 are told apart.
    assert counted("masqd_api_request_duration_seconds_count", route=ATTACHMENT, code="400") == 2
    assert counted("masqd_api_request_duration_seconds_count", route=ATTACHMENT, code="200") == 1
    # The harness's readiness polls went through the API too.
    assert requests("/readyz", "GET", "200") >= 1
    routes = counted.label_values("masqd_api_requests_total", "route")
    assert routes <= {ATTACHMENT, "unmatched", "/readyz", "/v1/status"}


def _status_line(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: masqd\r\nConnection: close\r\n\r\n")
    return sock.recv(4096).split(b"\r\n", 1)[0]


@pytest.mark.kernel
def test_connections_refused_at_the_cap_are_counted_by_listener(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(extra_args=["--max-connections", "2", "--metrics-max-connections", "2"])
    before = scrape(daemon)
    for listener in ("api", "metrics"):
        for reason in ("max_connections", "descriptors"):
            labels = {"listener": listener, "reason": reason}
            assert before.value("masqd_connections_refused_total", **labels) == 0

    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in held:
            sock.connect(daemon.socket)
        # Every connection beyond the two held is answered 503; count them as they come
        # (the first tries may still be served while the daemon accepts the held two).
        refused_api = 0
        deadline = time.monotonic() + 10
        while refused_api < 3:
            assert time.monotonic() < deadline, "no 503 beyond --max-connections 2"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
                extra.connect(daemon.socket)
                if _status_line(extra).startswith(b"HTTP/1.1 503"):
                    refused_api += 1
    finally:
        for sock in held:
            sock.close()

    host, _, port = daemon.status()["metrics_address"].rpartition(":")
    with Flood(["tcp", host, port], 2, ns=daemon.ns) as flood:
        assert flood.opened == 2
        refused_metrics = 0
        deadline = time.monotonic() + 10
        while refused_metrics < 1:
            assert time.monotonic() < deadline, "no 503 beyond --metrics-max-connections 2"
            code = http_code(daemon, "/healthz")
            refused_metrics += code == 503
    poll(lambda: http_code(daemon, "/healthz") == 200, 10, "metrics port served again")

    after = scrape(daemon)
    api = after("masqd_connections_refused_total", listener="api", reason="max_connections")
    assert api == refused_api
    metrics = after("masqd_connections_refused_total", listener="metrics", reason="max_connections")
    assert metrics >= refused_metrics
    for listener in ("api", "metrics"):
        assert (
            after("masqd_connections_refused_total", listener=listener, reason="descriptors") == 0
        )


@pytest.mark.kernel
def test_a_flushed_set_is_repaired_and_counted_as_drift(daemon: MasqdProcess) -> None:
    for n in (1, 2):
        assert daemon.client.put_attachment("net", f"c{n}", "eth0", ips(n)).status == 200
    before = scrape(daemon)
    assert before("masqd_drift_repairs_total") == 0
    nft(daemon.ns, "flush", "set", "inet", daemon.table, ruleset.SOURCES4)
    poll(
        lambda: scrape(daemon)("masqd_drift_repairs_total") == 1,
        within=5,
        what="masqd_drift_repairs_total == 1 after a flush",
    )
    assert set(kernel_table(daemon.ns).sets[ruleset.SOURCES4]) == {"198.18.61.1", "198.18.61.2"}
    after = scrape(daemon)
    assert after("masqd_sync_duration_seconds_count", kind="full") > before(
        "masqd_sync_duration_seconds_count", kind="full"
    )
    assert after("masqd_sync_failures_total") == 0


@pytest.mark.kernel
def test_a_transaction_the_kernel_refuses_is_counted_as_a_sync_failure(
    daemon: MasqdProcess,
) -> None:
    """The stale-mirror case (docs/operating.md, "Drift repair"): a partial sync deletes an
    element the kernel does not hold, nftables refuses the whole transaction (ENOENT), masqd
    counts the failure and repairs with a full sync. To make the mirror stale without the
    daemon noticing, it is restarted from its journal in a fresh namespace brought to the very
    generation id its journal marker names: it trusts the marker and lists nothing, yet the
    kernel is empty."""
    for n in (1, 2):
        assert daemon.client.put_attachment("net", f"c{n}", "eth0", ips(n)).status == 200
    daemon.stop()
    marker_generation = generation(daemon.ns)
    with netns("gen") as fresh:
        bump_generation(fresh, to=marker_generation)
        daemon.ns = fresh
        daemon.start()
        assert daemon.status()["syncs"]["failures"] == 0
        assert kernel_table(fresh).structure is None  # trusted the marker: nothing written

        assert daemon.client.delete_attachment("net", "c1", "eth0").status == 200
        counted = scrape(daemon)
        assert counted("masqd_sync_failures_total") == 1
        assert counted("masqd_drift_repairs_total") == 1  # the full sync found the table gone
        assert counted("masqd_attachments") == 1
        assert "partial sync failed" in daemon.log_tail()
        assert "No such file or directory" in daemon.log_tail()
        assert set(kernel_table(fresh).sets[ruleset.SOURCES4]) == {"198.18.61.2"}
        daemon.stop()


@pytest.mark.kernel
def test_a_table_another_socket_owns_fails_syncs_counted_until_released(
    daemon_factory: DaemonFactory,
) -> None:
    """While the table is unusable, every attempt is a counted failure, readiness is false,
    a setup answers 503 and still shows in masqd_attachments; once released, masqd rebuilds."""
    daemon = daemon_factory(extra_args=["--apply-timeout", "0.5"])
    client = daemon.client
    assert client.put_attachment("net", "c1", "eth0", ips(1)).status == 200
    before = scrape(daemon)
    assert before("masqd_sync_failures_total") == 0
    last_ok = before("masqd_last_successful_sync_timestamp_seconds")

    with owned_table(daemon.ns, daemon.table):
        poll(
            lambda: scrape(daemon)("masqd_sync_failures_total") >= 1,
            within=5,
            what="a sync failure counted while another socket owns the table",
        )
        assert http_code(daemon, "/readyz") == 503
        # A setup now is accepted but not confirmed (503); the desired state has it.
        assert client.put_attachment("net", "c2", "eth0", ips(2)).status == 503
        refused = scrape(daemon)
        assert refused("masqd_attachments") == 2
        assert refused("masqd_kernel_elements", family="ipv4") == 2  # as last synced
        assert refused("masqd_last_successful_sync_timestamp_seconds") == last_ok
        assert refused("masqd_last_sync_timestamp_seconds") > last_ok

    # The owner's socket closed, so the kernel dropped the table: the next retry rebuilds it.
    poll(lambda: http_code(daemon, "/readyz") == 200, within=10, what="ready again")
    recovered = scrape(daemon)
    assert recovered("masqd_sync_failures_total") >= 1
    assert recovered("masqd_last_successful_sync_timestamp_seconds") > last_ok
    assert recovered("masqd_kernel_elements", family="ipv4") == 4
    assert kernel_counts(daemon.ns) == {"ipv4": 4, "ipv6": 4}


# ---- the ruleset generation id of a namespace ------------------------------------------


def _read_generation() -> int:
    reader = GenerationReader()
    try:
        return reader.read()
    finally:
        reader.close()


def generation(ns: str) -> int:
    """The ruleset generation id of `ns`, read from a thread that entered it (and then ends)."""
    with ThreadPoolExecutor(1, initializer=enter_netns, initargs=(f"/var/run/netns/{ns}",)) as pool:
        return pool.submit(_read_generation).result(timeout=10)


def bump_generation(ns: str, *, to: int) -> None:
    """Commit one-command batches in `ns` until its generation id is `to`."""
    start = generation(ns)
    assert start <= to, f"{ns} is already at generation {start} > {to}"
    for step in range(to - start):
        verb = "add" if step % 2 == 0 else "delete"
        nft(ns, verb, "table", "inet", "masqd_test_padding")
    assert generation(ns) == to


# ---- an nftables table owned by another netlink socket -----------------------------------


@contextlib.contextmanager
def owned_table(ns: str, table: str) -> Iterator[None]:
    """While inside, inet `table` in `ns` is an empty table the kernel keeps for another
    process's netlink socket (EPERM to everyone else); on exit it vanishes."""
    holder = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.test_metrics", table],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        line = holder.stdout.readline()
        if line.strip() != "held":
            holder.wait(5)
            raise AssertionError(f"could not take the table: {line}{holder.communicate()[1]}")
        yield
    finally:
        holder.stdin.close()  # the holder exits, its socket closes, the kernel drops the table
        try:
            holder.wait(5)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        if holder.stderr is not None:
            holder.stderr.close()


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFPROTO_INET = 1
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFT_TABLE_F_OWNER = 0x2


def _nlattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nfmsg(kind: int, flags: int, seq: int, family: int, attrs: bytes = b"") -> bytes:
    # Batch delimiters carry the subsystem in res_id; table messages carry 0.
    res_id = NFNL_SUBSYS_NFTABLES if kind in (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END) else 0
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def hold_owned_table(table: str) -> None:
    """Replace inet `table` (deleted and created in one batch) by an empty table owned by
    this process's socket, print "held", and keep it until stdin closes."""
    name = _nlattr(NFTA_TABLE_NAME, table.encode() + b"\0")
    flags = _nlattr(NFTA_TABLE_FLAGS, struct.pack(">I", NFT_TABLE_F_OWNER))
    tables = NFNL_SUBSYS_NFTABLES << 8
    batch = b"".join(
        [
            _nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0),
            _nfmsg(tables | NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, 2, NFPROTO_INET, name),
            _nfmsg(
                tables | NFT_MSG_NEWTABLE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                3,
                NFPROTO_INET,
                name + flags,
            ),
            _nfmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 4, 0),
        ]
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(batch)
        acked: set[int] = set()
        while acked != {2, 3}:
            data = sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + 16)
                    if errno != 0:
                        sys.exit(f"nftables refused (message {seq}): errno {-errno}")
                    acked.add(seq)
                offset += (length + 3) & ~3
        print("held", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    hold_owned_table(sys.argv[1])

"""A real Prometheus server scrapes the real daemon, and its query API shows the right values.

Both run in one throwaway namespace (the daemon's metrics listen on the namespace's
127.0.0.1, where an operator's node-local Prometheus or agent would reach them). The test
writes a minimal scrape config (1 s interval), starts the Debian package's `prometheus`
with its TSDB in a temporary directory, and asks its HTTP API, from inside the namespace,
for `masqd_attachments` after setups and again after a teardown. Prometheus is stopped
(SIGTERM, then SIGKILL if it lingers) and its files removed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from masqd import __version__
from tests.daemon import MasqdProcess
from tests.netns import ns_run

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus"),
]

START_TIMEOUT = 15.0
QUERY_TIMEOUT = 10.0  # several 1 s scrape intervals


class Prometheus:
    """A Prometheus server in `ns`, reached with curl from inside that namespace."""

    def __init__(self, ns: str, address: str, workdir: Path, proc: subprocess.Popen[bytes]):
        self.ns, self.address, self.workdir, self.proc = ns, address, workdir, proc

    def get(self, path: str, **params: str) -> Any:
        args = [arg for k, v in params.items() for arg in ("--data-urlencode", f"{k}={v}")]
        proc = ns_run(
            self.ns, "curl", "-sS", "--max-time", "5", "--get", *args,
            f"http://{self.address}{path}",
        )  # fmt: skip
        return json.loads(proc.stdout)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for(self, expr: str, value: str) -> dict[str, Any]:
        """Poll until `expr` is one series with `value`; that series."""
        deadline = time.monotonic() + QUERY_TIMEOUT
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) == 1 and result[0]["value"][1] == value:
                return result[0]
            time.sleep(0.2)
        raise AssertionError(
            f"{expr} != {value} within {QUERY_TIMEOUT}s: {result}\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        text = (self.workdir / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-20:])


def free_port(ns: str) -> int:
    """A TCP port free on 127.0.0.1 in `ns` (nothing else binds there but the test's own)."""
    probe = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    )
    return int(ns_run(ns, sys.executable, "-c", probe).stdout)


@contextlib.contextmanager
def prometheus_scraping(daemon: MasqdProcess) -> Iterator[Prometheus]:
    target = daemon.status()["metrics_address"]
    workdir = Path(tempfile.mkdtemp(prefix="mqprom", dir="/tmp"))
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "masqd", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    address = f"127.0.0.1:{free_port(daemon.ns)}"
    argv = [
        "ip", "netns", "exec", daemon.ns, "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]  # fmt: skip
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = Prometheus(daemon.ns, address, workdir, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{server.log_tail()}"
            ready = ns_run(
                daemon.ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                "--max-time", "2", f"http://{address}/-/ready", check=False,
            )  # fmt: skip
            if ready.stdout == "200":
                break
            assert time.monotonic() < deadline, f"prometheus not ready:\n{server.log_tail()}"
            time.sleep(0.1)
        yield server
    finally:
        # `ip netns exec` execs prometheus, so this is its own pid.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_prometheus_scrapes_the_daemon_and_queries_masqd_attachments(
    daemon: MasqdProcess,
) -> None:
    client = daemon.client
    for n in range(1, 4):
        ips = [f"198.18.62.{n}/24", f"2001:db8:62::{n:x}/64"]
        assert client.put_attachment("net", f"c{n}", "eth0", ips).status == 200
    target = daemon.status()["metrics_address"]

    with prometheus_scraping(daemon) as prometheus:
        series = prometheus.wait_for("masqd_attachments", "3")
        assert series["metric"] == {
            "__name__": "masqd_attachments",
            "instance": target,
            "job": "masqd",
        }
        assert prometheus.wait_for('up{job="masqd"}', "1")
        targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]

        assert client.delete_attachment("net", "c3", "eth0").status == 200
        prometheus.wait_for("masqd_attachments", "2")
        prometheus.wait_for('masqd_kernel_elements{family="ipv6"}', "4")
        info = prometheus.wait_for("masqd_build_info", "1")
        assert info["metric"]["version"] == __version__
        # The histogram arrived whole: its 1 ms bucket is a series Prometheus can query.
        assert prometheus.query('masqd_sync_duration_seconds_bucket{kind="partial",le="0.001"}')

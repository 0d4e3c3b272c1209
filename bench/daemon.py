"""A masqd daemon under benchmark: started in a namespace of its own, filled, measured, stopped.

The daemon runs as `ip netns exec NS .venv/bin/masqd ...` (ip execs in place, so the pid we
hold is the daemon's own, which /proc readings need). Its socket and state directory live
in a temporary directory that goes away with the namespace. That directory is on tmpfs
(/dev/shm) when the machine has one, because that is where the journal lives in production:
/run/masqd, a tmpfs on every systemd host, where an fsync costs microseconds rather than a
disk's milliseconds. Fills go through the API, as a runtime would make them, from asyncio
clients on keep-alive connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import client
from bench.addresses import Attachment
from bench.harness import REPO_ROOT, Progress
from tests.netns import netns, nft

MASQD = REPO_ROOT / ".venv" / "bin" / "masqd"
TABLE = "masqd"
READY_TIMEOUT = 120.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def available() -> bool:
    """Whether the daemon has landed in this tree (the harness runs without it too)."""
    return MASQD.exists() and (REPO_ROOT / "masqd" / "daemon" / "main.py").exists()


class DaemonError(RuntimeError):
    pass


class Daemon:
    def __init__(self, ns: str, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.ns = ns
        self.workdir = workdir
        self.socket = str(workdir / "masqd.sock")
        self.state_dir = workdir / "state"
        self.log = workdir / "masqd.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("daemon is not running")
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            str(MASQD),
            "--socket",
            self.socket,
            "--state-dir",
            str(self.state_dir),
            "--table",
            TABLE,
            "--log-level",
            "warning",
            *self.extra_args,
        ]

    def start(self) -> float:
        """Start the daemon; seconds from spawn until /readyz answers 200."""
        t0 = time.perf_counter()
        self.start_detached()
        return self.wait_ready(t0)

    def start_detached(self) -> None:
        """Spawn the daemon and return at once (see `wait_ready`)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=REPO_ROOT)

    def wait_ready(self, t0: float) -> float:
        """Poll /readyz until it answers 200; seconds since `t0` (a perf_counter reading)."""
        assert self.proc is not None
        deadline = t0 + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise DaemonError(f"masqd exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, client.HTTPError):
                if client.request(self.socket, "GET", "/readyz", timeout=5.0).status == 200:
                    return time.perf_counter() - t0
            if time.perf_counter() > deadline:
                raise DaemonError(f"masqd not ready after {READY_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.002)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait: the graceful shutdown an operator's `systemctl stop` does."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise DaemonError(f"masqd did not stop within {timeout:.0f} s of SIGTERM") from None
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get(self, target: str) -> Any:
        resp = client.request(self.socket, "GET", target)
        if resp.status != 200:
            raise DaemonError(f"GET {target}: HTTP {resp.status} {resp.body[:200]!r}")
        return resp.json()

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/v1/status")
        return body

    def syncs(self) -> dict[str, int]:
        """The reconciler's sync counters (total, full, partial, failures) from /v1/status."""
        syncs: dict[str, int] = self.status()["syncs"]
        return syncs

    def timed(self, method: str, a: Attachment) -> tuple[float, int]:
        """(seconds until answered, HTTP status) of one PUT or DELETE on a fresh connection."""
        payload = {"ips": list(a.ips)} if method == "PUT" else None
        t0 = time.perf_counter()
        resp = client.request(self.socket, method, a.path, payload)
        return time.perf_counter() - t0, resp.status

    def put(self, a: Attachment) -> float:
        """One PUT on a fresh connection, as a CNI plugin makes it; seconds until answered."""
        t0 = time.perf_counter()
        resp = client.request(self.socket, "PUT", a.path, {"ips": list(a.ips)})
        elapsed = time.perf_counter() - t0
        if not 200 <= resp.status < 300:
            raise DaemonError(f"PUT {a.path}: HTTP {resp.status} {resp.body[:200]!r}")
        return elapsed

    def delete(self, a: Attachment) -> float:
        t0 = time.perf_counter()
        resp = client.request(self.socket, "DELETE", a.path)
        elapsed = time.perf_counter() - t0
        if not 200 <= resp.status < 300:
            raise DaemonError(f"DELETE {a.path}: HTTP {resp.status} {resp.body[:200]!r}")
        return elapsed

    def rss_mib(self) -> float:
        """Resident memory now (VmRSS)."""
        return self._status_mib("VmRSS")

    def peak_rss_mib(self) -> float:
        """The most resident memory this process has had (VmHWM)."""
        return self._status_mib("VmHWM")

    def _status_mib(self, field: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
        raise DaemonError(f"no {field} in /proc status")

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process (all its threads)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def table_json(self) -> str:
        return nft(self.ns, "--json", "list", "table", "inet", TABLE).stdout

    def element_counts(self) -> dict[str, int]:
        """Elements per set of the daemon's table, as the kernel holds them."""
        counts = {}
        for obj in json.loads(self.table_json())["nftables"]:
            if "set" in obj:
                counts[obj["set"]["name"]] = len(obj["set"].get("elem", []))
        return counts

    def fill(
        self,
        items: Sequence[Attachment],
        *,
        concurrency: int = 64,
        progress: Progress | None = None,
    ) -> float:
        """PUT every attachment of `items` from `concurrency` clients; seconds it took."""
        t0 = time.perf_counter()
        asyncio.run(_fill(self.socket, items, concurrency, progress))
        return time.perf_counter() - t0


async def _fill(
    path: str, items: Sequence[Attachment], concurrency: int, progress: Progress | None
) -> None:
    todo = iter(items)
    done = 0
    total = len(items)
    step = max(1, total // 10)
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        conn = await client.AsyncConnection.open(path)
        try:
            for a in todo:
                resp = await conn.request("PUT", a.path, {"ips": list(a.ips)})
                if not 200 <= resp.status < 300:
                    raise DaemonError(f"PUT {a.path}: HTTP {resp.status} {resp.body[:200]!r}")
                done += 1
                if progress is not None and total >= 1000 and done % step == 0:
                    rate = done / (time.perf_counter() - t0)
                    progress("fill", f"{done:,}/{total:,} attachments ({rate:,.0f}/s)")
        finally:
            await conn.close()

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, max(1, total))):
            tg.create_task(worker())


async def _burst(path: str, items: list[Attachment], concurrency: int) -> list[float]:
    """Each setup on a fresh connection, `concurrency` at a time; per-request latencies."""
    todo = iter(items)
    latencies: list[float] = []

    async def worker() -> None:
        for a in todo:
            t0 = time.perf_counter()
            conn = await client.AsyncConnection.open(path)
            try:
                resp = await conn.request("PUT", a.path, {"ips": list(a.ips)})
            finally:
                await conn.close()
            if not 200 <= resp.status < 300:
                raise DaemonError(f"PUT {a.path}: HTTP {resp.status} {resp.body[:200]!r}")
            latencies.append(time.perf_counter() - t0)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return latencies


def burst(d: Daemon, items: list[Attachment], concurrency: int) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of setting up `items` from concurrent clients."""
    t0 = time.perf_counter()
    latencies = asyncio.run(_burst(d.socket, items, concurrency))
    return time.perf_counter() - t0, latencies


def state_parent() -> str | None:
    """Where the daemon's socket and state directory go: tmpfs, as /run/masqd is on a node
    (None: the default temporary directory, when /dev/shm is missing)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def running(extra_args: tuple[str, ...] = ()) -> Iterator[Daemon]:
    """A started daemon in a fresh namespace; stopped and cleaned up afterwards."""
    if not available():
        raise DaemonError("masqd is not installed in .venv yet (masqd/daemon/main.py missing)")
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-", dir=state_parent()))
    try:
        with netns("bench") as ns:
            d = Daemon(ns, workdir, extra_args)
            d.start()
            try:
                yield d
            finally:
                d.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

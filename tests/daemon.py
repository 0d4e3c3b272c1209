"""The real masqd as a subprocess in a network namespace, and clients for its socket.

Tests that prove behaviour end to end (API, CLI, packets, restarts, CNI, systemd) start the
installed `masqd` exactly as an operator would, inside a namespace the test made, and talk to
its Unix socket from the test process (a socket is a file path, so it crosses namespaces).
`MasqdProcess` starts it, waits for /readyz, restarts or signals it, and always kills it and
removes its files. `Client` (blocking) and `AsyncClient` (aiohttp) speak HTTP over the socket;
both return the status, the raw body and the parsed JSON, so tests can also send malformed
requests. `kernel_table` and `nft_listing` read what the kernel holds in the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from masqd.cli import UnixHTTPConnection
from masqd.planning import ruleset
from masqd.planning.ruleset import TableState
from tests.netns import netns, nft

REPO = Path(__file__).resolve().parent.parent
MASQD = str(Path(sys.executable).with_name("masqd"))
MASQCTL = str(Path(sys.executable).with_name("masqctl"))
DEFAULT_TABLE = "masqd"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


# ---- clients ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def is_json_error(self) -> bool:
        """A JSON object with a non-empty "error" string: what every rejection must be."""
        try:
            payload = self.json
        except ValueError:
            return False
        return (
            isinstance(payload, dict)
            and isinstance(payload.get("error"), str)
            and bool(payload["error"])
        )


class Client:
    """Blocking HTTP/1.1 over the daemon's Unix socket; one connection per request."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        chunked: bool = False,
    ) -> Response:
        """Send `body` as JSON, or `raw` bytes as they are (for malformed requests);
        `chunked` sends the body with chunked transfer encoding (no Content-Length)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = dict(headers or {})
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            if chunked and data is not None:
                pieces = [data[i : i + 8192] for i in range(0, len(data), 8192)]
                conn.request(method, path, body=iter(pieces), headers=sent, encode_chunked=True)
            else:
                conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Response:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Response:
        return self.request("DELETE", path)

    def post(self, path: str, body: Any) -> Response:
        return self.request("POST", path, body)

    # Shorthands for the attachment API.

    def put_attachment(
        self, network: str, container_id: str, ifname: str, ips: Sequence[str]
    ) -> Response:
        return self.put(attachment_path(network, container_id, ifname), {"ips": list(ips)})

    def get_attachment(self, network: str, container_id: str, ifname: str) -> Response:
        return self.get(attachment_path(network, container_id, ifname))

    def delete_attachment(self, network: str, container_id: str, ifname: str) -> Response:
        return self.delete(attachment_path(network, container_id, ifname))

    def gc(self, network: str, valid: Sequence[tuple[str, str]]) -> Response:
        body = {"valid_attachments": [{"container_id": c, "ifname": i} for c, i in valid]}
        return self.post(f"/v1/networks/{network}/gc", body)

    def attachments(self, network: str | None = None) -> list[dict[str, Any]]:
        path = "/v1/attachments" + (f"?network={network}" if network else "")
        resp = self.get(path)
        assert resp.status == 200, resp.body
        items: list[dict[str, Any]] = resp.json["attachments"]
        return items


class AsyncClient:
    """aiohttp over the Unix socket, for tests that need many requests in flight at once."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self._session is not None, "use `async with AsyncClient(...)`"
        async with self._session.request(method, f"http://masqd{path}", json=body) as resp:
            raw = await resp.read()
            return resp.status, (json.loads(raw) if raw else None)

    async def put_attachment(
        self, network: str, container_id: str, ifname: str, ips: Sequence[str]
    ) -> tuple[int, Any]:
        return await self.request(
            "PUT", attachment_path(network, container_id, ifname), {"ips": list(ips)}
        )

    async def delete_attachment(
        self, network: str, container_id: str, ifname: str
    ) -> tuple[int, Any]:
        return await self.request("DELETE", attachment_path(network, container_id, ifname))


def attachment_path(network: str, container_id: str, ifname: str) -> str:
    return f"/v1/attachments/{network}/{container_id}/{ifname}"


# ---- the kernel side --------------------------------------------------------------------


def nft_listing(ns: str, table: str = DEFAULT_TABLE) -> list[dict[str, Any]]:
    """`nft -j list table inet <table>` in `ns`, without metainfo; [] when there is no table."""
    proc = nft(ns, "-j", "list", "table", "inet", table, check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return []
        raise RuntimeError(f"nft list table failed: {proc.stderr.strip()}")
    return [obj for obj in json.loads(proc.stdout)["nftables"] if "metainfo" not in obj]


def kernel_table(ns: str, table: str = DEFAULT_TABLE) -> TableState:
    """What the kernel holds in `ns`, parsed the way masqd parses it."""
    return ruleset.parse_table(table, nft_listing(ns, table))


def set_elements(ns: str, set_name: str, table: str = DEFAULT_TABLE) -> dict[str, str | None]:
    """key -> subnet (None outside the local sets) of one set, as the kernel lists it."""
    return {k: e.subnet for k, e in kernel_table(ns, table).sets[set_name].items()}


def masqueraded(ns: str, table: str = DEFAULT_TABLE) -> set[str]:
    """Every address in the kernel's sources sets."""
    state = kernel_table(ns, table)
    return set(state.sets[ruleset.SOURCES4]) | set(state.sets[ruleset.SOURCES6])


# ---- the daemon -------------------------------------------------------------------------


class DaemonExited(RuntimeError):
    """The daemon exited (or never became ready) when the test needed it running."""


@dataclass
class MasqdProcess:
    """One masqd in namespace `ns`, with its socket, state and log under `workdir`."""

    ns: str
    workdir: Path
    table: str = DEFAULT_TABLE
    resync_interval: float = 60.0
    log_level: str = "info"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # MASQD_* settings, for instance
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.workdir / "masqd.sock")

    @property
    def state_dir(self) -> str:
        return str(self.workdir / "state")

    @property
    def log_path(self) -> Path:
        return self.workdir / "masqd.log"

    @property
    def config_path(self) -> Path:
        """An empty config file: the host's /etc/masqd/masqd.toml must not leak into tests
        (a `--config` in `extra_args` comes later and wins)."""
        return self.workdir / "masqd.toml"

    @property
    def client(self) -> Client:
        return Client(self.socket)

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.socket)

    def argv(self) -> list[str]:
        return [
            "ip", "netns", "exec", self.ns, MASQD,
            "--socket", self.socket,
            "--state-dir", self.state_dir,
            "--table", self.table,
            "--metrics-listen", "127.0.0.1:0",
            "--resync-interval", str(self.resync_interval),
            "--log-level", self.log_level,
            "--config", str(self.config_path),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, *, wait: bool = True, timeout: float = READY_TIMEOUT) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.config_path.touch()
        # Only the settings the test gives: none from the environment of whoever runs it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASQD_")} | self.env
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            # `ip netns exec` execs masqd, so proc.pid is the daemon's own pid.
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll /readyz until 200; raise with the log's tail if the daemon dies or stalls."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise DaemonExited(
                    f"masqd exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            try:
                resp = self.client.get("/readyz")
                if resp.status == 200:
                    return
                last = f"{resp.status} {resp.body!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.02)
        raise DaemonExited(f"masqd not ready within {timeout}s ({last}):\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        resp = self.client.get("/v1/status")
        assert resp.status == 200, resp.body
        payload: dict[str, Any] = resp.json
        return payload

    def kill(self, sig: int = signal.SIGKILL, *, wait: bool = True) -> int | None:
        """Send `sig`; with `wait`, the exit code (raises if it did not exit in time)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        if not wait:
            return None
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DaemonExited(f"masqd ignored signal {sig} for {STOP_TIMEOUT}s") from None

    def stop(self) -> int | None:
        """SIGTERM and wait: the clean shutdown an operator's `systemctl stop` does."""
        return self.kill(signal.SIGTERM)

    def restart(self, *, sig: int = signal.SIGTERM, timeout: float = READY_TIMEOUT) -> None:
        """Stop with `sig` (SIGKILL simulates a crash), start again on the same state."""
        self.kill(sig)
        self.start(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Kill the daemon whatever state it is in and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def short_workdir() -> Path:
    # A Unix socket path must fit in 108 bytes; pytest's tmp_path often does not.
    return Path(tempfile.mkdtemp(prefix="mqd", dir="/tmp"))


@contextlib.contextmanager
def running_masqd(
    ns: str | None = None,
    *,
    start: bool = True,
    table: str = DEFAULT_TABLE,
    resync_interval: float = 60.0,
    log_level: str = "info",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[MasqdProcess]:
    """A ready masqd in `ns` (or in a fresh namespace of its own); killed and removed after."""
    with contextlib.ExitStack() as stack:
        if ns is None:
            ns = stack.enter_context(netns("mqd"))
        daemon = MasqdProcess(
            ns=ns,
            workdir=short_workdir(),
            table=table,
            resync_interval=resync_interval,
            log_level=log_level,
            extra_args=list(extra_args),
            env=dict(env or {}),
        )
        stack.callback(daemon.close)
        if start:
            daemon.start()
        yield daemon


def masqctl(
    socket_path: str, *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the installed masqctl against `socket_path`."""
    return subprocess.run(
        [MASQCTL, "--socket", socket_path, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

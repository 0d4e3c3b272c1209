"""The daemon in-process on the fake backend, without root: its start-up order, the DEL
spool, reload, status, listing, GC, the 503 and 507 answers, access refusals, the metrics
port and the server's limits, through a real Unix socket and the real aiohttp stack.

What only the kernel can show (the table nft lists, packets, namespaces, other uids at the
socket) is proven by the kernel-marked tests against the real process (test_api.py,
test_access.py, test_recovery.py, test_spool.py, ...); these check the daemon's own logic
and run everywhere, which is also what keeps `masqd/` covered without root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from masqd import paths
from masqd.cli import main as masqctl
from masqd.daemon.lifecycle import Daemon
from masqd.kernel.backend import NftError
from masqd.kernel.fake import FakeBackend
from masqd.migrate import LEGACY_TABLE, comment_for_instance
from masqd.planning.ruleset import EXEMPT4, SOURCES4, SOURCES6
from masqd.sdnotify import Notifier
from masqd.state import spool
from masqd.state.statedir import StateDirBusy
from tests.daemon import AsyncClient, Client, Response
from tests.inprocess import InProcessDaemon, build_daemon, running_inprocess, short_tmp
from tests.spool_entries import write_entry
from tests.test_api import BAD_REQUESTS, A
from tests.test_migrate import masq_rule

WAIT = 20.0  # seconds: generous, for a busy machine


def ok(resp: Response, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers.get("content-type", "").startswith("application/json")
    return resp.json


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmp()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[InProcessDaemon]:
    with running_inprocess("--metrics-listen", "127.0.0.1:0") as d:
        assert d.client.put_attachment("base", "c1", "eth0", ["198.18.0.2/24"]).status == 200
        yield d


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


def wait_until(predicate: Any, what: str, timeout: float = WAIT) -> None:
    """Poll `predicate` (a client's view) until it holds; fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def notifier(self) -> Notifier:
        return Notifier(environ={"NOTIFY_SOCKET": self.path})

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


# ---- start-up order -------------------------------------------------------------------------


async def test_startup_restores_applies_the_spool_and_listens_before_the_first_sync(
    workdir: Path,
) -> None:
    kernel = FakeBackend()
    first = build_daemon(workdir, backend=kernel)
    await first.startup()
    serving = asyncio.create_task(first.serve())
    await asyncio.wait_for(first.reconciler.first_sync_done.wait(), WAIT)
    async with AsyncClient(first.config.socket) as client:
        for n in (2, 3):
            status, _ = await client.put_attachment("n", f"c{n}", "eth0", [f"198.18.60.{n}/24"])
            assert status == 200
    first.stop()
    await serving
    await first.shutdown()
    # The table stays in the kernel while the daemon is away; the plugin spools a DEL.
    assert {"198.18.60.2", "198.18.60.3"} <= set(kernel.state().sets[SOURCES4])
    spooled = write_entry(spool.spool_dir_for(first.config.socket), "n", "c2", "eth0")

    notify = NotifySocket(workdir / "notify")
    second = build_daemon(workdir, backend=kernel, notifier=notify.notifier())
    attempts = kernel.attempts
    await second.startup()
    # Start-up has restored the journal, applied the spooled DEL to the desired state, and
    # opened the socket, but not synced: requests queue, nothing is ready yet.
    assert second.state.get(("n", "c3", "eth0")) is not None
    assert second.state.get(("n", "c2", "eth0")) is None
    assert second.restored.found and second.restored.incomplete is None
    assert exists(second.config.socket) and exists(spooled)
    assert kernel.attempts == attempts and not second.reconciler.first_sync_done.is_set()
    assert notify.messages() == []
    serving = asyncio.create_task(second.serve())
    await asyncio.wait_for(second.reconciler.first_sync_done.wait(), WAIT)
    async with asyncio.timeout(WAIT):
        while not (messages := notify.messages()):  # noqa: ASYNC110 - a datagram to read
            await asyncio.sleep(0.01)
    assert messages[0].startswith("READY=1"), messages
    # The spool file goes once the first sync has put the DEL in the kernel.
    assert not exists(spooled)
    held = kernel.state().sets[SOURCES4]
    assert "198.18.60.3" in held and "198.18.60.2" not in held
    second.stop()
    await serving
    await second.shutdown()
    assert any(m.startswith("STOPPING=1") for m in notify.messages())
    assert kernel.closed
    notify.sock.close()


async def test_a_second_daemon_on_the_state_directory_refuses_and_changes_nothing(
    workdir: Path,
) -> None:
    kernel = FakeBackend()
    first = build_daemon(workdir, backend=kernel)
    await first.startup()
    second = build_daemon(workdir, "--socket", str(workdir / "other.sock"), backend=FakeBackend())
    with pytest.raises(StateDirBusy):
        await second.startup()
    await second.shutdown()
    assert not exists(workdir / "other.sock")
    await first.shutdown()
    # Released: a daemon starts there now.
    third = build_daemon(workdir, backend=kernel)
    await third.startup()
    await third.shutdown()


async def test_an_untrusted_state_directory_stops_the_start(workdir: Path) -> None:
    state = workdir / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    d = build_daemon(workdir)
    with pytest.raises(paths.StartupError, match="lets others write it"):
        await d.startup()
    await d.shutdown()
    assert not exists(d.config.socket)


async def test_without_a_journal_the_table_s_attachments_are_recovered(workdir: Path) -> None:
    kernel = FakeBackend()
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.61.2/24", "2001:db8:61::2/64"]))
    shutil.rmtree(workdir / "state")
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        status = ok(d.client.get("/v1/status"))
        assert status["adopted"] == {"attachments": 1, "unreadable": 0}
        assert status["journal_incomplete"] is not None
        assert ok(d.client.get_attachment("n", "c1", "eth0"))["ips"] == [
            "198.18.61.2/24",
            "2001:db8:61::2/64",
        ]
        assert "198.18.61.2" in d.call(kernel.state).sets[SOURCES4]


# ---- the DEL spool while running ------------------------------------------------------------


def test_a_del_spooled_while_running_is_applied_and_its_file_removed(
    shared: InProcessDaemon,
) -> None:
    client = shared.client
    ok(client.put_attachment("spool", "c1", "eth0", ["198.18.62.2/24"]))
    path = write_entry(shared.daemon.spool.directory, "spool", "c1", "eth0")
    wait_until(lambda: not os.path.exists(path), "the spool file removed")
    assert client.get_attachment("spool", "c1", "eth0").status == 404
    assert "198.18.62.2" not in shared.call(shared.fake.state).sets[SOURCES4]


def test_a_spool_others_can_write_is_refused_and_reported(workdir: Path) -> None:
    with running_inprocess(workdir=workdir) as d:
        directory = d.daemon.spool.directory
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.63.2/24"]))
        os.chmod(directory, 0o777)
        write_entry(directory, "n", "c1", "eth0")
        wait_until(
            lambda: ok(d.client.get("/v1/status"))["spool"]["problem"] is not None,
            "the spool's problem in the status",
        )
        assert ok(d.client.get_attachment("n", "c1", "eth0"))["ips"] == ["198.18.63.2/24"]
        os.chmod(directory, 0o700)
        write_entry(directory, "n", "c1", "eth0")  # the plugin spools again: a change to see
        wait_until(
            lambda: d.client.get_attachment("n", "c1", "eth0").status == 404,
            "the DEL applied once the spool is private again",
        )
        assert ok(d.client.get("/v1/status"))["spool"]["problem"] is None


def test_a_corrupt_spool_entry_is_reported_and_removed(shared: InProcessDaemon) -> None:
    directory = shared.daemon.spool.directory
    path = os.path.join(directory, spool.entry_name("spool", "c9", "eth0"))
    with open(path, "w") as f:
        f.write("{not json")
    wait_until(lambda: not os.path.exists(path), "the corrupt entry removed")
    assert ok(shared.client.get("/v1/status"))["spool"]["problem"] is None


# ---- nftables events, CNI rules adoption -------------------------------------------------


def test_tampering_is_seen_through_the_backend_s_events_and_repaired(
    shared: InProcessDaemon,
) -> None:
    ok(shared.client.put_attachment("tamper", "c1", "eth0", ["198.18.70.2/24"]))
    before = ok(shared.client.get("/v1/status"))["events"]["table_batches"]
    shared.call(lambda: shared.fake.delete_element(SOURCES4, "198.18.70.2"))
    wait_until(
        lambda: "198.18.70.2" in shared.call(shared.fake.state).sets[SOURCES4],
        "the tampered element put back",
    )
    assert ok(shared.client.get("/v1/status"))["events"]["table_batches"] > before


def test_adopting_the_cni_plugins_rules_at_startup_finds_no_table_on_a_fresh_kernel(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO),
        running_inprocess("--adopt-cni-plugins-rules", workdir=workdir) as d,
    ):
        wait_until(
            lambda: "no table inet cni_plugins_masquerade to adopt" in caplog.text,
            "the adoption's log line",
        )
        assert ok(d.client.get("/readyz")) == {"ready": True}


# ---- reload ------------------------------------------------------------------------------------


NEW_POLICY = '[policy]\nexempt_destinations = ["198.19.5.0/24"]\nrandom_fully = true\n'


def test_reload_applies_a_valid_policy_and_refuses_a_bad_file(workdir: Path) -> None:
    config = workdir / "masqd.toml"
    config.write_text('[policy]\nexempt_destinations = ["198.19.0.0/16"]\n')
    with running_inprocess(workdir=workdir) as d:
        assert "198.19.0.0/16" in d.call(d.fake.state).sets[EXEMPT4]
        config.write_text(
            '[policy]\nexempt_destinations = ["198.19.5.0/24"]\nrandom_fully = true\n'
        )
        d.call(lambda: d.daemon.request_reload("test"))
        wait_until(
            lambda: "198.19.5.0/24" in d.call(d.fake.state).sets[EXEMPT4],
            "the new policy in the kernel",
        )
        assert "198.19.0.0/16" not in d.call(d.fake.state).sets[EXEMPT4]
        assert ok(d.client.get("/v1/status"))["policy"]["random_fully"] is True
        dump = d.dump()
        config.write_text('[policy]\nexempt_destinations = ["198.19.5.1/24"]\n')  # host bits
        assert d.call(lambda: d.daemon.reloader.reload("test")) is None
        assert d.dump() == dump
        failures = d.daemon.metrics.config_reload_failures
        assert failures._value.get() >= 1
        # The same file again: the policy is unchanged, nothing to apply.
        config.write_text(
            '[policy]\nexempt_destinations = ["198.19.5.0/24"]\nrandom_fully = true\n'
        )
        assert d.call(lambda: d.daemon.reloader.reload("test")) is None


# ---- the API: status, listing, GC, refusals -----------------------------------------------


def test_status_reports_the_daemon_s_parts(shared: InProcessDaemon) -> None:
    status = ok(shared.client.get("/v1/status"))
    assert status["ready"] is True and status["table"] == "inet masqd"
    assert status["events"]["subscribed"] is True
    assert status["socket"] == shared.socket
    assert status["spool"] == {"dir": shared.daemon.spool.directory, "problem": None}
    assert status["journal_problems"] == [] and status["adopted"] is None
    assert status["metrics_address"].startswith("127.0.0.1:")
    assert status["attachments"] == ok(shared.client.get("/v1/attachments"))["count"]


def test_listing_and_gc(shared: InProcessDaemon) -> None:
    client = shared.client
    for n in range(4):
        ok(client.put_attachment("gc", f"c{n}", "eth0", [f"198.18.64.{n + 2}/24"]))
    ok(client.put_attachment("other", "c0", "eth0", ["198.18.65.2/24"]))
    listed = client.attachments("gc")
    assert [a["container_id"] for a in listed] == ["c0", "c1", "c2", "c3"]
    body = ok(client.gc("gc", [("c1", "eth0"), ("c3", "eth0")]))
    assert sorted(a["container_id"] for a in body["removed"]) == ["c0", "c2"]
    assert [a["container_id"] for a in client.attachments("gc")] == ["c1", "c3"]
    assert client.attachments("other")[0]["ips"] == ["198.18.65.2/24"]
    held = shared.call(shared.fake.state).sets[SOURCES4]
    assert "198.18.64.2" not in held and "198.18.64.3" in held and "198.18.65.2" in held


def test_masqctl_speaks_to_the_daemon(
    shared: InProcessDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    def ctl(*argv: str) -> str:
        masqctl(["--socket", shared.socket, *argv])
        return capsys.readouterr().out

    ctl("set", "ctl", "c1", "eth0", "198.18.66.2/24")
    ctl("set", "ctl", "c2", "eth0", "198.18.66.3/24", "2001:db8:66::3/64")
    assert "198.18.66.2/24" in ctl("get", "ctl", "c1", "eth0")
    listed = ctl("list", "--network", "ctl")
    assert "c1" in listed and "2001:db8:66::3/64" in listed
    as_json = json.loads(ctl("--json", "list", "--network", "ctl"))
    assert [a["container_id"] for a in as_json["attachments"]] == ["c1", "c2"]
    assert "inet masqd" in ctl("status")
    assert json.loads(ctl("--json", "status"))["ready"] is True
    ctl("diff")  # a fresh listing against the desired table; the fake agrees
    assert "198.18.66.2" in shared.call(shared.fake.state).sets[SOURCES4]
    assert "removed 1 attachments" in ctl("gc", "ctl", "--valid", "c2/eth0")
    assert shared.client.get_attachment("ctl", "c1", "eth0").status == 404
    ctl("adopt-cni-plugins")  # no legacy table on the fake: nothing to adopt
    ctl("delete", "ctl", "c2", "eth0")
    assert shared.client.attachments("ctl") == []
    # Refused by the daemon: one line, exit 1.
    with pytest.raises(SystemExit) as exit_:
        masqctl(["--socket", shared.socket, "set", "ctl", "c3", "eth0", "224.0.0.1/4"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("masqctl: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_is_refused_and_changes_nothing(shared: InProcessDaemon, name: str) -> None:
    client = shared.client
    method, path, raw, statuses = BAD_REQUESTS[name]
    before = (client.attachments(), shared.dump())
    resp = client.request(method, path, raw=raw)
    assert resp.status in statuses, (resp.status, resp.body)
    assert resp.is_json_error(), resp.body
    if resp.status == 405:
        assert resp.headers.get("allow")
    assert (client.attachments(), shared.dump()) == before
    assert ok(client.get("/readyz")) == {"ready": True}


def test_an_oversized_chunked_body_is_refused(shared: InProcessDaemon) -> None:
    client = shared.client
    before = (client.attachments(), shared.dump())
    raw = json.dumps({"ips": ["198.18.30.2/24"], "pad": "x" * 100_000}).encode()
    resp = client.request("PUT", A, raw=raw, chunked=True)
    assert resp.status == 413 and resp.is_json_error()
    assert (client.attachments(), shared.dump()) == before


ENOMEM = "Cannot allocate memory"


def test_a_change_the_kernel_refuses_answers_503_then_recovers(workdir: Path) -> None:
    with running_inprocess("--apply-timeout", "0.5", workdir=workdir) as d:
        d.call(
            lambda: d.fake.fail_next(1000, "Error: Could not process rule: Cannot allocate memory")
        )
        resp = d.client.put_attachment("n", "c1", "eth0", ["198.18.67.2/24"])
        assert resp.status == 503 and "Cannot allocate memory" in resp.json["error"]
        resp = d.client.get("/readyz")
        assert resp.status == 503 and resp.json["ready"] is False
        d.call(d.fake.heal)
        wait_until(lambda: d.client.get("/readyz").status == 200, "ready again")
        assert "198.18.67.2" in d.call(d.fake.state).sets[SOURCES4]


def test_over_max_attachments_the_answer_is_507(workdir: Path) -> None:
    with running_inprocess("--max-attachments", "1", workdir=workdir) as d:
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.68.2/24"]))
        resp = d.client.put_attachment("n", "c2", "eth0", ["198.18.68.3/24"])
        assert resp.status == 507 and "--max-attachments is 1" in resp.json["error"]
        assert [a["container_id"] for a in d.client.attachments()] == ["c1"]


def test_a_uid_not_allowed_gets_403_and_changes_nothing(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer's uid is what SO_PEERCRED says; a test without root cannot connect as
    another uid, so the credentials are replaced here (test_access.py connects for real)."""
    from masqd.api import handlers

    other = 4242 if os.geteuid() != 4242 else 4343  # neither root nor the daemon's user
    monkeypatch.setattr(handlers, "peer_credentials", lambda request: (1, other, other))
    with running_inprocess(workdir=workdir) as d:
        resp = d.client.put_attachment("n", "c1", "eth0", ["198.18.69.2/24"])
        assert resp.status == 403 and f"uid {other}" in resp.json["error"]
        assert "198.18.69.2" not in d.dump() and d.call(lambda: len(d.daemon.state)) == 0
    with running_inprocess("--allow-uid", str(other), workdir=workdir) as d:
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.69.2/24"]))
    with running_inprocess("--allow-gid", str(other), workdir=workdir) as d:
        ok(d.client.get_attachment("n", "c1", "eth0"))


# ---- the metrics port and the server's limits -------------------------------------------------


def test_the_metrics_port_serves_the_metrics_and_probes(shared: InProcessDaemon) -> None:
    address = shared.daemon.metrics_address
    assert address is not None
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=WAIT) as resp:
        text = resp.read().decode()
    for name in ("masqd_attachments", "masqd_api_requests_total", "masqd_build_info"):
        assert name in text
    with urllib.request.urlopen(f"http://{address}/readyz", timeout=WAIT) as resp:
        assert resp.status == 200


def test_beyond_max_connections_one_503_and_the_refusal_counted(workdir: Path) -> None:
    with running_inprocess("--max-connections", "2", workdir=workdir) as d:
        held = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            held.append(s)
        # The held connections are counted once the daemon has seen them; a request of
        # their own shows it.
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: masqd\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        resp = Client(d.socket).get("/healthz")
        assert resp.status == 503 and resp.is_json_error()
        for s in held:
            s.close()
        wait_until(lambda: Client(d.socket).get("/healthz").status == 200, "room again")
        text = d.call(lambda: d.daemon.metrics.exposition()[0].decode())
        assert 'masqd_connections_refused_total{listener="api"' in text


def test_a_malformed_request_line_gets_a_json_400(shared: InProcessDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(shared.socket)
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and head.split()[1] == b"400", head
    assert "error" in json.loads(body)


def test_a_client_that_never_finishes_its_request_is_cut_off(workdir: Path) -> None:
    with running_inprocess("--client-timeout", "0.5", workdir=workdir) as d:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(WAIT)
            s.connect(d.socket)
            s.sendall(b"PUT /v1/attachments/n/c1/eth0 HTTP/1.1\r\nHost: masqd\r\n")
            data = b""
            while chunk := s.recv(4096):  # ends when the daemon closes the connection
                data += chunk
        assert d.client.get("/healthz").status == 200


# ---- when things go wrong at start-up or in the spool --------------------------------------


def test_recovery_beyond_max_attachments_takes_what_fits_and_names_the_rest(
    workdir: Path,
) -> None:
    kernel = FakeBackend()
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        for n in (2, 3, 4):
            ok(d.client.put_attachment("n", f"c{n}", "eth0", [f"198.18.71.{n}/24"]))
    shutil.rmtree(workdir / "state")
    with running_inprocess("--max-attachments", "2", workdir=workdir, backend=kernel) as d:
        status = ok(d.client.get("/v1/status"))
        assert status["adopted"] == {"attachments": 2, "unreadable": 1}
        assert len(d.client.attachments()) == 2


def test_a_table_that_cannot_be_listed_at_start_up_leaves_the_journal_s_state(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = FakeBackend()
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.72.2/24"]))
    shutil.rmtree(workdir / "state")
    failures = iter([True])

    def refuse_first_listing(point: str) -> None:
        if point == "observe" and next(failures, False):
            raise NftError("Error: Could not process rule: Operation not permitted")

    kernel.stage = refuse_first_listing
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        assert "cannot list table inet masqd to adopt it" in caplog.text
        assert ok(d.client.get("/v1/status"))["adopted"] is None
        # Nothing was recovered, so the first sync made the table what the state says.
        assert d.client.attachments() == []


def test_without_events_the_generation_poll_still_repairs_tampering(workdir: Path) -> None:
    kernel = FakeBackend()
    kernel.no_events = True
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        assert ok(d.client.get("/v1/status"))["events"] == {"subscribed": False}
        assert d.daemon.healthy()
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.73.2/24"]))
        d.call(lambda: kernel.delete_element(SOURCES4, "198.18.73.2"))
        wait_until(
            lambda: "198.18.73.2" in d.call(kernel.state).sets[SOURCES4],
            "the tampered element put back by the generation poll",
        )


def test_a_spooled_del_the_kernel_refuses_is_kept_and_retried(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_inprocess("--apply-timeout", "0.3", workdir=workdir) as d:
        ok(d.client.put_attachment("n", "c1", "eth0", ["198.18.74.2/24"]))
        d.call(lambda: d.fake.fail_next(1000))
        path = write_entry(d.daemon.spool.directory, "n", "c1", "eth0")
        wait_until(lambda: "spooled DELs not confirmed yet" in caplog.text, "the retry logged")
        assert exists(path)  # kept until the kernel has the DEL
        d.call(d.fake.heal)
        wait_until(lambda: not exists(path), "the spool file removed once confirmed")
        assert "198.18.74.2" not in d.call(d.fake.state).sets[SOURCES4]


def test_a_spool_entry_naming_no_valid_attachment_is_dropped(
    shared: InProcessDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_entry(shared.daemon.spool.directory, "spool", "c1", "eth0/../x")
    wait_until(lambda: not exists(path), "the entry dropped")
    assert "names no valid attachment; dropped" in caplog.text


def test_a_daemon_without_a_config_loader_ignores_reload(workdir: Path) -> None:
    config = build_daemon(workdir).config
    daemon = Daemon(config, backend=FakeBackend(), notifier=Notifier(environ={}))
    assert daemon.reloader.watched_files() == []
    assert daemon.reloader.reload("SIGHUP") is None


# ---- the CNI plugins' legacy rules, on the fake ------------------------------------------------


def legacy_table(*attachments: tuple[str, str, str, str]) -> dict[str, Any]:
    """The plugins' table as their ADDs leave it (as test_migrate's legacy_script, in JSON),
    for (network, container ID, ifname, IP/prefix) attachments."""
    t = {"family": "inet", "table": LEGACY_TABLE}
    base = {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}
    commands: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": LEGACY_TABLE}}},
        {"add": {"chain": t | {"name": "masq_checks"}}},
        {"add": {"chain": t | {"name": "postrouting"} | base}},
    ]
    for network, container_id, ifname, ip in attachments:
        iface = ipaddress.ip_interface(ip)
        rule = t | {
            "chain": "masq_checks",
            "expr": masq_rule(str(iface.ip), str(iface.network)),
            "comment": comment_for_instance(network, ifname, container_id),
        }
        commands.append({"add": {"rule": rule}})
    goto = {"chain": "postrouting", "expr": [{"goto": {"target": "masq_checks"}}]}
    commands.append({"add": {"rule": t | goto}})
    return {"nftables": commands}


def test_the_cni_plugins_rules_are_adopted_at_startup_and_their_table_removed(
    workdir: Path,
) -> None:
    kernel = FakeBackend()
    kernel.execute(
        legacy_table(
            ("cni", "c1", "eth0", "198.18.76.2/24"),
            ("cni", "c2", "eth0", "2001:db8:76::2/64"),
        )
    )
    with running_inprocess("--adopt-cni-plugins-rules", workdir=workdir, backend=kernel) as d:
        wait_until(lambda: d.call(lambda: kernel.listing(LEGACY_TABLE)) == [], "table gone")
        assert ok(d.client.get_attachment("cni", "c1", "eth0"))["ips"] == ["198.18.76.2/24"]
        state = d.call(kernel.state)
        assert "198.18.76.2" in state.sets[SOURCES4]
        assert "2001:db8:76::2" in state.sets[SOURCES6]


def test_masqctl_adopts_what_it_can_read_and_leaves_the_rest(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = FakeBackend()
    kernel.execute(legacy_table(("cni", "c1", "eth0", "198.18.77.2/24")))
    odd = {
        "family": "inet",
        "table": LEGACY_TABLE,
        "chain": "masq_checks",
        "expr": masq_rule("198.18.77.3", "198.18.77.0/24"),
        "comment": "not the plugins' comment",
    }
    kernel.execute({"nftables": [{"add": {"rule": odd}}]})
    with running_inprocess(workdir=workdir, backend=kernel) as d:
        masqctl(["--socket", d.socket, "adopt-cni-plugins"])
        out = capsys.readouterr().out
        assert "198.18.77.2" in out and "not the plugins' comment" in out, out
        assert ok(d.client.get_attachment("cni", "c1", "eth0"))["ips"] == ["198.18.77.2/24"]
        left = [o["rule"] for o in d.call(lambda: kernel.listing(LEGACY_TABLE)) if "rule" in o]
        assert [r.get("comment") for r in left if r["chain"] == "masq_checks"] == [
            "not the plugins' comment"
        ]
        # Again: nothing left that it can read; the table stays for what it cannot.
        masqctl(["--socket", d.socket, "--json", "adopt-cni-plugins"])
        report = json.loads(capsys.readouterr().out)
        assert report["adopted"] == [] and report["table_deleted"] is False, report


def test_a_body_that_does_not_decode_is_refused_in_json_and_changes_nothing(
    shared: InProcessDaemon,
) -> None:
    client = shared.client
    before = (client.attachments(), shared.dump())
    headers = {"Content-Encoding": "gzip"}
    resp = client.request("PUT", A, raw=b"not compressed at all", headers=headers)
    assert resp.status == 400 and resp.is_json_error(), (resp.status, resp.body)
    assert (client.attachments(), shared.dump()) == before

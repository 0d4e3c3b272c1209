"""The API contract, against the real daemon in a namespace of its own.

The API on the fake backend, without root, is in test_api_fake.py and
test_daemon_inprocess.py (which runs these bad-request cases there too).

Most tests share one daemon (module scope) and keep out of each other's way with their own
network names; the bad-input tests compare the whole attachment list and the kernel's whole
listing (handles included) before and after, so "changes nothing" means nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from masqd.planning.ruleset import SOURCES4, SOURCES6, local_set
from tests.daemon import (
    Client,
    MasqdProcess,
    Response,
    kernel_table,
    masqueraded,
    nft_listing,
    running_masqd,
    set_elements,
)

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def shared() -> Iterator[MasqdProcess]:
    with running_masqd() as daemon:
        # Something in place, so that "nothing changed" is checked against a non-empty table.
        client = daemon.client
        assert (
            client.put_attachment("base", "c1", "eth0", ["198.18.0.2/24", "2001:db8::2/64"]).status
            == 200
        )
        assert client.put_attachment("base", "c2", "eth0", ["198.18.0.3/24"]).status == 200
        yield daemon


@pytest.fixture
def client(shared: MasqdProcess) -> Client:
    assert shared.proc is not None and shared.proc.poll() is None, shared.log_tail()
    return shared.client


def ok(resp: Response, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers.get("content-type", "").startswith("application/json")
    return resp.json


# ---- setup, get, teardown -----------------------------------------------------------------


def test_put_answers_once_the_kernel_holds_the_attachment(
    shared: MasqdProcess, client: Client
) -> None:
    for n in range(10):
        ips = [f"198.18.10.{n + 2}/24", f"2001:db8:10::{n + 2:x}/64"]
        body = ok(client.put_attachment("put", f"c{n}", "eth0", ips))
        assert body == {"network": "put", "container_id": f"c{n}", "ifname": "eth0", "ips": ips}
        # Read right after the 200: no waiting, no polling.
        table = kernel_table(shared.ns)
        assert table.sets[SOURCES4][f"198.18.10.{n + 2}"].comment == f"put/c{n}/eth0"
        assert table.sets[local_set(4, 24)][f"198.18.10.{n + 2}"].subnet == "198.18.10.0/24"
        assert f"2001:db8:10::{n + 2:x}" in table.sets[SOURCES6]
        assert table.sets[local_set(6, 64)][f"2001:db8:10::{n + 2:x}"].subnet == "2001:db8:10::/64"


def test_put_answers_with_canonical_ips(client: Client) -> None:
    body = ok(
        client.put_attachment("canon", "c1", "eth0", ["2001:DB8:0:0::0011/64", "198.18.11.2/24"])
    )
    assert body["ips"] == ["2001:db8::11/64", "198.18.11.2/24"]
    assert ok(client.get_attachment("canon", "c1", "eth0"))["ips"] == body["ips"]


def test_get_answers_the_attachment_and_404_for_an_unknown_one(client: Client) -> None:
    ok(client.put_attachment("get", "c1", "eth0", ["198.18.12.2/24"]))
    assert ok(client.get_attachment("get", "c1", "eth0")) == {
        "network": "get",
        "container_id": "c1",
        "ifname": "eth0",
        "ips": ["198.18.12.2/24"],
    }
    resp = client.get_attachment("get", "nobody", "eth0")
    assert resp.status == 404 and resp.is_json_error()
    assert "get/nobody/eth0" in resp.json["error"]


def test_reput_replaces_the_ips_and_stale_ones_leave_unless_held(
    shared: MasqdProcess, client: Client
) -> None:
    ok(
        client.put_attachment(
            "reput", "a", "eth0", ["198.18.13.2/24", "198.18.13.3/24", "2001:db8:13::2/64"]
        )
    )
    ok(client.put_attachment("reput", "b", "eth0", ["198.18.13.3/24"]))
    ok(client.put_attachment("reput", "a", "eth0", ["198.18.13.4/24"]))
    held = masqueraded(shared.ns)
    assert "198.18.13.2" not in held and "2001:db8:13::2" not in held  # a's alone: gone
    assert "198.18.13.3" in held  # b still holds it
    assert "198.18.13.4" in held
    assert ok(client.get_attachment("reput", "a", "eth0"))["ips"] == ["198.18.13.4/24"]
    assert set_elements(shared.ns, local_set(4, 24))["198.18.13.3"] == "198.18.13.0/24"


def test_delete_is_idempotent(shared: MasqdProcess, client: Client) -> None:
    ok(client.put_attachment("del", "c1", "eth0", ["198.18.14.2/24"]))
    first = ok(client.delete_attachment("del", "c1", "eth0"))
    assert first == {
        "deleted": True,
        "attachment": {
            "network": "del",
            "container_id": "c1",
            "ifname": "eth0",
            "ips": ["198.18.14.2/24"],
        },
    }
    assert "198.18.14.2" not in masqueraded(shared.ns)
    assert client.get_attachment("del", "c1", "eth0").status == 404
    assert ok(client.delete_attachment("del", "c1", "eth0")) == {"deleted": False}
    assert ok(client.delete_attachment("del", "never", "eth9")) == {"deleted": False}


def test_the_shared_address_survives_the_teardown_of_one_holder(
    shared: MasqdProcess, client: Client
) -> None:
    ok(client.put_attachment("seed", "A", "eth0", ["198.18.15.3/24"]))
    ok(client.put_attachment("seed", "B", "eth0", ["198.18.15.3/24"]))
    ok(client.delete_attachment("seed", "A", "eth0"))
    table = kernel_table(shared.ns)
    assert table.sets[SOURCES4]["198.18.15.3"].comment == "seed/B/eth0"
    assert table.sets[local_set(4, 24)]["198.18.15.3"].subnet == "198.18.15.0/24"
    ok(client.delete_attachment("seed", "B", "eth0"))
    assert "198.18.15.3" not in masqueraded(shared.ns)


def test_list_and_filter_by_network(client: Client) -> None:
    ok(client.put_attachment("lista", "c1", "eth0", ["198.18.16.2/24"]))
    ok(client.put_attachment("lista", "c2", "eth1", ["198.18.16.3/24"]))
    ok(client.put_attachment("listb", "c1", "eth0", ["198.18.16.4/24"]))
    body = ok(client.get("/v1/attachments?network=lista"))
    assert body["count"] == 2
    assert {(a["container_id"], a["ifname"]) for a in body["attachments"]} == {
        ("c1", "eth0"),
        ("c2", "eth1"),
    }
    everything = ok(client.get("/v1/attachments"))
    assert everything["count"] == len(everything["attachments"]) >= 3
    assert ok(client.get("/v1/attachments?network=nothing-here")) == {"attachments": [], "count": 0}


def test_gc_removes_exactly_the_others_of_that_network(
    shared: MasqdProcess, client: Client
) -> None:
    for cid, ip in (("a", "198.18.17.2"), ("b", "198.18.17.3"), ("c", "198.18.17.4")):
        ok(client.put_attachment("gc1", cid, "eth0", [f"{ip}/24"]))
    ok(client.put_attachment("gc1", "b", "eth1", ["198.18.17.5/24"]))
    ok(client.put_attachment("gc2", "a", "eth0", ["198.18.17.6/24"]))
    body = ok(client.gc("gc1", [("b", "eth0"), ("zzz", "eth0")]))
    assert body["network"] == "gc1"
    assert sorted((a["container_id"], a["ifname"]) for a in body["removed"]) == [
        ("a", "eth0"),
        ("b", "eth1"),
        ("c", "eth0"),
    ]
    assert [(a["container_id"], a["ifname"]) for a in client.attachments("gc1")] == [("b", "eth0")]
    assert len(client.attachments("gc2")) == 1
    held = masqueraded(shared.ns)
    assert {"198.18.17.3", "198.18.17.6"} <= held
    assert not {"198.18.17.2", "198.18.17.4", "198.18.17.5"} & held
    # Again: nothing left to remove.
    assert ok(client.gc("gc1", [("b", "eth0")]))["removed"] == []
    assert ok(client.gc("gc-empty", []))["removed"] == []


def test_concurrent_setups_are_all_applied(shared: MasqdProcess) -> None:
    n = 200

    async def burst() -> list[int]:
        async with shared.async_client() as c:
            results = await asyncio.gather(
                *(
                    c.put_attachment(
                        "burst", f"c{i}", "eth0", [f"198.18.{20 + i // 200}.{i % 200 + 2}/16"]
                    )
                    for i in range(n)
                )
            )
        return [status for status, _ in results]

    syncs_before = shared.status()["syncs"]["total"]
    assert asyncio.run(burst()) == [200] * n
    held = masqueraded(shared.ns)
    assert all(f"198.18.{20 + i // 200}.{i % 200 + 2}" in held for i in range(n))
    syncs = shared.status()["syncs"]["total"] - syncs_before
    assert syncs < n / 2, syncs  # coalesced


def test_connections_queue_while_the_daemon_is_busy(shared: MasqdProcess) -> None:
    """Hundreds of clients connecting in the same instant (a node starting many containers)
    wait in the listen backlog: a non-blocking connect is never refused with EAGAIN, which
    asyncio clients misread as connected. The daemon is stopped so that nothing is accepted."""
    assert shared.proc is not None
    n = 600
    socks: list[socket.socket] = []
    shared.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            sock.connect(shared.socket)  # BlockingIOError here: the backlog was full
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: masqd\r\nConnection: close\r\n\r\n")
    finally:
        shared.proc.send_signal(signal.SIGCONT)
    try:
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(30)
            assert sock.recv(64).startswith(b"HTTP/1.1 200 "), "a queued client was not served"
    finally:
        for sock in socks:
            sock.close()


# ---- health, status, the socket ----------------------------------------------------------


def test_health_and_readiness(client: Client) -> None:
    assert ok(client.get("/healthz")) == {"status": "ok"}
    assert ok(client.get("/readyz")) == {"ready": True}


def test_status_reports_what_operators_need(shared: MasqdProcess, client: Client) -> None:
    status = ok(client.get("/v1/status"))
    assert status["table"] == "inet masqd"
    assert status["ready"] is True
    assert status["attachments"] == ok(client.get("/v1/attachments"))["count"]
    assert isinstance(status["addresses"], int) and isinstance(status["version"], str)
    assert set(status["syncs"]) >= {"total", "full", "partial", "failures", "drift_repairs"}
    assert status["syncs"]["failures"] == 0 and status["syncs"]["full"] >= 1
    last = status["last_sync"]
    assert last["result"] == "ok" and last["error"] is None
    assert last["kind"] in ("full", "partial")
    assert isinstance(last["time"], float) and isinstance(last["duration_seconds"], float)
    assert isinstance(status["generation"], int)
    table = kernel_table(shared.ns)
    counts = status["kernel_elements"]
    for family, count in counts.items():
        v = family[-1]
        local = {n for n in table.sets if n.startswith(f"local{v}_")}
        names = {f"sources{v}", f"exempt{v}"} | local
        assert count == sum(len(table.sets.get(n, {})) for n in names)
    assert status["socket"] == shared.socket and status["state_dir"] == shared.state_dir
    assert status["metrics_address"].startswith("127.0.0.1:")


def test_the_socket_is_private(shared: MasqdProcess) -> None:
    mode = os.stat(shared.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_just_works(shared: MasqdProcess) -> None:
    proc = subprocess.run(
        ["curl", "-sf", "--unix-socket", shared.socket, "http://masqd/v1/attachments"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "attachments" in json.loads(proc.stdout)


# ---- every rejected request: 4xx, a JSON error, and no change ----------------------------

A = "/v1/attachments/bad/c1/eth0"
GOOD = {"ips": ["198.18.30.2/24"]}

BAD_REQUESTS: dict[str, tuple[str, str, bytes | None, tuple[int, ...]]] = {
    # invalid path parameters
    "network starts with a dash": (
        "PUT",
        "/v1/attachments/-bad/c1/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "network with a space": (
        "PUT",
        "/v1/attachments/b%20d/c1/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "network too long": (
        "PUT",
        f"/v1/attachments/{'n' * 65}/c1/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "container id with a colon": (
        "PUT",
        "/v1/attachments/bad/c:1/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "container id too long": (
        "PUT",
        f"/v1/attachments/bad/{'c' * 129}/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "ifname of 16 bytes": (
        "PUT",
        "/v1/attachments/bad/c1/abcdefghijklmnop",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "ifname dot dot": ("PUT", "/v1/attachments/bad/c1/..", json.dumps(GOOD).encode(), (400, 404)),
    "ifname dot": ("PUT", "/v1/attachments/bad/c1/.", json.dumps(GOOD).encode(), (400, 404)),
    "ifname with a colon": (
        "PUT",
        "/v1/attachments/bad/c1/eth0:1",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "ifname with a space": (
        "PUT",
        "/v1/attachments/bad/c1/eth%200",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "ifname with a slash": (
        "PUT",
        "/v1/attachments/bad/c1/eth%2F0",
        json.dumps(GOOD).encode(),
        (400, 404),
    ),
    "ifname with NUL": ("PUT", "/v1/attachments/bad/c1/eth%000", json.dumps(GOOD).encode(), (400,)),
    "bad path on DELETE": ("DELETE", "/v1/attachments/-bad/c1/eth0", None, (400,)),
    "bad path on GET": ("GET", "/v1/attachments/bad/c1/abcdefghijklmnop", None, (400,)),
    # invalid JSON
    "truncated JSON": ("PUT", A, b'{"ips": [', (400,)),
    "empty body": ("PUT", A, b"", (400,)),
    "not UTF-8": ("PUT", A, b'{"ips": ["\xff"]}', (400,)),
    "JSON null": ("PUT", A, b"null", (400,)),
    "JSON list": ("PUT", A, b'["198.18.30.2/24"]', (400,)),
    "JSON with trailing garbage": ("PUT", A, b'{"ips": ["198.18.30.2/24"]} x', (400,)),
    # wrong types and keys
    "ips is a string": ("PUT", A, b'{"ips": "198.18.30.2/24"}', (400,)),
    "ips holds a number": ("PUT", A, b'{"ips": [3323198978]}', (400,)),
    "ips is null": ("PUT", A, b'{"ips": null}', (400,)),
    "extra key": ("PUT", A, b'{"ips": ["198.18.30.2/24"], "mtu": 1500}', (400,)),
    "missing key": ("PUT", A, b"{}", (400,)),
    # bad IPs
    "no IPs": ("PUT", A, b'{"ips": []}', (400,)),
    "17 IPs": (
        "PUT",
        A,
        json.dumps({"ips": [f"198.18.30.{n}/24" for n in range(2, 19)]}).encode(),
        (400,),
    ),
    "duplicate IP": ("PUT", A, b'{"ips": ["198.18.30.2/24", "198.18.30.2/16"]}', (400,)),
    "no prefix": ("PUT", A, b'{"ips": ["198.18.30.2"]}', (400,)),
    "garbage IP": ("PUT", A, b'{"ips": ["not-an-ip/24"]}', (400,)),
    "multicast": ("PUT", A, b'{"ips": ["224.0.0.9/4"]}', (400,)),
    "loopback": ("PUT", A, b'{"ips": ["::1/128"]}', (400,)),
    "unspecified": ("PUT", A, b'{"ips": ["0.0.0.0/0"]}', (400,)),
    "link-local": ("PUT", A, b'{"ips": ["fe80::2/64"]}', (400,)),
    "broadcast": ("PUT", A, b'{"ips": ["255.255.255.255/32"]}', (400,)),
    "v4-mapped": ("PUT", A, b'{"ips": ["::ffff:198.18.30.2/96"]}', (400,)),
    "one good one bad": ("PUT", A, b'{"ips": ["198.18.30.2/24", "127.0.0.1/8"]}', (400,)),
    "network address": ("PUT", A, b'{"ips": ["198.18.30.0/24"]}', (400,)),
    "subnet broadcast": ("PUT", A, b'{"ips": ["198.18.30.255/24"]}', (400,)),
    "v6 subnet-router anycast": ("PUT", A, b'{"ips": ["2001:db8:30::/64"]}', (400,)),
    "zone": ("PUT", A, b'{"ips": ["2001:db8:30::2%eth0/64"]}', (400,)),
    "netmask": ("PUT", A, b'{"ips": ["198.18.30.2/255.255.255.0"]}', (400,)),
    "hostmask": ("PUT", A, b'{"ips": ["198.18.30.2/0.0.0.255"]}', (400,)),
    # names that could not be read back from the element comment, or that print invisibly
    "ifname ending in ~": (
        "PUT",
        "/v1/attachments/bad/c1/eth0~",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "zero-width space in ifname": (
        "PUT",
        "/v1/attachments/bad/c1/e%E2%80%8B0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "right-to-left override in ifname": (
        "PUT",
        "/v1/attachments/bad/c1/e%E2%80%AE0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    "names over the comment's 128 bytes": (
        "PUT",
        "/v1/attachments/bad/" + "c" * 128 + "/eth0",
        json.dumps(GOOD).encode(),
        (400,),
    ),
    # size
    "body over 64 KiB": (
        "PUT",
        A,
        json.dumps({"ips": ["198.18.30.2/24"], "pad": "x" * 70_000}).encode(),
        (413,),
    ),
    # GC
    "gc body not a list": (
        "POST",
        "/v1/networks/bad/gc",
        b'{"valid_attachments": "c1/eth0"}',
        (400,),
    ),
    "gc missing key": ("POST", "/v1/networks/bad/gc", b"{}", (400,)),
    "gc extra key": (
        "POST",
        "/v1/networks/bad/gc",
        b'{"valid_attachments": [], "all": true}',
        (400,),
    ),
    "gc bad entry": (
        "POST",
        "/v1/networks/bad/gc",
        b'{"valid_attachments": [{"container_id": "c1", "ifname": ".."}]}',
        (400,),
    ),
    "gc bad network": ("POST", "/v1/networks/-bad/gc", b'{"valid_attachments": []}', (400,)),
    "gc invalid JSON": ("POST", "/v1/networks/bad/gc", b"{", (400,)),
    # query
    "bad network filter": ("GET", "/v1/attachments?network=-x", None, (400,)),
    "unknown query key": ("GET", "/v1/attachments?netwrok=x", None, (400,)),
    # wrong method
    "POST an attachment": ("POST", A, json.dumps(GOOD).encode(), (405,)),
    "PATCH an attachment": ("PATCH", A, json.dumps(GOOD).encode(), (405,)),
    "PUT the list": ("PUT", "/v1/attachments", json.dumps(GOOD).encode(), (405,)),
    "DELETE the list": ("DELETE", "/v1/attachments", None, (405,)),
    "GET gc": ("GET", "/v1/networks/bad/gc", None, (405,)),
    "DELETE status": ("DELETE", "/v1/status", None, (405,)),
    "POST healthz": ("POST", "/healthz", b"{}", (405,)),
    # unknown path
    "unknown path": ("GET", "/v1/nothing", None, (404,)),
    "other version": ("GET", "/v2/attachments", None, (404,)),
    "too few segments": ("PUT", "/v1/attachments/bad/c1", json.dumps(GOOD).encode(), (404, 405)),
    "too many segments": (
        "PUT",
        "/v1/attachments/bad/c1/eth0/x",
        json.dumps(GOOD).encode(),
        (404,),
    ),
    "root": ("GET", "/", None, (404,)),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_is_refused_and_changes_nothing(
    shared: MasqdProcess, client: Client, name: str
) -> None:
    method, path, raw, statuses = BAD_REQUESTS[name]
    before = (client.attachments(), nft_listing(shared.ns))
    resp = client.request(method, path, raw=raw)
    assert resp.status in statuses, (resp.status, resp.body)
    assert resp.is_json_error(), resp.body
    if resp.status == 405:
        assert resp.headers.get("allow")
    if (
        resp.status == 400
        and method == "PUT"
        and path == A
        and raw
        and raw.startswith(b'{"ips": [')
    ):
        # Validation errors say where: the failing field.
        assert resp.json.get("details") or "JSON" in resp.json["error"]
    assert (client.attachments(), nft_listing(shared.ns)) == before
    assert ok(client.get("/readyz")) == {"ready": True}


def test_an_oversized_chunked_body_is_refused(shared: MasqdProcess, client: Client) -> None:
    before = (client.attachments(), nft_listing(shared.ns))
    raw = json.dumps({"ips": ["198.18.30.2/24"], "pad": "x" * 100_000}).encode()
    resp = client.request("PUT", A, raw=raw, chunked=True)
    assert resp.status == 413 and resp.is_json_error()
    assert (client.attachments(), nft_listing(shared.ns)) == before


def test_a_refused_reput_keeps_the_old_ips(shared: MasqdProcess, client: Client) -> None:
    ok(client.put_attachment("keep", "c1", "eth0", ["198.18.31.2/24"]))
    resp = client.put_attachment("keep", "c1", "eth0", ["198.18.31.3/24", "224.0.0.1/4"])
    assert resp.status == 400
    assert ok(client.get_attachment("keep", "c1", "eth0"))["ips"] == ["198.18.31.2/24"]
    assert "198.18.31.2" in masqueraded(shared.ns) and "198.18.31.3" not in masqueraded(shared.ns)


# ---- lifecycle ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_leaves_the_table_and_a_restart_changes_nothing(
    daemon: MasqdProcess, sig: signal.Signals
) -> None:
    client = daemon.client
    ok(client.put_attachment("life", "c1", "eth0", ["198.18.32.2/24", "2001:db8:32::2/64"]))
    listing = nft_listing(daemon.ns)
    assert daemon.kill(sig) == 0
    assert nft_listing(daemon.ns) == listing  # SIGTERM: the table stays, containers keep working
    daemon.start()
    assert [a["container_id"] for a in daemon.client.attachments()] == ["c1"]
    assert nft_listing(daemon.ns) == listing  # same handles: nothing was rewritten

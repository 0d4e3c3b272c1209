"""No client can hold the API down by being slow: an idle connection, a slowloris, a body
that stalls (408) and a client that does not read its answer are each cut off after
`--client-timeout`, while everyone else is served meanwhile; connections beyond
`--max-connections` get a 503 until some close.

The daemon is built from its flags as `masqd` builds it (`tests/inprocess.build_daemon`: the
real API server on a real Unix socket, the fake backend) and runs in the test's own event
loop, on fake loop time (looptime): every wait here, the daemon's and the clients', is on
that clock, which jumps to the next timer whenever all wait on nothing else, so the bounds
asserted are exact however busy the machine is, and the waits take no real time. The
daemon is started inside each test, not in a fixture: fixtures run on the real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from masqd.daemon.lifecycle import Daemon
from tests.daemon import AsyncClient
from tests.inprocess import build_daemon, short_tmp
from tests.test_api_fuzz import CLIENT_TIMEOUT, body_of, http, status_of

pytestmark = pytest.mark.looptime

START = 20.0  # seconds of loop time for the start-up and the first sync


def limited() -> contextlib.AbstractAsyncContextManager[Daemon]:
    """A ready daemon with a 1 s client timeout and at most 8 connections, in this loop."""
    return serving("--client-timeout", str(CLIENT_TIMEOUT), "--max-connections", "8")


@contextlib.asynccontextmanager
async def serving(*flags: str) -> AsyncIterator[Daemon]:
    """A ready daemon with `flags`, in this loop; stopped and its files removed after."""
    workdir = short_tmp()
    daemon = build_daemon(workdir, *flags)
    try:
        await daemon.startup()
        serving = asyncio.create_task(daemon.serve())
        try:
            await asyncio.wait_for(daemon.reconciler.first_sync_done.wait(), START)
            yield daemon
        finally:
            daemon.stop()
            await serving
    finally:
        await daemon.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


async def attachments(client: AsyncClient) -> list[dict[str, Any]]:
    status, body = await client.request("GET", "/v1/attachments")
    assert status == 200, body
    items: list[dict[str, Any]] = body["attachments"]
    return items


async def healthz(client: AsyncClient) -> int:
    status, _ = await client.request("GET", "/healthz")
    return status


async def exchange(path: str, request: bytes, *, quiet: float = 10) -> bytes:
    """Send `request`; everything the daemon answers until it closes (or goes quiet for
    `quiet` seconds)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        data = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(65536), quiet):
                data += chunk
        return data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def head_of_answer(path: str, request: bytes) -> bytes:
    """Send `request`; the answer's status line and headers, as soon as they arrive (the
    connection is left open, as a client still sending its body would)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_idle_connections_are_closed() -> None:
    loop = asyncio.get_running_loop()
    async with limited() as d:
        reader, writer = await asyncio.open_unix_connection(d.config.socket)
        started = loop.time()
        # Closed by the daemon, having sent nothing.
        assert await asyncio.wait_for(reader.read(1), CLIENT_TIMEOUT + 3) == b""
        assert loop.time() - started < CLIENT_TIMEOUT + 1.5
        writer.close()


async def test_a_body_that_stalls_gets_408() -> None:
    loop = asyncio.get_running_loop()
    async with limited() as d, AsyncClient(d.config.socket) as client:
        head = http("PUT", "/v1/attachments/net/c/eth0", b"", content_length=100)
        started = loop.time()
        async with asyncio.timeout(CLIENT_TIMEOUT + 3):
            answer = await head_of_answer(d.config.socket, head + b'{"ips": [')
        waited = loop.time() - started
        assert status_of(answer) == 408
        assert CLIENT_TIMEOUT * 0.9 < waited < CLIENT_TIMEOUT + 1
        assert await attachments(client) == []


async def test_a_slowloris_is_cut_off_and_others_are_served_meanwhile() -> None:
    loop = asyncio.get_running_loop()
    request = http("PUT", "/v1/attachments/net/slow/eth0", b'{"ips": ["198.18.80.2/24"]}')
    async with limited() as d, AsyncClient(d.config.socket) as client:
        reader, writer = await asyncio.open_unix_connection(d.config.socket)
        started = loop.time()
        closed_after = None
        for byte in request:  # one byte every 50 ms: headers would take seconds
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                closed_after = loop.time() - started
                break
            try:
                if await asyncio.wait_for(reader.read(65536), 0.1) == b"":
                    closed_after = loop.time() - started
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed_after = loop.time() - started
                break
            # Meanwhile the daemon serves everyone else.
            assert await healthz(client) == 200
            await asyncio.sleep(0.05)
        writer.close()
        assert closed_after is not None, "the slow client was never cut off"
        assert closed_after < CLIENT_TIMEOUT + 1.5
        assert await attachments(client) == []


async def test_a_client_that_does_not_read_its_answer_is_cut_off() -> None:
    """A listing far larger than the socket buffers (about 2 MB), asked for and never read:
    the daemon stops it and drops the connection after the client timeout, instead of
    holding it for as long as the client likes."""
    network = "n" * 40
    daemon = serving("--client-timeout", str(CLIENT_TIMEOUT))
    async with daemon as d, AsyncClient(d.config.socket) as client:
        for start in range(0, 7500, 500):
            puts = (
                client.put_attachment(
                    network,
                    f"c{i:081d}",  # the longest that fits the 128-byte element comment
                    "eth0",
                    [f"198.18.{i // 250}.{i % 250 + 1}/16", f"2001:db8::{i + 1:x}/64"],
                )
                for i in range(start, start + 500)
            )
            assert {status for status, _ in await asyncio.gather(*puts)} == {200}
        reader, writer = await asyncio.open_unix_connection(d.config.socket)
        writer.write(http("GET", "/v1/attachments"))
        await asyncio.sleep(CLIENT_TIMEOUT + 1.5)  # reading nothing
        assert await healthz(client) == 200  # others were served meanwhile
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
                received += chunk
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    # Streamed (chunked), about 2 MB in all: what arrived is a part, without the last chunk.
    assert re.search(rb"(?i)transfer-encoding: *chunked", head), head
    assert len(body) < 1_500_000 and not body.endswith(b"\r\n0\r\n\r\n"), len(body)


async def test_connections_beyond_the_cap_get_503_until_some_close() -> None:
    async with limited() as d:
        held = []
        try:
            for _ in range(8):
                held.append(await asyncio.open_unix_connection(d.config.socket))
            await asyncio.sleep(0.1)  # let the daemon register them (no real time passes)
            answer = await exchange(d.config.socket, http("GET", "/healthz"))
            assert status_of(answer) == 503
            assert "too many connections" in json.loads(body_of(answer))["error"]
        finally:
            for _, writer in held:
                writer.close()
        async with asyncio.timeout(5):
            while status_of(await exchange(d.config.socket, http("GET", "/healthz"))) != 200:  # noqa: ASYNC110 - polling as a client does
                await asyncio.sleep(0.02)

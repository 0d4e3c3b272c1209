"""The API layer on the fake backend, in-process and without root: what it answers when
the kernel refuses (503, and unready until it recovers), beyond --max-attachments (507), and
for keys journalled before today's naming rules. The real app and reconciler, on a real
Unix socket; the kernel-backed API tests are in test_api.py. On fake loop time (looptime):
the short apply timeout (0.3 s) and the reconciler's backoff are on the loop's clock, so a
busy machine cannot turn a 200 into a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from masqd.api.handlers import ApiContext, build_app
from masqd.kernel.fake import FakeBackend
from masqd.metrics import Metrics
from masqd.planning.ruleset import SOURCES4, Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import DesiredState
from tests.daemon import AsyncClient, short_workdir

pytestmark = pytest.mark.looptime

# ---- when the kernel refuses: the API layer on the fake backend, in-process ---------------


@contextlib.asynccontextmanager
async def api_on_fake(
    backend: FakeBackend, state: DesiredState | None = None
) -> AsyncIterator[AsyncClient]:
    """The real API app and reconciler over `backend` (and `state`), on a Unix socket, with a
    short apply timeout so that a refused change answers 503 quickly."""
    state = DesiredState() if state is None else state
    metrics = Metrics()
    reconciler = Reconciler(
        state=state, backend=backend, table="masqd", policy=Policy(), metrics=metrics
    )
    ctx = ApiContext(state=state, reconciler=reconciler, metrics=metrics, apply_timeout=0.3)
    runner = web.AppRunner(build_app(ctx), access_log=None)
    await runner.setup()
    workdir = short_workdir()
    path = str(workdir / "api.sock")
    task = asyncio.create_task(reconciler.run())
    try:
        await web.UnixSite(runner, path).start()
        await asyncio.wait_for(reconciler.first_sync_done.wait(), 5)
        async with AsyncClient(path) as client:
            yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_a_change_the_kernel_refuses_answers_503_and_unready_until_it_recovers() -> None:
    backend = FakeBackend()
    async with api_on_fake(backend) as client:
        assert await client.request("GET", "/readyz") == (200, {"ready": True})
        backend.fail_next(1000, "Error: Could not process rule: Cannot allocate memory")
        status, body = await client.put_attachment("n", "c1", "eth0", ["198.18.50.2/24"])
        assert status == 503
        assert isinstance(body, dict) and "Cannot allocate memory" in body["error"]
        status, body = await client.request("GET", "/readyz")
        assert (
            status == 503 and body["ready"] is False and "Cannot allocate memory" in body["reason"]
        )
        backend.heal()
        # The change was accepted, only not confirmed: the next retry (after its backoff)
        # applies it and readiness comes back.
        async with asyncio.timeout(5):
            while (await client.request("GET", "/readyz"))[0] != 200:  # noqa: ASYNC110 - polling the API as a client does
                await asyncio.sleep(0.05)
        assert "198.18.50.2" in backend.state().sets[SOURCES4]
        status, body = await client.put_attachment("n", "c2", "eth0", ["198.18.50.3/24"])
        assert status == 200, body


async def test_over_max_attachments_the_507_states_the_configured_limit() -> None:
    state = DesiredState(max_attachments=2)
    async with api_on_fake(FakeBackend(), state) as client:
        for n in (2, 3):
            status, _ = await client.put_attachment("n", f"c{n}", "eth0", [f"198.18.51.{n}/24"])
            assert status == 200
        status, body = await client.put_attachment("n", "c4", "eth0", ["198.18.51.4/24"])
        assert status == 507
        assert "--max-attachments is 2" in body["error"], body
        assert len(state) == 2


async def test_an_attachment_journalled_before_the_naming_rules_keeps_working() -> None:
    """A key accepted before the comment-length and '~' rules (as the journal replays it):
    its IPs can be replaced, it is listed, kept by a GC that names it, and deleted."""
    state = DesiredState()
    long_key = ("n" * 64, "c" * 100, "eth0")  # 171 bytes as a comment
    tilde_key = ("n", "c1", "eth0~")
    state.load(long_key, ["198.18.52.2/24"])
    state.load(tilde_key, ["198.18.52.3/24"])
    async with api_on_fake(FakeBackend(), state) as client:
        status, body = await client.put_attachment(*long_key, ["198.18.52.4/24"])
        assert status == 200, body
        # A new key of the same length is refused: it could not be adopted back.
        status, body = await client.put_attachment("n" * 64, "d" * 100, "eth0", ["198.18.52.5/24"])
        assert status == 400 and "128" in body["details"][0]["msg"], body
        status, body = await client.request(
            "POST",
            "/v1/networks/n/gc",
            {"valid_attachments": [{"container_id": "c1", "ifname": "eth0~"}]},
        )
        assert status == 200 and body["removed"] == [], body
        status, body = await client.request("GET", "/v1/attachments/n/c1/eth0~")
        assert status == 200 and body["ips"] == ["198.18.52.3/24"], body
        status, body = await client.request("DELETE", "/v1/attachments/n/c1/eth0~")
        assert status == 200 and body["deleted"] is True, body
    assert state.get(long_key) is not None and state.get(tilde_key) is None

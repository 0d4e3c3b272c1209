"""HTTP/1.1 + JSON on the Unix socket: parse, validate, hand over, await, answer.

No business logic lives here. A handler validates through `models`, changes `DesiredState`,
asks the reconciler for a sync and answers once the kernel holds the change. Every error is
a JSON object (`{"error": ..., "details": [...]}`) with a 4xx (or 503 when the kernel did not
confirm in time), and a rejected request changes nothing.

Access: the peer's credentials (SO_PEERCRED, and SO_PEERGROUPS for its supplementary groups)
are checked on every request; root and the configured uids/gids get through, anyone else gets
403.

Limits, so that no client can exhaust the daemon: request line and each header at most 8 KiB
(and aiohttp's default of 128 headers), bodies at most 64 KiB (32 MiB for a GC), the IPs and
names `models` allows, `--max-attachments`, at most `max_connections` open connections
(`server.LimitedSockSite` answers 503 beyond), and `client_timeout` for slow or idle clients: the
request line and headers must arrive within it from the connection's start (or from the
previous answer on a kept-alive connection: aiohttp's keep-alive timer, which also covers a
request still being received), a body within it of waiting once the handler reads it, and
a listing taken by the client within it.

Big answers and big bodies never hold the loop: a listing is streamed in slices (`listing`),
a GC body parsed as it arrives (`gcbody`), each yielding to the loop between pieces, and at
most a few of each run at once (`slots`; 503 with Retry-After beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from asyncio.trsock import TransportSocket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from masqd import __version__
from masqd.api import listing
from masqd.api.gcbody import BodyError, GcBodyParser
from masqd.metrics import Metrics
from masqd.migrate import AdoptionError, Migrator
from masqd.models import (
    Attachment,
    AttachmentKey,
    AttachmentKeyT,
    AttachmentRef,
    AttachmentSpec,
    ErrorBody,
    GcResult,
    NetworkName,
    comment_problem,
    validation_details,
)
from masqd.planning.records import AttachmentRecord
from masqd.reconcile.errors import KernelUnavailable, SyncUnavailable
from masqd.reconcile.reconciler import Reconciler
from masqd.slots import Slots
from masqd.state.desired import CapacityExceeded, DesiredState

log = logging.getLogger(__name__)

ATTACHMENT_BODY_LIMIT = 64 * 1024
# A GC request lists every live attachment of a network; 32 MiB holds ~300,000 of them.
GC_BODY_LIMIT = 32 * 1024 * 1024

DEFAULT_CLIENT_TIMEOUT = 10.0
MAX_LINE_BYTES = 8190  # request line, and each header
# aiohttp decodes these itself; any other Content-Encoding is refused with 415.
CONTENT_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})
# A GC body is parsed this many bytes at a time, yielding to the loop between pieces (about
# 30 entries, a tenth of a millisecond): a setup never waits behind a GC for longer.
GC_PIECE = 2048
# Expensive requests admitted at once; more get 503 (see `slots`).
LISTING_SLOTS = 4
BIG_GC_SLOTS = 4
RETRY_AFTER = "1"

ATTACHMENT = "/v1/attachments/{network}/{container_id}/{ifname}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _no_groups(sock: TransportSocket) -> tuple[int, ...]:
    return ()


@dataclass
class AccessPolicy:
    """Who may use the socket besides root.

    `peer_groups` reads a peer's supplementary groups from its socket: the daemon passes
    `kernel.peergroups.peer_groups` (a libc call through ctypes, which only `kernel` makes;
    the API does not import `kernel`). Without it only the primary gid counts.
    """

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    peer_groups: Callable[[TransportSocket], Iterable[int]] = _no_groups

    def allows(self, uid: int, gid: int, groups: Callable[[], Iterable[int]] = tuple) -> bool:
        """`groups` gives the peer's supplementary groups; asked only when they decide."""
        if uid == 0 or uid == os.geteuid() or uid in self.uids or gid in self.gids:
            return True
        return bool(self.gids) and not self.gids.isdisjoint(groups())


@dataclass
class ApiContext:
    state: DesiredState
    reconciler: Reconciler
    metrics: Metrics
    access: AccessPolicy = field(default_factory=AccessPolicy)
    apply_timeout: float = 10.0
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    table: str = "masqd"
    extra_status: Callable[[], dict[str, Any]] = dict
    migrator: Migrator | None = None  # None: the backend cannot adopt legacy tables
    listings: Slots = field(default_factory=lambda: Slots(LISTING_SLOTS))
    big_gcs: Slots = field(default_factory=lambda: Slots(BIG_GC_SLOTS))
    # Big GC bodies are parsed one at a time: their pieces then never pile up in one loop turn.
    gc_parse: asyncio.Lock = field(default_factory=asyncio.Lock)


CONTEXT = web.AppKey("context", ApiContext)


def error(status: int, message: str, details: tuple[dict[str, Any], ...] = ()) -> web.Response:
    body = ErrorBody(error=message, details=details).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json")


def ok(payload: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return web.Response(status=status, text=text, content_type="application/json")


class ApiError(Exception):
    """A request answered with an error: `status` (4xx for the client's mistakes, 501 for an
    adoption the backend cannot do, 503 when the kernel did not confirm in time or too much
    runs at once, 507 at --max-attachments), and the JSON error body's message and details;
    `middleware` writes the answer."""

    def __init__(
        self,
        status: int,
        message: str,
        details: tuple[dict[str, Any], ...] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details
        self.headers = headers or {}


class ClientGone(Exception):
    """The client closed its connection before its request was read: nobody to answer."""


# Logged as the status of a request whose client left mid-body (nginx's convention); a 4xx,
# since it is the client's doing, so it never trips the API-errors alert.
CLIENT_CLOSED = 499


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, f"invalid {what}", validation_details(exc.errors())) from None


async def read_json(request: web.Request, limit: int) -> Any:
    body = b"".join([piece async for piece in body_pieces(request, limit, limit)])
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ApiError(400, "request body is not valid JSON: a number is too long") from None


async def body_pieces(request: web.Request, limit: int, piece: int) -> AsyncIterator[bytes]:
    """The body in pieces of at most `piece` bytes; refused (413) beyond `limit` bytes, on
    its Content-Length alone when it has one, and (408) once the handler has waited for it
    longer than the client timeout in all. Only the waiting counts, not the time the caller
    spends on each piece: a 30 MiB GC parsed on a busy node is not the client's delay."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise ApiError(415, f"unsupported Content-Encoding {encoding[:40]!r}: use gzip or none")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    timeout = request.app[CONTEXT].client_timeout
    clock = asyncio.get_running_loop().time
    waited = 0.0
    size = 0
    while True:
        try:
            started = clock()
            async with asyncio.timeout(timeout - waited):
                chunk = await request.content.read(piece)
            waited += clock() - started
        except TimeoutError:
            raise ApiError(408, f"request body not received within {timeout:g}s") from None
        except web.RequestPayloadError as exc:
            # A body that does not decode as its Content-Encoding says (gzip that is not).
            cause = exc.__cause__ or exc
            raise ApiError(400, f"request body cannot be decoded: {_one_line(cause)}") from None
        except ConnectionError:
            raise ClientGone from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
        yield chunk


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _key(request: web.Request) -> AttachmentKey:
    """The key of an attachment to create or change: every naming rule applies."""
    return _validate(AttachmentKey, _path_key(request), "attachment path")


def _ref(request: web.Request) -> AttachmentRef:
    """The key of an attachment to read or delete: names accepted before newer rules too."""
    return _validate(AttachmentRef, _path_key(request), "attachment path")


def _path_key(request: web.Request) -> dict[str, str]:
    m = request.match_info
    return {"network": m["network"], "container_id": m["container_id"], "ifname": m["ifname"]}


def _attachment(key: AttachmentKeyT, record: AttachmentRecord) -> dict[str, Any]:
    return listing.attachment_json(key, record)


async def _commit(ctx: ApiContext) -> None:
    """Answer only once the kernel holds the change just made (see `reconcile.barrier`)."""
    try:
        await ctx.reconciler.commit(ctx.apply_timeout)
    except SyncUnavailable as exc:
        raise ApiError(503, str(exc)) from None


# ---- handlers -----------------------------------------------------------------------------


async def put_attachment(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _key(request)
    spec = _validate(AttachmentSpec, await read_json(request, ATTACHMENT_BODY_LIMIT), "body")
    if ctx.state.get(key.as_tuple()) is None:
        # Only new keys: one journalled before the rule keeps working (see models).
        problem = comment_problem(*key.as_tuple())
        if problem is not None:
            raise ApiError(400, "invalid attachment path", ({"loc": "path", "msg": problem},))
    try:
        ctx.state.put(key.as_tuple(), spec.ips)
    except CapacityExceeded as exc:
        raise ApiError(507, str(exc)) from None
    await _commit(ctx)
    return ok(Attachment(**key.model_dump(), ips=spec.ips))


async def get_attachment(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _ref(request)
    record = ctx.state.get(key.as_tuple())
    if record is None:
        raise ApiError(404, f"no attachment {key.network}/{key.container_id}/{key.ifname}")
    return ok(_attachment(key.as_tuple(), record))


async def delete_attachment(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _ref(request)
    removed = ctx.state.delete(key.as_tuple())
    await _commit(ctx)
    body: dict[str, Any] = {"deleted": removed is not None}
    if removed is not None:
        body["attachment"] = _attachment(key.as_tuple(), removed)
    return ok(body)


class _NetworkQuery(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}
    network: NetworkName | None = None


async def list_attachments(request: web.Request) -> web.StreamResponse:
    """The listing, streamed (see `listing`): a slice at a time, each written with
    backpressure, the whole within the client timeout or the connection is cut."""
    ctx = request.app[CONTEXT]
    query = _validate(_NetworkQuery, dict(request.query), "query")
    with _admitted(ctx.listings, "listings"):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            async with asyncio.timeout(ctx.client_timeout):
                await response.prepare(request)
                for piece in listing.slices(ctx.state, query.network):
                    await response.write(piece)
                    await asyncio.sleep(0)  # a setup goes before the next slice
                await response.write_eof()
        except TimeoutError:
            log.debug("a client did not read its listing in %gs: cut off", ctx.client_timeout)
            if request.transport is not None:
                request.transport.abort()  # drops what is still buffered for it
        except ConnectionError:
            log.debug("a client closed its connection during its listing")
    return response


@contextlib.contextmanager
def _admitted(slots: Slots, what: str) -> Iterator[None]:
    """Hold one of `slots` for the block, or answer 503 with Retry-After."""
    if not slots.take():
        message = f"too many {what} at once ({slots.size}); retry later"
        raise ApiError(503, message, headers={"Retry-After": RETRY_AFTER})
    try:
        yield
    finally:
        slots.give_back()


class _NetworkPath(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}
    network: NetworkName


async def gc_network(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    network = _validate(_NetworkPath, {"network": request.match_info["network"]}, "network").network
    length = request.content_length
    if length is not None and length <= ATTACHMENT_BODY_LIMIT:
        started, valid = await _gc_entries(request, network)
    else:
        with _admitted(ctx.big_gcs, "big GC requests"):
            async with ctx.gc_parse:
                started, valid = await _gc_entries(request, network)
    removed = ctx.state.gc(network, valid, set_up_by=started)
    if removed:
        ctx.metrics.gc_removed.inc(len(removed))
        log.info("gc of network %s removed %d attachments", network, len(removed))
    await _commit(ctx)
    result = GcResult(
        network=network,
        removed=tuple(Attachment.model_validate(_attachment(k, r)) for k, r in removed),
    )
    return ok(result)


async def _gc_entries(request: web.Request, network: str) -> tuple[int, set[tuple[str, str]]]:
    """Parse a GC body as it arrives (see `gcbody`): the setup sequence number when parsing
    began, and the listed (container ID, ifname) pairs that the daemon holds.

    Entries the daemon does not hold are dropped as they are parsed, so memory follows the
    attachments, not the body. That is safe because the GC only removes what was set up
    before it began (`set_up_by`): an attachment set up while the body was read is never
    removed by this GC, listed or not.
    """
    state = request.app[CONTEXT].state
    started = state.seq
    parser = GcBodyParser()
    valid: set[tuple[str, str]] = set()
    try:
        async for piece in body_pieces(request, GC_BODY_LIMIT, GC_PIECE):
            for entry in parser.feed(piece):
                if state.get((network, entry.container_id, entry.ifname)) is not None:
                    valid.add((entry.container_id, entry.ifname))
            await asyncio.sleep(0)  # a setup goes before the next piece
        parser.feed(b"", eof=True)
    except BodyError as exc:
        raise ApiError(400, exc.message, exc.details) from None
    return started, valid


async def diff(request: web.Request) -> web.Response:
    """What a reconcile would change now, against a fresh listing of the kernel."""
    ctx = request.app[CONTEXT]
    try:
        tx = await ctx.reconciler.diff()
    except KernelUnavailable as exc:
        raise ApiError(503, f"cannot list table inet {ctx.table}: {exc}") from None
    return ok(
        {"commands": tx.to_script(), "empty": tx.empty, "element_changes": tx.element_changes}
    )


async def adopt_cni_plugins(request: web.Request) -> web.Response:
    """Adopt the CNI plugins' legacy masquerade rules (see `migrate`)."""
    ctx = request.app[CONTEXT]
    if ctx.migrator is None:
        raise ApiError(501, "adoption needs the kernel nftables backend")
    try:
        report = await ctx.migrator.adopt()
    except AdoptionError as exc:
        raise ApiError(503, str(exc)) from None
    except KernelUnavailable as exc:
        raise ApiError(503, f"nftables refused: {exc}") from None
    return ok(report.to_json())


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body: dict[str, Any] = {
        "version": __version__,
        "table": f"inet {ctx.table}",
        "attachments": len(ctx.state),
        "addresses": len(ctx.state.owners),
        "max_attachments": ctx.state.max_attachments,
    }
    body.update(ctx.reconciler.status())
    policy = ctx.reconciler.policy
    body["policy"] = {
        "exempt_destinations": [*policy.exempt4, *policy.exempt6],
        "random_fully": policy.random_fully,
    }
    body.update(ctx.extra_status())
    return ok(body)


async def healthz(request: web.Request) -> web.Response:
    return ok({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    if ctx.reconciler.ready:
        return ok({"ready": True})
    reason = ctx.reconciler.stats.last_error or "the first sync has not completed"
    return ok({"ready": False, "reason": reason}, status=503)


# ---- middleware ---------------------------------------------------------------------------


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer on a Unix socket, None on other transports."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _peer_groups_of(request: web.Request) -> Iterable[int]:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return () if sock is None else request.app[CONTEXT].access.peer_groups(sock)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    # asyncio's clock; aiohttp deprecates request.loop (a DeprecationWarning per request).
    started = asyncio.get_running_loop().time()
    response: web.StreamResponse
    creds = peer_credentials(request)
    if creds is not None and not ctx.access.allows(
        creds[1], creds[2], lambda: _peer_groups_of(request)
    ):
        response = error(403, f"uid {creds[1]} is not allowed to use this socket")
    else:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error(exc.status, exc.message, exc.details)
            response.headers.update(exc.headers)
        except ClientGone:
            log.debug("a client closed its connection before sending its whole request")
            response = error(CLIENT_CLOSED, "the client closed the connection")
            response.force_close()
        except web.HTTPException as exc:
            # The router's own answers (404, 405, 413 ...) in the same JSON shape.
            response = error(exc.status, exc.reason)
            if exc.status == 405:
                allowed = exc.headers.get("Allow")
                if allowed:
                    response.headers["Allow"] = allowed
        except Exception:
            # A bug: aiohttp logs it and answers 500; count that 500 too.
            _observe(ctx, request, route, 500, started)
            raise
    _observe(ctx, request, route, response.status, started)
    return response


def _observe(ctx: ApiContext, request: web.Request, route: str, code: int, started: float) -> None:
    elapsed = asyncio.get_running_loop().time() - started
    ctx.metrics.observe_request(route=route, method=request.method, code=code, seconds=elapsed)


def build_app(ctx: ApiContext) -> web.Application:
    app = web.Application(
        middlewares=[middleware],
        client_max_size=GC_BODY_LIMIT,
        handler_args={
            "max_field_size": MAX_LINE_BYTES,
            "max_line_size": MAX_LINE_BYTES,
            "keepalive_timeout": ctx.client_timeout,
            "lingering_time": ctx.client_timeout,
        },
    )
    app[CONTEXT] = ctx
    app.router.add_put(ATTACHMENT, put_attachment)
    app.router.add_get(ATTACHMENT, get_attachment, allow_head=False)
    app.router.add_delete(ATTACHMENT, delete_attachment)
    app.router.add_get("/v1/attachments", list_attachments, allow_head=False)
    app.router.add_post("/v1/networks/{network}/gc", gc_network)
    app.router.add_get("/v1/status", status, allow_head=False)
    app.router.add_get("/v1/diff", diff, allow_head=False)
    app.router.add_post("/v1/migrate/cni-plugins", adopt_cni_plugins)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    return app

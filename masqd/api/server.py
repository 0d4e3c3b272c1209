"""The API server's connection handling: limits and errors below the HTTP handlers.

aiohttp refuses some requests before any middleware sees them (a malformed request line, an
oversized header, a bad Content-Length); here they get the API's JSON error shape, logged at
debug only, since a client's malformed request must not be a way to flood the daemon's log.
A connection beyond `max_connections`, or accepted while the daemon is within its reserve of
free descriptors (`fdlimit.Guard`), gets one 503 (its request read and dropped, so that the
client sees the answer rather than a reset), and a client that does not read its response
within `send_timeout` is cut off (without that, every connection could hold a 20 MiB listing
in the daemon's memory for as long as it liked). A body that does not decode, or a client
gone mid-body, is the client's doing: logged at debug, never as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from masqd.api.handlers import error
from masqd.fdlimit import LINGERING, Guard
from masqd.models import ErrorBody

log = logging.getLogger(__name__)

# Connections accepted per loop turn: what a burst can take beyond the caps before they are
# checked (well inside fdlimit.RESERVE).
ACCEPT_BURST = 16


class LimitedSockSite(web.SockSite):
    """The API's (and the metrics port's) SockSite: it answers 503 and closes when
    `max_connections` are already open or `guard` says descriptors are short, and serves
    each connection with `_JsonErrorHandler`.

    Connections are counted from the handlers made here until their connection is lost:
    asyncio accepts a whole burst (up to the backlog) in one loop turn before any handler is
    told its connection is made, so aiohttp's own registry would let a burst overshoot.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        max_connections: int,
        send_timeout: float,
        guard: Guard | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        # asyncio listens on the socket again with this backlog (a passed one too). aiohttp's
        # default of 128 is too short: a runtime starting hundreds of containers at once
        # connects faster than one loop turn accepts, and a Unix socket connect beyond the
        # backlog fails with EAGAIN, which asyncio clients misread as connected. SOMAXCONN is
        # also what systemd's `Backlog=` defaults to.
        super().__init__(runner, sock, backlog=socket.SOMAXCONN)
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        self.guard = guard
        # Told the reason of each refusal ("max_connections" or "descriptors"), for the metric.
        self.on_refused = on_refused
        # Weak: a handler asyncio made but never connected (its transport failed) drops out.
        self._live: weakref.WeakSet[_JsonErrorHandler] = weakref.WeakSet()

    async def start(self) -> None:
        await super(web.SockSite, self).start()  # registers the site with its runner
        server = self._runner.server
        assert server is not None

        loop = asyncio.get_running_loop()
        # The handler arguments build_app set (sizes, timeouts), as aiohttp's Server keeps them.
        handler_args: dict[str, Any] = dict(server._kwargs)

        def protocol() -> asyncio.BaseProtocol:
            if len(self._live) >= self.max_connections:
                return self._refuse(
                    "max_connections",
                    f"too many connections: {self.max_connections} are open, "
                    "the configured maximum",
                )
            if self.guard is not None and self.guard.low():
                return self._refuse(
                    "descriptors", "the daemon is short of file descriptors; try again"
                )
            handler = _JsonErrorHandler(server, loop=loop, **handler_args)
            handler.send_timeout = self.send_timeout
            handler.live = self._live
            self._live.add(handler)
            return handler

        # asyncio accepts up to `backlog` connections in one loop turn before any of them
        # reaches `protocol` (so before any cap or descriptor check): a burst of SOMAXCONN
        # connects would take SOMAXCONN descriptors at once. So it is given ACCEPT_BURST, and
        # the kernel's queue is set back to the full backlog right after.
        self._server = await loop.create_server(protocol, sock=self._sock, backlog=ACCEPT_BURST)
        self._sock.listen(self._backlog)

    def _refuse(self, reason: str, message: str) -> _Refused:
        if self.on_refused is not None:
            self.on_refused(reason)
        return _Refused(message)


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering what aiohttp refuses before our middleware
    sees the request (a malformed request line, an oversized header, a bad Content-Length, an
    unknown `Expect` ...) in the API's JSON error shape. Logged at debug: a client's malformed
    request is not the daemon's fault, and must not be a way to flood its log. A 500 (a bug
    of ours) keeps aiohttp's error log. A response not taken by the client within
    `send_timeout` seconds aborts the connection."""

    send_timeout = 10.0
    live: weakref.WeakSet[_JsonErrorHandler] | None = None  # the site's count of connections

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.live is not None:
            self.live.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ContentEncodingError):
            # A Content-Encoding aiohttp knows but cannot decode here (br, zstd): refused
            # like any other encoding the API does not take.
            status = 415
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs, with the traceback
            text = "internal error (logged by the daemon)"
        else:
            text = " ".join((message or str(exc or "malformed request")).split())[:300]
            log.debug("refused a malformed request (%d): %s", status, text)
            if request.writer.output_size > 0:
                raise ConnectionError("response already started; cannot send the error")
        response = error(status, text)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After answering, aiohttp reads what is left of the request's body and logs what
        # that raises as an unhandled exception: a body that does not decode as its
        # Content-Encoding says (already answered 400), or a client gone mid-body. Neither is
        # the daemon's fault, and a traceback per request would be a way to flood the log.
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError | ConnectionError):
            log.debug("dropped the rest of a request body: %s", " ".join(str(exc).split()))
            return
        super().log_exception(*args, **kw)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if (
            resp.status >= 400
            and isinstance(resp, web.Response)
            and not resp.prepared
            and resp.content_type != "application/json"
        ):
            text = " ".join((resp.text or resp.reason).split())[:300]
            replacement = error(resp.status, text)
            if resp.keep_alive is False:
                replacement.force_close()
            resp = replacement
        try:
            async with asyncio.timeout(self.send_timeout):
                return await super().finish_response(request, resp, start_time)
        except TimeoutError:
            log.debug("a client did not read its response in %gs: cut off", self.send_timeout)
            if self.transport is not None:
                self.transport.abort()  # drops what is still buffered for it
            return resp, True


class _Refused(asyncio.Protocol):
    """Answers one 503 and hangs up, reading (and dropping) what the client sends meanwhile.

    Closing at once, as this did, was not enough for the 503 to arrive: a client still
    sending its request got EPIPE, and a Unix socket closed with unread data resets its
    peer. So, like aiohttp's lingering close, it shuts its side after the answer and drops
    the client's bytes until the client closes, for at most `LINGER_SECONDS` and
    `LINGER_BYTES`. At most `MAX_LINGERING` refused connections linger at once (the cap
    bounds descriptors; so must what is beyond it): beyond that, one is closed at once.
    """

    LINGER_SECONDS = 1.0
    LINGER_BYTES = 256 * 1024
    MAX_LINGERING = LINGERING  # the descriptor budget makes room for them (fdlimit)
    lingering = 0  # refused connections lingering now, all sites together

    def __init__(self, message: str) -> None:
        self._message = message
        self._transport: asyncio.WriteTransport | None = None
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        body = ErrorBody(error=self._message).model_dump_json().encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if _Refused.lingering >= self.MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        _Refused.lingering += 1
        self._transport = transport
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self.LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > self.LINGER_BYTES and self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            _Refused.lingering -= 1
            self._transport = None
        if self._timer is not None:
            self._timer.cancel()

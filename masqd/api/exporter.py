"""The metrics port: /metrics (and /healthz, /readyz, for probes that speak TCP) over HTTP.

Here in `api`, not beside `Metrics`: it serves through the API's `LimitedSockSite`, and
`Metrics` sits below the reconciler, which must not reach up to the API.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from aiohttp import web

from masqd.api.server import LimitedSockSite
from masqd.fdlimit import Guard
from masqd.metrics import Metrics


async def serve_metrics(
    metrics: Metrics,
    listen: str,
    *,
    ready: Callable[[], bool],
    max_connections: int = 64,
    client_timeout: float = 10.0,
    guard: Guard | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve /metrics (and /healthz, /readyz, for probes that speak TCP) on HOST:PORT from
    the running event loop. Returns the runner and the bound address as a URL's host:port
    (port 0 picks a free port; IPv6 in brackets).

    The port is open to the node's network, so it has the API's limits: at most
    `max_connections` at once (beyond, one 503 and close), `client_timeout` to send a
    request, to read the answer, and idle on a kept-alive connection."""
    host, _, port = listen.rpartition(":")
    app = web.Application(
        handler_args={
            "max_field_size": 8190,
            "max_line_size": 8190,
            "keepalive_timeout": client_timeout,
            "lingering_time": client_timeout,
        }
    )

    async def exposition(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)

    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        sock = _tcp_listener(host.strip("[]") or "127.0.0.1", int(port))
        await LimitedSockSite(
            runner,
            sock,
            max_connections=max_connections,
            send_timeout=client_timeout,
            guard=guard,
            on_refused=metrics.refusals("metrics"),
        ).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"{bound_host}:{bound_port}"


def _tcp_listener(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address, family=family)
    sock.setblocking(False)
    return sock

"""New-TCP-connection load: a sink that accepts and closes, a client that connects and resets.

Every connection the client opens is a new flow, so the host's NAT postrouting chain runs
once for it: that is the per-connection cost the per-rule and set tables differ by. The
rest of the connection is made as cheap as it can be so it does not hide that cost: the
client keeps `concurrency` non-blocking connects in flight on one epoll, and closes each
one as soon as it is established with SO_LINGER 0 (a RST, no TIME_WAIT, so ephemeral ports
and conntrack entries free up at once); the sink only accepts and closes.

Both ends are processes of their own, started in their namespaces with
`ip netns exec NS python -m bench.connload ...`; both stop by themselves (time bounds).
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence

_LINGER_RESET = struct.pack("ii", 1, 0)
CONNECT_TIMEOUT = 1.0  # a connect not done by then counts as failed (a dropped SYN)


def serve(port: int, max_seconds: float) -> None:
    """Accept and close until max_seconds have passed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    listener.settimeout(0.5)
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.close()


def load(
    dst: str, port: int, *, seconds: float, warmup: float, concurrency: int
) -> dict[str, float]:
    """Connect-and-reset as fast as possible; counts the connections completed in the window."""
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, float]] = {}

    def open_one(now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        code = s.connect_ex((dst, port))
        if code not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(code, f"connect to {dst}:{port}: {errno.errorcode.get(code, code)}")
        ep.register(s.fileno(), select.EPOLLOUT)
        socks[s.fileno()] = (s, now)

    start = time.monotonic()
    window_start, end = start + warmup, start + warmup + seconds
    ok = failed = 0
    for _ in range(concurrency):
        open_one(start)
    next_sweep = start + CONNECT_TIMEOUT
    now = start
    while now < end:
        events = ep.poll(0.05)
        now = time.monotonic()
        counting = now >= window_start
        for fd, _ in events:
            s, _opened = socks.pop(fd)
            ep.unregister(fd)
            good = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            s.close()
            if counting:
                ok += good
                failed += not good
            open_one(now)
        if now >= next_sweep:
            next_sweep = now + CONNECT_TIMEOUT / 2
            for fd, (s, opened) in list(socks.items()):
                if now - opened > CONNECT_TIMEOUT:
                    del socks[fd]
                    ep.unregister(fd)
                    s.close()
                    failed += counting
                    open_one(now)
    for s, _ in socks.values():
        s.close()
    ep.close()
    return {"connections": ok, "failed": failed, "seconds": seconds, "rate": ok / seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connload")
    sub = parser.add_subparsers(dest="cmd", required=True)
    srv = sub.add_parser("serve")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--max-seconds", type=float, default=900.0)
    cli = sub.add_parser("load")
    cli.add_argument("--dst", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--seconds", type=float, required=True)
    cli.add_argument("--warmup", type=float, default=0.3)
    cli.add_argument("--concurrency", type=int, default=128)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.max_seconds)
    else:
        result = load(
            args.dst,
            args.port,
            seconds=args.seconds,
            warmup=args.warmup,
            concurrency=args.concurrency,
        )
        json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

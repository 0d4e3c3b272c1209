"""A minimal HTTP/1.1 client for masqd's Unix socket, cheap enough not to blur what it times.

A general-purpose client (aiohttp, http.client) costs a few hundred microseconds per
request in Python, comparable with what the setup-latency benchmark measures. This one
writes the request in one send and reads one Content-Length response, nothing more. The
blocking form times single requests (a fresh connection each, as a CNI plugin makes);
the asyncio form drives many concurrent clients on keep-alive connections for fills and
bursts.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from typing import Any

_HOST = "masqd"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class HTTPError(RuntimeError):
    pass


def encode_request(method: str, target: str, payload: Any = None, *, close: bool = False) -> bytes:
    body = b"" if payload is None else json.dumps(payload).encode()
    head = f"{method} {target} HTTP/1.1\r\nHost: {_HOST}\r\n"
    if payload is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    elif method in ("PUT", "POST"):
        head += "Content-Length: 0\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def parse_head(head: bytes) -> tuple[int, int | None]:
    """(status, content length or None) from a response head without its final CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HTTPError(f"bad status line {lines[0]!r}")
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and value.strip().lower() != "identity":
            raise HTTPError(f"unsupported transfer-encoding {value.strip()!r}")
    return int(parts[1]), length


def request(
    path: str, method: str, target: str, payload: Any = None, timeout: float = 30.0
) -> Response:
    """One request on a fresh connection (what a CNI plugin invocation does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(encode_request(method, target, payload, close=True))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise HTTPError("connection closed before the response head")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        status, length = parse_head(head)
        while length is None or len(rest) < length:
            chunk = s.recv(max(65536, (length or 0) - len(rest)))
            if not chunk:
                if length is None:
                    break
                raise HTTPError("connection closed in the middle of the body")
            rest += chunk
        return Response(status, rest if length is None else rest[:length])


class AsyncConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> AsyncConnection:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        return cls(reader, writer)

    async def request(self, method: str, target: str, payload: Any = None) -> Response:
        self.writer.write(encode_request(method, target, payload))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length = parse_head(head[:-4])
        if length is None:
            raise HTTPError("keep-alive response without Content-Length")
        body = await self.reader.readexactly(length) if length else b""
        return Response(status, body)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

"""Hold many idle connections open to a TCP port or a Unix socket: the descriptor flood.

    python3 tests/flood.py tcp HOST PORT N [--partial]
    python3 tests/flood.py unix PATH N [--partial]

Standard library only, so it runs on the system's python3 as an unprivileged user (inside a
network namespace with `ip netns exec NS setpriv ...`). It opens N connections, one after the
other (with `--partial`, each sends the start of a request and never finishes it), prints
`{"opened": N, "failed": F}` and then answers commands on stdin, one per line:
- `count`: `{"open": K}`, the connections the server has not closed (a connection the server
  answered and closed counts as closed once its data is read);
- `exit` or end of input: closes everything and exits.
`Flood` (below) drives it from a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Sequence

PARTIAL_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: flood\r\n"  # headers never end


def _connect(target: Sequence[str]) -> socket.socket:
    if target[0] == "tcp":
        sock = socket.create_connection((target[1], int(target[2])), timeout=10)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(target[1])
    sock.setblocking(False)
    return sock


def _still_open(sock: socket.socket) -> bool:
    """Drain what the server sent; False once it closed (end of stream or a reset)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False


def main(argv: Sequence[str]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    partial = "--partial" in argv
    args = [a for a in argv if a != "--partial"]
    target, count = args[:-1], int(args[-1])
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(count):
        try:
            sock = _connect(target)
            if partial:
                sock.send(PARTIAL_REQUEST)
        except OSError:
            failed += 1
            continue
        socks.append(sock)
    print(json.dumps({"opened": len(socks), "failed": failed}), flush=True)
    open_ = set(socks)
    for line in sys.stdin:
        if line.strip() == "count":
            open_ = {s for s in open_ if _still_open(s)}
            print(json.dumps({"open": len(open_)}), flush=True)
        else:
            break
    for sock in socks:
        sock.close()


SYSTEM_PYTHON = "/usr/bin/python3"  # not under /root, so an unprivileged user can run it


class Flood:
    """The tool as a child process: `Flood(target, n, ns=..., uid=...)`, then `count()`."""

    def __init__(
        self,
        target: Sequence[str],
        n: int,
        *,
        ns: str | None = None,
        uid: int | None = None,
        partial: bool = False,
    ) -> None:
        argv = [SYSTEM_PYTHON, os.path.abspath(__file__), *target, str(n)]
        if partial:
            argv.append("--partial")
        if uid is not None:
            argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
        if ns is not None:
            argv = ["ip", "netns", "exec", ns, *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        self.result = self._read()
        self.opened: int = self.result["opened"]

    def _read(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"flood exited with {self.proc.wait()}")
        result: dict[str, int] = json.loads(line)
        return result

    def count(self) -> int:
        """Connections the server still holds open."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return self._read()["open"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Flood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main(sys.argv[1:])

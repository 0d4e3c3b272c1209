"""Hostile input: whatever a client sends, the daemon answers below 500, keeps running, and
changes nothing for a request it rejects; and no client can hold it down.

The fuzz writes raw bytes to the Unix socket (random methods, paths, headers and bodies,
requests cut short, bodies larger than allowed), so that it reaches the HTTP parser too, not
only the handlers. The limit tests then take each bound in turn: header size and body size
here; the connection cap and slow, idle or non-reading clients in test_client_timeouts.py,
where the daemon runs in the test's loop on fake time.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, kernel_table

pytestmark = pytest.mark.kernel

ATTACHMENT_BODY_LIMIT = 64 * 1024
CLIENT_TIMEOUT = 1.0


# ---- raw HTTP over the Unix socket ------------------------------------------------------


def exchange(path: str, request: bytes, *, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send `request` as it is; everything the daemon answers until it closes (or goes quiet
    for `timeout`). `half_close` ends our side after sending, as a truncated request does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before reading everything
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pass
        return data


def head_of_answer(path: str, request: bytes, timeout: float = 10) -> bytes:
    """Send `request`; the answer's status line and headers, as soon as they arrive (the
    connection is left open, as a client still sending its body would)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _final(answer: bytes) -> bytes:
    """The answer without interim responses (`100 Continue`)."""
    while answer.startswith(b"HTTP/1.1 1"):
        answer = answer.partition(b"\r\n\r\n")[2]
    return answer


def status_of(answer: bytes) -> int | None:
    answer = _final(answer)
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return _final(answer).partition(b"\r\n\r\n")[2]


def http(
    method: str,
    target: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    content_length: int | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: masqd", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    length = len(body) if content_length is None else content_length
    if body or content_length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---- strategies -------------------------------------------------------------------------

segment = st.one_of(
    st.sampled_from(["net", "ctr1", "eth0", "", ".", "..", "%2F", "%00", "a" * 300, "é", "x y"]),
    st.text(st.characters(codec="ascii", exclude_characters="\r\n ?#"), max_size=20),
)
paths = st.one_of(
    st.builds(lambda a, b, c: f"/v1/attachments/{a}/{b}/{c}", segment, segment, segment),
    st.builds(lambda n: f"/v1/networks/{n}/gc", segment),
    st.builds(lambda q: f"/v1/attachments?{q}", segment),
    st.sampled_from(["/v1/status", "/healthz", "/readyz", "/", "*", "/v1", "/v1/attachments"]),
    st.builds(lambda s: "/" + s, st.text(st.characters(codec="ascii", exclude_characters="\r\n "))),
)
methods = st.one_of(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"]),
    st.text(st.characters(codec="ascii", categories=["Lu", "Ll", "Nd"]), min_size=1, max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
ip_like = st.one_of(
    st.sampled_from(
        ["198.18.1.2/24", "198.18.1.2", "224.0.0.1/4", "::1/128", "fe80::1/64", "10.0.0.1/33"]
    ),
    st.text(max_size=30),
)
bodies = st.one_of(
    st.builds(lambda ips: json.dumps({"ips": ips}).encode(), st.lists(ip_like, max_size=20)),
    st.builds(
        lambda v: json.dumps({"valid_attachments": v}).encode(),
        st.lists(st.dictionaries(st.sampled_from(["container_id", "ifname", "x"]), segment)),
    ),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(b"{" * 5000),  # deep nesting
    st.just(b"[" * 3000 + b"]" * 3000),  # deep and well-formed: RecursionError in json
    st.just(b'{"ips": [' + b"9" * 5000 + b"]}"),  # beyond Python's 4,300-digit int limit
    st.just(b'{"ips": ["' + b"1" * (ATTACHMENT_BODY_LIMIT + 10) + b'"]}'),  # oversized
)
header_names = st.sampled_from(
    ["Content-Type", "Transfer-Encoding", "Expect", "Content-Encoding", "X-Junk", "Connection"]
) | st.text(st.characters(codec="ascii", categories=["Lu", "Ll"]), min_size=1, max_size=20)
header_values = st.sampled_from(
    [
        "application/json",
        "chunked",
        "100-continue",
        "gzip",
        "deflate",
        "br",
        "close",
        "keep-alive",
        "",
    ]
) | st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=100)


good_name = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,8}", fullmatch=True)
good_ip = st.builds(
    lambda a, b, p: f"198.18.{a}.{b}/{p}", st.integers(70, 72), st.integers(1, 4), st.just(24)
) | st.builds(lambda a: f"2001:db8:70::{a:x}/64", st.integers(1, 4))
plausible_bodies = st.one_of(
    st.builds(lambda ips: {"ips": ips}, st.lists(good_ip | ip_like, min_size=0, max_size=4)),
    st.builds(
        lambda v: {"valid_attachments": v},
        st.lists(st.fixed_dictionaries({"container_id": good_name, "ifname": good_name})),
    ),
    json_values,
)


@st.composite
def plausible_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Well-formed HTTP aimed at the real routes: the handlers' validation is what is tried."""
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "POST"]))
    net, ctr, ifname = draw(good_name | segment), draw(good_name), draw(good_name | segment)
    path = draw(
        st.sampled_from(
            [
                f"/v1/attachments/{net}/{ctr}/{ifname}",
                f"/v1/attachments/net/ctr{draw(st.integers(1, 4))}/eth0",
                f"/v1/networks/{net}/gc",
                f"/v1/attachments?network={net}",
            ]
        )
    )
    body = b"" if method in ("GET", "DELETE") else json.dumps(draw(plausible_bodies)).encode()
    return http(method, path, body, [("Content-Type", "application/json")]), False


@st.composite
def _wild(draw: st.DrawFn) -> tuple[bytes, bool]:
    method, path, body = draw(methods), draw(paths), draw(bodies)
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    lie = draw(st.sampled_from([None, None, 0, 1, 10**9, -1]))
    raw = http(method, path, body, headers, content_length=lie if lie != -1 else None)
    if lie == -1:
        raw = raw.replace(b"Content-Length", b"Content-Length: 5\r\nContent-Length", 1)
    cut = draw(st.sampled_from([None, None, None, "headers", "body"]))
    if cut == "headers":
        raw = raw[: draw(st.integers(0, raw.index(b"\r\n\r\n")))]
    elif cut == "body":
        raw = raw[: draw(st.integers(raw.index(b"\r\n\r\n") + 4, len(raw)))]
    return raw, cut is not None or lie == 10**9


requests = st.one_of(plausible_requests(), _wild())


# ---- the fuzz ---------------------------------------------------------------------------


@pytest.fixture
def fuzzed(daemon_factory: DaemonFactory) -> Iterator[MasqdProcess]:
    daemon = daemon_factory(extra_args=["--client-timeout", str(CLIENT_TIMEOUT)])
    # Something for the fuzz to damage, if it can.
    for n in range(1, 4):
        resp = daemon.client.put_attachment("net", f"ctr{n}", "eth0", [f"198.18.70.{n}/24"])
        assert resp.status == 200
    yield daemon


def _snapshot(daemon: MasqdProcess) -> list[dict[str, object]]:
    return sorted(daemon.client.attachments(), key=json.dumps)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests)
def test_fuzzed_requests_never_get_a_5xx_nor_change_state_when_rejected(
    fuzzed: MasqdProcess, request: tuple[bytes, bool]
) -> None:
    raw, cut_short = request
    before = _snapshot(fuzzed)
    answer = exchange(fuzzed.socket, raw, half_close=cut_short, timeout=CLIENT_TIMEOUT + 3)
    status = status_of(answer)
    event(f"status {status}")
    assert fuzzed.proc is not None and fuzzed.proc.poll() is None, "the daemon died"
    if status is not None:
        assert status < 500, answer[:500]
    if status is None or status >= 400:
        assert _snapshot(fuzzed) == before
    if status is not None and status >= 400 and not raw.startswith(b"HEAD "):
        # Every rejection, the HTTP parser's included, is a JSON object naming the error.
        assert json.loads(body_of(answer))["error"], answer[:500]
    assert fuzzed.client.get("/healthz").status == 200


def test_after_the_fuzz_style_abuse_the_kernel_matches_the_api(fuzzed: MasqdProcess) -> None:
    for raw in (
        http("PUT", "/v1/attachments/net/ctr1/eth0", b'{"ips": ["198.18.99.1/24"]'),
        http("PUT", "/v1/attachments/net/ctr9/eth0", b"", content_length=50),
        http("POST", "/v1/networks/net/gc", b'{"valid_attachments": [}'),
        http("DELETE", "/v1/attachments/net/%2e%2e/eth0"),
    ):
        exchange(fuzzed.socket, raw, half_close=True, timeout=CLIENT_TIMEOUT + 3)
    addresses = {ip.split("/")[0] for a in fuzzed.client.attachments() for ip in a["ips"]}
    assert set(kernel_table(fuzzed.ns).sets["sources4"]) == addresses
    assert addresses == {"198.18.70.1", "198.18.70.2", "198.18.70.3"}


# ---- limits -----------------------------------------------------------------------------


@pytest.fixture
def limited(daemon_factory: DaemonFactory) -> MasqdProcess:
    return daemon_factory(
        extra_args=["--client-timeout", str(CLIENT_TIMEOUT), "--max-connections", "8"],
    )


def test_oversized_header_line_and_too_many_headers_are_refused(limited: MasqdProcess) -> None:
    long_header = http("GET", "/v1/status", headers=[("X-Long", "a" * 9000)])
    assert status_of(exchange(limited.socket, long_header)) in (400, 431)
    long_target = http("GET", "/v1/attachments?" + "a" * 9000)
    assert status_of(exchange(limited.socket, long_target)) in (400, 414)
    many = http("GET", "/v1/status", headers=[(f"X-H{i}", "v") for i in range(200)])
    assert status_of(exchange(limited.socket, many)) in (400, 431)
    assert limited.client.get("/healthz").status == 200


def test_oversized_bodies_are_refused_before_being_read(limited: MasqdProcess) -> None:
    big = http("PUT", "/v1/attachments/net/c/eth0", b"x" * (ATTACHMENT_BODY_LIMIT + 1))
    answer = exchange(limited.socket, big)
    assert status_of(answer) == 413
    assert "larger than" in json.loads(body_of(answer))["error"]
    # A GC that announces 40 MiB is refused on its Content-Length alone.
    started = time.monotonic()
    claim = http("POST", "/v1/networks/net/gc", b"", content_length=40 * 1024 * 1024)
    assert status_of(head_of_answer(limited.socket, claim)) == 413
    assert time.monotonic() - started < 1
    assert limited.client.attachments() == []

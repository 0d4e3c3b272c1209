"""masqd-cni: the CNI plugin that forwards a runtime's ADD/DEL/CHECK/GC/STATUS to masqd.

A runtime runs it after an interface plugin (bridge with `ipMasq: false`) in a conflist. It
takes the sandbox IPs of `CNI_IFNAME` from `prevResult` and asks the daemon, over its Unix
socket, to masquerade them; the daemon owns the nftables table. All behaviour follows the CNI
spec (1.1.0 and the older result formats 0.3.0 to 1.0.0), because runtimes depend on it.

It is started once per container and interface, so cold start is its cost. It therefore
imports only json, os, socket, sys and time (plus what the interpreter loads anyway): no
typing, dataclasses or logging, and no http.client either, whose email and ssl imports alone
take about 20 ms, half the start-up budget. HTTP/1.1 with `Connection: close` is a few lines
here instead. `masqd.spool`, which pulls in hashlib and dataclasses, is imported only on the
rare paths that need it.

Output discipline: the result or the CNI error object goes to stdout (libcni reads it);
diagnostics go to stderr, one line each.

On a node it runs under the node's own python3 (deploy/image), so this module, `spool` and
`masqd/__init__` keep to Python 3.8: no `X | Y` outside annotations, no dataclass slots, no
`match`. tests/test_deploy.py runs the CNI tests against the node build under the oldest
python3 it finds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

# typing alone costs 2 ms to import; with postponed annotations only mypy needs these names.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, BinaryIO, TextIO

    JSONObject = dict[str, Any]

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
# libcni's rule: a config without cniVersion is 0.1.0, which this plugin does not support.
IMPLIED_VERSION = "0.1.0"

DEFAULT_SOCKET = "/run/masqd/masqd.sock"
DEFAULT_DAEMON_WAIT_SECONDS = 10.0
MAX_DAEMON_WAIT_SECONDS = 3600.0
SPOOL_DIRNAME = "spool"  # must equal masqd.spool.SPOOL_DIRNAME (a test pins it)

# How long one request may take once the daemon accepted the connection. It answers a
# change once the kernel holds it, which takes milliseconds; a daemon that takes this long
# is stuck, and the runtime hears "try again later".
REQUEST_TIMEOUT_SECONDS = 30.0
# DEL does not wait: an answer missing after this long is spooled (DEL is idempotent, so a
# DEL that the daemon also applied does no harm).
DEL_TIMEOUT_SECONDS = 3.0
STATUS_TIMEOUT_SECONDS = 3.0
RETRY_FIRST_DELAY_SECONDS = 0.05
RETRY_MAX_DELAY_SECONDS = 0.5
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# The CNI spec's well-known error codes, and libcni's code for anything else.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENVIRONMENT = 4
ERR_DECODING_FAILURE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_INTERNAL = 999

# Which variables each command needs, as libcni's skel requires them.
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
MIN_VERSION = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}
VALID_ATTACHMENTS_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_URL_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")


class CniError(Exception):
    """A failure the runtime is told about: the CNI error object, printed on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_object(self, cni_version: str) -> JSONObject:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


class DaemonUnreachable(Exception):
    """No HTTP answer from the daemon. `retryable`: it is not (yet) listening, so waiting helps."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


# --- versions ---------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int] | None:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def check_version(command: str, cni_version: str) -> None:
    """Code 1 unless this plugin speaks `cni_version` and the version has `command`."""
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {cni_version!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    minimum = MIN_VERSION.get(command)
    parsed = parse_version(cni_version)
    if minimum is not None and parsed is not None and parsed < minimum:
        need = ".".join(map(str, minimum))
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"{command} needs cniVersion {need} or later, config is {cni_version!r}",
        )


# --- environment and configuration -------------------------------------------------------


def valid_cni_name(value: str) -> bool:
    """The spec's rule for container IDs and network names: [A-Za-z0-9][A-Za-z0-9_.-]*."""
    return bool(value) and value[0] not in "_.-" and all(c in _NAME_CHARS for c in value)


def interface_name_problem(value: str) -> str | None:
    """Why `value` cannot be an interface name (the spec's and Linux's rules), or None."""
    if not value:
        return "interface name is empty"
    if len(value.encode()) > 15:
        return f"interface name {value!r} is longer than 15 bytes"
    if value in (".", ".."):
        return "interface name must not be '.' or '..'"
    if any(c in "/:" or c.isspace() for c in value):
        return "interface name contains / or : or whitespace characters"
    return None


class Invocation:
    """One run of the plugin: the command, its environment and the parsed configuration."""

    __slots__ = (
        "cni_version",
        "command",
        "config",
        "container_id",
        "daemon_wait",
        "ifname",
        "netns",
        "network",
        "socket_path",
    )

    def __init__(self, command: str, environ: Mapping[str, str], config: JSONObject) -> None:
        self.command = command
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.config = config
        self.network: str = config["name"]
        self.cni_version: str = config.get("cniVersion", IMPLIED_VERSION)
        self.socket_path = DEFAULT_SOCKET
        self.daemon_wait = DEFAULT_DAEMON_WAIT_SECONDS

    @property
    def attachment_path(self) -> str:
        return "/v1/attachments/" + "/".join(
            _quote(part) for part in (self.network, self.container_id, self.ifname)
        )

    @property
    def label(self) -> str:
        if self.container_id:
            return f"{self.command} {self.network}/{self.container_id}/{self.ifname}"
        return f"{self.command} {self.network}"


def read_command(environ: Mapping[str, str]) -> str:
    """CNI_COMMAND, after checking it and the variables it requires (code 4)."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
    if command not in REQUIRED_ENV:
        raise CniError(ERR_INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(
            ERR_INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing"
        )
    return command


def parse_config(command: str, environ: Mapping[str, str], stdin_data: bytes) -> Invocation:
    """Decode the network configuration and run libcni's generic checks, in libcni's order."""
    try:
        config = json.loads(stdin_data)
    except ValueError as exc:  # also catches UnicodeDecodeError
        raise CniError(ERR_DECODING_FAILURE, f"error unmarshalling network config: {exc}") from None
    if not isinstance(config, dict):
        raise CniError(ERR_DECODING_FAILURE, "network config must be a JSON object")
    name = config.get("name")
    if name is None or name == "":
        raise CniError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str) or not valid_cni_name(name):
        raise CniError(ERR_INVALID_CONFIG, "invalid characters found in network name", str(name))
    cni_version = config.get("cniVersion", IMPLIED_VERSION)
    if not isinstance(cni_version, str):
        raise CniError(ERR_DECODING_FAILURE, "cniVersion must be a string", repr(cni_version))
    inv = Invocation(command, environ, config)
    if command in ("ADD", "CHECK", "DEL"):
        if not valid_cni_name(inv.container_id):
            raise CniError(
                ERR_INVALID_ENVIRONMENT, "invalid characters in containerID", inv.container_id
            )
        problem = interface_name_problem(inv.ifname)
        if problem:
            raise CniError(ERR_INVALID_ENVIRONMENT, problem, inv.ifname)
    return inv


def read_plugin_keys(inv: Invocation) -> None:
    """This plugin's own keys: `socket` and `daemonWaitSeconds` (code 7 when invalid)."""
    config = inv.config
    sock = config.get("socket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise CniError(ERR_INVALID_CONFIG, "socket must be an absolute path", repr(sock))
    wait = config.get("daemonWaitSeconds", DEFAULT_DAEMON_WAIT_SECONDS)
    if (
        isinstance(wait, bool)
        or not isinstance(wait, (int, float))
        or not 0 <= wait <= MAX_DAEMON_WAIT_SECONDS
    ):
        raise CniError(
            ERR_INVALID_CONFIG,
            f"daemonWaitSeconds must be a number from 0 to {MAX_DAEMON_WAIT_SECONDS:g}",
            repr(wait),
        )
    inv.socket_path = sock
    inv.daemon_wait = float(wait)


# --- results -----------------------------------------------------------------------------


def prev_result(inv: Invocation) -> JSONObject:
    """The prevResult that ADD and CHECK require (code 7 without it)."""
    prev = inv.config.get("prevResult")
    if prev is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            f"{inv.command} needs prevResult",
            "masqd-cni is a chained plugin: list it after an interface plugin such as bridge",
        )
    if not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult must be a JSON object")
    return prev


def select_ips(prev: JSONObject, ifname: str) -> list[str]:
    """The addresses (with prefix) of the sandbox interface `ifname` in a 0.3.0+ result.

    `ips[].interface` indexes `interfaces[]`; an IP belongs to us when its interface has our
    name and a sandbox (host-side interfaces have none). When no IP names an interface, all
    of them are ours, as the spec's IPAM-only results imply.
    """
    ips = prev.get("ips") or []
    interfaces = prev.get("interfaces") or []
    if not isinstance(ips, list):
        raise CniError(ERR_INVALID_CONFIG, "prevResult.ips must be a list")
    if not isinstance(interfaces, list):
        raise CniError(ERR_INVALID_CONFIG, "prevResult.interfaces must be a list")
    for i, ip in enumerate(ips):
        if not isinstance(ip, dict):
            raise CniError(ERR_INVALID_CONFIG, f"prevResult.ips[{i}] must be an object")
        if not isinstance(ip.get("address"), str) or not ip["address"]:
            raise CniError(
                ERR_INVALID_CONFIG,
                f"prevResult.ips[{i}].address must be an address with prefix, like 10.22.0.5/16",
            )
    any_named = any(ip.get("interface") is not None for ip in ips)
    selected: list[str] = []
    for ip in ips:
        if any_named and not _is_sandbox_interface(interfaces, ip.get("interface"), ifname):
            continue
        if ip["address"] not in selected:
            selected.append(ip["address"])
    return selected


def _is_sandbox_interface(interfaces: list[Any], index: Any, ifname: str) -> bool:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(interfaces):
        return False
    iface = interfaces[index]
    return isinstance(iface, dict) and iface.get("name") == ifname and bool(iface.get("sandbox"))


def convert_result(prev: JSONObject, cni_version: str) -> JSONObject:
    """prevResult as the runtime asked for it: unchanged, in `cni_version`'s format.

    The 0.3.0 to 1.1.0 results differ in one field only: before 1.0.0 every IP carries
    `"version": "4"|"6"`, from 1.0.0 on it is gone. Everything else passes through.
    """
    out = dict(prev)
    out["cniVersion"] = cni_version
    if prev.get("cniVersion") == cni_version or not isinstance(prev.get("ips"), list):
        return out
    legacy = (parse_version(cni_version) or (0, 0, 0)) < (1, 0, 0)
    ips = []
    for ip in prev["ips"]:
        if isinstance(ip, dict):
            ip = dict(ip)
            if not legacy:
                ip.pop("version", None)
            elif "version" not in ip and isinstance(ip.get("address"), str):
                ip["version"] = "6" if ":" in ip["address"] else "4"
        ips.append(ip)
    out["ips"] = ips
    return out


def canonical_ips(ips: list[str], what: str) -> set[str]:
    """`ips` as the daemon spells them ('address/prefix', compressed IPv6), for comparing."""
    import ipaddress  # CHECK only: 3 ms that ADD does not need to pay.

    out = set()
    for ip in ips:
        try:
            iface = ipaddress.ip_interface(ip)
        except ValueError:
            raise CniError(ERR_INVALID_CONFIG, f"{what} holds an invalid address", ip) from None
        out.add(f"{iface.ip}/{iface.network.prefixlen}")
    return out


# --- talking to the daemon ----------------------------------------------------------------


def http_request(
    socket_path: str, method: str, target: str, body: JSONObject | None, *, timeout: float
) -> tuple[int, Any]:
    """One HTTP/1.1 request over the daemon's Unix socket: (status, decoded JSON body or None).

    Raises DaemonUnreachable when no complete answer arrives.
    """
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: masqd\r\nUser-Agent: masqd-cni\r\n"
        "Accept: application/json\r\nConnection: close\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
            # Absent, dead (a stale socket file), or its backlog full (EAGAIN): all pass.
            raise DaemonUnreachable(f"{socket_path}: {exc.strerror}", retryable=True) from None
        except TimeoutError:
            raise DaemonUnreachable(f"{socket_path}: connect timed out", retryable=True) from None
        try:
            sock.sendall(head.encode() + b"\r\n" + payload)
            status, raw = _read_response(sock)
        except TimeoutError:
            raise DaemonUnreachable(
                f"{socket_path}: no answer within {timeout:g}s", retryable=False
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            # The daemon went away mid-request: it is restarting, so waiting helps.
            raise DaemonUnreachable(f"{socket_path}: {exc.strerror}", retryable=True) from None
    except OSError as exc:
        raise CniError(ERR_INTERNAL, f"cannot talk to masqd at {socket_path}", str(exc)) from None
    finally:
        sock.close()
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = None
    return status, decoded


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the answer; stops reading as soon as Content-Length is satisfied."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock, len(buf))
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    rest = bytearray(body)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise DaemonUnreachable(f"not an HTTP answer: {lines[0][:80]!r}", retryable=False)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        while len(rest) < int(length):
            rest += _recv(sock, len(rest))
        return int(parts[1]), bytes(rest[: int(length)])
    while chunk := sock.recv(65536):  # no length: the body ends when the server closes
        rest += chunk
        if len(rest) > MAX_RESPONSE_BYTES:
            raise DaemonUnreachable("answer too large", retryable=False)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return int(parts[1]), _dechunk(bytes(rest))
    return int(parts[1]), bytes(rest)


def _recv(sock: socket.socket, have: int) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise DaemonUnreachable("connection closed before a complete answer", retryable=True)
    if have + len(chunk) > MAX_RESPONSE_BYTES:
        raise DaemonUnreachable("answer too large", retryable=False)
    return chunk


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        if not sep or not size_text:
            raise DaemonUnreachable("truncated chunked answer", retryable=False)
        try:
            size = int(size_text, 16)
        except ValueError:
            raise DaemonUnreachable("malformed chunked answer", retryable=False) from None
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def _quote(part: str) -> str:
    """Percent-encode one URL path segment (interface names may hold almost any character)."""
    return "".join(chr(b) if b in _URL_SAFE else f"%{b:02X}" for b in part.encode())


def call_with_wait(
    inv: Invocation, method: str, target: str, body: JSONObject | None = None
) -> tuple[int, Any]:
    """A request that waits up to daemonWaitSeconds for a daemon that is absent or not ready.

    Absent socket, refused connection or 503 mean "not up yet": retried with backoff. After
    the wait, code 11 (try again later), which runtimes retry.
    """
    deadline = time.monotonic() + inv.daemon_wait
    delay = RETRY_FIRST_DELAY_SECONDS
    while True:
        try:
            status, answer = http_request(
                inv.socket_path, method, target, body, timeout=REQUEST_TIMEOUT_SECONDS
            )
        except DaemonUnreachable as exc:
            if not exc.retryable:
                raise CniError(ERR_TRY_AGAIN_LATER, "masqd did not answer", str(exc)) from None
            reason = str(exc)
        else:
            if status != 503:
                return status, answer
            reason = f"masqd is not ready: {_error_text(answer, status)}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CniError(
                ERR_TRY_AGAIN_LATER,
                f"masqd is not available after waiting {inv.daemon_wait:g}s; try again later",
                reason,
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, RETRY_MAX_DELAY_SECONDS)


def _error_text(answer: Any, status: int) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        text = answer["error"]
        details = answer.get("details")
        return f"{text} {json.dumps(details)}" if details else text
    return f"HTTP {status}"


def _refused(status: int, answer: Any, what: str) -> CniError:
    """The CNI error for a daemon answer that is neither success nor "not ready"."""
    text = _error_text(answer, status)
    if status in (400, 409, 413, 422):
        return CniError(ERR_INVALID_CONFIG, f"masqd rejected {what}", text)
    if status >= 500:
        return CniError(ERR_TRY_AGAIN_LATER, f"masqd failed to {what}; try again later", text)
    if status == 403:
        return CniError(ERR_INTERNAL, "masqd refused this client (peer credentials)", text)
    return CniError(ERR_INTERNAL, f"unexpected answer from masqd to {what}", text)


# --- commands ------------------------------------------------------------------------------


def cmd_add(inv: Invocation, out: TextIO, err: TextIO) -> None:
    prev = prev_result(inv)
    ips = select_ips(prev, inv.ifname)
    if ips:
        _cancel_spooled_delete(inv, err)
        status, answer = call_with_wait(inv, "PUT", inv.attachment_path, {"ips": ips})
        if not 200 <= status < 300:
            raise _refused(status, answer, f"set up {inv.network}/{inv.container_id}/{inv.ifname}")
        _log(err, inv, f"masquerading {', '.join(ips)}")
    else:
        _log(err, inv, f"prevResult has no IP for {inv.ifname}: nothing to masquerade")
    out.write(json.dumps(convert_result(prev, inv.cni_version)) + "\n")


def cmd_check(inv: Invocation, out: TextIO, err: TextIO) -> None:
    expected = canonical_ips(select_ips(prev_result(inv), inv.ifname), "prevResult")
    key = f"{inv.network}/{inv.container_id}/{inv.ifname}"
    status, answer = call_with_wait(inv, "GET", inv.attachment_path)
    if status == 404:
        if expected:
            raise CniError(
                ERR_INTERNAL,
                f"masqd holds no attachment {key}",
                f"expected masquerade for {sorted(expected)}",
            )
        return
    if status != 200:
        raise _refused(status, answer, f"look up {key}")
    held_list = answer.get("ips") if isinstance(answer, dict) else None
    if not isinstance(held_list, list) or not all(isinstance(ip, str) for ip in held_list):
        raise CniError(ERR_INTERNAL, "unexpected answer from masqd", json.dumps(answer))
    held = canonical_ips(held_list, "masqd's answer")
    if held != expected:
        raise CniError(
            ERR_INTERNAL,
            f"masqd holds other IPs for {key} than prevResult says",
            f"masqd holds {sorted(held)}, prevResult has {sorted(expected)}",
        )


def cmd_del(inv: Invocation, out: TextIO, err: TextIO) -> None:
    key = f"{inv.network}/{inv.container_id}/{inv.ifname}"
    try:
        status, answer = http_request(
            inv.socket_path, "DELETE", inv.attachment_path, None, timeout=DEL_TIMEOUT_SECONDS
        )
    except DaemonUnreachable as exc:
        _spool(inv, err, str(exc))
        return
    if 200 <= status < 300 or status == 404:
        return
    if status >= 500:
        _spool(inv, err, f"masqd answered {status}: {_error_text(answer, status)}")
        return
    if status in (400, 422):
        # The daemon never accepts such a key, so it holds nothing to delete.
        _log(err, inv, f"masqd cannot hold {key}: {_error_text(answer, status)}; nothing to do")
        return
    raise _refused(status, answer, f"delete {key}")


def cmd_gc(inv: Invocation, out: TextIO, err: TextIO) -> None:
    valid = valid_attachments(inv.config)
    status, answer = call_with_wait(
        inv, "POST", f"/v1/networks/{_quote(inv.network)}/gc", {"valid_attachments": valid}
    )
    if not 200 <= status < 300:
        raise _refused(status, answer, f"garbage-collect network {inv.network}")
    removed = answer.get("removed") if isinstance(answer, dict) else None
    count = len(removed) if isinstance(removed, list) else "?"
    _log(err, inv, f"{len(valid)} valid attachments, {count} removed")


def cmd_status(inv: Invocation, out: TextIO, err: TextIO) -> None:
    try:
        status, answer = http_request(
            inv.socket_path, "GET", "/readyz", None, timeout=STATUS_TIMEOUT_SECONDS
        )
    except DaemonUnreachable as exc:
        raise CniError(ERR_NOT_AVAILABLE, "masqd is not available", str(exc)) from None
    if status != 200:
        raise CniError(ERR_NOT_AVAILABLE, "masqd is not ready", _error_text(answer, status))


def valid_attachments(config: JSONObject) -> list[dict[str, str]]:
    """GC's list of attachments to keep, as the daemon's API spells them (code 7 if absent).

    Absent is an error, never an empty list: an empty list would remove every attachment of
    the network. Entries whose IDs break the spec's naming rules are dropped: the daemon
    could never have accepted them, so they protect nothing.
    """
    for key in VALID_ATTACHMENTS_KEYS:
        if key in config:
            raw = config[key]
            break
    else:
        raise CniError(ERR_INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    if not isinstance(raw, list):
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be a list")
    valid: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(raw):
        cid = entry.get("containerID") if isinstance(entry, dict) else None
        ifname = entry.get("ifname") if isinstance(entry, dict) else None
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(
                ERR_INVALID_CONFIG, f"{key}[{i}] must be an object with containerID and ifname"
            )
        usable = valid_cni_name(cid) and interface_name_problem(ifname) is None
        if usable and (cid, ifname) not in seen:
            seen.add((cid, ifname))
            valid.append({"container_id": cid, "ifname": ifname})
    return valid


def version_info() -> JSONObject:
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def spool_dir(socket_path: str) -> str:
    """`masqd.spool.spool_dir_for`, without importing it on the ADD path (a test pins both)."""
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), SPOOL_DIRNAME)


def _spool(inv: Invocation, err: TextIO, reason: str) -> None:
    from masqd import spool  # the rare path: hashlib and dataclasses are paid only here

    directory = spool_dir(inv.socket_path)
    try:
        path = spool.spool_delete(directory, inv.network, inv.container_id, inv.ifname)
    except spool.SpoolFull as exc:
        raise CniError(
            ERR_TRY_AGAIN_LATER, "masqd is down and the DEL spool is full", str(exc)
        ) from None
    except (OSError, ValueError) as exc:
        raise CniError(
            ERR_TRY_AGAIN_LATER, "masqd is down and the DEL could not be spooled", str(exc)
        ) from None
    _log(err, inv, f"masqd unreachable ({reason}); DEL spooled to {path}")


def _cancel_spooled_delete(inv: Invocation, err: TextIO) -> None:
    """Forget a DEL of this key still waiting in the spool, so it cannot undo this ADD."""
    directory = spool_dir(inv.socket_path)
    try:
        with os.scandir(directory) as it:
            if next(it, None) is None:
                return  # the usual case: an empty (or absent) spool, one system call
    except OSError:
        return
    from masqd import spool

    try:
        if spool.cancel_delete(directory, inv.network, inv.container_id, inv.ifname):
            _log(err, inv, "dropped a spooled DEL of this attachment")
    except OSError as exc:
        _log(err, inv, f"cannot drop a spooled DEL of this attachment: {exc}")


COMMAND_HANDLERS = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "GC": cmd_gc,
    "STATUS": cmd_status,
}


# --- entry point ---------------------------------------------------------------------------


def run(environ: Mapping[str, str], stdin: BinaryIO, out: TextIO, err: TextIO) -> int:
    """Run one CNI command; the process exit status (0 success, 1 error object printed)."""
    cni_version = LATEST_VERSION
    inv: Invocation | None = None
    try:
        command = read_command(environ)
        stdin_data = stdin.read()
        if command == "VERSION":
            out.write(json.dumps(version_info()) + "\n")
            return 0
        inv = parse_config(command, environ, stdin_data)
        cni_version = inv.cni_version
        check_version(command, inv.cni_version)
        read_plugin_keys(inv)
        COMMAND_HANDLERS[command](inv, out, err)
        return 0
    except CniError as exc:
        failure = exc
    except Exception as exc:  # a bug must still reach the runtime as a CNI error object
        failure = CniError(ERR_INTERNAL, "internal error in masqd-cni", repr(exc))
    summary = f"error {failure.code}: {failure.msg} {failure.details}".rstrip()
    if inv is not None:
        _log(err, inv, summary)
    else:
        err.write(f"masqd-cni: {summary}\n")
    if cni_version not in SUPPORTED_VERSIONS:
        cni_version = LATEST_VERSION
    out.write(json.dumps(failure.to_object(cni_version)) + "\n")
    return 1


def _log(err: TextIO, inv: Invocation, message: str) -> None:
    err.write(f"masqd-cni: {inv.label}: {message}\n")


def main() -> int:
    try:
        return run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr)
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

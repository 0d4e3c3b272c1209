"""masqd-cni (the Go binary built from cni/), driven as a container runtime drives it.

Three layers, fastest first:
- the executable alone: versions, environment, config checks, result conversion, error
  objects (the CNI project's skel and types do most of it, so this pins what runtimes see);
- the executable against a stand-in daemon on a real Unix socket: the requests it sends, how
  it waits, retries, spools and maps the daemon's answers to CNI error codes;
- the executable, the upstream `bridge`, `host-local` and `loopback` plugins and the real
  daemon in network namespaces, with real connections to an outside namespace (kernel
  tests), run by hand as a runtime does and through libcni (`cnitool`).

`make setup` builds the plugin (cni/bin/masqd-cni); `make test` also builds the upstream
plugins and cnitool into .venv/cni-tools. MASQD_CNI_TEST_PLUGIN names another build to test.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from masqd.state import spool
from tests.daemon import MasqdProcess, masqueraded
from tests.netns import (
    Endpoint,
    enable_forwarding,
    netns,
    ns_run,
    probe,
    start_echo_server,
    veth,
)
from tests.spool_entries import write_entry

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = Path(os.environ.get("MASQD_CNI_TEST_PLUGIN") or REPO / "cni" / "bin" / "masqd-cni")
PLUGIN = [str(PLUGIN_PATH)]
MASQD = REPO / ".venv" / "bin" / "masqd"
# The CNI projects' own builds (make test-tools): bridge with the nftables ipMasq backend and
# CNI 1.1.0, host-local, loopback, cnitool. Debian's plugins (1.1.1) stop at CNI 1.0.0.
CNI_TOOLS = Path(os.environ.get("MASQD_CNI_TOOLS") or REPO / ".venv" / "cni-tools")
CNI_BIN = str(CNI_TOOLS)
BRIDGE = str(CNI_TOOLS / "bridge")
CNITOOL = str(CNI_TOOLS / "cnitool")
SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/run/masqd/masqd.sock"
VECTORS = json.loads((REPO / "tests" / "vectors" / "names.json").read_text())

# A bridge result as the bridge plugin prints it (1.0.0): host bridge, host veth, container.
# (The CNI library leaves out an empty `dns`, so the bridge does and so does masqd-cni.)
BRIDGE_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:2e:69:56:05:8a"},
        {"name": "veth1234", "mac": "6a:33:5e:08:78:91"},
        {"name": "eth0", "mac": "aa:2a:ca:ff:59:df", "sandbox": "/var/run/netns/c1"},
    ],
    "ips": [
        {"interface": 2, "address": "198.18.10.2/24", "gateway": "198.18.10.1"},
        {"interface": 2, "address": "2001:db8:10::2/64", "gateway": "2001:db8:10::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
}


@pytest.fixture(autouse=True, scope="module")
def _plugin_built() -> None:
    if not os.access(PLUGIN_PATH, os.X_OK):
        pytest.fail(f"{PLUGIN_PATH} is missing: `make setup` builds it")


# ---- running the executable ---------------------------------------------------------------


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def error(self, code: int) -> dict[str, Any]:
        """The CNI error object on stdout, after checking it is exactly one with `code`."""
        assert self.rc == 1, self
        obj: dict[str, Any] = self.json
        assert sorted(obj) == ["cniVersion", "code", "details", "msg"], obj
        assert obj["code"] == code, obj
        assert self.stderr.strip(), "an error is also logged on stderr"
        return obj


def run_in(
    ns: str | None, argv: list[str], command: str, conf: dict[str, Any] | bytes, env: dict[str, str]
) -> Outcome:
    """Run a CNI plugin as a runtime does: CNI_* variables, config on stdin, in namespace `ns`."""
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_PATH": CNI_BIN,
        **env,
    }
    prefix = ["ip", "netns", "exec", ns] if ns else []
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    proc = subprocess.run(
        [*prefix, *argv], input=data, env=full_env, capture_output=True, timeout=60, check=False
    )
    return Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def environ(command: str, **overrides: str | None) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "ctr1",
        "CNI_NETNS": "/var/run/netns/ctr1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": CNI_BIN,
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def config(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": version, "name": "net1", "type": "masqd-cni"}
    conf.update(extra)
    return conf


def invoke(command: str, conf: dict[str, Any] | bytes, **env: str | None) -> Outcome:
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    proc = subprocess.run(
        PLUGIN,
        input=data,
        env={"PATH": "/usr/bin:/bin", **environ(command, **env)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def short_tmpdir() -> str:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="mqcni-", dir="/tmp")


@pytest.fixture
def rundir() -> Iterator[str]:
    path = short_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- the executable itself --------------------------------------------------------------


def _elf_program_header_types(path: Path) -> list[int]:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "a 64-bit little-endian ELF"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def test_the_plugin_is_one_small_static_executable() -> None:
    """No interpreter, no shared libraries: it runs on any node, Python or not."""
    PT_INTERP, PT_DYNAMIC = 3, 2
    types = _elf_program_header_types(PLUGIN_PATH)
    assert PT_INTERP not in types and PT_DYNAMIC not in types, types
    assert PLUGIN_PATH.stat().st_size < 10 * 1024 * 1024
    if shutil.which("file"):
        described = subprocess.run(
            ["file", "-b", str(PLUGIN_PATH)], capture_output=True, text=True, check=True
        ).stdout
        assert "statically linked" in described, described


def test_version_reports_every_supported_version() -> None:
    out = invoke(
        "VERSION", b"", CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None, CNI_PATH=None
    )
    assert out.rc == 0, out
    assert out.json == {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}


@pytest.mark.parametrize(
    ("stdin", "code", "msg"),
    [
        (b'{"cniVersion": "1.0.0", "name": ', 6, "error unmarshall network config"),
        (b"\xff\xfe", 6, "error unmarshall network config"),
        (b'["a list"]', 6, "error unmarshall network config"),
        (b'{"cniVersion": "1.0.0", "name": 5}', 6, "error unmarshall network config"),
        (b'{"cniVersion": "1.0.0", "type": "masqd-cni"}', 7, "missing network name"),
        (b'{"cniVersion": "1.0.0", "name": ""}', 7, "missing network name"),
        (b'{"cniVersion": "1.0.0", "name": "bad/name"}', 7, "invalid characters"),
        (b'{"cniVersion": "9.9.9", "name": "n"}', 1, "incompatible CNI versions"),
        (b'{"cniVersion": "0.2.0", "name": "n"}', 1, "incompatible CNI versions"),
        (b'{"name": "n"}', 1, "incompatible CNI versions"),  # no cniVersion means 0.1.0
        (b'{"cniVersion": 1, "name": "n"}', 6, "cniVersion"),
        (
            json.dumps(config(prevResult=BRIDGE_RESULT, name="n" * 65)).encode(),
            7,
            "masqd cannot hold this network name",
        ),
    ],
)
def test_undecodable_or_invalid_config_is_an_error_object(
    stdin: bytes, code: int, msg: str
) -> None:
    obj = invoke("ADD", stdin).error(code)
    assert msg in obj["msg"]


@pytest.mark.parametrize(
    ("command", "env", "msg"),
    [
        ("ADD", {"CNI_COMMAND": None}, "[CNI_COMMAND] missing"),
        ("BOGUS", {}, "unknown CNI_COMMAND: BOGUS"),
        ("ADD", {"CNI_NETNS": None}, "[CNI_NETNS] missing"),
        ("ADD", {"CNI_CONTAINERID": None, "CNI_IFNAME": None}, "[CNI_CONTAINERID,CNI_IFNAME]"),
        ("CHECK", {"CNI_PATH": None}, "[CNI_PATH] missing"),
        ("DEL", {"CNI_CONTAINERID": None}, "[CNI_CONTAINERID] missing"),
        ("GC", {"CNI_PATH": None}, "[CNI_PATH] missing"),
        ("STATUS", {"CNI_PATH": None}, "[CNI_PATH] missing"),
        ("ADD", {"CNI_CONTAINERID": "-starts-with-dash"}, "invalid characters in containerID"),
        ("DEL", {"CNI_CONTAINERID": "has space"}, "invalid characters in containerID"),
        ("ADD", {"CNI_IFNAME": "eth/0"}, "contains / or :"),
        ("DEL", {"CNI_IFNAME": "a-very-long-ifname"}, "interface name is too long"),
        ("ADD", {"CNI_IFNAME": ".."}, "interface name is . or .."),
        # The CNI spec allows these; masqd cannot hold them, so ADD says so before asking.
        ("ADD", {"CNI_IFNAME": 'e"x'}, "masqd cannot hold this interface name"),
        ("ADD", {"CNI_IFNAME": "eth0~"}, "masqd cannot hold this interface name"),
        ("ADD", {"CNI_IFNAME": "e\u202ex"}, "masqd cannot hold this interface name"),
        ("CHECK", {"CNI_CONTAINERID": "c" * 129}, "masqd cannot hold this container ID"),
    ],
)
def test_missing_or_invalid_environment_is_code_4(
    command: str, env: dict[str, str | None], msg: str
) -> None:
    obj = invoke(command, config(prevResult=BRIDGE_RESULT), **env).error(4)
    assert msg in obj["msg"]


def test_del_needs_neither_netns_nor_prev_result_to_pass_the_checks(rundir: str) -> None:
    conf = config(socket=f"{rundir}/masqd.sock")
    assert invoke("DEL", conf, CNI_NETNS=None).rc == 0


@pytest.mark.parametrize(
    ("command", "version", "msg"),
    [
        ("CHECK", "0.3.1", "config version does not allow CHECK"),
        ("CHECK", "0.3.0", "config version does not allow CHECK"),
        ("GC", "1.0.0", "config version does not allow GC"),
        ("STATUS", "0.4.0", "config version does not allow STATUS"),
    ],
)
def test_commands_newer_than_the_config_version_are_code_1(
    command: str, version: str, msg: str
) -> None:
    conf = config(version, prevResult=BRIDGE_RESULT, **{"cni.dev/valid-attachments": []})
    obj = invoke(command, conf).error(1)
    assert obj["msg"] == msg
    assert obj["cniVersion"] == version


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        ({"socket": "relative/masqd.sock"}, "socket must be an absolute path"),
        ({"socket": 7}, "socket must be an absolute path"),
        ({"daemonWaitSeconds": "ten"}, "daemonWaitSeconds"),
        ({"daemonWaitSeconds": -1}, "daemonWaitSeconds"),
        ({"daemonWaitSeconds": True}, "daemonWaitSeconds"),
        ({"daemonWaitSeconds": 1e9}, "daemonWaitSeconds"),
    ],
)
def test_bad_plugin_keys_are_code_7(extra: dict[str, Any], msg: str) -> None:
    obj = invoke("ADD", config(prevResult=BRIDGE_RESULT, **extra)).error(7)
    assert msg in obj["msg"]


def test_add_without_prev_result_is_code_7() -> None:
    obj = invoke("ADD", config()).error(7)
    assert obj["msg"] == "ADD needs prevResult"
    assert "chained plugin" in obj["details"]


def test_check_without_prev_result_is_code_7() -> None:
    invoke("CHECK", config()).error(7)


@pytest.mark.parametrize(
    "prev",
    [
        {"ips": {"address": "198.18.1.2/24"}},
        {"ips": ["198.18.1.2/24"]},
        {"ips": [{"interface": 0}]},
        {"ips": [{"address": 5}]},
        {"ips": [{"address": "198.18.1.2"}]},
        {"interfaces": "eth0", "ips": []},
        {"ips": [{"interface": True, "address": "198.18.1.2/24"}]},
        "a string",
    ],
)
def test_malformed_prev_result_is_code_7(prev: Any) -> None:
    invoke("ADD", config(prevResult=prev)).error(7)


def test_error_object_speaks_the_config_version_when_it_can() -> None:
    assert invoke("ADD", config("0.4.0")).error(7)["cniVersion"] == "0.4.0"
    unknown = b'{"cniVersion": "9.9.9", "name": "n"}'
    assert invoke("ADD", unknown).error(1)["cniVersion"] == "1.1.0"
    assert invoke("ADD", b"{", CNI_COMMAND=None).error(4)["cniVersion"] == "1.1.0"


# ---- against a stand-in daemon ------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Answer = tuple[int, Any]


@dataclass
class StandIn:
    """A masqd stand-in on a Unix socket: records every request, answers through `answer`."""

    socket: str
    answer: Callable[[Seen], Answer | bytes] = lambda seen: (200, {})
    seen: list[Seen] = field(default_factory=list)


@contextlib.contextmanager
def stand_in(
    directory: str, answer: Callable[[Seen], Answer | bytes] | None = None
) -> Iterator[StandIn]:
    state = StandIn(socket=f"{directory}/masqd.sock")
    if answer is not None:
        state.answer = answer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command, self.path, dict(self.headers), json.loads(raw) if raw else None
            )
            state.seen.append(seen)
            reply = state.answer(seen)
            if isinstance(reply, bytes):  # a raw response, written as it is
                self.wfile.write(reply)
                self.close_connection = True
                return
            status, payload = reply
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the client address of a Unix socket is '', which the default chokes on

    server = socketserver.ThreadingUnixStreamServer(state.socket, Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        os.unlink(state.socket)


def sock_config(directory: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return config(version, socket=f"{directory}/masqd.sock", **extra)


def spool_files(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(f"{directory}/spool"))
    except FileNotFoundError:
        return []


def put_ips(rundir: str, prev: dict[str, Any], version: str = "1.0.0", **env: str) -> list[str]:
    """The IPs ADD asks the daemon to masquerade for `prev` ([] when it asks nothing)."""
    with stand_in(rundir) as daemon:
        out = invoke("ADD", sock_config(rundir, version, prevResult=prev), **env)
    assert out.rc == 0, out
    return [ip for seen in daemon.seen for ip in seen.body["ips"]]


def test_add_puts_the_sandbox_ips_and_prints_prev_result(rundir: str) -> None:
    with stand_in(rundir) as daemon:
        out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT))
    assert out.rc == 0, out
    assert out.json == BRIDGE_RESULT
    (seen,) = daemon.seen
    assert (seen.method, seen.path) == ("PUT", "/v1/attachments/net1/ctr1/eth0")
    assert seen.body == {"ips": ["198.18.10.2/24", "2001:db8:10::2/64"]}
    assert seen.headers["Host"] == "masqd"
    assert seen.headers["Content-Type"] == "application/json"


def test_add_takes_only_the_sandbox_interface_ips(rundir: str) -> None:
    prev = json.loads(json.dumps(BRIDGE_RESULT))
    prev["ips"].append({"interface": 0, "address": "198.18.10.1/24"})  # the host's bridge
    assert put_ips(rundir, prev) == ["198.18.10.2/24", "2001:db8:10::2/64"]


def test_a_host_interface_with_the_same_name_is_not_ours(rundir: str) -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0"}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [
            {"interface": 0, "address": "198.18.1.1/24"},
            {"interface": 1, "address": "198.18.1.2/24"},
        ],
    }
    assert put_ips(rundir, prev) == ["198.18.1.2/24"]


def test_ips_of_other_container_interfaces_are_not_taken(rundir: str) -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/ns"}, {"name": "net1", "sandbox": "/ns"}],
        "ips": [
            {"interface": 0, "address": "198.18.1.2/24"},
            {"interface": 1, "address": "198.18.2.2/24"},
            {"interface": 7, "address": "198.18.3.2/24"},  # no such interface
        ],
    }
    assert put_ips(rundir, prev, CNI_IFNAME="net1") == ["198.18.2.2/24"]
    assert put_ips(rundir, prev, CNI_IFNAME="eth9") == []


def test_when_no_ip_names_an_interface_all_are_taken_once(rundir: str) -> None:
    prev = {
        "cniVersion": "0.4.0",
        "ips": [
            {"version": "4", "address": "198.18.1.2/24"},
            {"version": "6", "address": "2001:db8:1::2/64"},
            {"version": "4", "address": "198.18.1.2/24"},
        ],
    }
    assert put_ips(rundir, prev, "0.4.0") == ["198.18.1.2/24", "2001:db8:1::2/64"]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_add_prints_a_pre_1_0_result_with_ip_versions(rundir: str, version: str) -> None:
    prev = {
        **BRIDGE_RESULT,
        "cniVersion": version,
        "ips": [
            {**ip, "version": "6" if ":" in ip["address"] else "4"} for ip in BRIDGE_RESULT["ips"]
        ],
    }
    with stand_in(rundir):
        out = invoke("ADD", sock_config(rundir, version, prevResult=prev))
    assert out.rc == 0, out
    assert out.json == {**prev, "dns": {}}  # the library's 0.x result always has dns


def test_add_prints_the_result_in_the_config_version(rundir: str) -> None:
    # libcni hands prevResult over in the config's version; 1.0.0 and 1.1.0 share a format.
    with stand_in(rundir):
        out = invoke("ADD", sock_config(rundir, "1.1.0", prevResult=BRIDGE_RESULT))
    assert out.rc == 0, out
    assert out.json == {**BRIDGE_RESULT, "cniVersion": "1.1.0"}


def test_add_percent_encodes_an_unusual_interface_name(rundir: str) -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.1.2/24"}]}
    with stand_in(rundir) as daemon:
        assert invoke("ADD", sock_config(rundir, prevResult=prev), CNI_IFNAME="e%t@hü").rc == 0
    assert daemon.seen[0].path == "/v1/attachments/net1/ctr1/e%25t%40h%C3%BC"


def test_add_with_no_ip_for_the_interface_passes_through_without_the_daemon(rundir: str) -> None:
    prev = {**BRIDGE_RESULT, "ips": []}
    out = invoke("ADD", sock_config(rundir, prevResult=prev))  # no daemon at all
    assert out.rc == 0, out
    assert out.json == {k: v for k, v in prev.items() if k != "ips"}  # an empty list is omitted
    assert "nothing to masquerade" in out.stderr


def test_add_waits_for_a_daemon_that_is_not_ready_yet(rundir: str) -> None:
    def answer(seen: Seen) -> Answer:
        if len([s for s in daemon.seen if s.method == "PUT"]) < 3:
            return 503, {"error": "starting"}
        return 200, {}

    with stand_in(rundir, answer) as daemon:
        out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT, daemonWaitSeconds=5))
    assert out.rc == 0, out
    assert len(daemon.seen) == 3


def test_add_gives_up_with_code_11_after_the_wait_when_the_daemon_is_absent(rundir: str) -> None:
    started = time.monotonic()
    out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT, daemonWaitSeconds=0.4))
    elapsed = time.monotonic() - started
    obj = out.error(11)
    assert "after waiting 0.4s" in obj["msg"]
    assert "no such file or directory" in obj["details"]
    assert elapsed >= 0.4


def test_add_gives_up_with_code_11_when_the_daemon_stays_unready(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (503, {"error": "first sync pending"})) as daemon:
        out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT, daemonWaitSeconds=0.3))
    obj = out.error(11)
    assert "first sync pending" in obj["details"]
    assert len(daemon.seen) >= 2


def test_a_refused_socket_counts_as_absent(rundir: str) -> None:
    path = f"{rundir}/masqd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)  # bound but never listening: connect() is refused
        out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT, daemonWaitSeconds=0.2))
    assert "connection refused" in out.error(11)["details"]


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, 7), (422, 7), (403, 999), (500, 11), (507, 11), (418, 999)],
)
def test_add_maps_daemon_refusals_to_cni_codes(rundir: str, status: int, code: int) -> None:
    body = {"error": "the daemon says no", "details": [{"loc": "ips.0", "msg": "bad"}]}
    with stand_in(rundir, lambda seen: (status, body)) as daemon:
        out = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT))
    obj = out.error(code)
    assert "the daemon says no" in obj["details"]
    assert len(daemon.seen) == 1  # only "not ready" is retried


def test_add_drops_a_spooled_delete_of_the_same_attachment(rundir: str) -> None:
    # Entries written as docs/cni.md describes them (tests/spool_entries.py): the plugin
    # finds the one of its key by name.
    spool_dir = f"{rundir}/spool"
    write_entry(spool_dir, "net1", "ctr1", "eth0")
    write_entry(spool_dir, "net1", "other", "eth0")
    with stand_in(rundir):
        assert invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT)).rc == 0
    assert [e.container_id for e in spool.read_spooled_deletes(spool_dir).entries] == ["other"]


@pytest.mark.parametrize("status", [200, 404])
def test_del_succeeds_silently_when_the_daemon_answers(rundir: str, status: int) -> None:
    with stand_in(rundir, lambda seen: (status, {"deleted": status == 200})) as daemon:
        out = invoke("DEL", sock_config(rundir, prevResult=BRIDGE_RESULT))
    assert (out.rc, out.stdout) == (0, "")
    assert [(s.method, s.path) for s in daemon.seen] == [
        ("DELETE", "/v1/attachments/net1/ctr1/eth0")
    ]
    assert spool_files(rundir) == []


def test_del_spools_at_once_when_the_daemon_is_absent(rundir: str) -> None:
    started = time.monotonic()
    out = invoke("DEL", sock_config(rundir, daemonWaitSeconds=10), CNI_NETNS=None)
    assert time.monotonic() - started < 5.0  # far below daemonWaitSeconds: no waiting
    assert (out.rc, out.stdout) == (0, "")
    assert "DEL spooled" in out.stderr
    (entry,) = spool.read_spooled_deletes(f"{rundir}/spool").entries
    assert entry.key == ("net1", "ctr1", "eth0")
    assert abs(entry.spooled_at - time.time()) < 60


@pytest.mark.parametrize("ifname", VECTORS["ifname"]["valid"])
def test_what_the_plugin_spools_the_daemon_reads_back(rundir: str, ifname: str) -> None:
    """The format in both directions: the Go writer's file names and JSON are what the Python
    reader accepts, for every interface name the two sides agree on."""
    out = invoke("DEL", sock_config(rundir), CNI_IFNAME=ifname, CNI_NETNS=None)
    assert (out.rc, out.stdout) == (0, ""), out
    scan = spool.read_spooled_deletes(f"{rundir}/spool")
    assert scan.problems == ()
    assert [e.key for e in scan.entries] == [("net1", "ctr1", ifname)]


@pytest.mark.parametrize("status", [503, 500])
def test_del_spools_when_the_daemon_cannot_apply_it(rundir: str, status: int) -> None:
    with stand_in(rundir, lambda seen: (status, {"error": "kernel busy"})):
        out = invoke("DEL", sock_config(rundir))
    assert out.rc == 0
    assert len(spool_files(rundir)) == 1


@pytest.mark.slow
def test_del_spools_when_the_daemon_never_answers(rundir: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(f"{rundir}/masqd.sock")
        s.listen(8)  # connections queue, nobody answers
        out = invoke("DEL", sock_config(rundir))
    assert out.rc == 0, out
    assert "no answer within 3s" in out.stderr
    assert len(spool_files(rundir)) == 1


def test_del_of_a_key_the_daemon_rejects_is_a_no_op(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (400, {"error": "container_id too long"})):
        out = invoke("DEL", sock_config(rundir))
    assert out.rc == 0
    assert spool_files(rundir) == []


def test_del_of_a_key_masqd_cannot_hold_asks_nothing(rundir: str) -> None:
    with stand_in(rundir) as daemon:
        out = invoke("DEL", sock_config(rundir), CNI_IFNAME='e"x')
    assert (out.rc, out.stdout) == (0, ""), out
    assert "nothing to do" in out.stderr
    assert daemon.seen == []
    assert spool_files(rundir) == []


def test_del_refused_for_permissions_is_an_error_not_spooled(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (403, {"error": "uid 1000 is not allowed"})):
        obj = invoke("DEL", sock_config(rundir)).error(999)
    assert "uid 1000" in obj["details"]
    assert spool_files(rundir) == []


def test_del_fails_with_code_11_when_the_spool_is_full(rundir: str) -> None:
    os.mkdir(f"{rundir}/spool", 0o700)
    for i in range(4096):  # entries are counted by name
        Path(f"{rundir}/spool/del-{i:032x}.json").touch()
    obj = invoke("DEL", sock_config(rundir)).error(11)
    assert "spool is full" in obj["msg"]


def test_del_fails_with_code_11_when_it_cannot_be_spooled(rundir: str) -> None:
    Path(f"{rundir}/spool").write_text("a file where the spool directory belongs")
    obj = invoke("DEL", sock_config(rundir)).error(11)
    assert obj["msg"] == "masqd is down and the DEL could not be spooled"


def test_check_passes_when_the_daemon_holds_the_same_ips(rundir: str) -> None:
    held = {"ips": ["2001:db8:10::2/64", "198.18.10.2/24"]}
    prev = json.loads(json.dumps(BRIDGE_RESULT))
    prev["ips"][1]["address"] = "2001:DB8:10:0::2/64"  # same address, other spelling
    with stand_in(rundir, lambda seen: (200, held)) as daemon:
        out = invoke("CHECK", sock_config(rundir, prevResult=prev))
    assert (out.rc, out.stdout) == (0, ""), out
    assert [(s.method, s.path) for s in daemon.seen] == [("GET", "/v1/attachments/net1/ctr1/eth0")]


def test_check_fails_when_the_daemon_does_not_hold_the_attachment(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (404, {"error": "no attachment"})):
        obj = invoke("CHECK", sock_config(rundir, prevResult=BRIDGE_RESULT)).error(999)
    assert obj["msg"] == "masqd holds no attachment net1/ctr1/eth0"


def test_check_fails_when_the_daemon_holds_other_ips(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (200, {"ips": ["198.18.10.9/24"]})):
        obj = invoke("CHECK", sock_config(rundir, prevResult=BRIDGE_RESULT)).error(999)
    assert "other IPs" in obj["msg"]
    assert "198.18.10.9/24" in obj["details"]


@pytest.mark.parametrize("answer", [{"ips": "198.18.10.2/24"}, {"ips": [5]}, {}, ["x"]])
def test_check_of_a_malformed_answer_is_code_999(rundir: str, answer: Any) -> None:
    with stand_in(rundir, lambda seen: (200, answer)):
        obj = invoke("CHECK", sock_config(rundir, prevResult=BRIDGE_RESULT)).error(999)
    assert obj["msg"] == "unexpected answer from masqd"


def test_check_of_an_interface_without_ips_expects_nothing_held(rundir: str) -> None:
    prev = {**BRIDGE_RESULT, "ips": []}
    with stand_in(rundir, lambda seen: (404, {"error": "no attachment"})):
        assert invoke("CHECK", sock_config(rundir, prevResult=prev)).rc == 0


VALID_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


@pytest.mark.parametrize("key", VALID_KEYS)
def test_gc_posts_the_valid_attachments_under_the_daemon_names(rundir: str, key: str) -> None:
    valid = [
        {"containerID": "c1", "ifname": "eth0", "extra": "kept out"},
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "bad id", "ifname": "eth0"},  # the CNI spec forbids these names,
        {"containerID": "c2", "ifname": "e/th"},
        {"containerID": "c3", "ifname": 'e"x'},  # and masqd cannot hold these:
        {"containerID": "c4", "ifname": "eth0~"},  # each would fail the whole GC
        {"containerID": "c" * 129, "ifname": "eth0"},
        {"containerID": "c2", "ifname": "net1"},
    ]
    removed = {"network": "net1", "removed": [{"container_id": "c9"}]}
    with stand_in(rundir, lambda seen: (200, removed)) as daemon:
        out = invoke("GC", sock_config(rundir, "1.1.0", **{key: valid}), CNI_CONTAINERID=None)
    assert (out.rc, out.stdout) == (0, ""), out
    (seen,) = daemon.seen
    assert (seen.method, seen.path) == ("POST", "/v1/networks/net1/gc")
    assert seen.body == {
        "valid_attachments": [
            {"container_id": "c1", "ifname": "eth0"},
            {"container_id": "c2", "ifname": "net1"},
        ]
    }
    assert "1 removed" in out.stderr


def test_gc_reads_null_as_libcni_writes_an_empty_list(rundir: str) -> None:
    with stand_in(rundir, lambda seen: (200, {"removed": []})) as daemon:
        out = invoke("GC", sock_config(rundir, "1.1.0", **{VALID_KEYS[0]: None}))
    assert out.rc == 0, out
    assert daemon.seen[0].body == {"valid_attachments": []}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {VALID_KEYS[0]: {}},
        {VALID_KEYS[0]: [{"containerID": "c1"}]},
        {VALID_KEYS[0]: ["c1"]},
    ],
)
def test_gc_without_a_usable_valid_list_is_code_7_never_an_empty_list(
    rundir: str, extra: dict[str, Any]
) -> None:
    with stand_in(rundir) as daemon:
        invoke("GC", sock_config(rundir, "1.1.0", **extra)).error(7)
    assert daemon.seen == []


@pytest.mark.parametrize(
    ("answer", "code", "msg"),
    [
        ((200, {"ready": True}), 0, ""),
        ((503, {"ready": False, "reason": "first sync"}), 50, "masqd is not ready"),
        (None, 50, "masqd is not available"),
    ],
)
def test_status_is_zero_when_ready_and_code_50_otherwise(
    rundir: str, answer: Answer | None, code: int, msg: str
) -> None:
    conf = sock_config(rundir, "1.1.0")
    with contextlib.ExitStack() as stack:
        if answer is not None:
            daemon = stack.enter_context(stand_in(rundir, lambda seen: answer))
        out = invoke("STATUS", conf, CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None)
    if code == 0:
        assert (out.rc, out.stdout) == (0, ""), out
        assert [(s.method, s.path) for s in daemon.seen] == [("GET", "/readyz")]
    else:
        assert out.error(code)["msg"] == msg


def _raw(status_line: str, headers: list[str], body: bytes) -> bytes:
    return (status_line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


def _chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    # The first chunk carries an extension, which a client must ignore.
    encoded = [
        f"{len(p):x}{';x=y' if n == 0 else ''}\r\n".encode() + p + b"\r\n"
        for n, p in enumerate(pieces)
    ]
    return b"".join(encoded) + b"0\r\n\r\n"


HELD = b'{"ips": ["198.18.10.2/24", "2001:db8:10::2/64"]}'


@pytest.mark.parametrize(
    "reply",
    [
        _raw("HTTP/1.1 200 OK", ["Transfer-Encoding: chunked"], _chunked(HELD, 7)),
        _raw("HTTP/1.1 200 OK", ["Connection: close"], HELD),
        _raw("HTTP/1.0 200 OK", [f"content-length: {len(HELD)}"], HELD + b"trailing garbage"),
    ],
    ids=["chunked", "close-delimited", "content-length"],
)
def test_the_http_client_reads_chunked_close_delimited_and_sized_answers(
    rundir: str, reply: bytes
) -> None:
    with stand_in(rundir, lambda seen: reply):
        out = invoke("CHECK", sock_config(rundir, prevResult=BRIDGE_RESULT))
    assert out.rc == 0, out


def test_an_answer_that_is_not_http_is_code_11(rundir: str) -> None:
    with stand_in(rundir, lambda seen: b"SSH-2.0-OpenSSH\r\n\r\n"):
        obj = invoke("ADD", sock_config(rundir, prevResult=BRIDGE_RESULT)).error(11)
    assert "not an HTTP answer" in obj["details"]


# ---- the real thing: bridge, host-local, masqd-cni and masqd in namespaces -----------------

OUTSIDE4, OUTSIDE6 = "198.19.0.2", "2001:db8:ff::2"
HOST_OUTSIDE4, HOST_OUTSIDE6 = "198.19.0.1", "2001:db8:ff::1"


def require_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables)")
    for path in (BRIDGE, f"{CNI_BIN}/host-local", str(MASQD)):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: `make test-tools` builds it")


class Masqd(MasqdProcess):
    """The real daemon (tests/daemon.py), with the views of it these tests read."""

    @property
    def spool_dir(self) -> str:
        return spool.spool_dir_for(self.socket)

    def get(self, network: str, container_id: str, ifname: str = "eth0") -> int:
        return self.client.get(f"/v1/attachments/{network}/{container_id}/{ifname}").status

    def kernel_sources(self) -> set[str]:
        """The addresses the kernel masquerades: the elements of the sources sets."""
        return masqueraded(self.ns)


@dataclass
class Container:
    ns: str
    container_id: str

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.ns}"


@dataclass
class Node:
    """A host namespace running masqd and a bridge network, and an outside namespace."""

    host: str
    workdir: str
    masqd: Masqd
    network: str = "mqnet"
    bridge_name: str = "mqbr0"
    subnet: int = 20

    def bridge_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": self.network,
            "type": "bridge",
            "bridge": self.bridge_name,
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "dataDir": f"{self.workdir}/ipam",
                "ranges": [
                    [{"subnet": f"198.18.{self.subnet}.0/24"}],
                    [{"subnet": f"2001:db8:{self.subnet}::/64"}],
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        }

    def plugin_config(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": self.network,
            "type": "masqd-cni",
            "socket": self.masqd.socket,
        }
        conf.update(extra)
        return conf

    def bridge(self, command: str, ctr: Container) -> Outcome:
        env = {
            "CNI_CONTAINERID": ctr.container_id,
            "CNI_NETNS": ctr.netns_path,
            "CNI_IFNAME": "eth0",
        }
        return run_in(self.host, [BRIDGE], command, self.bridge_config(), env)

    def plugin(self, command: str, conf: dict[str, Any], **env: str) -> Outcome:
        return run_in(self.host, PLUGIN, command, conf, env)

    def plugin_for(self, command: str, ctr: Container, conf: dict[str, Any]) -> Outcome:
        env = {
            "CNI_CONTAINERID": ctr.container_id,
            "CNI_NETNS": ctr.netns_path,
            "CNI_IFNAME": "eth0",
        }
        return self.plugin(command, conf, **env)

    def attach(self, ctr: Container) -> dict[str, Any]:
        """bridge ADD then masqd-cni ADD, as a runtime runs the conflist; the chain's result."""
        bridged = self.bridge("ADD", ctr)
        assert bridged.rc == 0, bridged
        prev: dict[str, Any] = bridged.json
        added = self.plugin_for("ADD", ctr, self.plugin_config(prevResult=prev))
        assert added.rc == 0, added
        assert added.json == prev  # a chained plugin passes the result on unchanged
        return prev

    def detach(self, ctr: Container, prev: dict[str, Any]) -> None:
        """DEL in reverse order: masqd-cni, then bridge."""
        deleted = self.plugin_for("DEL", ctr, self.plugin_config(prevResult=prev))
        assert (deleted.rc, deleted.stdout) == (0, ""), deleted
        assert self.bridge("DEL", ctr).rc == 0


@contextlib.contextmanager
def kernel_host(workdir: str) -> Iterator[tuple[str, Masqd]]:
    """A host namespace with masqd running in it."""
    with netns("host") as host:
        # No duplicate address detection: addresses are usable at once, probes need no wait.
        ns_run(host, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        enable_forwarding(host)
        masqd = Masqd(host, Path(workdir))
        masqd.start()
        try:
            yield host, masqd
        finally:
            masqd.stop()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    require_kernel()
    workdir = short_tmpdir()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        host, masqd = stack.enter_context(kernel_host(workdir))
        outside = stack.enter_context(netns("out"))
        veth(
            Endpoint(host, "uplink", f"{HOST_OUTSIDE4}/24", f"{HOST_OUTSIDE6}/64"),
            Endpoint(outside, "eth0", f"{OUTSIDE4}/24", f"{OUTSIDE6}/64"),
        )
        # The outside routes the containers' ranges back through the host, so a connection
        # that is not masqueraded works too and shows the container's own address.
        ns_run(outside, "ip", "route", "add", "198.18.0.0/16", "via", HOST_OUTSIDE4)
        ns_run(outside, "ip", "-6", "route", "add", "2001:db8::/40", "via", HOST_OUTSIDE6)
        server = start_echo_server(outside)
        stack.callback(server.wait)
        stack.callback(server.kill)
        yield Node(host=host, workdir=workdir, masqd=masqd)


_container_ids = itertools.count(1)


@contextlib.contextmanager
def containers(count: int) -> Iterator[list[Container]]:
    with contextlib.ExitStack() as stack:
        made = []
        for _ in range(count):
            ns = stack.enter_context(netns("ctr"))
            ns_run(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            made.append(Container(ns, f"ctr-{os.getpid()}-{next(_container_ids)}"))
        yield made


def source_seen(ctr: Container, dst: str) -> str | None:
    """The source address the outside echo server saw for a connection from `ctr`."""
    for _ in range(3):  # the first packet may wait for neighbour discovery
        seen = probe(ctr.ns, dst, timeout=2.0)
        if seen is not None:
            return seen
    return None


def own_ips(prev: dict[str, Any]) -> tuple[str, str]:
    v4, v6 = (ip["address"].split("/")[0] for ip in prev["ips"])
    return v4, v6


@pytest.mark.kernel
def test_bridge_then_masqd_cni_masquerades_real_connections_of_each_container(node: Node) -> None:
    with containers(4) as ctrs:
        *chained, control = ctrs
        prevs = [node.attach(ctr) for ctr in chained]
        bridged_only = node.bridge("ADD", control)  # the same network without masqd-cni
        assert bridged_only.rc == 0, bridged_only
        for ctr, prev in zip(chained, prevs, strict=True):
            v4, v6 = own_ips(prev)
            assert node.masqd.get(node.network, ctr.container_id) == 200
            assert {v4, v6} <= node.masqd.kernel_sources()
            assert source_seen(ctr, OUTSIDE4) == HOST_OUTSIDE4
            assert source_seen(ctr, OUTSIDE6) == HOST_OUTSIDE6
        assert source_seen(control, OUTSIDE4) == own_ips(bridged_only.json)[0]
        assert source_seen(control, OUTSIDE6) == own_ips(bridged_only.json)[1]
        for ctr, prev in zip(chained, prevs, strict=True):
            node.detach(ctr, prev)
        assert node.bridge("DEL", control).rc == 0


@pytest.mark.kernel
def test_check_passes_after_add_and_fails_for_an_unknown_container(node: Node) -> None:
    with containers(1) as (ctr,):
        prev = node.attach(ctr)
        checked = node.plugin_for("CHECK", ctr, node.plugin_config(prevResult=prev))
        assert (checked.rc, checked.stdout) == (0, ""), checked
        unknown = Container(ctr.ns, "never-added")
        obj = node.plugin_for("CHECK", unknown, node.plugin_config(prevResult=prev)).error(999)
        assert obj["msg"] == f"masqd holds no attachment {node.network}/never-added/eth0"
        node.detach(ctr, prev)


@pytest.mark.kernel
def test_del_twice_succeeds_and_ends_the_masquerade(node: Node) -> None:
    with containers(1) as (ctr,):
        prev = node.attach(ctr)
        v4, v6 = own_ips(prev)
        assert source_seen(ctr, OUTSIDE4) == HOST_OUTSIDE4
        conf = node.plugin_config(prevResult=prev)
        for _ in range(2):
            deleted = node.plugin_for("DEL", ctr, conf)
            assert (deleted.rc, deleted.stdout) == (0, ""), deleted
        assert node.masqd.get(node.network, ctr.container_id) == 404
        assert {v4, v6}.isdisjoint(node.masqd.kernel_sources())
        assert source_seen(ctr, OUTSIDE4) == v4  # no longer masqueraded
        assert node.bridge("DEL", ctr).rc == 0
        assert node.plugin_for("DEL", ctr, conf).rc == 0  # after bridge's DEL too


@pytest.mark.kernel
def test_del_without_prev_result_or_netns_succeeds(node: Node) -> None:
    with containers(1) as (ctr,):
        prev = node.attach(ctr)
        bare = node.plugin_config()  # no prevResult
        deleted = node.plugin("DEL", bare, CNI_CONTAINERID=ctr.container_id, CNI_IFNAME="eth0")
        assert (deleted.rc, deleted.stdout) == (0, ""), deleted
        assert node.masqd.get(node.network, ctr.container_id) == 404
        assert not set(own_ips(prev)) & node.masqd.kernel_sources()
        never = node.plugin("DEL", bare, CNI_CONTAINERID="never-added", CNI_IFNAME="eth0")
        assert never.rc == 0, never
        assert node.bridge("DEL", ctr).rc == 0


def synthetic_result(address: str, version: str = "1.1.0") -> dict[str, Any]:
    """A result as an interface plugin would pass it on (for tests that need no real link)."""
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/none"}],
        "ips": [{"interface": 0, "address": address}],
    }


@pytest.mark.kernel
def test_gc_removes_exactly_the_attachments_not_listed(node: Node) -> None:
    def add(network: str, cid: str, address: str) -> None:
        conf = {
            **node.plugin_config("1.1.0", prevResult=synthetic_result(address)),
            "name": network,
        }
        out = node.plugin(
            "ADD", conf, CNI_CONTAINERID=cid, CNI_NETNS="/var/run/netns/none", CNI_IFNAME="eth0"
        )
        assert out.rc == 0, out

    def gc(key: str, valid: list[str]) -> None:
        entries = [{"containerID": cid, "ifname": "eth0"} for cid in valid]
        conf = {**node.plugin_config("1.1.0"), "name": "gcnet", key: entries}
        out = node.plugin("GC", conf)
        assert (out.rc, out.stdout) == (0, ""), out

    for k in range(1, 5):
        add("gcnet", f"gc{k}", f"198.18.200.{k}/24")
    add("othernet", "gc1", "198.18.201.1/24")  # same container ID, another network

    gc("cni.dev/valid-attachments", ["gc1", "gc3", "gc9"])
    held = {cid: node.masqd.get("gcnet", cid) for cid in ("gc1", "gc2", "gc3", "gc4")}
    assert held == {"gc1": 200, "gc2": 404, "gc3": 200, "gc4": 404}
    assert node.masqd.get("othernet", "gc1") == 200
    sources = node.masqd.kernel_sources()
    assert {"198.18.200.1", "198.18.200.3", "198.18.201.1"} <= sources
    assert {"198.18.200.2", "198.18.200.4"}.isdisjoint(sources)

    gc("cni.dev/attachments", ["gc1"])  # the key's older name
    assert node.masqd.get("gcnet", "gc3") == 404
    gc("cni.dev/valid-attachments", [])
    assert node.masqd.get("gcnet", "gc1") == 404
    assert node.masqd.get("othernet", "gc1") == 200
    conf = {**node.plugin_config("1.1.0"), "name": "othernet"}
    assert node.plugin("DEL", conf, CNI_CONTAINERID="gc1", CNI_IFNAME="eth0").rc == 0


@pytest.mark.kernel
def test_status_is_0_with_the_daemon_up_and_50_with_it_down(node: Node) -> None:
    up = node.plugin("STATUS", node.plugin_config("1.1.0"))
    assert (up.rc, up.stdout) == (0, ""), up
    down = node.plugin_config("1.1.0", socket=f"{node.workdir}/elsewhere/masqd.sock")
    assert node.plugin("STATUS", down).error(50)["msg"] == "masqd is not available"


@pytest.mark.kernel
def test_daemon_down_add_fails_with_11_and_del_is_spooled_then_applied(rundir: str) -> None:
    require_kernel()
    with kernel_host(rundir) as (host, masqd):
        node = Node(host=host, workdir=rundir, masqd=masqd, network="downnet")

        def run(command: str, cid: str, **extra: Any) -> Outcome:
            conf = node.plugin_config("1.1.0", daemonWaitSeconds=1, **extra)
            return node.plugin(
                command,
                conf,
                CNI_CONTAINERID=cid,
                CNI_IFNAME="eth0",
                CNI_NETNS="/var/run/netns/none",
            )

        for cid, address in (("a", "198.18.210.1/24"), ("b", "198.18.210.2/24")):
            assert run("ADD", cid, prevResult=synthetic_result(address)).rc == 0
        masqd.stop()

        started = time.monotonic()
        refused = run("ADD", "c", prevResult=synthetic_result("198.18.210.3/24"))
        assert time.monotonic() - started >= 1.0
        assert "after waiting 1s" in refused.error(11)["msg"]

        deleted = run("DEL", "a")  # spooled at once, without waiting (a stand-in test times it)
        assert (deleted.rc, deleted.stdout) == (0, ""), deleted
        assert len(spool.read_spooled_deletes(masqd.spool_dir).entries) == 1
        assert run("STATUS", "-").error(50)
        # The table stays while the daemon is away: a is still masqueraded.
        assert "198.18.210.1" in masqd.kernel_sources()

        masqd.start()  # applies the spool before it reports ready
        assert masqd.get("downnet", "a") == 404
        assert masqd.get("downnet", "b") == 200
        sources = masqd.kernel_sources()
        assert "198.18.210.1" not in sources and "198.18.210.2" in sources
        wait_for(lambda: not spool.read_spooled_deletes(masqd.spool_dir).entries, "spool emptied")

        # A DEL spooled while the daemon runs is applied too.
        write_entry(masqd.spool_dir, "downnet", "b", "eth0")
        wait_for(lambda: masqd.get("downnet", "b") == 404, "spooled DEL applied while running")
        wait_for(lambda: not os.listdir(masqd.spool_dir), "spool emptied")
        assert "198.18.210.2" not in masqd.kernel_sources()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.05)


EXAMPLE_CONFLIST = REPO / "deploy" / "cni" / "masqd.conflist"


def test_the_example_conflist_chains_bridge_without_ipmasq_then_masqd_cni() -> None:
    conflist = json.loads(EXAMPLE_CONFLIST.read_text())
    assert conflist["cniVersion"] in SUPPORTED_VERSIONS
    bridge, masq = conflist["plugins"]
    assert (bridge["type"], bridge["ipMasq"], bridge["ipam"]["type"]) == (
        "bridge",
        False,
        "host-local",
    )
    assert masq == {
        "type": "masqd-cni",
        "socket": DEFAULT_SOCKET,
        "daemonWaitSeconds": 10,
    }


@pytest.mark.kernel
def test_the_example_conflist_works_with_the_installed_plugins(node: Node) -> None:
    conflist = json.loads(EXAMPLE_CONFLIST.read_text())
    common = {"cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    bridge_conf = {**common, **conflist["plugins"][0]}
    masq_conf = {**common, **conflist["plugins"][1]}
    # Only what must differ on a test machine: a bridge of its own, addresses from the test
    # ranges, IPAM state in the test's directory, the test daemon's socket.
    bridge_conf["bridge"] = "mqbr1"
    bridge_conf["ipam"] = {
        **bridge_conf["ipam"],
        "dataDir": f"{node.workdir}/ipam",
        "ranges": [[{"subnet": "198.18.30.0/24"}], [{"subnet": "2001:db8:30::/64"}]],
    }
    masq_conf["socket"] = node.masqd.socket
    with containers(1) as (ctr,):
        env = {
            "CNI_CONTAINERID": ctr.container_id,
            "CNI_NETNS": ctr.netns_path,
            "CNI_IFNAME": "eth0",
        }
        bridged = run_in(node.host, [BRIDGE], "ADD", bridge_conf, env)
        assert bridged.rc == 0, bridged
        chained = {**masq_conf, "prevResult": bridged.json}
        added = run_in(node.host, PLUGIN, "ADD", chained, env)
        assert added.rc == 0, added
        assert added.json == bridged.json
        assert source_seen(ctr, OUTSIDE4) == HOST_OUTSIDE4
        assert source_seen(ctr, OUTSIDE6) == HOST_OUTSIDE6
        assert run_in(node.host, PLUGIN, "CHECK", chained, env).rc == 0
        assert run_in(node.host, PLUGIN, "DEL", chained, env).rc == 0
        assert run_in(node.host, [BRIDGE], "DEL", bridge_conf, env).rc == 0


# ---- through libcni: the CNI project's reference runtime ----------------------------------


def cnitool_container_id(netns_path: str) -> str:
    """The container ID cnitool gives a namespace (it hashes the path)."""
    return "cnitool-" + hashlib.sha512(os.path.abspath(netns_path).encode()).hexdigest()[:20]


@dataclass
class Cnitool:
    node: Node
    confdir: str

    def __call__(self, command: str, network: str, netns_path: str) -> Outcome:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NETCONFPATH": self.confdir,
            # libcni finds each plugin by its type in CNI_PATH: upstream's and masqd-cni.
            "CNI_PATH": f"{CNI_BIN}:{PLUGIN_PATH.parent}",
        }
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node.host, CNITOOL, command, network, netns_path],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        return Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
def cnitool(node: Node) -> Iterator[Cnitool]:
    if not os.access(CNITOOL, os.X_OK):
        pytest.fail(f"{CNITOOL} is missing: `make test-tools` builds it")
    confdir = tempfile.mkdtemp(prefix="mqcnitool-", dir=node.workdir)
    tag = f"{os.getpid()}"
    bridge = {
        "type": "bridge",
        "bridge": "mqbr3",
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "dataDir": f"{node.workdir}/ipam-cnitool",
            "ranges": [[{"subnet": "198.18.40.0/24"}], [{"subnet": "2001:db8:40::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        },
    }
    masq = {"type": "masqd-cni", "socket": node.masqd.socket, "daemonWaitSeconds": 5}
    lists = {
        "mqtool": [bridge, masq],
        # The same chain with masqd-cni pointed at a socket nobody serves.
        "mqtool-away": [
            {
                **bridge,
                "bridge": "mqbr4",
                "ipam": {**bridge["ipam"], "ranges": [[{"subnet": "198.18.41.0/24"}]]},
            },
            {**masq, "socket": f"{node.workdir}/away/masqd.sock"},
        ],
        "mqlo": [{"type": "loopback"}],
    }
    for name, plugins in lists.items():
        conflist = {"cniVersion": "1.1.0", "name": f"{name}-{tag}", "plugins": plugins}
        Path(confdir, f"{name}.conflist").write_text(json.dumps(conflist))
    try:
        yield Cnitool(node, confdir)
    finally:
        shutil.rmtree(confdir, ignore_errors=True)


@pytest.mark.kernel
def test_libcni_runs_the_chain_add_check_status_del_and_gc(node: Node, cnitool: Cnitool) -> None:
    net, lo, away = (f"{n}-{os.getpid()}" for n in ("mqtool", "mqlo", "mqtool-away"))
    with containers(2) as (first, second):
        for ctr in (first, second):
            looped = cnitool("add", lo, ctr.netns_path)
            assert looped.rc == 0, looped
            assert "UP" in ns_run(ctr.ns, "ip", "-o", "link", "show", "lo").stdout
            added = cnitool("add", net, ctr.netns_path)
            assert added.rc == 0, added
            result = added.json
            assert result["cniVersion"] == "1.1.0"
            cid = cnitool_container_id(ctr.netns_path)
            assert node.masqd.get(net, cid) == 200
            v4, v6 = own_ips(result)
            assert {v4, v6} <= node.masqd.kernel_sources()
        assert source_seen(first, OUTSIDE4) == HOST_OUTSIDE4
        assert source_seen(first, OUTSIDE6) == HOST_OUTSIDE6

        checked = cnitool("check", net, first.netns_path)
        assert checked.rc == 0, checked
        status = cnitool("status", net, first.netns_path)
        assert status.rc == 0, status
        down = cnitool("status", away, first.netns_path)
        assert down.rc == 1 and "masqd is not available" in down.stderr, down

        deleted = cnitool("del", net, first.netns_path)
        assert deleted.rc == 0, deleted
        assert node.masqd.get(net, cnitool_container_id(first.netns_path)) == 404
        assert source_seen(first, OUTSIDE4) is None  # bridge's veth is gone too
        assert cnitool("check", net, second.netns_path).rc == 0  # the other one is untouched

        # cnitool's gc passes no valid list: libcni first DELs every attachment it has cached
        # for the network, then sends GC without cni.dev/valid-attachments, which masqd-cni
        # refuses (code 7) rather than read as "none are valid".
        collected = cnitool("gc", net, second.netns_path)
        assert node.masqd.get(net, cnitool_container_id(second.netns_path)) == 404
        assert collected.rc == 1
        assert "GC needs cni.dev/valid-attachments" in collected.stderr, collected
        for ctr in (first, second):
            assert cnitool("del", lo, ctr.netns_path).rc == 0

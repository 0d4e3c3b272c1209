"""Who may use the socket: file modes first, then the daemon's peer-credential check.

The clients here are child processes that drop to another uid/gid *before* connecting
(SO_PEERCRED records the credentials of the connect() call), run the system Python with the
standard library only, and print the status and body they got.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from masqd.state import spool
from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, masqctl, masqueraded

pytestmark = pytest.mark.kernel

NOBODY = 65534
OTHER_UID = 65533
OTHER_GID = 65533
SYSTEM_PYTHON = "/usr/bin/python3"

_CLIENT = r"""
import json, socket, sys
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[4])
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno}))
    sys.exit(0)
head = f"{method} {path} HTTP/1.1\r\nHost: masqd\r\nConnection: close\r\n"
if body:
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
s.sendall(head.encode() + b"\r\n" + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
status_line, _, rest = data.partition(b"\r\n")
body = rest.partition(b"\r\n\r\n")[2].decode()
print(json.dumps({"status": int(status_line.split()[1]), "body": body}))
"""


@dataclass(frozen=True)
class Answer:
    status: int | None
    body: str = ""
    connect_errno: int | None = None

    @property
    def json(self) -> object:
        return json.loads(self.body)


def request_as(
    daemon: MasqdProcess,
    method: str,
    path: str,
    body: object = None,
    *,
    uid: int,
    gid: int,
    groups: Sequence[int] = (),
) -> Answer:
    payload = "" if body is None else json.dumps(body)
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", _CLIENT, method, path, payload, daemon.socket],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    out = json.loads(proc.stdout)
    if "connect_error" in out:
        return Answer(None, connect_errno=out["connect_error"])
    return Answer(out["status"], out["body"])


def open_socket_to_everyone(daemon: MasqdProcess) -> None:
    """Undo the file permissions, so only the daemon's own check stands in the way."""
    Path(daemon.socket).parent.chmod(0o755)
    Path(daemon.socket).chmod(0o666)


PUT_PATH = "/v1/attachments/net/ctr1/eth0"
PUT_BODY = {"ips": ["198.18.7.2/24"]}


def test_socket_is_0660_in_a_0750_directory_it_created(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(start=False)
    socket_path = daemon.workdir / "run" / "masqd" / "masqd.sock"
    daemon.extra_args += ["--socket", str(socket_path)]  # the last --socket wins
    daemon.start(wait=False)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
        assert time.monotonic() < deadline, "no socket after 10s"
        time.sleep(0.01)
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o750


def test_nobody_without_file_access_cannot_even_connect(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    answer = request_as(daemon, "GET", "/healthz", uid=NOBODY, gid=NOBODY)
    assert answer.status is None
    assert answer.connect_errno == 13  # EACCES: the socket's mode stops it first


def test_non_root_uid_gets_403_and_changes_nothing(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    open_socket_to_everyone(daemon)
    for method, path, body in (
        ("PUT", PUT_PATH, PUT_BODY),
        ("GET", "/v1/attachments", None),
        ("GET", "/v1/status", None),
        ("DELETE", PUT_PATH, None),
        ("POST", "/v1/networks/net/gc", {"valid_attachments": []}),
    ):
        answer = request_as(daemon, method, path, body, uid=NOBODY, gid=NOBODY)
        assert answer.status == 403, (method, path, answer)
        error = answer.json
        assert isinstance(error, dict) and "not allowed" in error["error"]
    assert daemon.client.attachments() == []


def test_root_gets_through(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    open_socket_to_everyone(daemon)
    answer = request_as(daemon, "PUT", PUT_PATH, PUT_BODY, uid=0, gid=0)
    assert answer.status == 200, answer
    assert [a["container_id"] for a in daemon.client.attachments()] == ["ctr1"]


def test_allow_uid_admits_that_uid_only(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(extra_args=["--allow-uid", str(NOBODY)])
    open_socket_to_everyone(daemon)
    assert request_as(daemon, "PUT", PUT_PATH, PUT_BODY, uid=NOBODY, gid=NOBODY).status == 200
    refused = request_as(daemon, "GET", "/v1/attachments", uid=OTHER_UID, gid=OTHER_GID)
    assert refused.status == 403
    assert len(daemon.client.attachments()) == 1


def test_allow_gid_with_a_group_owned_socket(daemon_factory: DaemonFactory) -> None:
    """The deployment the modes are for: the socket's group may connect, and is allowed."""
    daemon = daemon_factory(extra_args=["--allow-gid", str(NOBODY)])
    Path(daemon.socket).parent.chmod(0o755)
    os.chown(daemon.socket, 0, NOBODY)
    answer = request_as(daemon, "PUT", PUT_PATH, PUT_BODY, uid=OTHER_UID, gid=NOBODY)
    assert answer.status == 200, answer
    # Another uid of another group cannot connect at all (mode 0660).
    assert request_as(daemon, "GET", "/healthz", uid=OTHER_UID, gid=OTHER_GID).status is None


@pytest.mark.parametrize("others", [0, 100], ids=["one-group", "beyond-the-first-buffer"])
def test_allow_gid_admits_members_by_their_supplementary_groups(
    daemon_factory: DaemonFactory, others: int
) -> None:
    """Issue 10, case 11: a member of the allowed group whose primary group is another."""
    daemon = daemon_factory(extra_args=["--allow-gid", str(OTHER_GID)])
    open_socket_to_everyone(daemon)
    groups = [*range(70_000, 70_000 + others), OTHER_GID]
    answer = request_as(daemon, "PUT", PUT_PATH, PUT_BODY, uid=OTHER_UID, gid=NOBODY, groups=groups)
    assert answer.status == 200, answer
    # The same user outside that group is refused, whatever other groups it has.
    refused = request_as(daemon, "DELETE", PUT_PATH, uid=OTHER_UID, gid=NOBODY, groups=groups[:-1])
    assert refused.status == 403, refused
    assert len(daemon.client.attachments()) == 1


# ---- issue 10, case 10: the DEL spool in a shared directory --------------------------------


def as_nobody(*argv: str, input: str | None = None) -> None:
    """Run a command as uid/gid 65534 (no other groups), as a local user would."""
    subprocess.run(
        argv,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        input=input,
        text=True,
        capture_output=True,
        timeout=30,
        check=True,
        cwd="/",
    )


def in_shared_directory(daemon: MasqdProcess) -> Path:
    """Make the daemon's socket directory like /tmp: sticky, anyone may create in it."""
    daemon.workdir.chmod(0o1777)
    return daemon.workdir / "spool"


def test_a_spool_symlinked_by_a_local_user_is_not_followed(daemon_factory: DaemonFactory) -> None:
    """The user points `spool` at a root directory: the daemon must not chmod it (main made
    it 0700) and must not read from it."""
    daemon = daemon_factory(start=False)
    spool_path = in_shared_directory(daemon)
    target = daemon.workdir / "root-owned"
    target.mkdir()
    target.chmod(0o755)
    as_nobody("ln", "-s", str(target), str(spool_path))
    daemon.start()

    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    problem = daemon.status()["spool"]["problem"]
    assert problem is not None and "symbolic link" in problem
    assert daemon.log_tail().count("DEL spool refused") == 1
    shown = masqctl(daemon.socket, "status").stdout
    assert "DEL spool     refused:" in shown and "symbolic link" in shown


def test_a_del_planted_by_a_local_user_is_not_applied(daemon_factory: DaemonFactory) -> None:
    """The user creates `spool` before the daemon does and plants a DEL for an attachment
    it may not delete through the socket (403 there): the daemon must not apply it."""
    daemon = daemon_factory()
    assert daemon.client.put_attachment("net", "victim", "eth0", ["198.18.7.9/24"]).status == 200
    daemon.stop()
    spool_path = in_shared_directory(daemon)
    spool_path.rmdir()  # as on a node where the daemon has not run in this directory yet
    entry = spool.entry_name("net", "victim", "eth0")
    record = {"version": 1, "network": "net", "container_id": "victim", "ifname": "eth0",
              "spooled_at": 1.0}  # fmt: skip
    as_nobody("mkdir", "-m", "0700", str(spool_path))
    as_nobody("tee", str(spool_path / entry), input=json.dumps(record))
    daemon.start()

    assert daemon.client.get_attachment("net", "victim", "eth0").status == 200
    assert "198.18.7.9" in masqueraded(daemon.ns)
    problem = daemon.status()["spool"]["problem"]
    assert problem is not None and f"owned by uid {NOBODY}" in problem
    assert (spool_path / entry).exists()  # reported, not touched
    assert stat.S_IMODE(spool_path.stat().st_mode) == 0o700
    assert spool_path.stat().st_uid == NOBODY


def test_a_spool_of_its_own_reports_no_problem(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    assert daemon.status()["spool"] == {"dir": str(daemon.workdir / "spool"), "problem": None}

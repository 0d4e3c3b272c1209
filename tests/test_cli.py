"""masqctl against the real daemon: tables for people, JSON for scripts, one line on failure.

Most commands run in-process (`masqd.cli.main`, fast); the installed `masqctl` script runs
as a subprocess where the process boundary matters (entry point, exit code, stderr).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from masqd import cli
from tests.daemon import MasqdProcess, masqctl, masqueraded, running_masqd

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def shared() -> Iterator[MasqdProcess]:
    with running_masqd() as daemon:
        yield daemon


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def ctl(shared: MasqdProcess, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    def run(*args: str) -> Run:
        capsys.readouterr()
        try:
            cli.main(["--socket", shared.socket, *args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run


def one_line_error(run: Run) -> str:
    assert run.code == 1, (run.code, run.out, run.err)
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("masqctl: ")
    return lines[0]


def test_set_get_list_delete(shared: MasqdProcess, ctl: Any) -> None:
    run = ctl("set", "cli1", "c1", "eth0", "198.18.40.2/24", "2001:DB8:40::2/64")
    assert run.code == 0 and run.err == ""
    assert run.out.strip() == "set cli1/c1/eth0: 198.18.40.2/24 2001:db8:40::2/64"
    assert {"198.18.40.2", "2001:db8:40::2"} <= masqueraded(shared.ns)

    run = ctl("get", "cli1", "c1", "eth0")
    header, row = run.out.splitlines()
    assert header.split() == ["NETWORK", "CONTAINER", "IFNAME", "IPS"]
    assert row.split() == ["cli1", "c1", "eth0", "198.18.40.2/24", "2001:db8:40::2/64"]

    ctl("set", "cli1", "c2", "eth1", "198.18.40.3/24")
    ctl("set", "cli1-other", "c1", "eth0", "198.18.40.4/24")
    run = ctl("list", "--network", "cli1")
    lines = run.out.splitlines()
    assert lines[0].split() == ["NETWORK", "CONTAINER", "IFNAME", "IPS"]
    assert sorted(line.split()[1] for line in lines[1:-1]) == ["c1", "c2"]
    assert lines[-1] == "2 attachments"

    assert ctl("delete", "cli1", "c2", "eth1").out.strip() == "cli1/c2/eth1 deleted"
    assert ctl("delete", "cli1", "c2", "eth1").out.strip() == "cli1/c2/eth1 was not there"
    assert "198.18.40.3" not in masqueraded(shared.ns)


def test_json_output_parses(ctl: Any) -> None:
    run = ctl("--json", "set", "cli2", "c1", "eth0", "198.18.41.2/24")
    assert run.json == {
        "network": "cli2",
        "container_id": "c1",
        "ifname": "eth0",
        "ips": ["198.18.41.2/24"],
    }
    assert ctl("--json", "get", "cli2", "c1", "eth0").json["ips"] == ["198.18.41.2/24"]
    listed = ctl("--json", "list", "--network", "cli2").json
    assert listed["count"] == 1 and listed["attachments"][0]["container_id"] == "c1"
    status = ctl("--json", "status").json
    assert status["ready"] is True and status["table"] == "inet masqd"
    assert ctl("--json", "delete", "cli2", "c1", "eth0").json["deleted"] is True
    assert ctl("--json", "delete", "cli2", "c1", "eth0").json == {"deleted": False}


def test_gc(shared: MasqdProcess, ctl: Any) -> None:
    for cid, ip in (("a", "198.18.42.2"), ("b", "198.18.42.3"), ("c", "198.18.42.4")):
        ctl("set", "cli3", cid, "eth0", f"{ip}/24")
    ctl("set", "cli3-other", "a", "eth0", "198.18.42.5/24")
    run = ctl("gc", "cli3", "--valid", "b/eth0")
    assert run.code == 0
    assert run.out.splitlines()[-1] == "removed 2 attachments from network cli3"
    assert {line.split()[1] for line in run.out.splitlines()[1:-1]} == {"a", "c"}
    held = masqueraded(shared.ns)
    assert {"198.18.42.3", "198.18.42.5"} <= held and not {"198.18.42.2", "198.18.42.4"} & held
    assert ctl("--json", "gc", "cli3", "--valid", "b/eth0").json == {
        "network": "cli3",
        "removed": [],
    }


def test_status_for_people(ctl: Any) -> None:
    run = ctl("status")
    assert run.code == 0
    first, *rest = run.out.splitlines()
    assert first.startswith("masqd ") and first.endswith("READY") and "NOT READY" not in first
    text = "\n".join(rest)
    assert "table         inet masqd" in text
    assert "last sync" in text and "syncs" in text and "0 failed" in text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("get", "cli4", "nobody", "eth0"), "404"),
        (("set", "cli4", "c1", "eth0", "224.0.0.1/4"), "multicast"),
        (("set", "cli4", "c1", "eth0", "198.18.43.2"), "prefix length"),
        (("set", "cli4", "c:1", "eth0", "198.18.43.2/24"), "400"),
        (("gc", "cli4", "--valid", "no-slash"), "CONTAINER/IFNAME"),
    ],
)
def test_a_refusal_is_one_line_and_exit_1(
    shared: MasqdProcess, ctl: Any, args: tuple[str, ...], says: str
) -> None:
    before = shared.client.attachments()
    line = one_line_error(ctl(*args))
    assert says in line
    assert shared.client.attachments() == before


def test_the_installed_script_works(shared: MasqdProcess) -> None:
    proc = masqctl(shared.socket, "--json", "set", "cli5", "c1", "eth0", "198.18.44.2/24")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ips"] == ["198.18.44.2/24"]
    proc = masqctl(shared.socket, "list")
    assert proc.returncode == 0 and "cli5" in proc.stdout


def test_daemon_not_running_is_one_line_and_exit_1(tmp_path: Path) -> None:
    proc = masqctl(str(tmp_path / "nothing.sock"), "status")
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "not reachable" in proc.stderr and str(tmp_path / "nothing.sock") in proc.stderr


def test_a_stale_socket_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # the file stays, nobody listens: connection refused
    proc = masqctl(path, "list")
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "not reachable" in proc.stderr


def test_a_stopped_daemon_is_one_line_and_exit_1() -> None:
    with running_masqd() as daemon:
        assert daemon.stop() == 0
        proc = masqctl(daemon.socket, "status")
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr

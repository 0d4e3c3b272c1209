"""The directories the daemon trusts at start-up, and how it refuses the ones it cannot.

The unit tests call `masqd.paths` on directories made here (foreign owners need root: those
are marked `kernel`, which is how the suite marks "needs root"). The daemon tests start the
real masqd on a bad state directory or socket path and expect one line and exit 1.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd import paths
from tests.conftest import DaemonFactory

NOBODY = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp, that other users can reach."""
    path = Path(tempfile.mkdtemp(prefix="mqpath", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()


def test_a_missing_state_directory_is_made_0750(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    paths.prepare_state_dir(str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o750


def test_an_existing_private_directory_is_left_as_it_is(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    paths.prepare_state_dir(str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(tmp_path / "real")
    with pytest.raises(paths.StartupError, match="symbolic link"):
        paths.prepare_state_dir(str(tmp_path / "state"))


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o1777])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(paths.StartupError, match="lets others write it"):
        paths.prepare_state_dir(str(state))
    assert stat.S_IMODE(state.stat().st_mode) == mode  # refused, not "fixed"


def test_a_state_directory_that_cannot_be_made_is_one_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(paths.StartupError, match=r"cannot create state directory .*: Not a dir"):
        paths.prepare_state_dir(str(tmp_path / "file" / "state"))


def test_a_socket_directory_may_be_shared_only_when_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    paths.prepare_socket_dir(str(shared / "masqd.sock"))
    shared.chmod(0o777)
    with pytest.raises(paths.StartupError, match="make it sticky"):
        paths.prepare_socket_dir(str(shared / "masqd.sock"))


def test_something_else_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "masqd.sock").write_text("precious")
    with pytest.raises(
        paths.StartupError, match="a file is there, not a socket; masqd will not replace it"
    ):
        paths.prepare_socket_dir(str(tmp_path / "masqd.sock"))
    assert (tmp_path / "masqd.sock").read_text() == "precious"


@pytest.mark.kernel
def test_directories_of_another_user_are_refused(shared_tmp: Path) -> None:
    for name in ("state", "run"):
        (shared_tmp / name).mkdir(mode=0o700)
        os.chown(shared_tmp / name, NOBODY, NOBODY)
    with pytest.raises(paths.StartupError, match=f"owned by uid {NOBODY}"):
        paths.prepare_state_dir(str(shared_tmp / "state"))
    with pytest.raises(paths.StartupError, match=f"owned by uid {NOBODY}"):
        paths.prepare_socket_dir(str(shared_tmp / "run" / "masqd.sock"))


# ---- the daemon ---------------------------------------------------------------------------


def _start_fails(daemon_factory: DaemonFactory, *args: str) -> str:
    daemon = daemon_factory(start=False)
    daemon.extra_args += list(args)  # the last one of a flag wins
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 1
    text = daemon.log_path.read_text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "cannot start" in line]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.kernel
def test_an_uncreatable_state_directory_is_one_line_and_exit_1(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    line = _start_fails(daemon_factory, "--state-dir", str(tmp_path / "file" / "state"))
    assert "cannot start: cannot create state directory" in line and "Not a directory" in line


@pytest.mark.kernel
def test_a_regular_file_at_the_socket_path_is_one_line_and_exit_1(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    (tmp_path / "masqd.sock").write_text("precious")
    line = _start_fails(daemon_factory, "--socket", str(tmp_path / "masqd.sock"))
    assert "cannot start: socket" in line and "will not replace it" in line
    assert (tmp_path / "masqd.sock").read_text() == "precious"


@pytest.mark.kernel
def test_a_socket_directory_anyone_can_rename_in_is_one_line_and_exit_1(
    daemon_factory: DaemonFactory, shared_tmp: Path
) -> None:
    shared_tmp.chmod(0o777)
    line = _start_fails(daemon_factory, "--socket", str(shared_tmp / "masqd.sock"))
    assert "cannot start: socket directory" in line and "make it sticky" in line

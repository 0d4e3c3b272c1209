"""The directories the daemon trusts at start-up: its state directory and its socket's.

Whoever can write the state directory can rewrite the journal, and so the table; whoever can
replace entries in the socket's directory can put their own socket or DEL spool where the
CNI plugin looks for masqd's. So before using either, the daemon checks the directory it
actually opens (no symlink followed for the last component, checked on the open descriptor,
not on a path that could change meanwhile):

- the state directory must be owned by root or by the daemon's user and writable by no one
  else (the journal is not shared);
- the socket's directory must be owned by root or by the daemon's user; it may be writable
  by others only when it is sticky, like /tmp, where no one can rename or remove what the
  daemon made there.

A directory that is missing is created (0750). Anything else stops the start with
`StartupError`, which `daemon.main` prints as one line, `masqd: cannot start: ...`, exit 1.
The spool under the socket's directory has its own, stricter check (see `spool`).
"""

from __future__ import annotations

import errno
import os
import stat


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix (one line)."""


def trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def prepare_state_dir(path: str, *, mode: int = 0o750) -> None:
    """Create the state directory if needed; StartupError when it cannot be trusted."""
    _check(path, "state directory", mode=mode, shared_ok=False)


def prepare_socket_dir(socket_path: str, *, mode: int = 0o750) -> None:
    """Create the socket's directory if needed; StartupError when it cannot be trusted, or
    when something other than a socket is at `socket_path` (it is never replaced)."""
    directory = os.path.dirname(os.path.abspath(socket_path))
    _check(directory, "socket directory", mode=mode, shared_ok=True)
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
        raise StartupError(
            f"socket {socket_path}: {kind} is there, not a socket; masqd will not replace it"
        )


def _check(path: str, what: str, *, mode: int, shared_ok: bool) -> None:
    created = _make(path, what, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"{what} {path}: {_open_problem(path, exc)}") from None
    try:
        st = os.fstat(fd)
        if created:
            # makedirs' mode went through the umask; set it on what we opened, not the path.
            os.fchmod(fd, mode)
            st = os.fstat(fd)
    finally:
        os.close(fd)
    problem = dir_problem(st, shared_ok=shared_ok)
    if problem is not None:
        raise StartupError(f"{what} {path}: {problem}")


def dir_problem(st: os.stat_result, *, shared_ok: bool) -> str | None:
    """Why a directory with this status cannot be trusted, or None."""
    if st.st_uid not in trusted_owners():
        return (
            f"owned by uid {st.st_uid}, not by root or the daemon's user (uid {os.geteuid()}); "
            "whoever owns it could replace what masqd keeps there"
        )
    mode = stat.S_IMODE(st.st_mode)
    if shared_ok:
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return f"mode {mode:04o} lets anyone rename or remove masqd's files (make it sticky)"
    elif mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"mode {mode:04o} lets others write it (chmod go-w)"
    return None


def _make(path: str, what: str, mode: int) -> bool:
    """Create `path` (and parents) if missing; True when this call made the last component."""
    if os.path.lexists(path):
        return False
    try:
        os.makedirs(path, mode=mode)
    except FileExistsError:
        return False  # made meanwhile: checked like any existing directory
    except OSError as exc:
        raise StartupError(f"cannot create {what} {path}: {exc.strerror}") from None
    return True


def _open_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP or os.path.islink(path):
        return "is a symbolic link; give the real directory"
    if exc.errno == errno.ENOTDIR:
        return "is not a directory"
    return exc.strerror or str(exc)

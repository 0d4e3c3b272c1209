"""The daemon's file descriptor budget: raise the limit, keep a reserve, fit the listeners.

Every connection to the API or the metrics port holds a descriptor. Run out of them and the
daemon cannot open its journal, a temporary file or a netlink socket: syncs fail and the
table is no longer repaired. So at start-up:
- the soft RLIMIT_NOFILE is raised to the hard limit (systemd's LimitNOFILE= and the
  container runtime's limit set the hard one; a soft limit of 1,024 is the usual default);
- RESERVE descriptors are kept for the kernel path (journal, compaction, netlink, pipes of a
  child process), and the listeners' connection caps are cut to fit what is left, with a
  warning naming the limit;
- `Guard.low` is the cheap check each listener makes per accepted connection: a connection
  accepted while fewer than RESERVE descriptors are free is answered 503 and closed.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Descriptors kept free beyond the connections: what the daemon itself may open at any moment
# (the journal and its compaction, a child process's pipes, the libraries' own: about 10),
# plus the connections a burst brings in before the caps are checked (server.ACCEPT_BURST
# per loop turn, and those refused, until their close in a later turn).
RESERVE = 128
# Connections refused with a 503 that are kept open a moment so that the answer arrives
# (server._Refused lingers): they hold descriptors beyond the caps, so the caps make room.
LINGERING = 64
# Descriptors the daemon opens after the caps are fitted: listeners, the journal and its end
# file, the event socket, the loop's selector, worker threads' pipes (about 15 seen).
OPENED_LATER = 32


@dataclass(frozen=True)
class Limits:
    soft: int
    hard: int
    raised_from: int | None = None  # the soft limit before start-up raised it


def raise_limit() -> Limits:
    """Raise the soft RLIMIT_NOFILE to the hard limit (RLIM_INFINITY counts as the kernel's
    nr_open ceiling, which setrlimit would refuse beyond)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
            return Limits(soft, hard)
        return Limits(target, hard, raised_from=soft)
    return Limits(soft, hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def open_descriptors() -> int:
    """How many descriptors the process holds now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing the directory
    except OSError:
        return 0


@dataclass(frozen=True)
class Budget:
    """The connection caps that fit under the limit, and whether they had to be cut."""

    api: int
    metrics: int
    cut: bool


def fit_caps(
    *,
    soft: int,
    in_use: int,
    api: int,
    metrics: int,
    reserve: int = RESERVE,
    lingering: int = LINGERING,
) -> Budget:
    """Cut the listeners' caps so that, all of them full and `lingering` refused connections
    still open, `reserve` descriptors stay free. The metrics port gives way first (a scrape
    can wait, a container's setup cannot), down to one connection; then the API, down to one."""
    room = max(2, soft - in_use - OPENED_LATER - reserve - lingering)
    if api + metrics <= room:
        return Budget(api, metrics, cut=False)
    fitted_metrics = max(1, min(metrics, room - api))
    fitted_api = max(1, min(api, room - fitted_metrics))
    return Budget(fitted_api, fitted_metrics, cut=True)


class Guard:
    """Tells a listener when the process is within `reserve` descriptors of its limit."""

    def __init__(self, soft: int, reserve: int = RESERVE) -> None:
        self.threshold = soft - reserve

    def low(self) -> bool:
        """True when the lowest free descriptor is at or above the threshold, or none is
        free. The kernel hands out the lowest free number, so one probe (two system calls)
        tells it: below that number every descriptor is taken."""
        try:
            fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return True
        os.close(fd)
        return fd >= self.threshold


def prepare(*, api: int, metrics: int) -> tuple[Guard, Budget]:
    """Start-up: raise the limit, fit the caps, log what was done."""
    limits = raise_limit()
    in_use = open_descriptors()
    budget = fit_caps(soft=limits.soft, in_use=in_use, api=api, metrics=metrics)
    if limits.raised_from is not None:
        log.info("descriptor limit raised from %d to %d", limits.raised_from, limits.soft)
    if budget.cut:
        log.warning(
            "the descriptor limit of %d (%d in use, %d kept in reserve, %d for refusals) does "
            "not fit --max-connections %d and --metrics-max-connections %d: serving at most %d API "
            "and %d metrics connections; raise LimitNOFILE (or the container's nofile limit)",
            limits.soft,
            in_use,
            RESERVE,
            LINGERING,
            api,
            metrics,
            budget.api,
            budget.metrics,
        )
    return Guard(limits.soft), budget

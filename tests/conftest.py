"""Shared fixtures: fresh namespaces, the real daemon in one, the fake nftables backend;
the hypothesis profile.

Kernel tests (marker `kernel`) need root and nftables; they are skipped, with the reason,
where those are missing. When a test that ran a daemon fails, the daemon's log tail is added
to the report, since that is usually where the reason is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from masqd.kernel.fake import FakeBackend
from tests.daemon import MasqdProcess, running_masqd
from tests.netns import netns

_DAEMONS = pytest.StashKey[list[MasqdProcess]]()

# CI runs on two shared cores: time per example says nothing about correctness there.
settings.register_profile(
    "masqd", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("masqd")


def pytest_configure(config: pytest.Config) -> None:
    # looptime (fake loop time, see README "Timing tests") asks the event loop policy for the
    # current loop before every test, sync ones included (pytest-asyncio's `event_loop_policy`
    # fixture is autouse). Until set_event_loop() has been called once, the policy answers
    # that on the main thread by creating a loop, which nobody closes: collected later, it
    # fails some unrelated test with "unclosed event loop" (filterwarnings = error). Having
    # called it, the policy answers "no current loop" instead, which looptime expects.
    asyncio.set_event_loop(None)


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kernel_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        stashed: list[MasqdProcess] = item.stash.get(_DAEMONS, [])
        daemons = list(stashed)
        funcargs = getattr(item, "funcargs", {})
        daemons += [
            d for d in funcargs.values() if isinstance(d, MasqdProcess) and d not in daemons
        ]
        for daemon in daemons:
            report.sections.append((f"masqd log ({daemon.ns})", daemon.log_tail(80)))
    return report


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh network namespace (loopback up), deleted after the test."""
    with netns("t") as name:
        yield name


DaemonFactory = Callable[..., MasqdProcess]


@pytest.fixture
def daemon_factory(request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """Start masqd: `daemon_factory(ns=None, start=True, table=..., resync_interval=...,
    log_level=..., extra_args=..., env=...)`. Without `ns` each daemon gets a namespace of
    its own. It reads an empty config file and no MASQD_* variable but those in `env`.
    Every daemon is killed and its files removed after the test."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        started: list[MasqdProcess] = []
        request.node.stash[_DAEMONS] = started

        def factory(**kwargs: Any) -> MasqdProcess:
            daemon = stack.enter_context(running_masqd(**kwargs))
            started.append(daemon)
            return daemon

        yield factory


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> MasqdProcess:
    """A ready masqd in a namespace of its own (table `masqd`, default flags)."""
    return daemon_factory()


@pytest.fixture
def fake_backend() -> FakeBackend:
    """An in-memory nftables with kernel semantics, table `masqd`."""
    return FakeBackend(table="masqd")

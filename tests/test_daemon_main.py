"""`masqd`'s process wrapper (masqd.daemon.main) in-process, without root: the signals drive
the daemon (SIGHUP reloads, SIGTERM stops it in order), and a start that cannot happen is
one line and exit 1. The real process under signals is in test_api.py and test_config.py
(kernel)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd import logrepeat
from masqd.daemon import main as masqd_main
from masqd.kernel.fake import FakeBackend
from masqd.planning.ruleset import EXEMPT4
from tests.inprocess import build_daemon, daemon_args, short_tmp

WAIT = 20.0


def _fake_backend(*, table: str, runner: str) -> FakeBackend:
    return FakeBackend(table=table)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmp()
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_sighup_reloads_and_sigterm_stops_in_order(workdir: Path) -> None:
    kernel = FakeBackend()
    d = build_daemon(workdir, backend=kernel)
    running = asyncio.create_task(masqd_main.run(d))
    try:
        await asyncio.wait_for(d.reconciler.first_sync_done.wait(), WAIT)
        (workdir / "masqd.toml").write_text('[policy]\nexempt_destinations = ["198.19.7.0/24"]\n')
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(WAIT):
            # The reload runs on the daemon's loop after the signal: watch the kernel for it.
            while "198.19.7.0/24" not in kernel.state().sets.get(EXEMPT4, {}):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, WAIT)
    finally:
        gc.unfreeze()  # main froze everything it found after start-up
    assert kernel.closed
    # The table stays, and the state directory is free for the next daemon.
    assert "198.19.7.0/24" in kernel.state().sets[EXEMPT4]
    again = build_daemon(workdir)
    await again.startup()
    await again.shutdown()


def test_a_start_that_cannot_happen_is_one_line_and_exit_1(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state = workdir / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    (workdir / "masqd.toml").touch()
    # main() builds a kernel backend: this test runs in the root network namespace, whose
    # ruleset is not ours to touch, so main gets the fake instead.
    monkeypatch.setattr(masqd_main, "KernelBackend", _fake_backend)
    # main() sets the process's logging up for good; the test's logging must survive it.
    monkeypatch.setattr(logrepeat, "install", lambda: None)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_:
        masqd_main.main(daemon_args(workdir))
    assert exit_.value.code == 1
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and critical[0].startswith("cannot start: state directory")
    assert "lets others write it" in critical[0]
    assert not os.path.exists(workdir / "run" / "masqd.sock")

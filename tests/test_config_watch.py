"""Config files are watched: a ConfigMap update (the kubelet's `..data` symlink swap), an
editor's rename-over or a plain write is applied like SIGHUP, an invalid file is refused once.

The watcher's tests run real inotify on a temporary directory (no root needed), on fake loop
time (looptime: the settle and quiet periods take no real time and cannot be stretched by a
busy machine; inotify's events are queued by the time the write returns); the daemon's
run the installed masqd in a throwaway namespace and read the kernel's exempt sets, from
the moment the kubelet-style swap is made to the moment the kernel holds the new policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from masqd.planning import ruleset
from masqd.watch import ConfigWatcher, file_digest
from tests.conftest import DaemonFactory
from tests.daemon import MasqdProcess, kernel_table
from tests.netns import ns_run
from tests.test_policy import start_daemon

pytestmark = pytest.mark.looptime  # the async tests; the daemon's (sync) ones run on real time

WAIT = 10.0  # generous: a busy CI machine; the measured latency is printed and far lower


# ---- a ConfigMap volume, as the kubelet writes it ------------------------------------------


def kubelet_write(mount: Path, files: dict[str, str]) -> float:
    """Update a ConfigMap volume the way the kubelet's AtomicWriter does: a new timestamped
    directory, a `..data_tmp` symlink to it renamed over `..data`, user-visible symlinks
    `name -> ..data/name`, the old directory removed. Returns the time of the rename."""
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    stamp = mount / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    (mount / "..data_tmp").symlink_to(stamp.name)
    os.rename(mount / "..data_tmp", mount / "..data")
    swapped = time.monotonic()
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(mount / old)
    return swapped


# ---- the watcher, on real inotify ---------------------------------------------------------


class Seen:
    """What the watcher reported: one entry per call, the watched file's content then."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.contents: list[str | None] = []
        self.event = asyncio.Event()

    def __call__(self) -> None:
        try:
            self.contents.append(self.path.read_text())
        except FileNotFoundError:
            self.contents.append(None)
        self.event.set()

    async def next(self) -> str | None:
        await asyncio.wait_for(self.event.wait(), WAIT)
        self.event.clear()
        return self.contents[-1]


@contextlib.asynccontextmanager
async def watching(path: Path, **kwargs: object) -> AsyncIterator[Seen]:
    seen = Seen(path)
    watcher = ConfigWatcher(
        [str(path)], on_change=seen, baseline={str(path): file_digest(str(path))}
    )
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0)  # the watches are in place once run() has started
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_kubelet_symlink_swap_is_one_change(tmp_path: Path) -> None:
    kubelet_write(tmp_path, {"masqd.toml": "one"})
    async with watching(tmp_path / "masqd.toml") as seen:
        kubelet_write(tmp_path, {"masqd.toml": "two"})
        assert await seen.next() == "two"
        kubelet_write(tmp_path, {"masqd.toml": "three"})
        assert await seen.next() == "three"
        # Each swap is mkdir, symlink, rename, rmdir: still one call each.
        assert seen.contents == ["two", "three"]


async def test_same_content_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "masqd.toml"
    path.write_text("one")
    async with watching(path) as seen:
        path.touch()
        kubelet_write(tmp_path, {"other": "x"})
        (tmp_path / "new").write_text("one")
        os.rename(tmp_path / "new", path)  # rename-over, same bytes
        path.write_text("two")
        assert await seen.next() == "two"
        assert seen.contents == ["two"]


async def test_a_file_being_written_is_read_once_closed(tmp_path: Path) -> None:
    path = tmp_path / "masqd.toml"
    async with watching(path) as seen:
        with open(path, "w") as f:  # noqa: ASYNC230 - the write being watched, on purpose
            f.write("half")
            f.flush()
            await asyncio.sleep(0.3)  # longer than the settle time: a check now would see "half"
            f.write(" and whole")
        assert await seen.next() == "half and whole"
        assert seen.contents == ["half and whole"]


async def test_a_file_hard_linked_into_place_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "masqd.toml"
    (tmp_path / "prepared").write_text("linked")
    async with watching(path) as seen:
        os.link(tmp_path / "prepared", path)  # appears whole: IN_CREATE, no IN_CLOSE_WRITE
        assert await seen.next() == "linked"


async def test_a_directory_that_never_goes_quiet_still_gets_its_change_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "masqd.toml"
    path.write_text("one")
    seen = Seen(path)
    watcher = ConfigWatcher([str(path)], on_change=seen, settle=0.2, max_settle=0.5)
    task = asyncio.create_task(watcher.run())

    async def busy() -> None:  # events every 50 ms, less than the quiet time asked for
        while True:
            (tmp_path / "noise").write_text("x")
            await asyncio.sleep(0.05)

    noise = asyncio.create_task(busy())
    try:
        await asyncio.sleep(0)
        path.write_text("two")
        assert await seen.next() == "two"  # bounded by max_settle, not by a quiet moment
    finally:
        for t in (noise, task):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_a_vanished_file_keeps_the_settings_until_it_is_back(tmp_path: Path) -> None:
    path = tmp_path / "masqd.toml"
    path.write_text("one")
    async with watching(path) as seen:
        path.unlink()
        path.write_text("two")
        assert await seen.next() == "two"
        assert None not in seen.contents


async def test_an_edit_behind_a_symlink_to_another_directory_is_seen(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    target = tmp_path / "real" / "masqd.toml"
    target.write_text("one")
    link = tmp_path / "etc" / "masqd.toml"
    link.symlink_to(target)
    async with watching(link) as seen:
        target.write_text("two")
        assert await seen.next() == "two"


async def test_a_change_between_the_loaders_read_and_the_watch_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "masqd.toml"
    path.write_text("read by the loader")
    baseline = {str(path): file_digest(str(path))}
    path.write_text("changed before the watch")
    seen = Seen(path)
    task = asyncio.create_task(ConfigWatcher([str(path)], on_change=seen, baseline=baseline).run())
    try:
        assert await seen.next() == "changed before the watch"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- the daemon, in a namespace ------------------------------------------------------------


def exempt(d: MasqdProcess) -> set[str]:
    table = kernel_table(d.ns, d.table)
    return set(table.sets[ruleset.EXEMPT4]) | set(table.sets[ruleset.EXEMPT6])


def wait_until(what: str, check: Callable[[], bool], d: MasqdProcess) -> float:
    """Poll `check` until true; the monotonic time it first was."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{d.log_tail()}")
        time.sleep(0.01)
    return time.monotonic()


def metric(d: MasqdProcess, name: str) -> float:
    address = d.status()["metrics_address"]
    text = ns_run(d.ns, "curl", "-sS", "--max-time", "5", f"http://{address}/metrics").stdout
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def policy_toml(*exempt: str) -> str:
    return "[policy]\nexempt_destinations = [" + ", ".join(f'"{c}"' for c in exempt) + "]\n"


@pytest.mark.kernel
def test_a_configmap_update_reaches_the_kernel_in_one_reload(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    config_dir, agent_dir = tmp_path / "masqd-config", tmp_path / "ip-masq-agent"
    config_dir.mkdir()
    agent_dir.mkdir()
    kubelet_write(config_dir, {"masqd.toml": policy_toml("198.18.10.0/24")})
    kubelet_write(agent_dir, {"ip-masq-agent": "nonMasqueradeCIDRs: []\nmasqLinkLocal: true\n"})
    d = start_daemon(
        daemon_factory,
        extra_args=[
            "--config", str(config_dir / "masqd.toml"),
            "--ip-masq-agent-config", str(agent_dir / "ip-masq-agent"),
        ],
    )  # fmt: skip
    assert exempt(d) == {"198.18.10.0/24", "fe80::/10"}

    latencies = []
    swapped = kubelet_write(
        config_dir, {"masqd.toml": policy_toml("198.18.20.0/24", "2001:db8:20::/48")}
    )
    done = wait_until("the TOML change in the kernel", lambda: "198.18.20.0/24" in exempt(d), d)
    latencies.append(done - swapped)
    assert exempt(d) == {"198.18.20.0/24", "2001:db8:20::/48", "fe80::/10"}

    swapped = kubelet_write(
        agent_dir,
        {"ip-masq-agent": '{"nonMasqueradeCIDRs": ["198.19.0.0/16"], "masqLinkLocalIPv6": true}'},
    )
    done = wait_until(
        "the ip-masq-agent change in the kernel", lambda: "198.19.0.0/16" in exempt(d), d
    )
    latencies.append(done - swapped)
    assert exempt(d) == {"198.18.20.0/24", "2001:db8:20::/48", "169.254.0.0/16", "198.19.0.0/16"}
    log = d.log_path.read_text()
    assert log.count("config file changed: policy applied to table inet") == 2
    assert "resyncInterval 60s read and ignored" in log
    shown = ", ".join(f"{s * 1000:.0f} ms" for s in latencies)
    print(f"\nreload latency, file swap to kernel: {shown}")
    assert max(latencies) < WAIT


@pytest.mark.kernel
def test_an_invalid_update_keeps_the_policy_is_logged_once_and_counted(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    config_dir = tmp_path / "masqd-config"
    config_dir.mkdir()
    kubelet_write(config_dir, {"masqd.toml": policy_toml("198.18.10.0/24")})
    d = start_daemon(daemon_factory, extra_args=["--config", str(config_dir / "masqd.toml")])
    assert metric(d, "masqd_config_last_reload_successful") == 1

    bad = policy_toml("198.18.10.7/24")
    kubelet_write(config_dir, {"masqd.toml": bad})
    wait_until(
        "the failure counted", lambda: metric(d, "masqd_config_reload_failures_total") == 1, d
    )
    assert metric(d, "masqd_config_last_reload_successful") == 0
    assert exempt(d) == {"198.18.10.0/24"}
    # More events, the same bad content: nothing new to say.
    kubelet_write(config_dir, {"masqd.toml": bad})
    (config_dir / "masqd.toml").touch()

    kubelet_write(config_dir, {"masqd.toml": policy_toml("198.18.30.0/24")})
    wait_until("the valid change in the kernel", lambda: exempt(d) == {"198.18.30.0/24"}, d)
    assert metric(d, "masqd_config_reload_failures_total") == 1
    assert metric(d, "masqd_config_last_reload_successful") == 1
    log = d.log_path.read_text()
    assert log.count("config refused") == 1, log
    assert "198.18.10.7/24' has host bits set" in log

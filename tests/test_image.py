"""The container image: built from deploy/Dockerfile with podman, and run as the DaemonSet runs it.

The base image is debootstrapped and imported (deploy/image/base-image.sh), the image built
by deploy/image/build-image.sh with --network host, all in a private podman storage kept in a
cache folder (MASQD_IMAGE_CACHE, default ~/.cache/masqd-image), never the machine's. A build
is tagged with a digest of everything the build context admits, so an unchanged tree reuses
it; a changed one builds again (podman's layer cache keeps that quick).

Then: the init container's install step into a temporary folder (the plugin lands and
answers VERSION), and the daemon container with only NET_ADMIN on a read-only root, on the
network of a test namespace, serving its socket into a folder shared with the host: a PUT
through that socket reaches the namespace's table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd.planning import ruleset
from tests.daemon import Client, kernel_table
from tests.netns import netns
from tests.podman import REPO, Podman, inputs_digest, root_network_snapshot
from tests.podman import wait_for as wait_until

CACHE = Path(os.environ.get("MASQD_IMAGE_CACHE", Path.home() / ".cache" / "masqd-image"))
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
BUILD_TIMEOUT = 1800


def context_files(dockerignore: Path = DOCKERIGNORE) -> list[Path]:
    """The files the build context admits: deploy/Dockerfile's .dockerignore is "*" then
    "!path" exceptions (and __pycache__ excluded), the only form this reads."""
    files = [REPO / "deploy" / "Dockerfile", dockerignore]
    for line in dockerignore.read_text().splitlines():
        if not line.startswith("!"):
            continue
        root = REPO / line[1:].rstrip("/")
        found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [p for p in found if "__pycache__" not in p.parts]
    return files


def test_the_cache_key_covers_what_the_build_copies() -> None:
    names = {str(p.relative_to(REPO)) for p in context_files()}
    assert {"deploy/Dockerfile", "pyproject.toml", "masqd/daemon/main.py"} <= names
    assert {"deploy/image/install-cni.sh", "deploy/image/build-image.sh"} <= names
    assert not [n for n in names if n.startswith(("tests/", ".venv/")) or "__pycache__" in n]


def test_build_image_passes_its_inputs_on() -> None:
    script = (REPO / "deploy" / "image" / "build-image.sh").read_text()
    assert "--network host" in script
    assert "base-image.sh" in script
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "ARG BUILD_CA_BUNDLE" in dockerfile
    base = (REPO / "deploy" / "image" / "base-image.sh").read_text()
    # The base gets the name deploy/Dockerfile builds FROM.
    froms = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")}
    assert froms == {"debian:bookworm-slim"}
    assert "docker.io/library/debian:bookworm-slim" in base


# ---- the real build -----------------------------------------------------------------------


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman, debootstrap, network namespaces)"
    for tool in ("podman", "runc", "conmon", "nsenter", "debootstrap", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


_UNAVAILABLE = _unavailable()


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Podman, str]]:
    """(the private podman, the built image's tag): built now or reused from the cache."""
    if _UNAVAILABLE is not None:
        pytest.skip(_UNAVAILABLE)
    before = root_network_snapshot()
    with _cache_lock():
        podman = Podman(CACHE / "podman", None)
        tag = f"localhost/masqd:test-{inputs_digest(context_files())[:16]}"
        try:
            if podman.run("image", "exists", tag, check=False).returncode != 0:
                build(podman, tag)
            yield podman, tag
        finally:
            podman.close(keep_storage=True)
    assert root_network_snapshot() == before


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """The cache's podman storage is one per machine, and closing it removes every container
    in it: a second run of the suite beside this one (a busy CI machine) waits its turn."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(podman: Podman, tag: str) -> None:
    env = {**podman.env, "PODMAN": " ".join(podman.command()), "CACHE_DIR": str(CACHE)}
    started = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "deploy" / "image" / "build-image.sh"), tag],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"built {tag} in {time.monotonic() - started:.0f} s")
    # Older test builds are dead weight in the cache: keep this one only.
    for old in podman.out("images", "--format", "{{.Repository}}:{{.Tag}}").split():
        if old.startswith("localhost/masqd:test-") and old != tag:
            podman.run("rmi", "--force", old, check=False)
    podman.run("image", "prune", "--force", check=False)


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_init_container_installs_a_plugin_that_runs_on_the_node(
    image: tuple[Podman, str], tmp_path: Path
) -> None:
    podman, tag = image
    dest = tmp_path / "opt-cni-bin"
    dest.mkdir()
    # As the DaemonSet's init container: its command, no capabilities, read-only root.
    podman.run(
        "run", "--rm", "--network", "none", "--cap-drop", "all", "--read-only",
        "--volume", f"{dest}:/host/opt/cni/bin",
        "--entrypoint", '["/opt/masqd/share/install-cni.sh", "/host/opt/cni/bin"]',
        tag,
    )  # fmt: skip
    plugin = dest / "masqd-cni"
    assert plugin.is_file()
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    # On the node, from a clean environment, as a runtime runs it.
    proc = subprocess.run(
        [str(plugin)],
        input='{"cniVersion": "1.0.0"}',
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "CNI_COMMAND": "VERSION"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1.0.0" in json.loads(proc.stdout)["supportedVersions"]


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_daemon_container_with_net_admin_only_serves_the_shared_socket(
    image: tuple[Podman, str],
) -> None:
    built, tag = image
    with netns("img") as ns:
        podman = Podman(built.base, ns)
        share = Path(f"/tmp/mqimg{os.getpid()}")  # a socket path must stay short
        share.mkdir(mode=0o750)
        name = f"masqd-image-test-{os.getpid()}"
        try:
            podman.run(
                "run", "--detach", "--name", name,
                "--network", "host",  # podman's host is the test namespace
                "--cap-drop", "all", "--cap-add", "NET_ADMIN",
                "--security-opt", "no-new-privileges", "--read-only",
                "--volume", f"{share}:/run/masqd",
                tag,
                "--socket=/run/masqd/masqd.sock", "--state-dir=/run/masqd",
                "--metrics-listen=127.0.0.1:9810",
            )  # fmt: skip
            caps = podman.out("exec", name, "grep", "^CapEff", "/proc/1/status").split()[1]
            assert int(caps, 16) == 1 << 12  # CAP_NET_ADMIN alone
            client = Client(str(share / "masqd.sock"))
            wait_until(lambda: ready(client), timeout=60, what="the container's /readyz")
            resp = client.put_attachment("podnet", "c0ffee", "eth0", ["198.18.9.2/24"])
            assert resp.status in (200, 201), resp.body
            assert "198.18.9.2" in kernel_table(ns).sets[ruleset.SOURCES4]
            logs = podman.run("logs", name).stderr + podman.run("logs", name).stdout
            assert "ready" in logs
        finally:
            podman.run("rm", "--force", "--time", "0", name, check=False)
            shutil.rmtree(share, ignore_errors=True)


def ready(client: Client) -> bool:
    try:
        return client.get("/readyz").status == 200
    except OSError:
        return False

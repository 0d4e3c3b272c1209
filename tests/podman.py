"""A private podman with its CNI backend, for tests that run real containers.

Nothing here uses the machine's podman state: storage (--root, --runroot), containers.conf,
storage.conf, the CNI network configuration directory and the plugin directory all live under
a folder the test owns. Every podman command runs with `nsenter --net=/run/netns/NS`, so the
CNI plugins (and podman's bridge, veths and firewall rules) land in that test namespace.
`ip netns exec` would not do: it remounts /sys, and runc then finds no cgroup mount.

podman 4.3 (Debian 12) needs three settings on machines like CI's: runc (crun 1.8.1 fails with
"cgroups in hybrid mode not supported"), the cgroupfs manager (no systemd), and explicit
`default_ulimits` (the sandbox lacks CAP_SYS_RESOURCE to raise them to podman's defaults).

What podman runs as masqd-cni comes from `cni_plugin()` alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYSTEM_CNI_DIR = Path("/usr/lib/cni")
# The plugins podman's generated conflists name (VERSION is asked of each whenever podman
# loads its networks), plus loopback.
SYSTEM_PLUGINS = ("bridge", "host-local", "loopback", "portmap", "firewall", "tuning")
BUSYBOX = Path("/bin/busybox")  # from busybox-static: no libraries to copy into the image
BUSYBOX_IMAGE = "localhost/masqd-test-busybox:latest"
COMMAND_TIMEOUT = 120.0


def cni_plugin() -> Path:
    """The masqd-cni executable the tests give podman: the static Go binary `make setup`
    builds (MASQD_CNI_TEST_PLUGIN overrides it, as for tests/test_cni.py)."""
    override = os.environ.get("MASQD_CNI_TEST_PLUGIN")
    return Path(override) if override else REPO / "cni" / "bin" / "masqd-cni"


def unavailable_reason() -> str | None:
    """Why the podman tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (podman, network namespaces)"
    for tool in ("podman", "runc", "conmon", "nsenter", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    for plugin in SYSTEM_PLUGINS:
        if not (SYSTEM_CNI_DIR / plugin).exists():
            return f"needs {SYSTEM_CNI_DIR / plugin} (containernetworking-plugins)"
    if not BUSYBOX.exists():
        return f"needs {BUSYBOX} (busybox-static)"
    if not cni_plugin().exists():
        return f"needs {cni_plugin()} (make setup)"
    return None


# ---- configuration (pure) ---------------------------------------------------------------


def containers_conf(
    base: Path, plugin_dir: Path, network_dir: Path, default_network: str | None = None
) -> str:
    """containers.conf for a podman whose every file lives under `base`. `default_network`
    names the network a container without --network joins; podman's own default ("podman",
    which masquerades with the firewall rules of its plugins) then no longer exists. It must
    be set after that network is created: podman makes up a default network under that name
    until a conflist of that name exists, and refuses to create one."""
    return "\n".join(
        [
            "[containers]",
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]',
            "[engine]",
            'runtime = "runc"',
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f'events_logfile_path = "{base}/events.log"',
            f'tmp_dir = "{base}/tmp"',
            f'volume_path = "{base}/volumes"',
            "[network]",
            'network_backend = "cni"',
            f'cni_plugin_dirs = ["{plugin_dir}"]',
            f'network_config_dir = "{network_dir}"',
            *([f'default_network = "{default_network}"'] if default_network else []),
            "",
        ]
    )


def storage_conf(root: Path, runroot: Path) -> str:
    return f'[storage]\ndriver = "overlay"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n'


def masqd_conflist(
    conflist: dict[str, Any], *, socket: str, daemon_wait: float, ipam_dir: str | None = None
) -> dict[str, Any]:
    """podman's generated conflist, edited as docs/cni.md tells users to: the bridge stops
    masquerading (masqd does it) and masqd-cni is chained last. `ipam_dir` moves host-local's
    leases out of /var/lib/cni/networks. The input is left as it was."""
    edited: dict[str, Any] = json.loads(json.dumps(conflist))
    plugins: list[dict[str, Any]] = edited["plugins"]
    bridges = [p for p in plugins if p.get("type") == "bridge"]
    if len(bridges) != 1:
        raise ValueError(f"expected one bridge plugin, found {len(bridges)}")
    if any(p.get("type") == "masqd-cni" for p in plugins):
        raise ValueError("masqd-cni is already in the conflist")
    bridges[0]["ipMasq"] = False
    if ipam_dir is not None:
        bridges[0]["ipam"]["dataDir"] = ipam_dir
    plugins.append({"type": "masqd-cni", "socket": socket, "daemonWaitSeconds": daemon_wait})
    return edited


def busybox_tar(busybox: Path = BUSYBOX) -> bytes:
    """A root filesystem of one static busybox and the applets the tests call."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "nc", "ip", "sleep", "cat", "true"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buf.getvalue()


# ---- the root namespace, before and after -----------------------------------------------


def root_network_snapshot() -> dict[str, str]:
    """The root namespace's ruleset, links and routes, as text: a test takes one before and
    one after and asserts they are equal."""

    def out(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    return {
        "ruleset": out("nft", "list", "ruleset"),
        "links": out("ip", "-o", "link", "show"),
        "routes4": out("ip", "-4", "route", "show", "table", "all"),
        "routes6": out("ip", "-6", "route", "show", "table", "all"),
    }


# ---- the podman itself ------------------------------------------------------------------


class PodmanError(RuntimeError):
    pass


class Podman:
    """podman with every file under `base`; commands run in network namespace `ns` (None:
    the caller's, for builds that need the machine's network with `--network host`)."""

    def __init__(self, base: Path, ns: str | None) -> None:
        self.base = base
        self.ns = ns
        self.root = base / "root"
        self.runroot = base / "runroot"
        self.network_dir = base / "net.d"
        self.plugin_dir = base / "cni-bin"
        for folder in (self.root, self.runroot, self.network_dir, self.plugin_dir, base / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        for plugin in SYSTEM_PLUGINS:
            self._link_plugin(plugin, SYSTEM_CNI_DIR / plugin)
        self._link_plugin("masqd-cni", cni_plugin())
        self.write_containers_conf()
        (base / "storage.conf").write_text(storage_conf(self.root, self.runroot))

    def write_containers_conf(self, default_network: str | None = None) -> None:
        conf = containers_conf(self.base, self.plugin_dir, self.network_dir, default_network)
        (self.base / "containers.conf").write_text(conf)

    def _link_plugin(self, name: str, target: Path) -> None:
        link = self.plugin_dir / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)

    @property
    def env(self) -> dict[str, str]:
        # conmon inherits this, and so does the `podman container cleanup` it runs when a
        # container exits: the cleanup (and its CNI DEL) uses the same private configuration.
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
        }

    def command(self) -> list[str]:
        """podman with its private storage, without the namespace: what scripts that take a
        PODMAN command line are given (with `env`)."""
        return ["podman", "--root", str(self.root), "--runroot", str(self.runroot)]

    def argv(self, *args: str) -> list[str]:
        prefix = ["nsenter", f"--net=/run/netns/{self.ns}"] if self.ns else []
        return [*prefix, *self.command(), *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    def import_busybox(self, name: str = BUSYBOX_IMAGE) -> str:
        tarball = self.base / "busybox.tar"
        tarball.write_bytes(busybox_tar())
        self.run("import", "--change", "ENV PATH=/bin", str(tarball), name)
        return name

    def create_masqd_network(
        self, name: str, subnets: tuple[str, str], socket: str, daemon_wait: float
    ) -> dict[str, Any]:
        """`podman network create` (IPv4 and IPv6), the conflist edit, and the network made
        podman's default; the edited conflist."""
        self.run("network", "create", "--subnet", subnets[0], "--subnet", subnets[1], name)
        path = self.network_dir / f"{name}.conflist"
        edited = masqd_conflist(
            json.loads(path.read_text()),
            socket=socket,
            daemon_wait=daemon_wait,
            ipam_dir=str(self.base / "ipam"),
        )
        path.write_text(json.dumps(edited, indent=2))
        self.write_containers_conf(default_network=name)
        return edited

    def container_ids(self, *filters: str) -> set[str]:
        args = [arg for f in filters for arg in ("--filter", f)]
        return set(self.out("ps", "--all", "--no-trunc", "--quiet", *args).split())

    def state(self, container: str) -> str:
        return self.out("inspect", "--format", "{{.State.Status}}", container)

    def addresses(self, container: str, network: str) -> list[str]:
        """The container's IPv4 and IPv6 address on `network`, with prefix lengths."""
        info = json.loads(self.out("inspect", container))[0]
        net = info["NetworkSettings"]["Networks"][network]
        return [
            f"{net['IPAddress']}/{net['IPPrefixLen']}",
            f"{net['GlobalIPv6Address']}/{net['GlobalIPv6PrefixLen']}",
        ]

    def close(self, *, keep_storage: bool = False) -> None:
        """Remove every container; unmount what podman mounted under `base` (storage's own
        bind mount included); delete `base` unless `keep_storage`."""
        with contextlib.suppress(PodmanError, subprocess.TimeoutExpired):
            self.run("rm", "--all", "--force", "--time", "0")
        unmount_under(self.base)
        if not keep_storage:
            shutil.rmtree(self.base, ignore_errors=True)


def unmount_under(base: Path) -> None:
    """Lazily unmount every mount point at or below `base`, deepest first."""
    prefix = str(base.resolve())
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll `predicate()` until true; the bound is generous, the poll is fast."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def inputs_digest(paths: list[Path]) -> str:
    """A digest of files' relative paths and contents: the cache key of a build."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()

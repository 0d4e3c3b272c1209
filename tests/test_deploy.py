"""The shipped operating files are valid for the tools that consume them, and do what they say.

systemd units: `systemd-analyze verify` and `security`, the socket/service relation, and the
hardening checked against the real thing (libnftables through ctypes under W^X). Kubernetes
manifests: the API schemas (kubernetes-validate ships them, so this runs offline). Prometheus:
`promtool check config` and `promtool test rules`. The CNI plugin the DaemonSet installs:
installed and run exactly as the init container does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, via kubernetes-validate

from tests import sandbox
from tests.netns import netns

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
KUBERNETES = REPO / "deploy" / "kubernetes"
PROMETHEUS = REPO / "deploy" / "prometheus"
IMAGE = REPO / "deploy" / "image"
UNIT_EXEC_START = "/usr/local/bin/masqd"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")


def run(
    *cmd: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def unit_directives(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (systemd allows a key more than once)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


@pytest.fixture
def units_with_existing_binary(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart names an executable that exists here.

    verify insists that ExecStart's binary exists; /usr/local/bin/masqd is where a root
    `pip install .` puts it on a node, not on this machine. Only that path is changed.
    """
    binary = tmp_path / "masqd"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    for unit in ("masqd.service", "masqd.socket"):
        text = (SYSTEMD / unit).read_text()
        (tmp_path / unit).write_text(text.replace(f"={UNIT_EXEC_START} ", f"={binary} "))
    assert str(binary) in (tmp_path / "masqd.service").read_text()
    return tmp_path


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(units_with_existing_binary: Path) -> None:
    proc = run(
        "systemd-analyze",
        "verify",
        "--man=no",
        "./masqd.socket",
        "./masqd.service",
        cwd=units_with_existing_binary,
    )
    # verify exits 0 on mere warnings (an unknown key is one), so silence is the criterion.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_would_catch_a_mistake(units_with_existing_binary: Path) -> None:
    service = units_with_existing_binary / "masqd.service"
    service.write_text(service.read_text().replace("Type=notify", "Type=notify\nWatchdogSecs=5"))
    proc = run("systemd-analyze", "verify", "--man=no", "./masqd.service", cwd=service.parent)
    assert "WatchdogSecs" in proc.stderr


@needs_systemd_analyze
def test_service_sandbox_exposure_is_low(units_with_existing_binary: Path) -> None:
    proc = run(
        "systemd-analyze",
        "security",
        "--offline=true",
        "--no-pager",
        "./masqd.service",
        cwd=units_with_existing_binary,
    )
    found = re.search(r"Overall exposure level for masqd\.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    # 10 is an unsandboxed root service; what remains is inherent to the job (root, host
    # network, netlink, CAP_NET_ADMIN).
    assert float(found.group(1)) <= 2.0


def test_stopping_the_service_leaves_the_socket_listening() -> None:
    service = unit_directives(SYSTEMD / "masqd.service")
    socket_unit = unit_directives(SYSTEMD / "masqd.socket")
    # The service needs its socket; the socket is not bound to the service's lifetime.
    assert service["Unit.Requires"] == ["masqd.socket"]
    for binding in ("Unit.PartOf", "Unit.BindsTo", "Unit.StopPropagatedFrom"):
        assert binding not in socket_unit
    # The runtime directory holds the socket file and the journal: never removed on stop.
    assert service["Service.RuntimeDirectory"] == ["masqd"]
    assert service["Service.RuntimeDirectoryPreserve"] == ["yes"]
    assert service["Service.RuntimeDirectoryMode"] == ["0750"]
    assert socket_unit["Socket.DirectoryMode"] == ["0750"]


def test_service_and_socket_agree_on_the_api_socket() -> None:
    service = unit_directives(SYSTEMD / "masqd.service")
    socket_unit = unit_directives(SYSTEMD / "masqd.socket")
    (listen,) = socket_unit["Socket.ListenStream"]
    (exec_start,) = service["Service.ExecStart"]
    assert exec_start.split()[0] == UNIT_EXEC_START
    assert f"--socket {listen}" in exec_start
    assert listen.startswith("/run/masqd/")
    assert socket_unit["Socket.SocketMode"] == ["0660"]
    assert service["Service.Type"] == ["notify"]
    assert service["Service.NotifyAccess"] == ["main"]
    assert service["Service.Restart"] == ["on-failure"]
    assert service["Service.WatchdogSec"]
    assert service["Service.CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["Service.MemoryDenyWriteExecute"] == ["yes"]


@pytest.mark.kernel
@sandbox.needs_unit_privileges
def test_ctypes_libnftables_work_with_the_units_privileges() -> None:
    """MemoryDenyWriteExecute, NoNewPrivileges and CAP_NET_ADMIN alone leave libnftables usable."""
    probe = r"""
import ctypes, json, mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    wx = "allowed"
except OSError:
    wx = "refused"
lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
ctx = lib.nft_ctx_new(0)
lib.nft_ctx_buffer_output(ctx)
lib.nft_ctx_output_set_flags(ctx, 1 << 4)  # NFT_CTX_OUTPUT_JSON: JSON in and out
add = lib.nft_run_cmd_from_buffer(
    ctx, b'{"nftables": [{"add": {"table": {"family": "inet", "name": "probe"}}}]}'
)
listed = lib.nft_run_cmd_from_buffer(ctx, b'{"nftables": [{"list": {"tables": null}}]}')
out = json.loads(lib.nft_ctx_get_output_buffer(ctx))
# A ctypes callback too: libffi must not need writable+executable memory for it.
callback = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)()
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:")][0]
tables = [i["table"]["name"] for i in out["nftables"] if "table" in i]
print(json.dumps({"wx": wx, "add": add, "listed": listed, "tables": tables,
                  "callback": callback, "cap_eff": int(caps, 16)}))
"""
    with netns("mdwe") as ns:
        proc = run("ip", "netns", "exec", ns, *sandbox.unit_privileges(sys.executable, "-c", probe))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["wx"] == "refused"  # the filter is really on
    assert report["cap_eff"] == sandbox.CAP_NET_ADMIN_MASK
    assert (report["add"], report["listed"]) == (0, 0)
    assert report["tables"] == ["probe"]
    assert report["callback"] == 7


# ---- Kubernetes ------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", ["1.28.0", None], ids=["k8s-1.28", "k8s-latest"])
def test_kubernetes_manifests_validate_against_the_schemas(version: str | None) -> None:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    args = ["--strict", *(["--kubernetes-version", version] if version else [])]
    proc = run(validator, *args, *manifests())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(manifests())


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifests()]


def test_daemonset_runs_with_net_admin_only_on_the_host_network() -> None:
    (ds,) = yaml.safe_load_all((KUBERNETES / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    (daemon,) = pod["containers"]
    security = daemon["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The probes ask the API socket, which must be the one the daemon serves and the host sees.
    sock = next(a.split("=", 1)[1] for a in daemon["args"] if a.startswith("--socket="))
    mounts = {m["mountPath"]: m["name"] for m in daemon["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert volumes[mounts[os.path.dirname(sock)]] == os.path.dirname(sock)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        command = daemon[probe]["exec"]["command"]
        assert command[command.index("--unix-socket") + 1] == sock
        assert command[-1].endswith(path)
    assert daemon["ports"] == [{"name": "metrics", "containerPort": 9810, "protocol": "TCP"}]
    assert "--metrics-listen=$(NODE_IP):9810" in daemon["args"]


def test_image_provides_what_the_daemonset_runs() -> None:
    (ds,) = yaml.safe_load_all((KUBERNETES / "daemonset.yaml").read_text())
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    installer = Path(init["command"][0])
    assert installer.name in dockerfile and str(installer.parent) in dockerfile
    assert (IMAGE / installer.name).exists()
    assert "curl" in dockerfile  # the exec probes


# ---- the CNI plugin as the DaemonSet installs it ----------------------------------------

CNI_PLUGIN = REPO / "cni" / "bin" / "masqd-cni"


@pytest.fixture
def installed_cni(tmp_path: Path) -> Path:
    """masqd-cni (as `make setup` and the image build it) installed by the init container's
    script into a node's plugin directory that holds the old Python plugin's files."""
    share, cni_bin = tmp_path / "share", tmp_path / "opt-cni-bin"
    share.mkdir()
    cni_bin.mkdir()
    assert CNI_PLUGIN.exists(), "`make setup` builds cni/bin/masqd-cni"
    shutil.copy(CNI_PLUGIN, share / "masqd-cni")
    (cni_bin / "masqd-cni").write_text("#!/bin/sh\nexec python3 masqd-cni.pyz\n")
    (cni_bin / "masqd-cni.pyz").write_text("the plugin of masqd 0.1")
    (cni_bin / "bridge").write_text("another plugin")
    install = run(IMAGE / "install-cni.sh", cni_bin, env={**os.environ, "MASQD_SHARE": str(share)})
    assert install.returncode == 0, install.stderr
    return cni_bin


def test_the_init_container_installs_the_static_plugin_in_place_of_the_python_one(
    installed_cni: Path,
) -> None:
    assert sorted(p.name for p in installed_cni.iterdir()) == ["bridge", "masqd-cni"]
    assert stat.S_IMODE((installed_cni / "masqd-cni").stat().st_mode) == 0o755
    assert (installed_cni / "masqd-cni").read_bytes() == CNI_PLUGIN.read_bytes()


def test_installed_cni_plugin_runs_with_nothing_from_the_node(installed_cni: Path) -> None:
    # No PATH, no interpreter: only what a runtime passes.
    proc = run(
        installed_cni / "masqd-cni", input='{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


def test_installed_cni_plugin_reports_errors_with_a_failing_exit(installed_cni: Path) -> None:
    proc = run(installed_cni / "masqd-cni", input="{}", env={})  # no CNI_COMMAND
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 4


def test_the_image_builds_the_plugin_from_the_vendored_module() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "COPY cni/" in dockerfile
    assert "-mod=vendor" in dockerfile and "CGO_ENABLED=0" in dockerfile
    assert "/opt/masqd/share/masqd-cni" in dockerfile
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert "!cni/" in ignore and "cni/bin/" in ignore


# ---- Prometheus ------------------------------------------------------------------------


@needs_promtool
def test_plain_node_scrape_config_passes_promtool() -> None:
    proc = run("promtool", "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9810"]}]


@needs_promtool
def test_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """Checked as is where promtool has kubernetes_sd; Debian builds it without, and there
    everything but the discovery block (relabelling, rule files) is still checked."""
    proc = run("promtool", "check", "config", "prometheus-kubernetes.yml", cwd=PROMETHEUS)
    if "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            job["static_configs"] = [{"targets": ["192.0.2.1:9810"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(PROMETHEUS / "masqd-rules.yml", tmp_path)
        proc = run("promtool", "check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_alert_rules_fire_when_they_should() -> None:
    proc = run("promtool", "test", "rules", "masqd-rules.test.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_unit_and_the_daemonset_cap_memory_alike() -> None:
    """Both carry the memory limit the figures justify (docs/operating.md)."""
    service = unit_directives(SYSTEMD / "masqd.service")
    assert service["Service.MemoryMax"] == ["384M"]
    assert service["Service.MemoryHigh"] == ["320M"]
    (ds,) = yaml.safe_load_all((KUBERNETES / "daemonset.yaml").read_text())
    (masqd,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "masqd"]
    assert masqd["resources"]["limits"]["memory"] == "384Mi"

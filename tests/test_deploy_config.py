"""The policy ConfigMaps the manifests ship: kustomize builds them, the API schemas accept the
result, the DaemonSet mounts them where the kubelet keeps them up to date, and masqd reads
the example policies they hold.

`kubectl kustomize` builds offline; kubernetes-validate carries the schemas (as in
tests/test_deploy.py, which validates the plain manifests).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML

from masqd.config import ConfigLoader, read_ip_masq_agent
from masqd.ipmasqagent import LINK_LOCAL4, LINK_LOCAL6

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "deploy" / "kubernetes"
IP_MASQ_AGENT = REPO / "deploy" / "ip-masq-agent"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def validate(tmp_path: Path, docs: list[dict[str, Any]], version: str | None) -> None:
    files = []
    for index, doc in enumerate(docs):
        path = tmp_path / f"{index}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    args = ["--strict", *(["--kubernetes-version", version] if version else [])]
    proc = subprocess.run(
        [str(validator), *args, *files], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(files)


@pytest.mark.parametrize("overlay", [BASE, IP_MASQ_AGENT], ids=["base", "ip-masq-agent"])
@pytest.mark.parametrize("version", ["1.28.0", None], ids=["k8s-1.28", "k8s-latest"])
def test_the_kustomized_manifests_validate_against_the_schemas(
    overlay: Path, version: str | None, tmp_path: Path
) -> None:
    validate(tmp_path, kustomize(overlay), version)


def test_the_ip_masq_agent_example_configmap_validates(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((IP_MASQ_AGENT / "ip-masq-agent-configmap.yaml").read_text()))
    validate(tmp_path, docs, None)


def daemon_container(ds: dict[str, Any]) -> dict[str, Any]:
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return container


def mounted_file(ds: dict[str, Any], flag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The path `flag` names, and the mount and volume holding it."""
    container = daemon_container(ds)
    path = next(a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "="))
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    return path, mount, volumes[mount["name"]]


def test_the_daemonset_mounts_masqd_config_as_a_directory_the_kubelet_updates() -> None:
    docs = kustomize(BASE)
    configmap = by_kind(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == "masqd-config"  # no hash suffix: updated in place
    assert configmap["metadata"]["namespace"] == by_kind(docs, "DaemonSet")["metadata"]["namespace"]
    path, mount, volume = mounted_file(by_kind(docs, "DaemonSet"), "--config")
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == "masqd-config"
    assert Path(path).name in configmap["data"]


def test_the_example_policy_is_one_masqd_accepts(tmp_path: Path) -> None:
    data = by_kind(kustomize(BASE), "ConfigMap")["data"]
    (tmp_path / "masqd.toml").write_text(data["masqd.toml"])
    config = ConfigLoader(["--config", str(tmp_path / "masqd.toml")], environ={}).load()
    assert config.exempt_destinations == ("10.0.0.0/8", "fd00::/8")


def test_the_overlay_mounts_ip_masq_agents_configmap_where_ip_masq_agent_reads_it() -> None:
    ds = by_kind(kustomize(IP_MASQ_AGENT), "DaemonSet")
    path, mount, volume = mounted_file(ds, "--ip-masq-agent-config")
    assert path == "/etc/config/ip-masq-agent"
    assert "subPath" not in mount
    assert volume["configMap"] == {
        "name": "ip-masq-agent",
        "optional": True,
        "items": [{"key": "config", "path": "ip-masq-agent"}],
    }
    # The base's settings are all still there.
    assert mounted_file(ds, "--config")[2]["configMap"]["name"] == "masqd-config"


def test_the_example_ip_masq_agent_configmap_is_read_as_ip_masq_agent_reads_it(
    tmp_path: Path,
) -> None:
    (doc,) = yaml.safe_load_all((IP_MASQ_AGENT / "ip-masq-agent-configmap.yaml").read_text())
    (tmp_path / "ip-masq-agent").write_text(doc["data"]["config"])
    agent = read_ip_masq_agent(str(tmp_path / "ip-masq-agent"))
    assert agent is not None
    assert agent.exempt_destinations() == (
        LINK_LOCAL4, LINK_LOCAL6, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    )  # fmt: skip

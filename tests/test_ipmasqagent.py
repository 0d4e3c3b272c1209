"""ip-masq-agent's config format: read as ip-masq-agent reads it, mapped onto exempt destinations.

The documented examples are ip-masq-agent's own, verbatim: its repository's
`agent-config/config`, the Kubernetes "IP Masquerade Agent User Guide" ConfigMap, and the
YAML and JSON files of its `syncConfig` tests (cmd/ip-masq-agent/ip-masq-agent_test.go).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from masqd import ipmasqagent
from masqd.config import ConfigError, ConfigLoader
from masqd.ipmasqagent import LINK_LOCAL4, LINK_LOCAL6, InvalidFile, MasqAgentConfig, parse

RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")

# kubernetes-sigs/ip-masq-agent: agent-config/config
AGENT_CONFIG = (
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 172.16.0.0/12\n  - 192.168.0.0/16\n"
    "masqLinkLocal: false\nresyncInterval: 60s"
)
# The Kubernetes task page's ConfigMap file "config", then with masqLinkLocal added.
GUIDE_CONFIG = "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\nresyncInterval: 60s\n"
GUIDE_CONFIG_LINK_LOCAL = (
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\nresyncInterval: 60s\nmasqLinkLocal: true\n"
)
# ip-masq-agent's syncConfig tests.
YAML_ALL_KEYS = """
nonMasqueradeCIDRs:
  - 172.16.0.0/12
  - 10.0.0.0/8
cidrLimit: 64
masqLinkLocal: true
resyncInterval: 5s
"""
JSON_ALL_KEYS = """
{
  "nonMasqueradeCIDRs": ["172.16.0.0/12", "10.0.0.0/8"],
  "masqLinkLocal": true,
  "resyncInterval": "5s"
}
"""
JSON_JUST_CIDRS = '\n{\n\t"nonMasqueradeCIDRs": ["192.168.0.0/16"]\n}\n'
# (its tab indentation, written as escapes)
JSON_IPV6 = (
    "\n\t\t{\n"
    '\t\t  "nonMasqueradeCIDRs": ["172.16.0.0/12", "10.0.0.0/8", "fc00::/7"],\n'
    '\t\t  "masqLinkLocal": true,\n'
    '\t\t  "resyncInterval": "5s"\n'
    "\t\t}\n\t\t"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (AGENT_CONFIG, MasqAgentConfig(RFC1918, 64, False, False, "60s")),
        (GUIDE_CONFIG, MasqAgentConfig(("10.0.0.0/8",), 64, False, False, "60s")),
        (GUIDE_CONFIG_LINK_LOCAL, MasqAgentConfig(("10.0.0.0/8",), 64, True, False, "60s")),
        (YAML_ALL_KEYS, MasqAgentConfig(("172.16.0.0/12", "10.0.0.0/8"), 64, True, False, "5s")),
        ("\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n", MasqAgentConfig(("192.168.0.0/16",))),
        ("\nmasqLinkLocal: true\n", MasqAgentConfig(RFC1918, masq_link_local=True)),
        ("\nresyncInterval: 5m\n", MasqAgentConfig(resync_interval="5m")),
        (JSON_ALL_KEYS, MasqAgentConfig(("172.16.0.0/12", "10.0.0.0/8"), 64, True, False, "5s")),
        (JSON_JUST_CIDRS, MasqAgentConfig(("192.168.0.0/16",))),
        ('\n{\n\t"masqLinkLocal": true\n}\n', MasqAgentConfig(masq_link_local=True)),
        ('\n{\n\t"resyncInterval": "5m"\n}\n', MasqAgentConfig(resync_interval="5m")),
        (
            JSON_IPV6,
            MasqAgentConfig(("172.16.0.0/12", "10.0.0.0/8", "fc00::/7"), 64, True, False, "5s"),
        ),
    ],
    ids=[
        "agent-config",
        "guide",
        "guide-link-local",
        "yaml-all-keys",
        "yaml-cidrs",
        "yaml-link-local",
        "yaml-resync",
        "json-all-keys",
        "json-cidrs",
        "json-link-local",
        "json-resync",
        "json-ipv6",
    ],
)
def test_ip_masq_agents_documented_examples_read_as_it_reads_them(
    text: str, expected: MasqAgentConfig
) -> None:
    assert parse(text.encode()) == expected


@pytest.mark.parametrize("text", ["*", "{*"], ids=["yaml", "json"])
def test_ip_masq_agents_invalid_examples_are_refused(text: str) -> None:
    with pytest.raises(InvalidFile, match="not valid"):
        parse(text.encode())


def test_link_local_is_exempt_unless_masqueraded_as_in_ip_masq_agent() -> None:
    assert parse(AGENT_CONFIG.encode()).exempt_destinations() == (
        LINK_LOCAL4,
        LINK_LOCAL6,
        *RFC1918,
    )
    assert parse(GUIDE_CONFIG_LINK_LOCAL.encode()).exempt_destinations() == (
        LINK_LOCAL6,
        "10.0.0.0/8",
    )
    both = parse(b"masqLinkLocal: true\nmasqLinkLocalIPv6: true\nnonMasqueradeCIDRs: []\n")
    assert both.exempt_destinations() == ()


def test_an_empty_file_and_an_absent_key_mean_ip_masq_agents_defaults() -> None:
    assert parse(b"") == parse(b"\n# nothing\n") == MasqAgentConfig()
    assert MasqAgentConfig().exempt_destinations() == (LINK_LOCAL4, LINK_LOCAL6, *RFC1918)


def test_null_cidrs_mean_none_as_go_decodes_them() -> None:
    assert parse(b"nonMasqueradeCIDRs:\n").non_masquerade_cidrs == ()
    assert parse(b'{"nonMasqueradeCIDRs": null}').non_masquerade_cidrs == ()


def test_keys_match_case_insensitively_and_unknown_keys_are_kept_aside() -> None:
    # As Rancher writes it: Go's JSON decoder matches field names in any case.
    config = parse(
        b'{"NonMasqueradeCIDRs":["10.42.0.0/16"],"MasqLinkLocal":true,"ResyncInterval":"1m0s","extra":1}'
    )
    assert config == MasqAgentConfig(
        ("10.42.0.0/16",), masq_link_local=True, resync_interval="1m0s", unknown_keys=("extra",)
    )


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("- 10.0.0.0/8\n", "", "must be a mapping"),
        ("nonMasqueradeCIDRs: 10.0.0.0/8\n", "nonMasqueradeCIDRs", "must be a list"),
        ("nonMasqueradeCIDRs: [10.0.0.0/8, 7]\n", "nonMasqueradeCIDRs[1]", "must be a string"),
        ('{"masqLinkLocal": "true"}', "masqLinkLocal", "must be true or false"),
        ("cidrLimit: 1.5\n", "cidrLimit", "must be an integer"),
        ("resyncInterval: 60\n", "resyncInterval", "must be a duration"),
        ("resyncInterval: 60 seconds\n", "resyncInterval", "must be a duration"),
        (
            "cidrLimit: 1\nnonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\n",
            "nonMasqueradeCIDRs",
            "more than cidrLimit",
        ),
        ("masqLinkLocal: [\n", "", "not valid YAML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(text: str, key: str, message: str) -> None:
    with pytest.raises(InvalidFile) as caught:
        parse(text.encode())
    assert (caught.value.key, message in caught.value.message) == (key, True), caught.value


def test_a_file_over_a_configmaps_size_is_refused() -> None:
    with pytest.raises(InvalidFile, match="larger than"):
        parse(b"#" * (ipmasqagent.MAX_FILE_BYTES + 1))


def test_go_durations() -> None:
    for good in ("60s", "1m0s", "1h2m3.5s", "300ms", "0", "1.5h", "-5s", "2us", "3\u00b5s"):
        assert parse(f'{{"resyncInterval": "{good}"}}'.encode()).resync_interval == good
    for bad in ("", "5", "s", "1d", "1.s.", "5 s"):
        with pytest.raises(InvalidFile):
            parse(f'{{"resyncInterval": "{bad}"}}'.encode())


# ---- through the config loader: flag, environment, TOML key; union; errors --------------


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_the_file_joins_the_policys_exempt_destinations(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "masqd.toml", '[policy]\nexempt_destinations = ["198.18.0.0/15", "10.0.0.0/8"]\n'
    )
    agent = write(tmp_path / "ip-masq-agent", JSON_IPV6)
    config = ConfigLoader(["--config", toml, "--ip-masq-agent-config", agent], environ={}).load()
    assert config.ip_masq_agent_config == agent
    assert config.exempt_destinations == (
        "198.18.0.0/15", "10.0.0.0/8", LINK_LOCAL6, "172.16.0.0/12", "fc00::/7",
    )  # fmt: skip
    assert config.policy.exempt6 == (LINK_LOCAL6, "fc00::/7")


def test_the_path_comes_from_flag_environment_or_file_in_that_order(tmp_path: Path) -> None:
    a = write(
        tmp_path / "a",
        "nonMasqueradeCIDRs: [198.18.1.0/24]\nmasqLinkLocal: true\nmasqLinkLocalIPv6: true\n",
    )
    b = write(
        tmp_path / "b",
        "nonMasqueradeCIDRs: [198.18.2.0/24]\nmasqLinkLocal: true\nmasqLinkLocalIPv6: true\n",
    )
    c = write(
        tmp_path / "c",
        "nonMasqueradeCIDRs: [198.18.3.0/24]\nmasqLinkLocal: true\nmasqLinkLocalIPv6: true\n",
    )
    toml = write(tmp_path / "masqd.toml", f'ip_masq_agent_config = "{c}"\n')
    env = {"MASQD_IP_MASQ_AGENT_CONFIG": b}

    def exempt(argv: list[str], environ: dict[str, str]) -> tuple[str, ...]:
        return ConfigLoader(["--config", toml, *argv], environ=environ).load().exempt_destinations

    assert exempt(["--ip-masq-agent-config", a], env) == ("198.18.1.0/24",)
    assert exempt([], env) == ("198.18.2.0/24",)
    assert exempt([], {}) == ("198.18.3.0/24",)


def test_an_absent_file_means_ip_masq_agents_defaults(tmp_path: Path) -> None:
    config = ConfigLoader(
        [
            "--config",
            write(tmp_path / "m.toml", ""),
            "--ip-masq-agent-config",
            str(tmp_path / "none"),
        ],
        environ={},
    ).load()
    assert config.exempt_destinations == (LINK_LOCAL4, LINK_LOCAL6, *RFC1918)


def test_a_cidr_with_host_bits_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    agent = write(
        tmp_path / "ip-masq-agent", "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.1.2.3/16\n"
    )
    loader = ConfigLoader(
        ["--config", write(tmp_path / "m.toml", ""), "--ip-masq-agent-config", agent], environ={}
    )
    with pytest.raises(ConfigError) as caught:
        loader.load()
    assert str(caught.value) == (
        f"{agent}: nonMasqueradeCIDRs[1]: '10.1.2.3/16' has host bits set; "
        "write the network, 10.1.0.0/16"
    )


def test_the_file_is_the_one_named_at_start_until_a_restart(tmp_path: Path) -> None:
    first = write(tmp_path / "first", "nonMasqueradeCIDRs: [198.18.1.0/24]\n")
    second = write(tmp_path / "second", "nonMasqueradeCIDRs: [198.18.2.0/24]\n")
    toml = tmp_path / "masqd.toml"
    write(toml, f'ip_masq_agent_config = "{first}"\n')
    loader = ConfigLoader(["--config", str(toml)], environ={})
    assert "198.18.1.0/24" in loader.load().exempt_destinations
    write(toml, f'ip_masq_agent_config = "{second}"\n')
    reloaded = loader.load()
    assert "198.18.1.0/24" in reloaded.exempt_destinations
    assert "198.18.2.0/24" not in reloaded.exempt_destinations

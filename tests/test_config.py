"""Settings: flags > MASQD_* environment > TOML file > defaults; a bad file names key and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from masqd import config
from masqd.config import (
    ConfigError,
    ConfigLoader,
    DaemonConfig,
    find_key_line,
    parse_args,
    restart_needed,
    unknown_environment,
)
from masqd.planning.ruleset import Policy


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read the machine's /etc/masqd/masqd.toml."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))


def write(tmp_path: Path, text: str, name: str = "masqd.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def load(argv: list[str], environ: dict[str, str] | None = None) -> DaemonConfig:
    return ConfigLoader(argv, environ or {}).load()


def refusal(argv: list[str], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(argv, environ)
    return info.value


FULL_FILE = """
    # every setting masqd has
    socket = "/tmp/file.sock"
    state_dir = "/tmp/file-state"
    table = "filetable"
    metrics_listen = "127.0.0.1:9999"
    resync_interval = 30
    log_level = "debug"
    allow_uid = [1000, 1001]
    allow_gid = [50]
    max_attachments = 500
    apply_timeout = 3.5
    max_connections = 64
    metrics_max_connections = 8
    client_timeout = 2.5
    nft_runner = "cli"
    adopt_cni_plugins_rules = true

    [policy]
    exempt_destinations = ["10.0.0.0/8", "fd00::/8"]
    random_fully = true
"""


def test_defaults_when_no_file_no_environment_no_flags() -> None:
    assert load([]) == DaemonConfig()
    assert DaemonConfig().policy == Policy()


def test_a_file_can_hold_every_setting(tmp_path: Path) -> None:
    # An ip-masq-agent file that adds no exempt destination (see tests/test_ipmasqagent.py).
    agent = write(
        tmp_path,
        "nonMasqueradeCIDRs: []\nmasqLinkLocal: true\nmasqLinkLocalIPv6: true\n",
        "ip-masq-agent",
    )
    full = f'    ip_masq_agent_config = "{agent}"\n' + FULL_FILE
    cfg = load(["--config", write(tmp_path, full)])
    assert cfg == DaemonConfig(
        socket="/tmp/file.sock",
        state_dir="/tmp/file-state",
        table="filetable",
        metrics_listen="127.0.0.1:9999",
        resync_interval=30,
        log_level="debug",
        allow_uid=(1000, 1001),
        allow_gid=(50,),
        max_attachments=500,
        apply_timeout=3.5,
        max_connections=64,
        metrics_max_connections=8,
        client_timeout=2.5,
        nft_runner="cli",
        adopt_cni_plugins_rules=True,
        ip_masq_agent_config=agent,
        exempt_destinations=("10.0.0.0/8", "fd00::/8"),
        random_fully=True,
    )
    # Every field of the model is settable from the file: none forgotten.
    assert {k for k, v in cfg.model_dump().items() if v != getattr(DaemonConfig(), k)} == set(
        config.FIELDS
    )
    assert cfg.policy == Policy(exempt4=("10.0.0.0/8",), exempt6=("fd00::/8",), random_fully=True)


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        socket = "/tmp/file.sock"
        resync_interval = 30
        [policy]
        exempt_destinations = ["10.0.0.0/8"]
        random_fully = true
        """,
    )
    env = {
        "MASQD_SOCKET": "/tmp/env.sock",
        "MASQD_EXEMPT_DESTINATIONS": "192.0.2.0/24, 2001:db8::/32",
        "MASQD_RANDOM_FULLY": "false",
    }
    flags = [
        "--config",
        path,
        "--socket",
        "/tmp/flag.sock",
        "--exempt-destination",
        "198.18.0.0/15",
    ]

    cfg = load(flags, env)
    assert cfg.socket == "/tmp/flag.sock"  # flag beats environment and file
    assert cfg.exempt_destinations == ("198.18.0.0/15",)  # a flag list replaces, never merges
    assert cfg.random_fully is False  # environment beats file
    assert cfg.resync_interval == 30  # file beats default
    assert cfg.table == "masqd"  # default

    cfg = load(["--config", path], env)
    assert cfg.socket == "/tmp/env.sock"
    assert cfg.exempt_destinations == ("192.0.2.0/24", "2001:db8::/32")

    cfg = load(["--config", path])
    assert cfg.socket == "/tmp/file.sock"
    assert cfg.exempt_destinations == ("10.0.0.0/8",)
    assert cfg.random_fully is True

    assert load([]).socket == config.DEFAULT_SOCKET


def test_boolean_flags_can_turn_a_file_setting_off(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nrandom_fully = true\n")
    assert load(["--config", path]).random_fully is True
    assert load(["--config", path, "--no-random-fully"]).random_fully is False


def test_environment_lists_are_comma_separated_and_empty_means_none(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nexempt_destinations = ["10.0.0.0/8"]\n')
    env = {"MASQD_ALLOW_UID": "1000,1001", "MASQD_EXEMPT_DESTINATIONS": ""}
    cfg = load(["--config", path], env)
    assert cfg.allow_uid == (1000, 1001)
    assert cfg.exempt_destinations == ()


def test_flag_exempt_destinations_repeat_or_take_commas() -> None:
    cfg = load(
        ["--exempt-destination", "10.0.0.0/8,fd00::/8", "--exempt-destination", "192.0.2.0/24"]
    )
    assert cfg.exempt_destinations == ("10.0.0.0/8", "fd00::/8", "192.0.2.0/24")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'table = "fromenv"\n')
    assert load([], {"MASQD_CONFIG": path}).table == "fromenv"


def test_absent_default_file_is_fine_but_a_named_missing_file_is_an_error(tmp_path: Path) -> None:
    assert load([]) == DaemonConfig()
    missing = str(tmp_path / "nope.toml")
    assert "config file not found" in str(refusal(["--config", missing]))
    assert missing in str(refusal([], {"MASQD_CONFIG": missing}))


@pytest.mark.parametrize(
    ("text", "where", "key", "words"),
    [
        ('socket = "/s"\nresync_interval = -5\n', 2, "resync_interval", "greater than 0"),
        ('socket = "/s"\n\nsokcet = "/t"\n', 3, "sokcet", "unknown setting"),
        ('table = "x"\n[policy]\nrandom_fully = "perhaps"\n', 3, "policy.random_fully", "boolean"),
        ("[policy]\nrandom_fuly = true\n", 2, "policy.random_fuly", "unknown setting"),
        ("# top\nrandom_fully = true\n", 2, "random_fully", "belongs in the [policy] table"),
        (
            '[policy]\nexempt_destinations = [\n  "10.0.0.0/8",\n  "10.1.2.3/16",\n]\n',
            4,
            "policy.exempt_destinations[1]",
            "host bits set; write the network, 10.1.0.0/16",
        ),
        (
            '[policy]\nexempt_destinations = ["10.0.0.0/8", "banana/8"]\n',
            2,
            "policy.exempt_destinations[1]",
            "not an IPv4 or IPv6 CIDR",
        ),
        (
            '[policy]\nexempt_destinations = ["10.0.0.1"]\n',
            2,
            "policy.exempt_destinations[0]",
            "prefix length",
        ),
        ('log_level = "loud"\n', 1, "log_level", "'debug'"),
        ('metrics_listen = "nowhere"\n', 1, "metrics_listen", "HOST:PORT"),
        ("allow_uid = 1000\n", 1, "allow_uid", "tuple"),
    ],
)
def test_bad_file_is_refused_with_key_and_line(
    tmp_path: Path, text: str, where: int, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    problem = refusal(["--config", path]).problems[0]
    assert problem.where == f"{path}:{where}"
    assert problem.key == key
    assert words in problem.message


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'socket = "/s"\ntable = \n')
    problem = refusal(["--config", path]).problems[0]
    assert problem.where == f"{path}:2"
    assert "not valid TOML" in problem.message


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, 'socket = 5\ncolour = "blue"\n[policy]\nrandom_fully = 3\n')
    problems = {(p.where, p.key) for p in refusal(["--config", path]).problems}
    assert problems == {
        (f"{path}:1", "socket"),
        (f"{path}:2", "colour"),
        (f"{path}:4", "policy.random_fully"),
    }


def test_a_bad_file_is_refused_even_when_a_flag_overrides_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "resync_interval = 0\n")
    assert (
        refusal(["--config", path, "--resync-interval", "5"]).problems[0].key == "resync_interval"
    )


def test_bad_environment_and_flags_name_their_source() -> None:
    assert str(refusal([], {"MASQD_RESYNC_INTERVAL": "soon"}).problems[0]).startswith(
        "MASQD_RESYNC_INTERVAL: "
    )
    problem = refusal(["--exempt-destination", "10.0.0.1/8"]).problems[0]
    assert problem.where == "--exempt-destination"
    assert problem.key == "[0]"


def test_parse_args_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "table = 7\n")
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", path], {})
    assert info.value.code == 2
    assert (
        f"masqd: error: {path}:1: table: Input should be a valid string" in capsys.readouterr().err
    )


def test_existing_flags_keep_their_names() -> None:
    cfg = parse_args(
        [
            "--socket", "/s", "--state-dir", "/d", "--table", "t", "--metrics-listen", "",
            "--resync-interval", "5", "--log-level", "error", "--allow-uid", "7",
            "--allow-gid", "8", "--max-attachments", "9", "--apply-timeout", "2",
            "--nft-runner", "cli",
        ],
        {},
    )  # fmt: skip
    assert (cfg.socket, cfg.state_dir, cfg.table, cfg.metrics_listen) == ("/s", "/d", "t", "")
    assert (cfg.allow_uid, cfg.allow_gid, cfg.max_attachments, cfg.nft_runner) == (
        (7,),
        (8,),
        9,
        "cli",
    )


def test_exempt_destinations_are_canonical_and_deduplicated() -> None:
    cfg = DaemonConfig(exempt_destinations=("2001:DB8::/32", "10.0.0.0/8", "10.0.0.0/8"))
    assert cfg.exempt_destinations == ("2001:db8::/32", "10.0.0.0/8")
    assert cfg.policy == Policy(exempt4=("10.0.0.0/8",), exempt6=("2001:db8::/32",))


def test_reloading_rereads_only_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nexempt_destinations = ["10.0.0.0/8"]\n')
    loader = ConfigLoader(["--config", path, "--socket", "/flag.sock"], {"MASQD_TABLE": "envtable"})
    first = loader.load()
    Path(path).write_text(
        'socket = "/file.sock"\ntable = "filetable"\n[policy]\nrandom_fully = true\n'
    )
    second = loader.load()
    assert (second.socket, second.table) == ("/flag.sock", "envtable")  # precedence holds
    assert second.exempt_destinations == () and second.random_fully
    assert restart_needed(first, second) == []
    Path(path).write_text('state_dir = "/elsewhere"\n')
    assert restart_needed(first, loader.load()) == ["state_dir"]


def test_unknown_masqd_variables_are_named() -> None:
    env = {"MASQD_SOKET": "/x", "MASQD_SOCKET": "/y", "MASQD_CONFIG": "/c", "PATH": "/bin"}
    assert unknown_environment(env) == ["MASQD_SOKET"]


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("socket",), 2),
        (("policy", "random_fully"), 9),
        (("policy", "exempt_destinations"), 5),
        (("other", "random_fully"), 12),
        (("policy",), 4),
        (("other", "dotted", "key"), 13),
        (("other", "inline", "x"), 14),
        (("missing",), None),
    ],
)
def test_find_key_line(path: tuple[str, ...], line: int | None) -> None:
    text = textwrap.dedent(
        """\
        # comment with socket = "no"
        socket = "/run/masqd/masqd.sock"   # trailing comment
        random_fully = "top-level, not the policy one"
        [policy]
        exempt_destinations = [
          "socket = 'not a key'",
          "[other]",
        ]
        random_fully = true
        [ other ]
        x = 1
        "random_fully" = false
        dotted . key = 2
        inline = { x = 1 }
        """
    )
    assert find_key_line(text, path) == line

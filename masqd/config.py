"""Daemon settings: one validated model, filled from flags, environment, file and defaults.

Precedence, highest first: command-line flags > `MASQD_*` environment variables > the TOML
config file (`--config`, default /etc/masqd/masqd.toml) > built-in defaults. Each source is
validated on its own before they are merged, so an error always names where the bad value
came from: a flag (`--socket`), a variable (`MASQD_SOCKET`), or a file key with its line
(`/etc/masqd/masqd.toml:7: policy.exempt_destinations[1]: ...`).

The file holds every setting; the policy (what applies to every attachment) sits in its own
`[policy]` table:

    socket = "/run/masqd/masqd.sock"
    resync_interval = 60
    [policy]
    exempt_destinations = ["10.0.0.0/8", "fd00::/8"]
    random_fully = false

`ConfigLoader` keeps the flags and environment it was started with, so `load()` again (on
SIGHUP, or when the watcher sees the file change) re-reads only the file and re-applies the
same precedence. The flag names are a contract (scripts, unit files and manifests call them).

`ip_masq_agent_config` (`--ip-masq-agent-config`) names a file in ip-masq-agent's format (see
`ipmasqagent`): its exempt destinations are added to the policy's, a union, re-read with the
TOML file on every load. Which file that is stays as it was at start (changing it needs a
restart), like the socket.

An exempt destination with host bits set (`10.1.2.3/8`) is refused, not normalised: it
widens what is never masqueraded, and guessing whether the /8 or the host was meant is not
a guess to make silently. The error names the network it would have been.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from masqd import __version__, ipmasqagent
from masqd.defaults import (
    DEFAULT_CONFIG,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TABLE,
    ENV_CONFIG,
    ENV_PREFIX,
)
from masqd.planning.ruleset import Policy
from masqd.watch import Digest, file_digest

MAX_EXEMPT_DESTINATIONS = 100_000

# The file's [policy] table holds these fields; every other field is a top-level key.
POLICY_SECTION = "policy"
POLICY_FIELDS = ("exempt_destinations", "random_fully")
# Fields whose environment value is a comma-separated list.
LIST_FIELDS = ("allow_uid", "allow_gid", "exempt_destinations")
# Fields a reload (SIGHUP) applies to the running daemon; any other change needs a restart.
RELOADABLE_FIELDS = frozenset({"exempt_destinations", "random_fully", "log_level"})


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (port 0 picks a free one)")
    host = host.strip("[]")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"{host!r} is not an IP address") from None
    return value


def parse_exempt(value: str) -> str:
    """Canonical CIDR of an exempt destination, or ValueError saying why not."""
    if "/" not in value:
        raise ValueError(f"{value!r} needs a prefix length, like '10.0.0.0/8' or '{value}/32'")
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 CIDR") from None
    raise ValueError(f"{value!r} has host bits set; write the network, {loose}")


def _dedupe(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


TableName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
Listen = Annotated[str, AfterValidator(_check_listen)]
ExemptCIDR = Annotated[str, AfterValidator(parse_exempt)]
ExemptList = Annotated[
    tuple[ExemptCIDR, ...], Field(max_length=MAX_EXEMPT_DESTINATIONS), AfterValidator(_dedupe)
]


class DaemonConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    socket: str = Field(default=DEFAULT_SOCKET, min_length=1)
    state_dir: str = Field(default=DEFAULT_STATE_DIR, min_length=1)
    table: TableName = DEFAULT_TABLE
    metrics_listen: Listen | Literal[""] = DEFAULT_METRICS_LISTEN
    resync_interval: float = Field(default=60.0, gt=0, le=86400)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    allow_uid: tuple[Annotated[int, Field(ge=0)], ...] = ()
    allow_gid: tuple[Annotated[int, Field(ge=0)], ...] = ()
    max_attachments: int = Field(default=100_000, ge=1, le=10_000_000)
    apply_timeout: float = Field(default=10.0, gt=0, le=600)
    # No client may exhaust the daemon: open connections, and time to send a request.
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    client_timeout: float = Field(default=10.0, gt=0, le=3600)
    # The metrics port is reachable from the node's network (every pod, in Kubernetes): a
    # scraper or two and the probes need a handful of connections.
    metrics_max_connections: int = Field(default=64, ge=1, le=1_000_000)
    nft_runner: Literal["lib", "cli"] = "lib"
    adopt_cni_plugins_rules: bool = False
    # A file in ip-masq-agent's format whose exempt destinations join the policy's ("" none).
    ip_masq_agent_config: str = ""
    # The policy: destinations never masqueraded, and the masquerade's port selection.
    exempt_destinations: ExemptList = ()
    random_fully: bool = False

    @property
    def policy(self) -> Policy:
        nets = [ipaddress.ip_network(c) for c in self.exempt_destinations]
        return Policy(
            exempt4=tuple(str(n) for n in nets if n.version == 4),
            exempt6=tuple(str(n) for n in nets if n.version == 6),
            random_fully=self.random_fully,
        )


FIELDS = tuple(DaemonConfig.model_fields)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    name = "exempt_destination" if field_name == "exempt_destinations" else field_name
    return "--" + name.replace("_", "-")


def file_key(field_name: str) -> tuple[str, ...]:
    """Where a field lives in the file: ('policy', 'random_fully') or ('socket',)."""
    return (POLICY_SECTION, field_name) if field_name in POLICY_FIELDS else (field_name,)


# ---- errors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One bad setting: where it came from (`--flag`, `MASQD_VAR`, or the file and line)."""

    where: str
    key: str
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.where}: {self.key}: {self.message}"
        return f"{self.where}: {self.message}"


class ConfigError(Exception):
    """The settings were refused; `problems` lists every reason (the first is in the message)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")


def _loc_text(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- where a key is in the file ---------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(_BARE_OR_QUOTED, text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _bracket_depth(text: str) -> int:
    """Net [ minus ] in a line, ignoring strings and comments (multi-line arrays)."""
    depth = 0
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def find_key_line(text: str, path: Sequence[str]) -> int | None:
    """The 1-based line that sets key `path` (e.g. ('policy', 'random_fully')) in TOML text.

    Handles `key = value`, `[table]` headers, dotted keys and values spanning lines (arrays);
    a key inside an inline table falls back to the line of the table's key, and a missing
    key to its table's header. None when nothing matches.
    """
    want = tuple(path)
    section: tuple[str, ...] = ()
    depth = 0
    fallback: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if depth > 0:
            depth += _bracket_depth(line)
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            section = _split_dotted(header.group(1))
            if want[: len(section)] == section and fallback is None:
                fallback = number
            continue
        key = _KEY.match(line)
        if key is None:
            continue
        full = section + _split_dotted(key.group(1))
        depth = _bracket_depth(line[key.end() :])
        if full == want:
            return number
        if want[: len(full)] == full:
            fallback = number  # an inline table or dotted parent holding the key
    return fallback


def find_value_line(text: str, key_line: int, value: str) -> int:
    """The line at or after `key_line` that holds the string `value` (an item of an array that
    may span lines); `key_line` itself when it cannot be told."""
    lines = text.splitlines()
    quoted = (f'"{value}"', f"'{value}'")
    depth = 0
    for number in range(key_line, len(lines) + 1):
        line = lines[number - 1]
        part = line.split("=", 1)[1] if number == key_line and "=" in line else line
        if any(q in part for q in quoted):
            return number
        depth += _bracket_depth(part)
        if depth <= 0:
            break
    return key_line


# ---- the sources ------------------------------------------------------------------------


Locate = Callable[[tuple[Any, ...], Any], tuple[str, str]]


def _problems(exc: ValidationError, where: Locate) -> list[Problem]:
    """Pydantic's errors as Problems; `where(loc, error)` -> (where, key)."""
    out: dict[tuple[str, str], Problem] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        # Keep the field and list indices; drop the names pydantic gives union members, and
        # report a field that failed every member of a union once, with the first reason.
        loc = loc[:1] + tuple(part for part in loc[1:] if isinstance(part, int))
        place, key = where(loc, err)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        out.setdefault((place, key), Problem(place, key, msg))
    return list(out.values())


def read_file(path: str, *, required: bool) -> dict[str, Any]:
    """The settings a TOML file gives, validated, by field name; {} for a file that is absent
    and not required. Raises ConfigError naming the file, the line and the key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError([Problem(path, "", "config file not found")]) from None
        return {}
    except OSError as exc:
        raise ConfigError([Problem(path, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path, "", f"not UTF-8 text: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        place = f"{path}:{found.group(1)}" if found else path
        raise ConfigError([Problem(place, "", f"not valid TOML: {exc}")]) from None

    def at(key_path: Sequence[str], value: Any = None) -> str:
        line = find_key_line(text, key_path)
        if line is not None and isinstance(value, str):
            line = find_value_line(text, line, value)
        return f"{path}:{line}" if line is not None else path

    problems: list[Problem] = []
    flat: dict[str, Any] = {}
    top_fields = [f for f in FIELDS if f not in POLICY_FIELDS]
    for key, value in data.items():
        if key == POLICY_SECTION:
            if not isinstance(value, dict):
                problems.append(Problem(at((key,)), key, "must be a table ([policy])"))
                continue
            for sub, sub_value in value.items():
                if sub in POLICY_FIELDS:
                    flat[sub] = sub_value
                else:
                    problems.append(
                        Problem(at((key, sub)), f"{key}.{sub}", _unknown(sub, POLICY_FIELDS))
                    )
        elif key in top_fields:
            flat[key] = value
        else:
            hint = " (it belongs in the [policy] table)" if key in POLICY_FIELDS else ""
            problems.append(Problem(at((key,)), key, _unknown(key, top_fields) + hint))
    try:
        DaemonConfig.model_validate(flat)
    except ValidationError as exc:

        def where(loc: tuple[Any, ...], err: Any) -> tuple[str, str]:
            field_name = str(loc[0]) if loc else ""
            key_path = file_key(field_name) if field_name else ()
            value = err.get("input") if len(loc) > 1 else None
            return at(key_path, value), _loc_text((*key_path, *loc[1:]))

        problems.extend(_problems(exc, where))
    if problems:
        raise ConfigError(problems)
    return flat


def _unknown(key: str, known: Sequence[str]) -> str:
    return f"unknown setting (known here: {', '.join(known)})"


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings `MASQD_*` variables give, validated, by field name. Lists are comma-separated
    (`MASQD_EXEMPT_DESTINATIONS=10.0.0.0/8,fd00::/8`); an empty value is an empty list."""
    given: dict[str, Any] = {}
    for field_name in FIELDS:
        value = environ.get(env_name(field_name))
        if value is None:
            continue
        if field_name in LIST_FIELDS:
            given[field_name] = tuple(v.strip() for v in value.split(",") if v.strip())
        else:
            given[field_name] = value.strip()
    try:
        DaemonConfig.model_validate(given)
    except ValidationError as exc:
        raise ConfigError(
            _problems(exc, lambda loc, _: (env_name(str(loc[0])), _loc_text(loc[1:])))
        ) from None
    return given


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """`MASQD_*` variables that name no setting (likely typos), for a warning."""
    known = {env_name(f) for f in FIELDS} | {ENV_CONFIG}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="masqd",
        description="Keep an nftables masquerade table in line with container attachments.",
        epilog="Every setting can also come from the environment (MASQD_SOCKET, ...) or the "
        "config file; flags win over the environment, which wins over the file.",
    )
    p.add_argument("--version", action="version", version=f"masqd {__version__}")
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML config file (default {DEFAULT_CONFIG}, which may be absent; "
        f"a path given here or in {ENV_CONFIG} must exist)",
    )
    p.add_argument("--socket", help=f"API Unix socket (default {DEFAULT_SOCKET})")
    p.add_argument("--state-dir", help=f"journal directory (default {DEFAULT_STATE_DIR})")
    p.add_argument("--table", help=f"nftables table name, family inet (default {DEFAULT_TABLE})")
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"Prometheus endpoint (default {DEFAULT_METRICS_LISTEN}; "
        "port 0 picks a free port; empty disables)",
    )
    p.add_argument(
        "--resync-interval", type=float, metavar="SECONDS", help="full resync period (default 60)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="a uid besides root that may use the socket (repeatable)",
    )
    p.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        metavar="GID",
        help="a gid whose members may use the socket (repeatable)",
    )
    p.add_argument("--max-attachments", type=int, help="refuse setups beyond this (default 100000)")
    p.add_argument(
        "--apply-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a request waits for the kernel before 503 (default 10)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="API connections open at once; beyond, 503 and close (default 1024)",
    )
    p.add_argument(
        "--metrics-max-connections",
        type=int,
        metavar="N",
        help="metrics connections open at once; beyond, 503 and close (default 64)",
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        metavar="SECONDS",
        help="time a client has to send its request, and to read the response; idle time "
        "before a kept-alive connection is closed; API and metrics port (default 10)",
    )
    p.add_argument(
        "--nft-runner",
        choices=["lib", "cli"],
        help="libnftables in-process (default) or the nft binary",
    )
    p.add_argument(
        "--exempt-destination",
        dest="exempt_destinations",
        action="append",
        metavar="CIDR",
        help="a destination never masqueraded to (repeatable, or comma-separated); "
        "given here, it replaces the file's list",
    )
    p.add_argument(
        "--ip-masq-agent-config",
        metavar="PATH",
        help="also exempt the destinations of this ip-masq-agent config file (YAML or JSON, "
        "e.g. /etc/config/ip-masq-agent); watched like the config file",
    )
    p.add_argument(
        "--random-fully",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="masquerade with fully random source ports (default off)",
    )
    p.add_argument(
        "--adopt-cni-plugins-rules",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="at start-up, take over the CNI plugins' table inet cni_plugins_masquerade "
        "(see docs/policy.md)",
    )
    return p


class ConfigLoader:
    """Flags and environment, fixed at start; the file, read on every `load()`."""

    def __init__(
        self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.parser = build_parser()
        args = vars(self.parser.parse_args(argv))
        self.environ = dict(os.environ if environ is None else environ)
        config_path = args.pop("config")
        if config_path is None:
            config_path = self.environ.get(ENV_CONFIG) or None
        self.path: str = config_path or DEFAULT_CONFIG
        self.explicit = config_path is not None
        self.flags = {k: v for k, v in args.items() if v is not None}
        # What each watched file held when last read, so the watcher can tell a change
        # made after the read from one the read already saw.
        self.digests: dict[str, Digest] = {}
        self.ip_masq_agent_path: str | None = None  # pinned by the first load
        self._said: set[str] = set()
        self._notes: list[tuple[int, str]] = []
        for multi in ("allow_uid", "allow_gid"):
            if multi in self.flags:
                self.flags[multi] = tuple(self.flags[multi])
        if "exempt_destinations" in self.flags:
            self.flags["exempt_destinations"] = tuple(
                part.strip()
                for value in self.flags["exempt_destinations"]
                for part in value.split(",")
                if part.strip()
            )

    def read_flags(self) -> dict[str, Any]:
        try:
            DaemonConfig.model_validate(self.flags)
        except ValidationError as exc:
            raise ConfigError(
                _problems(exc, lambda loc, _: (flag_name(str(loc[0])), _loc_text(loc[1:])))
            ) from None
        return self.flags

    def load(self) -> DaemonConfig:
        """Defaults < file < environment < flags, each validated, then the ip-masq-agent
        file's exempt destinations added. Raises ConfigError."""
        merged: dict[str, Any] = {}
        # Digest before reading: a change made in between shows as a change to the watcher.
        self.digests[self.path] = file_digest(self.path)
        merged.update(read_file(self.path, required=self.explicit))
        merged.update(read_environment(self.environ))
        merged.update(self.read_flags())
        config = DaemonConfig.model_validate(merged)
        if self.ip_masq_agent_path is None:
            self.ip_masq_agent_path = config.ip_masq_agent_config
        path = self.ip_masq_agent_path
        if not path:
            return config
        self.digests[path] = file_digest(path)
        agent = read_ip_masq_agent(path)
        self._note_once(agent, path)
        extra = (agent or ipmasqagent.MasqAgentConfig()).exempt_destinations()
        union = _dedupe((*config.exempt_destinations, *extra))
        if len(union) > MAX_EXEMPT_DESTINATIONS:
            raise ConfigError(
                [
                    Problem(
                        path,
                        "nonMasqueradeCIDRs",
                        f"with the policy's own, {len(union)} exempt destinations; at most "
                        f"{MAX_EXEMPT_DESTINATIONS}",
                    )
                ]
            )
        # Validated again: the file's CIDRs are written in canonical form and deduplicated.
        return DaemonConfig.model_validate({**merged, "exempt_destinations": union})

    def take_notes(self) -> list[tuple[int, str]]:
        """(log level, line) for the daemon to log: what the last loads noticed and did not
        say before. Kept until asked for, since the first load runs before logging is set."""
        notes, self._notes = self._notes, []
        return notes

    def _note_once(self, agent: ipmasqagent.MasqAgentConfig | None, path: str) -> None:
        """Note what masqd does not use from the ip-masq-agent file, once per distinct note."""
        notes: list[tuple[int, str]] = []
        if agent is None:
            notes.append((logging.INFO, f"{path}: absent; ip-masq-agent's defaults apply"))
        else:
            notes.append(
                (
                    logging.INFO,
                    f"{path}: resyncInterval {agent.resync_interval} read and ignored: masqd "
                    "watches the file and applies a change at once",
                )
            )
            if agent.unknown_keys:
                notes.append(
                    (
                        logging.WARNING,
                        f"{path}: keys ip-masq-agent does not know, ignored as it ignores "
                        f"them: {', '.join(agent.unknown_keys)}",
                    )
                )
        for level, text in notes:
            if text not in self._said:
                self._said.add(text)
                self._notes.append((level, text))

    def load_or_exit(self) -> DaemonConfig:
        """`load()`, or exit 2 with every problem, one line each (for start-up)."""
        try:
            return self.load()
        except ConfigError as exc:
            self.fail(exc)

    def fail(self, exc: ConfigError) -> NoReturn:
        lines = "".join(f"masqd: error: {p}\n" for p in exc.problems)
        self.parser.exit(2, lines)


def read_ip_masq_agent(path: str) -> ipmasqagent.MasqAgentConfig | None:
    """The ip-masq-agent file at `path` with every CIDR checked as an exempt destination;
    None when it is absent (ip-masq-agent's defaults then apply, as in ip-masq-agent).
    Raises ConfigError naming the file and the key."""
    try:
        agent = ipmasqagent.read(path)
    except ipmasqagent.InvalidFile as exc:
        raise ConfigError([Problem(path, exc.key, exc.message)]) from None
    except OSError as exc:
        raise ConfigError([Problem(path, "", f"cannot read: {exc.strerror}")]) from None
    if agent is None:
        return None
    problems: list[Problem] = []
    for index, cidr in enumerate(agent.non_masquerade_cidrs):
        try:
            parse_exempt(cidr)
        except ValueError as exc:
            problems.append(Problem(path, f"nonMasqueradeCIDRs[{index}]", str(exc)))
    if problems:
        raise ConfigError(problems)
    return agent


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> DaemonConfig:
    """Flags, environment and file -> validated config; a bad value exits 2, one line each."""
    return ConfigLoader(argv, environ).load_or_exit()


def changed_fields(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    return [f for f in FIELDS if getattr(old, f) != getattr(new, f)]


def restart_needed(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    """Changed settings that a reload cannot apply to a running daemon."""
    return [f for f in changed_fields(old, new) if f not in RELOADABLE_FIELDS]


def log_level(name: str) -> int:
    return int(getattr(logging, name.upper()))

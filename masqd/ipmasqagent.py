"""ip-masq-agent's config file, read the way ip-masq-agent reads it, as masqd policy.

Clusters that ran kubernetes-sigs/ip-masq-agent keep their policy in its ConfigMap (mounted
at /etc/config/ip-masq-agent). `--ip-masq-agent-config PATH` points masqd at that file, so
the ConfigMap they already have keeps working. ip-masq-agent's reading, followed here:

- the file is YAML or JSON (it converts YAML to JSON, then decodes JSON into its struct), so
  keys match case-insensitively, as Go's decoder matches them, and unknown keys are ignored
  (masqd names them once in the log);
- every key is optional and starts from ip-masq-agent's defaults: `nonMasqueradeCIDRs` the
  three RFC 1918 ranges, `cidrLimit` 64, `masqLinkLocal` and `masqLinkLocalIPv6` false,
  `resyncInterval` 60s; an absent or empty file is all defaults; `nonMasqueradeCIDRs: null`
  is no CIDRs at all (Go sets the slice to nil);
- more CIDRs than `cidrLimit`, a CIDR with host bits set, or a value of the wrong type
  refuses the whole file.

The mapping onto masqd's policy: the CIDRs become exempt destinations, and so do
169.254.0.0/16 when `masqLinkLocal` is false and fe80::/10 when `masqLinkLocalIPv6` is false
(ip-masq-agent's RETURN rules for them). `resyncInterval` is checked as a Go duration and
otherwise unused: masqd watches the file instead of re-reading it on a timer.

This module parses only; the CIDRs are validated by `config`, with the one rule every
exempt destination obeys, so an error names this file and the key (`nonMasqueradeCIDRs[1]`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LINK_LOCAL4 = "169.254.0.0/16"
LINK_LOCAL6 = "fe80::/10"
# ip-masq-agent's defaults (without its --nomasq-all-reserved-ranges flag).
DEFAULT_NON_MASQUERADE_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
DEFAULT_CIDR_LIMIT = 64
DEFAULT_RESYNC_INTERVAL = "60s"
# A ConfigMap holds at most 1 MiB; a bigger file is not one.
MAX_FILE_BYTES = 1024 * 1024

KEYS = ("nonMasqueradeCIDRs", "cidrLimit", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval")
_BY_FOLDED = {k.lower(): k for k in KEYS}
# Go's time.ParseDuration: "0", or signed runs of decimal numbers each with a unit.
_GO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)")


class InvalidFile(ValueError):
    """The file was refused; `key` is where (a key path like `nonMasqueradeCIDRs[1]`, or '')."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


@dataclass(frozen=True)
class MasqAgentConfig:
    non_masquerade_cidrs: tuple[str, ...] = DEFAULT_NON_MASQUERADE_CIDRS
    cidr_limit: int = DEFAULT_CIDR_LIMIT
    masq_link_local: bool = False
    masq_link_local_ipv6: bool = False
    resync_interval: str = DEFAULT_RESYNC_INTERVAL
    unknown_keys: tuple[str, ...] = ()

    def exempt_destinations(self) -> tuple[str, ...]:
        """The destinations ip-masq-agent would RETURN for (never masquerade), in its order:
        link-local first, then the CIDRs."""
        out: list[str] = []
        if not self.masq_link_local:
            out.append(LINK_LOCAL4)
        if not self.masq_link_local_ipv6:
            out.append(LINK_LOCAL6)
        out.extend(self.non_masquerade_cidrs)
        return tuple(dict.fromkeys(out))


def parse(raw: bytes) -> MasqAgentConfig:
    """The config a file's bytes give, or InvalidFile saying why not."""
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidFile(
            "", f"larger than {MAX_FILE_BYTES} bytes; a ConfigMap holds at most 1 MiB"
        )
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidFile("", f"not UTF-8 text: {exc}") from None
    data = _load(text)
    if data is None:
        return MasqAgentConfig()
    if not isinstance(data, Mapping):
        raise InvalidFile("", f"must be a mapping of keys ({', '.join(KEYS)}), not {_kind(data)}")
    return _decode(data)


def read(path: str) -> MasqAgentConfig | None:
    """The config in `path`; None when there is no such file (ip-masq-agent then uses its
    defaults, and so does the caller). OSError for a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    return parse(raw)


def _load(text: str) -> Any:
    """JSON, else YAML (a JSON document is also YAML, but JSON's own errors are clearer for a
    file that starts like JSON)."""
    if not text.strip():
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidFile("", f"not valid JSON: {exc}") from None
    # Imported here: only a daemon given --ip-masq-agent-config pays for PyYAML's import.
    import yaml  # type: ignore[import-untyped]

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidFile("", f"not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise InvalidFile("", "not valid YAML: nested too deeply") from None


def _decode(data: Mapping[Any, Any]) -> MasqAgentConfig:
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        name = _BY_FOLDED.get(str(key).lower())
        if name is None:
            unknown.append(str(key))
        else:
            values[name] = value  # as in Go, a later spelling of a key wins
    fields: dict[str, Any] = {"unknown_keys": tuple(unknown)}
    if "nonMasqueradeCIDRs" in values:
        fields["non_masquerade_cidrs"] = _cidrs(values["nonMasqueradeCIDRs"])
    for key, field in (
        ("masqLinkLocal", "masq_link_local"),
        ("masqLinkLocalIPv6", "masq_link_local_ipv6"),
    ):
        value = values.get(key)
        if value is None:
            continue  # absent, or null: Go leaves the default
        if not isinstance(value, bool):
            raise InvalidFile(key, f"must be true or false, not {_kind(value)}")
        fields[field] = value
    limit = values.get("cidrLimit")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidFile("cidrLimit", f"must be an integer, not {_kind(limit)}")
        fields["cidr_limit"] = limit
    if "resyncInterval" in values:
        fields["resync_interval"] = _duration(values["resyncInterval"])
    config = MasqAgentConfig(**fields)
    if len(config.non_masquerade_cidrs) > config.cidr_limit:
        raise InvalidFile(
            "nonMasqueradeCIDRs",
            f"{len(config.non_masquerade_cidrs)} CIDRs, more than cidrLimit "
            f"({config.cidr_limit}) allows",
        )
    return config


def _cidrs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidFile("nonMasqueradeCIDRs", f"must be a list of CIDRs, not {_kind(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidFile(
                f"nonMasqueradeCIDRs[{index}]", f"must be a string, not {_kind(item)}"
            )
    return tuple(value)


def _duration(value: Any) -> str:
    if not isinstance(value, str) or not _GO_DURATION.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise InvalidFile(
            "resyncInterval", f'must be a duration like "60s" or "1m30s", not {shown}'
        )
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__

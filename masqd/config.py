"""Daemon settings: one validated model, filled from the command line.

The flag names are a contract (scripts, unit files and manifests call them).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from masqd import __version__

DEFAULT_SOCKET = "/run/masqd/masqd.sock"
DEFAULT_STATE_DIR = "/run/masqd"
DEFAULT_TABLE = "masqd"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9810"


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


TableName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
Listen = Annotated[str, AfterValidator(_check_listen)]


class DaemonConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    table: TableName = DEFAULT_TABLE
    metrics_listen: Listen | Literal[""] = DEFAULT_METRICS_LISTEN
    resync_interval: float = Field(default=60.0, gt=0, le=86400)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    allow_uid: tuple[int, ...] = ()
    allow_gid: tuple[int, ...] = ()
    max_attachments: int = Field(default=100_000, ge=1, le=10_000_000)
    apply_timeout: float = Field(default=10.0, gt=0, le=600)
    nft_runner: Literal["lib", "cli"] = "lib"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="masqd",
        description="Keep an nftables masquerade table in line with container attachments.",
    )
    p.add_argument("--version", action="version", version=f"masqd {__version__}")
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
        "--nft-runner",
        choices=["lib", "cli"],
        help="libnftables in-process (default) or the nft binary",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> DaemonConfig:
    """Flags -> validated config; a bad value exits 2 with one readable line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    for multi in ("allow_uid", "allow_gid"):
        if multi in given:
            given[multi] = tuple(given[multi])
    try:
        return DaemonConfig(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "config"
        parser.exit(2, f"masqd: error: {where}: {err['msg']}\n")


def log_level(name: str) -> int:
    return int(getattr(logging, name.upper()))

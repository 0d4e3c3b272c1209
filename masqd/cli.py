"""masqctl: the operator's command line for a running masqd.

Talks to the daemon's API over its Unix socket (standard library HTTP), prints tables for
people and JSON (`--json`) for scripts. Any failure is one readable line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from masqd.defaults import DEFAULT_SOCKET


class CliError(Exception):
    """Something to tell the user in one line."""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("masqd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise CliError(
                f"masqd is not reachable at {self.socket_path} ({exc.strerror}); is it running?"
            ) from None
        except PermissionError:
            raise CliError(f"permission denied on {self.socket_path} (run as root?)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"talking to masqd at {self.socket_path} failed: {exc}") from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            payload = {"error": raw.decode(errors="replace")}
        return response.status, payload

    def expect(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        status, payload = self.call(method, path, body)
        if status not in ok:
            message = payload.get("error") if isinstance(payload, dict) else payload
            details = payload.get("details") if isinstance(payload, dict) else None
            if details:
                message = f"{message}: " + "; ".join(f"{d['loc']}: {d['msg']}" for d in details)
            raise CliError(f"masqd answered {status}: {message}")
        return payload


def attachment_path(network: str, container_id: str, ifname: str) -> str:
    parts = (quote(network, safe=""), quote(container_id, safe=""), quote(ifname, safe=""))
    return "/v1/attachments/" + "/".join(parts)


# ---- presentation --------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def attachment_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [[a["network"], a["container_id"], a["ifname"], " ".join(a["ips"])] for a in items]


def ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_status(s: dict[str, Any]) -> str:
    last = s.get("last_sync", {})
    syncs = s.get("syncs", {})
    elements = s.get("kernel_elements", {})
    health = "READY" if s.get("ready") else "NOT READY"
    policy = s.get("policy", {})
    lines = [
        f"masqd {s.get('version')}  {health}",
        f"  table         {s.get('table')}",
        f"  attachments   {s.get('attachments')} (max {s.get('max_attachments')}), "
        f"{s.get('addresses')} addresses",
        f"  kernel        {elements.get('ipv4', 0)} IPv4 + {elements.get('ipv6', 0)} IPv6 "
        f"set elements, generation {s.get('generation')}",
        f"  last sync     {last.get('kind') or '-'} {last.get('result') or '-'} "
        f"{ago(last.get('time'))}"
        + (
            f" in {last['duration_seconds'] * 1000:.1f} ms"
            if last.get("duration_seconds") is not None
            else ""
        ),
        f"  last success  {ago(last.get('last_success_time'))}",
        f"  syncs         {syncs.get('total', 0)} total ({syncs.get('full', 0)} full, "
        f"{syncs.get('partial', 0)} partial), {syncs.get('failures', 0)} failed, "
        f"{syncs.get('drift_repairs', 0)} drift repairs",
        f"  policy        exempt: {', '.join(policy.get('exempt_destinations', [])) or 'none'}; "
        f"fully-random: {'on' if policy.get('random_fully') else 'off'}",
    ]
    if last.get("error"):
        lines.append(f"  last error    {last['error']}")
    if s.get("metrics_address"):
        lines.append(f"  metrics       http://{s['metrics_address']}/metrics")
    for problem in s.get("journal_problems") or []:
        lines.append(f"  journal       {problem}")
    spool_problem = (s.get("spool") or {}).get("problem")
    if spool_problem:
        lines.append(f"  DEL spool     refused: {spool_problem}")
    return "\n".join(lines)


# ---- commands ------------------------------------------------------------------------------


def cmd_list(client: Client, args: argparse.Namespace) -> Any:
    query = f"?{urlencode({'network': args.network})}" if args.network else ""
    payload = client.expect("GET", f"/v1/attachments{query}")
    if args.json:
        return payload
    items = payload["attachments"]
    print(table(attachment_rows(items), ["NETWORK", "CONTAINER", "IFNAME", "IPS"]))
    print(f"{len(items)} attachments")
    return None


def cmd_get(client: Client, args: argparse.Namespace) -> Any:
    payload = client.expect("GET", attachment_path(args.network, args.container_id, args.ifname))
    if args.json:
        return payload
    print(table(attachment_rows([payload]), ["NETWORK", "CONTAINER", "IFNAME", "IPS"]))
    return None


def cmd_set(client: Client, args: argparse.Namespace) -> Any:
    path = attachment_path(args.network, args.container_id, args.ifname)
    payload = client.expect("PUT", path, {"ips": args.ips})
    if args.json:
        return payload
    print(f"set {args.network}/{args.container_id}/{args.ifname}: {' '.join(payload['ips'])}")
    return None


def cmd_delete(client: Client, args: argparse.Namespace) -> Any:
    path = attachment_path(args.network, args.container_id, args.ifname)
    payload = client.expect("DELETE", path, ok=(200, 204))
    if args.json:
        return payload
    what = "deleted" if payload and payload.get("deleted") else "was not there"
    print(f"{args.network}/{args.container_id}/{args.ifname} {what}")
    return None


def cmd_gc(client: Client, args: argparse.Namespace) -> Any:
    valid = []
    for item in args.valid or []:
        container_id, sep, ifname = item.rpartition("/")
        if not sep or not container_id or not ifname:
            raise CliError(f"--valid takes CONTAINER/IFNAME, got {item!r}")
        valid.append({"container_id": container_id, "ifname": ifname})
    payload = client.expect(
        "POST", f"/v1/networks/{quote(args.network, safe='')}/gc", {"valid_attachments": valid}
    )
    if args.json:
        return payload
    removed = payload["removed"]
    if removed:
        print(table(attachment_rows(removed), ["NETWORK", "CONTAINER", "IFNAME", "IPS"]))
    print(f"removed {len(removed)} attachments from network {args.network}")
    return None


def cmd_status(client: Client, args: argparse.Namespace) -> Any:
    payload = client.expect("GET", "/v1/status")
    if args.json:
        return payload
    print(format_status(payload))
    return None


def cmd_diff(client: Client, args: argparse.Namespace) -> Any:
    payload = client.expect("GET", "/v1/diff")
    if args.json:
        return payload
    if payload["empty"]:
        print("no changes: the kernel's table matches the desired state")
    else:
        print(payload["commands"])
    return None


def format_adoption(report: dict[str, Any]) -> str:
    if not report.get("found"):
        return "no table inet cni_plugins_masquerade: nothing to adopt"
    lines = []
    adopted = report.get("adopted") or []
    if adopted:
        lines.append(table(attachment_rows(adopted), ["NETWORK", "CONTAINER", "IFNAME", "IPS"]))
    lines.append(
        f"adopted {len(adopted)} attachments; deleted {report.get('deleted_rules', 0)} legacy rules"
    )
    for left in report.get("left") or []:
        lines.append(
            f"left in place: rule handle {left['handle']} ({left['rule']}) "
            f"comment {left['comment']!r}: {left['reason']}"
        )
    if report.get("table_deleted"):
        lines.append("table inet cni_plugins_masquerade deleted")
    else:
        lines.append(f"table inet cni_plugins_masquerade kept: {report.get('table_kept')}")
    return "\n".join(lines)


def cmd_adopt(client: Client, args: argparse.Namespace) -> Any:
    payload = client.expect("POST", "/v1/migrate/cni-plugins", {})
    if args.json:
        return payload
    print(format_adoption(payload))
    return None


Command = Callable[[Client, argparse.Namespace], Any]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="masqctl", description="Control a running masqd.")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def key_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("network")
        sp.add_argument("container_id")
        sp.add_argument("ifname")

    sp = sub.add_parser("list", help="list attachments")
    sp.add_argument("--network")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("get", help="show one attachment")
    key_args(sp)
    sp.set_defaults(func=cmd_get)
    sp = sub.add_parser("set", help="set an attachment's IPs (ADDRESS/PREFIX ...)")
    key_args(sp)
    sp.add_argument("ips", nargs="+", metavar="IP")
    sp.set_defaults(func=cmd_set)
    sp = sub.add_parser("delete", help="remove an attachment (idempotent)")
    key_args(sp)
    sp.set_defaults(func=cmd_delete)
    sp = sub.add_parser("gc", help="remove a network's attachments not listed as valid")
    sp.add_argument("network")
    sp.add_argument("--valid", action="append", metavar="CONTAINER/IFNAME")
    sp.set_defaults(func=cmd_gc)
    sp = sub.add_parser("status", help="sync health and counters")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser(
        "diff", help="what a reconcile would change now, as nft commands (changes nothing)"
    )
    sp.set_defaults(func=cmd_diff)
    sp = sub.add_parser(
        "adopt-cni-plugins",
        help="take over the CNI plugins' rules (table inet cni_plugins_masquerade)",
    )
    sp.set_defaults(func=cmd_adopt)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    client = Client(args.socket, timeout=args.timeout)
    func: Command = args.func
    try:
        result = func(client, args)
    except CliError as exc:
        print(f"masqctl: {exc}", file=sys.stderr)
        sys.exit(1)
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""Adoption of the CNI plugins' masquerade rules: `table inet cni_plugins_masquerade`.

The bridge plugin's `ipMasq` on the nftables backend (containernetworking/plugins,
pkg/ip/ipmasq_nftables_linux.go) keeps, per attachment IP, one rule in chain `masq_checks`:

    ip saddr 10.22.0.5 ip daddr != 10.22.0.0/16 masquerade comment "<h>, net: N, if: I, id: C"

where <h> is sha512(N)[:16 hex] "-" sha512(I ":" C)[:16 hex], and the comment is cut at 128
bytes; a base chain `postrouting` (nat, srcnat) returns for multicast and does `goto
masq_checks`. Adoption turns each complete rule into a masqd attachment and only then removes
the rule, in this order, so that no connection leaves unmasqueraded in between:

1. list the legacy table and read every rule of `masq_checks`; the owner comes from the
   comment and is trusted only when the comment's own hashes confirm it (a comment cut at
   128 bytes, or edited, fails that check and its rule is left alone and reported);
2. set the attachments in masqd's desired state (an attachment masqd already holds keeps its
   IPs and gains the legacy ones), wait until the reconciler confirms them in the kernel,
   then list masqd's table afresh and check every adopted address is in its sources set;
3. delete exactly the adopted rules, by handle (the legacy masquerade and masqd's overlap
   until then: both are srcnat chains, and a flow is NATed by the first that matches);
4. if `masq_checks` is then empty and the table holds nothing else, delete the table, in a
   batch that first deletes the `postrouting` rules by the handles just listed: every
   legacy ADD flushes and refills that chain, so if one slipped in since the listing the
   handles are gone, the batch fails whole and nothing is lost.

Rules are only ever deleted, never rewritten, and the deletion is a no-op for traffic: masqd's
table already masquerades the same flows.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from masqd.kernel.backend import NftError
from masqd.models import AttachmentKey, AttachmentKeyT, AttachmentSpec, comment_problem
from masqd.planning import ruleset
from masqd.reconcile.errors import SyncUnavailable, kernel_boundary
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import CapacityExceeded, DesiredState

log = logging.getLogger(__name__)

# The CNI plugins' names, as pkg/ip/ipmasq_nftables_linux.go writes them.
LEGACY_TABLE = "cni_plugins_masquerade"
LEGACY_CHAIN = "masq_checks"
LEGACY_BASE_CHAIN = "postrouting"
COMMENT_LENGTH_MAX = 128  # knftables.CommentLengthMax
DELETE_ATTEMPTS = 3

_COMMENT = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16}), net: (.*?), if: (.*?), id: (.*)$", re.S)


class AdoptionError(Exception):
    """Adoption stopped before deleting anything; the legacy rules are all still there."""


class JsonRunner(Protocol):
    """What adoption needs from the nftables backend: run a JSON batch, get JSON back."""

    async def run_json(self, payload: dict[str, Any]) -> str: ...


# ---- the legacy comment -----------------------------------------------------------------


def _hash16(value: str) -> str:
    return hashlib.sha512(value.encode()).hexdigest()[:16]


def hash_for_network(network: str) -> str:
    return _hash16(network)


def hash_for_instance(network: str, ifname: str, container_id: str) -> str:
    return f"{hash_for_network(network)}-{_hash16(ifname + ':' + container_id)}"


def comment_for_instance(network: str, ifname: str, container_id: str) -> str:
    """The comment the CNI plugins write (commentForInstance), cut to 128 bytes."""
    comment = "{}, net: {}, if: {}, id: {}".format(
        hash_for_instance(network, ifname, container_id),
        network.replace('"', ""),
        ifname.replace('"', ""),
        container_id.replace('"', ""),
    )
    return comment.encode()[:COMMENT_LENGTH_MAX].decode(errors="ignore")


def parse_comment(comment: str | None) -> AttachmentKeyT | str:
    """(network, container ID, ifname) named by a legacy comment, or the reason it cannot be
    read. The names are believed only when they hash to the hashes the comment starts with."""
    if not comment:
        return "the rule has no comment"
    m = _COMMENT.match(comment)
    if m is None:
        if len(comment.encode()) >= COMMENT_LENGTH_MAX and re.match(r"^[0-9a-f]{16}-", comment):
            return f"the comment was cut at {COMMENT_LENGTH_MAX} bytes before the container ID"
        return "the comment is not in the CNI plugins' format"
    net_hash, instance_hash, network, ifname, container_id = m.groups()
    if hash_for_network(network) != net_hash:
        return "the comment's network name does not match its hash"
    if hash_for_instance(network, ifname, container_id) != f"{net_hash}-{instance_hash}":
        if len(comment.encode()) >= COMMENT_LENGTH_MAX:
            return (
                f"the comment was cut at {COMMENT_LENGTH_MAX} bytes, so the container ID "
                f"or interface name is incomplete (network {network!r})"
            )
        return "the comment's interface name and container ID do not match its hash"
    return network, container_id, ifname


# ---- the legacy table -------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyRule:
    """One readable rule: who owns it and which IP (with its subnet's prefix) it masquerades."""

    handle: int
    key: AttachmentKeyT
    ip: str
    comment: str


@dataclass(frozen=True)
class LeftRule:
    """A rule left in place, and why."""

    handle: int
    rule: str
    comment: str | None
    reason: str


@dataclass
class LegacyTable:
    found: bool = False
    rules: list[LegacyRule] = field(default_factory=list)
    unreadable: list[LeftRule] = field(default_factory=list)
    base_handles: tuple[int, ...] = ()  # the rules of chain postrouting
    foreign: list[str] = field(default_factory=list)  # objects the CNI plugins do not make


def _payload_field(expr: Any) -> tuple[str, str] | None:
    payload = expr.get("payload") if isinstance(expr, dict) else None
    if not isinstance(payload, dict):
        return None
    return str(payload.get("protocol")), str(payload.get("field"))


def _network(value: Any, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        if isinstance(value, str):
            net = ipaddress.ip_network(value)
        elif isinstance(value, dict) and isinstance(value.get("prefix"), dict):
            p = value["prefix"]
            net = ipaddress.ip_network(f"{p['addr']}/{p['len']}")
        else:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return net if net.version == version else None


def rule_ip(exprs: Any) -> str | None:
    """'address/prefix' from `ip saddr == A ip daddr != NET masquerade`, if that is the rule."""
    if not isinstance(exprs, list) or len(exprs) != 3 or exprs[2] != {"masquerade": None}:
        return None
    src, dst = (e.get("match") if isinstance(e, dict) else None for e in exprs[:2])
    if not isinstance(src, dict) or not isinstance(dst, dict):
        return None
    if src.get("op") != "==" or dst.get("op") != "!=":
        return None
    src_field, dst_field = _payload_field(src.get("left")), _payload_field(dst.get("left"))
    if src_field is None or dst_field is None or src_field[0] != dst_field[0]:
        return None
    proto = src_field[0]
    if proto not in ("ip", "ip6") or src_field[1] != "saddr" or dst_field[1] != "daddr":
        return None
    version = 4 if proto == "ip" else 6
    address = src.get("right")
    subnet = _network(dst.get("right"), version)
    if not isinstance(address, str) or subnet is None:
        return None
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return None
    if addr.version != version or addr not in subnet:
        return None
    return f"{addr}/{subnet.prefixlen}"


def describe_rule(exprs: Any) -> str:
    """A short nft-like text of a rule, for reports."""
    words: list[str] = []
    for e in exprs if isinstance(exprs, list) else []:
        if not isinstance(e, dict):
            continue
        if "match" in e and isinstance(e["match"], dict):
            m = e["match"]
            left = _payload_field(m.get("left"))
            right = m.get("right")
            if isinstance(right, dict) and "prefix" in right:
                right = f"{right['prefix'].get('addr')}/{right['prefix'].get('len')}"
            lhs = " ".join(left) if left else json.dumps(m.get("left"), sort_keys=True)
            op = "" if m.get("op") == "==" else f"{m.get('op')} "
            words.append(f"{lhs} {op}{right if isinstance(right, str) else json.dumps(right)}")
        else:
            for verb, arg in e.items():
                words.append(verb if arg is None else f"{verb} {json.dumps(arg, sort_keys=True)}")
    return " ".join(words)


def parse_legacy(listing: Iterable[dict[str, Any]], table: str = LEGACY_TABLE) -> LegacyTable:
    """The JSON listing of `table inet cni_plugins_masquerade`, read rule by rule."""
    out = LegacyTable()
    base: list[int] = []
    for obj in listing:
        if "metainfo" in obj:
            continue
        if "table" in obj:
            out.found = out.found or obj["table"].get("name") == table
            continue
        if "chain" in obj:
            name = obj["chain"].get("name")
            if name not in (LEGACY_CHAIN, LEGACY_BASE_CHAIN):
                out.foreign.append(f"chain {name}")
            continue
        if "rule" not in obj:
            kind = next(iter(obj), "object")
            out.foreign.append(f"{kind} {obj[kind].get('name', '')}".strip())
            continue
        rule = obj["rule"]
        handle = int(rule.get("handle", -1))
        chain = rule.get("chain")
        if chain == LEGACY_BASE_CHAIN:
            base.append(handle)
            continue
        if chain != LEGACY_CHAIN:
            continue  # a rule of a foreign chain: that chain is already reported
        comment = rule.get("comment")
        text = describe_rule(rule.get("expr"))
        ip = rule_ip(rule.get("expr"))
        if ip is None:
            reason = "not a CNI plugins masquerade rule (ip saddr A ip daddr != SUBNET masquerade)"
            out.unreadable.append(LeftRule(handle, text, comment, reason))
            continue
        owner = parse_comment(comment)
        if isinstance(owner, str):
            out.unreadable.append(LeftRule(handle, text, comment, owner))
            continue
        out.rules.append(LegacyRule(handle, owner, ip, str(comment)))
    out.base_handles = tuple(base)
    return out


# ---- adoption ---------------------------------------------------------------------------


@dataclass
class AdoptionReport:
    found: bool = False
    adopted: list[dict[str, Any]] = field(default_factory=list)
    left: list[LeftRule] = field(default_factory=list)
    deleted_rules: int = 0
    table_deleted: bool = False
    table_kept: str | None = None  # why the legacy table is still there

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["left"] = [asdict(r) for r in self.left]
        return body


def _merge_ips(existing: Iterable[str], legacy: Iterable[str]) -> list[str]:
    """masqd's IPs first, then legacy ones for addresses masqd does not hold yet."""
    merged: dict[str, str] = {}
    for ip in (*existing, *legacy):
        merged.setdefault(ip.split("/", 1)[0], ip)
    return list(merged.values())


class Migrator:
    """Adopts the legacy table into a running daemon's state; one adoption at a time."""

    def __init__(
        self,
        *,
        state: DesiredState,
        reconciler: Reconciler,
        nft: JsonRunner,
        masqd_table: str,
        apply_timeout: float = 10.0,
        table: str = LEGACY_TABLE,
    ) -> None:
        self.state = state
        self.reconciler = reconciler
        self.nft = nft
        self.masqd_table = masqd_table
        self.apply_timeout = apply_timeout
        self.table = table
        self._lock = asyncio.Lock()

    async def list_legacy(self) -> LegacyTable:
        payload = {"nftables": [{"list": {"table": {"family": "inet", "name": self.table}}}]}
        try:
            out = await self.nft.run_json(payload)
        except NftError as exc:
            if exc.kind == "enoent":
                return LegacyTable()
            raise
        listing = json.loads(out)["nftables"] if out.strip() else []
        return parse_legacy(listing, self.table)

    async def adopt(self) -> AdoptionReport:
        """Adopt every readable legacy rule; raises AdoptionError (nothing deleted) when
        masqd's table cannot be confirmed to hold them, KernelUnavailable when nftables
        refuses or cannot be reached."""
        async with self._lock:
            with kernel_boundary():
                return await self._adopt()

    async def _adopt(self) -> AdoptionReport:
        legacy = await self.list_legacy()
        report = AdoptionReport(found=legacy.found, left=list(legacy.unreadable))
        if not legacy.found:
            return report
        groups: dict[AttachmentKeyT, list[LegacyRule]] = {}
        for rule in legacy.rules:
            groups.setdefault(rule.key, []).append(rule)
        adopted: list[LegacyRule] = []
        # Chain order is the plugins' setup order, so the newest owner of a shared IP is set
        # last and decides its subnet, as it did in the legacy chain.
        for key, rules in groups.items():
            problem = self._put(key, rules)
            if problem is None:
                adopted.extend(rules)
                report.adopted.append(
                    {
                        "network": key[0],
                        "container_id": key[1],
                        "ifname": key[2],
                        "ips": [r.ip for r in rules],
                        "legacy_handles": [r.handle for r in rules],
                    }
                )
            else:
                report.left.extend(
                    LeftRule(r.handle, f"ip saddr {r.ip}", r.comment, problem) for r in rules
                )
        if adopted:
            await self._confirm(adopted)
            report.deleted_rules = await self._delete_rules(adopted)
        report.table_deleted, report.table_kept = await self._delete_table_if_empty()
        log.info(
            "adopted %d attachments (%d legacy rules deleted) from table inet %s; "
            "%d rules left in place%s",
            len(report.adopted),
            report.deleted_rules,
            self.table,
            len(report.left),
            "; table deleted" if report.table_deleted else f"; table kept: {report.table_kept}",
        )
        for left in report.left:
            log.warning(
                "legacy rule %d (%s, comment %r) left in place: %s",
                left.handle,
                left.rule,
                left.comment,
                left.reason,
            )
        return report

    def _put(self, key: AttachmentKeyT, rules: list[LegacyRule]) -> str | None:
        """Set one attachment in the desired state; the reason when it cannot be."""
        try:
            AttachmentKey(network=key[0], container_id=key[1], ifname=key[2])
        except ValidationError as exc:
            return f"not a valid attachment name: {exc.errors()[0]['msg']}"
        existing = self.state.get(key)
        problem = None if existing else comment_problem(*key)
        if problem is not None:
            return f"not a valid attachment name: {problem}"
        current = existing.cidrs() if existing else []
        try:
            spec = AttachmentSpec(ips=tuple(_merge_ips(current, (r.ip for r in rules))))
        except ValidationError as exc:
            err = exc.errors()[0]
            return f"masqd refuses its IPs: {err['msg']}"
        try:
            self.state.put(key, spec.ips)
        except CapacityExceeded as exc:
            return str(exc)
        return None

    async def _confirm(self, adopted: list[LegacyRule]) -> None:
        """Return once masqd's table in the kernel masquerades every adopted address."""
        try:
            await self.reconciler.commit(self.apply_timeout)
        except SyncUnavailable as exc:
            raise AdoptionError(f"masqd's table did not take the adopted attachments: {exc}") from (
                None
            )
        observed = await self.reconciler.listing()
        missing = [
            r.ip
            for r in adopted
            if r.ip.split("/")[0] not in observed.sets[ruleset.sources_set(r.ip)]
        ]
        if missing:
            raise AdoptionError(
                f"masqd's table inet {self.masqd_table} does not hold "
                f"{', '.join(missing[:5])} after the sync; no legacy rule was deleted"
            )

    async def _delete_rules(self, adopted: list[LegacyRule]) -> int:
        """Delete the adopted rules (by handle, checking each is still the rule we read)."""
        wanted = {(r.handle, r.comment, r.ip) for r in adopted}
        todo = [r.handle for r in adopted]
        deleted = 0
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            if not todo:
                break
            batch = [{"delete": {"rule": self._rule_ref(LEGACY_CHAIN, handle)}} for handle in todo]
            try:
                await self.nft.run_json({"nftables": batch})
            except NftError as exc:
                if exc.kind != "enoent" or attempt == DELETE_ATTEMPTS:
                    raise
                # Someone (a legacy DEL) removed one of them meanwhile: read again.
                current = await self.list_legacy()
                todo = [r.handle for r in current.rules if (r.handle, r.comment, r.ip) in wanted]
                continue
            deleted += len(todo)
            break
        return deleted

    async def _delete_table_if_empty(self) -> tuple[bool, str | None]:
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            legacy = await self.list_legacy()
            if not legacy.found:
                return False, "already gone"
            remaining = len(legacy.rules) + len(legacy.unreadable)
            if remaining:
                return False, f"{remaining} rules of chain {LEGACY_CHAIN} are left in place"
            if legacy.foreign:
                return False, f"it holds objects the CNI plugins do not make: {legacy.foreign}"
            # The postrouting rules' handles guard against a legacy ADD since the listing.
            batch: list[dict[str, Any]] = [
                {"delete": {"rule": self._rule_ref(LEGACY_BASE_CHAIN, h)}}
                for h in legacy.base_handles
            ]
            batch.append({"delete": {"table": {"family": "inet", "name": self.table}}})
            try:
                await self.nft.run_json({"nftables": batch})
            except NftError as exc:
                if exc.kind != "enoent" or attempt == DELETE_ATTEMPTS:
                    raise
                continue
            return True, None
        return False, "it kept changing"

    def _rule_ref(self, chain: str, handle: int) -> dict[str, Any]:
        return {"family": "inet", "table": self.table, "chain": chain, "handle": handle}

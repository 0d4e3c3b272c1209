"""nftables events: a change to our table is repaired at once, a change elsewhere costs no listing.

The kernel multicasts every committed nftables batch to the NFNLGRP_NFTABLES group of its
network namespace: one message per object the batch touched (table, chain, rule, set,
elements, ...), then NFT_MSG_NEWGEN with the new ruleset generation id. `BatchParser` turns
those datagrams into `Batch` values; `EventWatcher` reads the socket on the event loop and
tells the reconciler (an `EventSink`):
- a batch that touched `table inet <ours>`: sync in full now, so tampering is repaired in
  milliseconds rather than at the next generation poll;
- a batch that touched only other tables: the reconciler may move its known generation
  forward without listing our table (it does so only when that generation is exactly the
  next one, so nothing can have slipped by unseen);
- lost events (the socket's buffer overflowed: ENOBUFS, or a truncated datagram): a full
  sync, since anything may have happened.

The reconciler's own transactions come back as events too. They need no special case here:
the reconciler ignores an event whose generation it already knows, and holds events that
arrive during its own sync until it knows which generation it wrote.

Only the first attribute of each message is decoded. For every nftables object message it is
the table's name (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE,
NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE and NFTA_FLOWTABLE_TABLE are all attribute 1), and in
NEWGEN it is NFTA_GEN_ID. The echo of a 100,000-element transaction is 100,000 messages:
decoding them whole (pyroute2's message classes decode every expression and element) would
stall the event loop for seconds, while walking the headers takes milliseconds. pyroute2
supplies the protocol's constants.

The socket must be opened in the network namespace whose ruleset it watches, so the backend
opens it in its worker thread (`KernelBackend.subscribe`) and hands over the fd.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWGEN, NFT_MSG_TRACE

from masqd.kernel.backend import EventSink

log = logging.getLogger(__name__)

NFPROTO_INET = 1
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
SO_RCVBUFFORCE = 33  # like SO_RCVBUF, but root may exceed net.core.rmem_max
# Room for the echo of a large batch before the kernel drops events (and we list instead).
RECEIVE_BUFFER = 16 * 1024 * 1024
DATAGRAM_MAX = 256 * 1024

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian, unused)
_NLATTR = struct.Struct("=HH")  # length, type
_BE32 = struct.Struct(">I")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_ATTR_TABLE = 1  # the table name in every object message
_ATTR_GEN_ID = 1  # NFTA_GEN_ID in NEWGEN


@dataclass(frozen=True)
class Batch:
    """One committed nftables transaction, as the event group reported it.

    `generation` is the ruleset generation it produced (None when NEWGEN was unreadable).
    `touches_table`: some message named our table, or could not be read (so it may have).
    `complete`: every message of the batch was received.
    """

    generation: int | None
    touches_table: bool
    complete: bool = True


class BatchParser:
    """Netlink datagrams in, complete batches out. Pure: no socket, no clock."""

    def __init__(self, table: str) -> None:
        self._table = table.encode()
        self._touched = False
        self._complete = True
        self.in_batch = False  # messages seen since the last NEWGEN

    def lost(self) -> None:
        """Some messages of the batch in progress were dropped: it may have touched us."""
        self._touched = True
        self._complete = False

    def feed(self, data: bytes) -> list[Batch]:
        batches: list[Batch] = []
        offset, end = 0, len(data)
        while offset + NLMSGHDR.size <= end:
            length, msg_type, _, _, _ = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size or offset + length > end:
                self.lost()  # a malformed datagram: assume the worst
                break
            if msg_type >> 8 == NFNL_SUBSYS_NFTABLES:
                body = data[offset + NLMSGHDR.size : offset + length]
                kind = msg_type & 0xFF
                if kind == NFT_MSG_NEWGEN:
                    batches.append(self._finish(body))
                elif kind != NFT_MSG_TRACE:
                    self.in_batch = True
                    if not self._touched:
                        self._touched = self._names_our_table(body)
            offset += (length + 3) & ~3
        return batches

    def _finish(self, body: bytes) -> Batch:
        raw = _first_attr(body, _ATTR_GEN_ID)
        generation = _BE32.unpack(raw)[0] if raw is not None and len(raw) == 4 else None
        batch = Batch(generation, self._touched or generation is None, self._complete)
        self._touched, self._complete, self.in_batch = False, True, False
        return batch

    def _names_our_table(self, body: bytes) -> bool:
        if len(body) < _NFGENMSG.size:
            return True
        family = body[0]
        raw = _first_attr(body, _ATTR_TABLE)
        if raw is None:
            return True  # an object message without a table name: unknown, so suspect
        name = raw.split(b"\0", 1)[0]
        return family == NFPROTO_INET and name == self._table


def _first_attr(body: bytes, wanted: int) -> bytes | None:
    """The payload of attribute `wanted` if it is the first after the nfgenmsg header."""
    offset = _NFGENMSG.size
    if offset + _NLATTR.size > len(body):
        return None
    length, attr_type = _NLATTR.unpack_from(body, offset)
    if attr_type & _NLA_TYPE_MASK != wanted or length < _NLATTR.size:
        return None
    return body[offset + _NLATTR.size : offset + length]


# ---- the socket -------------------------------------------------------------------------


def open_event_socket() -> socket.socket:
    """A non-blocking netlink socket subscribed to nftables events of the calling thread's
    network namespace (call it from the thread that entered the namespace)."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_NETFILTER,
    )
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class EventStats:
    batches: int = 0
    table_batches: int = 0
    listings_skipped: int = 0
    overflows: int = 0


class EventWatcher:
    """Reads the event socket from the event loop; never blocks, never raises into the loop."""

    def __init__(self, sock: socket.socket, *, table: str, sink: EventSink) -> None:
        self._sock = sock
        self._sink = sink
        self._parser = BatchParser(table)
        self.stats = EventStats()
        self._broken: asyncio.Future[None] | None = None

    def pump(self) -> None:
        """Read and handle every datagram waiting in the socket. A failing socket ends `run`
        (drift detection then rests on the generation poll); it never raises here."""
        try:
            self._read()
        except OSError as exc:
            if self._broken is not None and not self._broken.done():
                self._broken.set_exception(exc)

    def pause(self) -> None:
        """Leave the event group, for the backend's own whole-table transactions: their
        echo is one message per element (400,000 at 100,000 attachments), which took the
        event loop seconds to read and the kernel a second to send. The backend checks the
        generation after `resume` instead (`backend.paused_events`)."""
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as exc:
            log.debug("cannot leave the nftables event group: %s", exc)

    def resume(self) -> None:
        """Join the event group again. What was queued before `pause` is read first; a batch
        cut by leaving or joining counts as lost (it may have touched our table)."""
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as exc:
            if self._broken is not None and not self._broken.done():
                self._broken.set_exception(exc)
            return
        self.pump()
        if self._parser.in_batch:
            self._lost("a batch was cut by leaving the event group")

    def _read(self) -> None:
        while True:
            try:
                data, _, flags, _ = self._sock.recvmsg(DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overflowed()
                continue
            if flags & socket.MSG_TRUNC:
                self._overflowed()
            for batch in self._parser.feed(data):
                self._handle(batch)

    def _overflowed(self) -> None:
        self.stats.overflows += 1
        self._lost("receive buffer overflow")

    def _lost(self, why: str) -> None:
        self._parser.lost()
        log.info("nftables events were lost (%s): checking the table", why)
        self._sink.events_lost()

    def _handle(self, batch: Batch) -> None:
        self.stats.batches += 1
        if batch.touches_table or not batch.complete or batch.generation is None:
            self.stats.table_batches += 1
            self._sink.table_changed(batch.generation)
        elif self._sink.other_tables_changed(batch.generation):
            self.stats.listings_skipped += 1

    async def run(self) -> None:
        """Watch until cancelled; returns (after logging) if the socket fails, leaving drift
        detection to the generation poll."""
        loop = asyncio.get_running_loop()
        self._broken = loop.create_future()
        fd = self._sock.fileno()
        loop.add_reader(fd, self.pump)
        try:
            self.pump()  # anything that arrived before we started reading
            await self._broken
        except OSError as exc:
            log.error("nftables event socket failed (%s); relying on generation polling", exc)
        finally:
            loop.remove_reader(fd)
            self._sock.close()

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "subscribed": self._broken is not None and not self._broken.done(),
            "batches": s.batches,
            "table_batches": s.table_batches,
            "listings_skipped": s.listings_skipped,
            "overflows": s.overflows,
        }

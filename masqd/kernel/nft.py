"""The only module that talks to nftables.

`KernelBackend` implements the seam, `backend.Backend` (`observe` the table, `apply` a
transaction, read the ruleset `generation`, `subscribe` to events, `run_json`) with:
- libnftables, loaded in-process with ctypes, fed nftables JSON (never text with values
  pasted in). The `nft` binary is kept as a fallback runner (`NftCli`) for hosts without the
  library and as the reference in tests; `bench/` measures both (libnftables is several times
  faster for a one-element transaction, since it spares a process start).
- pyroute2's message classes for the generation id: one netlink round trip of microseconds,
  cheap enough to poll several times a second, so drift is noticed without listing the table;
- the nftables event socket (`events`), opened in the worker thread so that it watches the
  backend's network namespace.

Listings and big transactions run in one dedicated worker thread: libnftables blocks, and the
event loop must keep accepting requests (which then coalesce into the next transaction). The
thread can enter a network namespace first, which is how tests run a backend in a throwaway
one. Small transactions and generation reads run on the caller's thread when the backend
needs no namespace of its own (see `KernelBackend`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
from typing import Any, Protocol

from masqd.kernel import events
from masqd.kernel.backend import Applied as Applied
from masqd.kernel.backend import Backend as Backend
from masqd.kernel.backend import EventSink, EventSource, paused_events
from masqd.kernel.backend import NftError as NftError
from masqd.kernel.backend import Observation as Observation
from masqd.kernel.backend import Stage as Stage
from masqd.kernel.memory import release_heap
from masqd.planning import ruleset
from masqd.planning.transaction import Transaction

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
GENERATION_TIMEOUT = 5.0  # seconds; the kernel answers in microseconds
BIG_TRANSACTION = 10_000  # element changes
# Element changes per libnftables batch: a whole table of 400,000 in one batch made it peak at
# 700 MiB; in batches of 20,000 it takes no longer.
BATCH_ELEMENTS = 20_000
# Transactions up to this many element changes run on the caller's thread (see KernelBackend).
INLINE_TRANSACTION = 64


# ---- runners: how a JSON batch reaches nftables -----------------------------------------


class Runner(Protocol):
    def run(self, payload: dict[str, Any] | bytes) -> str:
        """Run a JSON batch (a value, or already encoded); the JSON output (may be empty).
        Raises NftError."""
        ...

    def release_cache(self) -> None:
        """Give back what the runner keeps between commands; it stays usable."""
        ...

    def close(self) -> None: ...


@functools.cache
def _libnftables() -> ctypes.CDLL:
    """The library, found and loaded once per process: `find_library` runs `ldconfig` and
    makes temporary files, which a daemon short of descriptors cannot do."""
    path = ctypes.util.find_library("nftables") or "libnftables.so.1"
    lib = ctypes.CDLL(path, use_errno=True)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


# libnftables 1.0.6 is not safe to run from two threads at once, even with a context each:
# two listings in parallel abort the process. The daemon runs it on its worker thread and,
# for small transactions, on the loop thread (and a test process may hold several backends),
# so every call into the library takes this lock.
_LIBRARY_LOCK = threading.Lock()


class LibNftables:
    """libnftables through ctypes: no process start, JSON in and out.

    A context opens its netlink socket when it is made, and libnftables 1.0.6 waits on that
    socket with select(): a context made while the process holds more than 1,024 descriptors
    aborts the process (glibc's FD_SETSIZE check). So a context is made once, early, and
    kept: `release_cache` gives back what its cache holds without closing the socket.
    """

    _OUTPUT_JSON = 1 << 4
    # Not a command: parsing fails in user space, nothing reaches the kernel, and libnftables
    # frees its cache after any failed command.
    _RELEASE_CACHE = b'{"nftables": [{"masqd-release-cache": null}]}'

    def __init__(self) -> None:
        lib = _libnftables()
        self._lib = lib
        with _LIBRARY_LOCK:
            self._ctx = lib.nft_ctx_new(0)
            if not self._ctx:
                raise OSError("nft_ctx_new failed")
            lib.nft_ctx_output_set_flags(self._ctx, self._OUTPUT_JSON)
            lib.nft_ctx_buffer_output(self._ctx)
            lib.nft_ctx_buffer_error(self._ctx)

    def run(self, payload: dict[str, Any] | bytes) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with _LIBRARY_LOCK:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, data)
            out_raw = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err_raw = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        out, err = out_raw.decode(), err_raw.decode()
        if rc != 0:
            raise NftError(err.strip() or f"libnftables returned {rc}")
        return out

    def release_cache(self) -> None:
        """Free the context's cache (every element listed or added, in C) and keep the
        context and its socket."""
        with _LIBRARY_LOCK:
            self._lib.nft_run_cmd_from_buffer(self._ctx, self._RELEASE_CACHE)
            self._lib.nft_ctx_get_output_buffer(self._ctx)
            self._lib.nft_ctx_get_error_buffer(self._ctx)  # empties the parse error's buffer

    def close(self) -> None:
        if self._ctx:
            with _LIBRARY_LOCK:
                self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class NftCli:
    """The `nft` binary, JSON on stdin."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("nft") or "/usr/sbin/nft"
        self.binary = found

    def run(self, payload: dict[str, Any] | bytes) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        proc = subprocess.run(
            [self.binary, "-j", "-f", "-"], input=data, capture_output=True, check=False
        )
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise NftError(stderr or f"nft exited {proc.returncode}")
        return proc.stdout.decode()

    def release_cache(self) -> None:
        pass  # each run is a process of its own

    def close(self) -> None:
        pass


# ---- generation id ----------------------------------------------------------------------


class GenerationReader:
    """The ruleset generation id over netlink (NFT_MSG_GETGEN): pyroute2's message class on a
    plain blocking socket, one round trip of about 16 us. Plain, because pyroute2's own
    sockets run an asyncio loop of their own, which cannot be done from the daemon's loop
    thread (where small transactions run, see `KernelBackend`)."""

    def __init__(self) -> None:
        from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_REQUEST, NLMSG_ERROR
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, nft_gen_msg

        self._msg_class = nft_gen_msg
        self._type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
        self._flags = NLM_F_REQUEST
        self._error_type = NLMSG_ERROR
        self._seq = 0
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.settimeout(GENERATION_TIMEOUT)
        self._sock.bind((0, 0))

    def read(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        request = self._msg_class()
        request["header"]["type"] = self._type
        request["header"]["flags"] = self._flags
        request["header"]["sequence_number"] = self._seq
        request.encode()
        self._sock.send(request.data)
        while True:
            data = self._sock.recv(65536)
            length, msg_type, _, seq, _ = events.NLMSGHDR.unpack_from(data)
            if seq != self._seq:
                continue  # the late answer to a read that timed out
            if msg_type == self._error_type:
                (code,) = struct.unpack_from("=i", data, events.NLMSGHDR.size)
                raise OSError(-code, f"NFT_MSG_GETGEN: {os.strerror(-code)}")
            reply = self._msg_class(data[:length])
            reply.decode()
            return int(reply.get_attr("NFTA_GEN_ID"))

    def close(self) -> None:
        self._sock.close()


# ---- the backend ------------------------------------------------------------------------


def enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (only this thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _Channel:
    """A runner and a generation reader, used from one thread only, kept for the backend's
    life: their sockets are opened by `open` at start-up, while descriptor numbers are low
    (see `LibNftables`), and never again."""

    def __init__(self, runner_kind: str) -> None:
        self._runner_kind = runner_kind
        self._runner: Runner | None = None
        self._gen: GenerationReader | None = None

    def open(self) -> None:
        self.runner  # noqa: B018 - made for its socket
        self.gen  # noqa: B018

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = LibNftables() if self._runner_kind == "lib" else NftCli()
        return self._runner

    @property
    def gen(self) -> GenerationReader:
        if self._gen is None:
            self._gen = GenerationReader()
        return self._gen

    def release_cache(self) -> None:
        """Free libnftables' cache and the heap it used; the context stays."""
        if self._runner is not None:
            self._runner.release_cache()
        release_heap()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._gen is not None:
            self._gen.close()
            self._gen = None


class KernelBackend:
    """Backend on the real kernel. `runner` is 'lib' (libnftables) or 'cli' (`nft`).

    Listings, big transactions and anything else slow run in one worker thread, which can
    enter a network namespace first. When there is no namespace to enter (the daemon: its
    process is where its ruleset is) and the runner is libnftables, generation reads and
    transactions of up to INLINE_TRANSACTION element changes run on the calling thread
    instead: a fraction of a millisecond, while the hand-off to the worker and back costs
    two thread wake-ups, about 0.5 ms of a setup's latency on an idle VM. Each thread has
    its own libnftables context and netlink socket, so they never share one.
    """

    def __init__(self, *, table: str, runner: str = "lib", netns: str | None = None) -> None:
        self.table = table
        self._netns = netns
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="masqd-nft", initializer=self._init_thread
        )
        self._worker = _Channel(runner)
        self._inline = _Channel(runner) if netns is None and runner == "lib" else None
        self.stage: Stage | None = None  # tests only; runs on the thread doing the work
        self._events: EventSource | None = None  # the last `subscribe`'s

    def _init_thread(self) -> None:
        if self._netns:
            enter_netns(self._netns)

    async def open(self) -> None:
        """Open every netlink socket the backend will use (libnftables contexts, generation
        readers), on the threads that use them. Call it at start-up, before any listener
        accepts: the sockets then get low descriptor numbers, which libnftables' select()
        needs (see `LibNftables`); otherwise they are opened on first use."""
        await self._call(lambda ch: ch.open())
        if self._inline is not None:
            self._inline.open()

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args, self._worker)

    # The `_` methods run with a channel of the thread they run on.

    def _stage(self, point: str) -> None:
        if self.stage is not None:
            self.stage(point)

    def _observe(self, ch: _Channel) -> Observation:
        cmd = {"nftables": [{"list": {"table": ruleset.table_ref(self.table)}}]}
        for _ in range(5):
            self._stage("observe")
            before = ch.gen.read()
            try:
                out = ch.runner.run(cmd)
            except NftError as exc:
                if exc.kind != "enoent":
                    raise
                out = ""
            after = ch.gen.read()
            if before == after:
                break
        # libnftables keeps what it listed in its context's cache: every element, in C, for
        # as long as the context lives (about 250 MiB for 400,000 elements). Nothing later
        # needs it.
        ch.release_cache()
        self._stage("listed")
        try:
            listing = json.loads(out)["nftables"] if out.strip() else []
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # nft 1.0.6 prints truncated JSON for a table owned by another process.
            raise NftError(f"unreadable listing of table inet {self.table}: {exc}") from None
        # If the ruleset kept changing under us, the last listing is still a listing, but
        # only of `before`: a commit between it and `after` may or may not be in it, so the
        # commit planned from it can never count as exclusive, and the next sync lists again.
        return Observation(ruleset.parse_table(self.table, listing), before)

    def _apply(self, tx: Transaction, ch: _Channel) -> Applied:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("nft transaction:\n%s", tx.to_script())
        before = ch.gen.read()
        big = tx.recreate or tx.element_changes > BIG_TRANSACTION
        batches = 0
        # Big transactions go in batches of BATCH_ELEMENTS (see Transaction.batches), with
        # libnftables' cache released after each, so that its memory is given back between.
        for payload in tx.batches(BATCH_ELEMENTS):
            self._stage("commit")
            try:
                ch.runner.run(payload)
            finally:
                if big:
                    del payload  # before trimming the heap
                    ch.release_cache()
            batches += 1
        return Applied(ch.gen.read(), before, batches)

    async def observe(self) -> Observation:
        result: Observation = await self._call(self._observe)
        return result

    async def apply(self, tx: Transaction) -> Applied:
        """Commit `tx`; a whole-table one with the event subscription paused (see
        `backend.paused_events`)."""
        return await paused_events(self._events, tx, lambda: self._commit(tx), self.generation)

    async def _commit(self, tx: Transaction) -> Applied:
        small = not tx.recreate and tx.element_changes <= INLINE_TRANSACTION
        if small and self._inline is not None:
            return self._apply(tx, self._inline)
        result: Applied = await self._call(self._apply, tx)
        return result

    async def generation(self) -> int:
        if self._inline is not None:
            return self._inline.gen.read()
        result: int = await self._call(lambda ch: ch.gen.read())
        return result

    async def open_event_socket(self) -> socket.socket:
        """A socket subscribed to the nftables events of the backend's namespace (`events`)."""
        result: socket.socket = await self._call(lambda _: events.open_event_socket())
        return result

    async def subscribe(self, sink: EventSink) -> EventSource:
        """The nftables event socket of the backend's namespace, read by an `EventWatcher`;
        the backend pauses it around its own whole-table transactions."""
        self._events = events.EventWatcher(
            await self.open_event_socket(), table=self.table, sink=sink
        )
        return self._events

    async def run_json(self, payload: dict[str, Any]) -> str:
        """Run an arbitrary JSON batch (cleanup, adoption of other tables)."""
        result: str = await self._call(lambda ch: ch.runner.run(payload))
        return result

    async def close(self) -> None:
        await self._call(lambda ch: ch.close())
        self._executor.shutdown(wait=True)
        if self._inline is not None:
            self._inline.close()

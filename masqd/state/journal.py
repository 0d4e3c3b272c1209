"""The journal that lets desired attachments survive a daemon restart.

Two files under the state directory (in /run by default, so they vanish with a reboot, as
the kernel ruleset does):
- `attachments.snapshot`: every attachment at the last compaction, written to a temporary
  file, fsynced and renamed into place;
- `attachments.journal`: one line per change since then, appended.

Each line is `<crc32 hex> <json>`, so a torn write (power loss, SIGKILL mid-write) or any
corruption is detected line by line. Rewriting one file per change made setups slower as
the table grew; appending keeps a change O(1), and one fsync covers a whole coalesced batch.

Replaying puts and deletes is idempotent, so a crash between writing a snapshot and
truncating the journal loses nothing.

Completeness. A journal cut short (a 0-byte file, a tail or a middle cut exactly at a line
boundary) reads as a valid, smaller history: trusting it would make the first sync delete
what it lost. So every journal record carries a sequence number `n` (consecutive, given at
write time), the snapshot's first line names the number the journal continues from (`next`)
and how many records it holds (`count`), and a third file, `attachments.end`, names the last
number written (rewritten in place after each append; not fsynced, as a lag only costs an
adoption). The loader says a journal is complete (`Loaded.complete`) only when every line
reads, the numbers run without a gap from the snapshot's `next` on, and the last one is the
one `attachments.end` names. Otherwise the daemon adopts from the kernel's table what the
journal does not name (see `daemon.restore.recover_from_table`).

Older journals (records without `n`, no end file) are read as before, and complete when they
hold at least one line, every line reads, and the journal's last line is a sync marker; the
first append numbers on from there. Readers that predate `n`, `next` and `count` ignore them.

An append that fails (ENOSPC, EIO) is cut back off the file (`ftruncate` to the length before
it) before anything else is appended, so a half record is never followed by whole ones.

Records are queued on the event loop (`record_*`). Each sync takes them in one turn of the
journal (`cycle`), which owns the whole round: append and fsync the records before the
kernel gets the change (on the loop itself when the batch is small and the last append was
fast, tmpfs; in a worker thread otherwise; never two at once), put them back if the sync
fails, and afterwards rewrite the snapshot in a worker thread when the journal has grown
(`compact`) and write the sync marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masqd.models import AttachmentKeyT

log = logging.getLogger(__name__)

SNAPSHOT = "attachments.snapshot"
JOURNAL = "attachments.journal"
END = "attachments.end"
FORMAT_VERSION = 1  # `n`, `next` and `count` are additions an older reader ignores
INLINE_LINES = 64  # appends of up to this many records may run on the event loop
SLOW_WRITE = 0.001  # seconds: an append slower than this sends the next to a thread


class JournalError(Exception):
    """An append failed; it was cut back off the file, and its records are not durable."""


@dataclass(frozen=True)
class Entry:
    """A journal record: "put" or "del" of an attachment, or a "synced" marker.

    A marker says: once every record before it is applied, the kernel held exactly that, at
    ruleset `generation`, under the policy whose `fingerprint` it names. If the generation
    is unchanged at start-up, nothing has touched the ruleset since, and the daemon can trust
    that picture instead of listing 100,000 elements.
    """

    op: str
    key: AttachmentKeyT = ("", "", "")
    ips: tuple[str, ...] = ()
    generation: int | None = None
    fingerprint: str | None = None
    # Set by the loader on the last readable marker: the one that describes the kernel.
    last: bool = field(default=False, compare=False)
    seq: int | None = field(default=None, compare=False)  # None: a snapshot or older record


@dataclass
class Loaded:
    entries: list[Entry] = field(default_factory=list)  # filled by `load`, not by `stream`
    problems: list[str] = field(default_factory=list)
    found: bool = False  # a snapshot or journal existed
    complete: bool = False  # proven to hold every record written (see the module's doc)
    incomplete: str = "no journal"  # why not, when not


Records = Callable[[], list[tuple[AttachmentKeyT, tuple[str, ...]]]]


@dataclass(frozen=True)
class Settled:
    """How a sync ended, as the journal's housekeeping needs it (see `Journal.cycle`)."""

    # The generation at which the kernel holds every record written; None: write no marker.
    generation: int | None
    fingerprint: str  # the policy's (see `Entry`)
    attachments: int  # how many the desired state holds now
    quiet: bool  # the desired state has not changed since the sync planned
    records: Records  # every attachment now, for a new snapshot


class Cycle:
    """One sync's turn of the journal; the sync says how it ended with `settle`."""

    def __init__(self) -> None:
        self.settled: Settled | None = None

    def settle(self, settled: Settled) -> None:
        self.settled = settled


# Lines decoded at a time while streaming: the transient objects of one chunk are freed before
# the next is decoded, so their memory is reused instead of lying between the long-lived ones.
CHUNK_LINES = 4096


def _line(payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _record(payload: dict[str, Any]) -> bytes:
    """A pending record: its JSON object without the closing brace, numbered when written."""
    return json.dumps(payload, separators=(",", ":")).encode()[:-1]


def _numbered(record: bytes, seq: int) -> bytes:
    body = b'%s,"n":%d}' % (record, seq)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _end_line(seq: int) -> bytes:
    # Fixed width, so that rewriting it in place never leaves a longer old one's tail.
    body = b"%020d" % seq
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse_end(data: bytes) -> int | None:
    crc_hex, _, body = data.rstrip(b"\n").partition(b" ")
    try:
        if len(crc_hex) == 8 and int(crc_hex, 16) == zlib.crc32(body) and body.isdigit():
            return int(body)
    except ValueError:
        pass
    return None


def _parse_lines(lines: list[bytes]) -> list[Any]:
    """Each line's payload, or the exception that line raised.

    Checksums are verified line by line, then all good bodies are decoded in one json.loads:
    three times faster than one call per line when replaying 100,000 records.
    """
    bodies: list[bytes] = []
    results: list[Any] = []
    for raw in lines:
        if not raw.endswith(b"\n"):
            results.append(ValueError("torn line (no newline)"))
            continue
        crc_hex, _, body = raw[:-1].partition(b" ")
        try:
            good = len(crc_hex) == 8 and int(crc_hex, 16) == zlib.crc32(body)
        except ValueError:
            good = False
        if not good:
            results.append(ValueError("checksum mismatch"))
            continue
        results.append(len(bodies))
        bodies.append(body)
    try:
        decoded = json.loads(b"[" + b",".join(bodies) + b"]")
    except (ValueError, RecursionError):
        decoded = []
        for body in bodies:
            try:
                decoded.append(json.loads(body))
            except ValueError as exc:
                decoded.append(ValueError(f"not JSON: {exc}"))
    return [decoded[r] if isinstance(r, int) else r for r in results]


def _entry(payload: Any, *, last: bool = False) -> Entry:
    seq = payload.get("n")
    if seq is not None and (type(seq) is not int or seq < 1):
        raise ValueError("malformed sequence number")
    if payload["op"] == "synced":
        generation, fingerprint = payload["gen"], payload["fp"]
        if not isinstance(generation, int) or not isinstance(fingerprint, str):
            raise ValueError("malformed marker")
        return Entry("synced", generation=generation, fingerprint=fingerprint, last=last, seq=seq)
    op, key = payload["op"], tuple(payload["k"])
    if op not in ("put", "del") or len(key) != 3 or not all(isinstance(k, str) for k in key):
        raise ValueError("malformed record")
    ips = tuple(payload.get("ips", ()))
    if op == "put" and (not ips or not all(isinstance(ip, str) for ip in ips)):
        raise ValueError("malformed record")
    return Entry(op, (str(key[0]), str(key[1]), str(key[2])), ips, seq=seq)


def _find_last_marker(files: list[tuple[Path, list[bytes]]]) -> tuple[Path, int] | None:
    """(file, line number) of the last readable marker, found from the end without decoding
    anything else."""
    for path, lines in reversed(files):
        for index in range(len(lines) - 1, -1, -1):
            if b'"synced"' not in lines[index]:
                continue
            payload = _parse_lines([lines[index]])[0]
            try:
                if not isinstance(payload, Exception) and _entry(payload).op == "synced":
                    return path, index + 1
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
    return None


class Journal:
    def __init__(self, directory: Path, *, compact_min: int = 10_000) -> None:
        self.directory = directory
        self.compact_min = compact_min
        self._pending: list[bytes] = []
        self._lines_in_journal = 0
        self._fd: int | None = None
        self._end_fd: int | None = None
        self._next_seq = 1  # the number the next journal record gets
        # Length of the journal's whole records: what an append starts from. None until the
        # file is loaded or opened; a failed append leaves the file longer, to be cut back.
        self._length: int | None = None
        self._cut_back = False
        self._last_write = 0.0  # seconds the last append by `cycle` took

    @property
    def snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT

    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL

    @property
    def end_path(self) -> Path:
        return self.directory / END

    # ---- loading -------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Read snapshot then journal, all at once. See `stream`."""
        result = Loaded()
        result.entries.extend(self.stream(result))
        return result

    def stream(self, result: Loaded) -> Iterator[Entry]:
        """The snapshot's then the journal's records, decoded a chunk at a time.

        Corrupt lines are skipped and reported in `result.problems`, never raised; `result`
        (with `complete`) is final once the iterator is exhausted. Replaying 100,000 records
        from one list of entries left about 50 MiB of the daemon's heap fragmented for good.
        """
        files: list[tuple[Path, list[bytes]]] = []
        for path in (self.snapshot_path, self.journal_path):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                result.problems.append(f"{path}: cannot read: {exc}")
                continue
            result.found = True
            lines = data.splitlines(keepends=True)
            if path == self.journal_path:
                # A torn last line (no newline) is cut off by the first append.
                torn = len(lines[-1]) if lines and not lines[-1].endswith(b"\n") else 0
                self._length = len(data) - torn
            files.append((path, lines))
            del data
        check = _Completeness()
        last_marker = _find_last_marker(files)
        for path, lines in files:
            in_snapshot = path == self.snapshot_path
            for start in range(0, len(lines), CHUNK_LINES):
                payloads = _parse_lines(lines[start : start + CHUNK_LINES])
                for number, payload in enumerate(payloads, start + 1):
                    try:
                        if isinstance(payload, Exception):
                            raise payload
                        if number == 1 and in_snapshot:
                            if payload.get("format") != FORMAT_VERSION:
                                raise ValueError(f"unknown format {payload.get('format')!r}")
                            check.snapshot_header(payload)
                            continue
                        entry = _entry(payload, last=(path, number) == last_marker)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        result.problems.append(f"{path.name} line {number}: {exc}; skipped")
                        continue
                    if in_snapshot:
                        check.snapshot_records += 1
                    else:
                        check.record(entry)
                    yield entry
            if path == self.journal_path:
                self._lines_in_journal = len(lines)
        end = self._read_end()
        result.complete, result.incomplete = check.verdict(
            found=result.found, problems=bool(result.problems), end=end
        )
        self._next_seq = check.last_seq() + 1

    def _read_end(self) -> int | None:
        try:
            return _parse_end(self.end_path.read_bytes())
        except OSError:
            return None

    # ---- recording (event loop) ----------------------------------------------------------

    def record_put(self, key: AttachmentKeyT, ips: Iterable[str]) -> None:
        self._pending.append(_record({"op": "put", "k": list(key), "ips": list(ips)}))

    def record_delete(self, key: AttachmentKeyT) -> None:
        self._pending.append(_record({"op": "del", "k": list(key)}))

    def write_marker(self, generation: int, fingerprint: str) -> None:
        """Record that the kernel holds everything journalled so far (see `Entry`).

        Written at once and without fsync: the state directory is on tmpfs by default, and a
        lost marker only costs the next start-up a full listing of the table.
        """
        self.write_pending(
            [_record({"op": "synced", "gen": generation, "fp": fingerprint})], sync=False
        )

    def take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        return pending

    def requeue(self, lines: list[bytes]) -> None:
        """Put back records whose write failed, ahead of anything recorded since."""
        self._pending[:0] = lines

    def needs_compaction(self, attachments: int, *, overdue: bool = False) -> bool:
        """The journal has outgrown its snapshot (`overdue`: by far)."""
        limit = max(self.compact_min, 2 * attachments)
        return self._lines_in_journal > (4 * limit if overdue else limit)

    # ---- one sync's turn ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def cycle(self, timer: Callable[[], float] = time.perf_counter) -> AsyncIterator[Cycle]:
        """The journal's part of one sync, around its commit to the kernel.

        On entry the records queued so far are taken and appended, durable before the kernel
        has them, so an acknowledged change survives a crash. Enter it right after taking
        the desired state's changes, with no await between, so that the records and the plan
        describe the same changes. If anything inside fails, the records are put back, ahead
        of newer ones, and written again by the next sync. On a clean exit after `settle`:
        compaction when the journal has grown, then the marker (see `_housekeeping`).
        `timer` times the appends (see `_write`).
        """
        pending = self.take_pending()
        cycle = Cycle()
        try:
            if pending:
                await self._write(pending, timer)
            yield cycle
            if cycle.settled is not None:
                await self._housekeeping(cycle.settled)
        except Exception:
            self.requeue(pending)
            raise

    async def _write(self, pending: list[bytes], timer: Callable[[], float]) -> None:
        """Append and fsync `pending`. A few records on a fast file system (the default state
        directory is tmpfs: microseconds) are written right here, since a hand-off to a
        thread and back costs a setup about 0.35 ms; anything big goes to a thread, and so
        does everything after an append that was slow (a disk), until one is fast again."""
        started = timer()
        if len(pending) <= INLINE_LINES and self._last_write < SLOW_WRITE:
            self.write_pending(pending)
        else:
            await asyncio.to_thread(self.write_pending, pending)
        self._last_write = timer() - started

    async def _housekeeping(self, settled: Settled) -> None:
        """Compact the journal when it has grown, and mark what the kernel now holds.

        The marker is true when every record in the files is in the kernel: records of changes
        made since the sync planned are still in memory, so it holds, unless a snapshot was
        just written from a state that includes them. Compaction therefore waits for a quiet
        moment (state unchanged since planning) unless the journal is far past its limit.
        """
        generation = settled.generation
        if self.needs_compaction(settled.attachments, overdue=not settled.quiet):
            records = settled.records()
            if not settled.quiet:
                generation = None
            try:
                await asyncio.to_thread(self.compact, records)
            except OSError as exc:
                # The old snapshot and journal still hold everything: only slower replays.
                log.error("journal compaction failed, the journal keeps growing: %s", exc)
                return
        if generation is not None:
            try:
                self.write_marker(generation, settled.fingerprint)
            except JournalError as exc:
                # The kernel has the changes already; a missing marker costs the next
                # start-up a listing of the table, no more.
                log.warning("journal: sync marker not written: %s", exc)

    # ---- writing (on the loop or in a worker thread, one at a time) ------------------------------

    def write_pending(self, records: list[bytes], *, sync: bool = True) -> None:
        """Number, append and fsync `records` (from `take_pending`): once this returns, the
        changes survive a crash. Raises JournalError, with the file as it was before, when
        the append fails; the records then keep no number and can be written again."""
        if not records:
            return
        data = b"".join(_numbered(r, n) for n, r in enumerate(records, self._next_seq))
        try:
            fd = self._open()
            if self._cut_back:
                assert self._length is not None
                os.ftruncate(fd, self._length)
                self._cut_back = False
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync:
                os.fsync(fd)
        except OSError as exc:
            self._cut_back = self._fd is not None
            self._try_cut_back()
            raise JournalError(f"cannot append to {self.journal_path}: {exc}") from exc
        assert self._length is not None
        self._length += len(data)
        self._next_seq += len(records)
        self._lines_in_journal += len(records)
        self._write_end(self._next_seq - 1)

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(fd).st_size
            if self._length is None:
                self._length = size
            elif size != self._length:
                self._cut_back = True  # a torn tail found at load
            self._fd = fd
        return self._fd

    def _try_cut_back(self) -> None:
        """Cut a failed append back off now; if that fails too, the next append does it
        first (and fails itself if it cannot)."""
        if self._fd is None or self._length is None:
            return
        try:
            os.ftruncate(self._fd, self._length)
            self._cut_back = False
        except OSError as exc:
            log.error("journal: cannot cut a failed append back off: %s", exc)

    def _write_end(self, seq: int) -> None:
        """Name the last record written (see the module's doc). A failure only makes the
        next start-up adopt from the table, so it is logged, not raised."""
        try:
            if self._end_fd is None:
                self._end_fd = os.open(self.end_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(self._end_fd, _end_line(seq), 0)
        except OSError as exc:
            log.warning("journal: cannot write %s: %s", self.end_path, exc)

    def compact(self, records: Iterable[tuple[AttachmentKeyT, tuple[str, ...]]]) -> None:
        """Write every attachment as the new snapshot, then start an empty journal."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        records = list(records)
        try:
            with open(fd, "wb") as out:
                out.write(
                    _line({"format": FORMAT_VERSION, "next": self._next_seq, "count": len(records)})
                )
                chunk: list[bytes] = []
                for key, ips in records:
                    chunk.append(_line({"op": "put", "k": list(key), "ips": list(ips)}))
                    if len(chunk) >= 4096:
                        out.write(b"".join(chunk))
                        chunk.clear()
                out.write(b"".join(chunk))
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.snapshot_path)
        # Until the journal is truncated, replaying it over the new snapshot is harmless.
        new_journal = self.journal_path.with_suffix(".tmp")
        fd = os.open(new_journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fsync(fd)
        os.replace(new_journal, self.journal_path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._length, self._cut_back = 0, False
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._lines_in_journal = 0
        self._write_end(self._next_seq - 1)

    def close(self) -> None:
        for fd in (self._fd, self._end_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._end_fd = None


class _Completeness:
    """Follows the sequence numbers while loading, and says whether nothing is missing."""

    def __init__(self) -> None:
        self.snapshot_next: int | None = None  # None: no snapshot, or one from before `next`
        self.snapshot_count: int | None = None
        self.snapshot_records = 0
        self.first: int | None = None
        self.last: int | None = None
        self.gap: str | None = None
        self.unnumbered_after_numbered = False
        self.records = 0
        self.last_is_marker = False

    def snapshot_header(self, header: dict[str, Any]) -> None:
        next_, count = header.get("next"), header.get("count")
        if type(next_) is int and type(count) is int:
            self.snapshot_next, self.snapshot_count = next_, count

    def record(self, entry: Entry) -> None:
        self.records += 1
        self.last_is_marker = entry.op == "synced"
        if entry.seq is None:
            self.unnumbered_after_numbered = self.unnumbered_after_numbered or self.last is not None
            return
        if self.last is None:
            self.first = entry.seq
            if self.snapshot_next is not None and entry.seq > self.snapshot_next and not self.gap:
                self.gap = f"records {self.snapshot_next} to {entry.seq - 1} are missing"
        elif entry.seq != self.last + 1 and not self.gap:
            self.gap = f"records {self.last + 1} to {entry.seq - 1} are missing"
        self.last = entry.seq

    def last_seq(self) -> int:
        """The last number the files account for (0: none)."""
        return max(self.last or 0, (self.snapshot_next or 1) - 1)

    def verdict(self, *, found: bool, problems: bool, end: int | None) -> tuple[bool, str]:
        if not found:
            return False, "no journal"
        if problems:
            return False, "it has unreadable lines"
        if self.snapshot_count is not None and self.snapshot_records != self.snapshot_count:
            return False, (
                f"the snapshot holds {self.snapshot_records} of its {self.snapshot_count} records"
            )
        if self.gap is not None:
            return False, self.gap
        if self.unnumbered_after_numbered:
            return False, "a record without a sequence number follows numbered ones"
        if self.last is None and self.snapshot_next is None and end is None:
            # Written by an older masqd: it must at least end the way a sync leaves it.
            if self.records == 0 and self.snapshot_records == 0:
                return False, "it is empty"
            if not self.last_is_marker:
                return False, "it was written by an older masqd and does not end with a marker"
            return True, ""
        if end is None:
            return False, f"{END} is missing or unreadable"
        last = self.last_seq()
        if last < end:
            return False, f"it ends at record {last}, but record {end} was written"
        if last > end:
            # The end file lags (a power loss before it reached the disk): cannot tell.
            return False, f"it goes on past record {end}, the last one {END} names"
        return True, ""

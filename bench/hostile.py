"""hostile: a setup's latency while hostile API clients do their worst (issue 10, item 3).

A real daemon in a throwaway namespace, filled through the API. A PUT (on a fresh
connection, as a CNI plugin makes it, deleted again after) is timed when the daemon is quiet
and then during each attack, with the daemon's peak RSS (VmHWM, reset before each attack
through /proc/PID/clear_refs):

- `listing-30`: 30 clients ask for `GET /v1/attachments` at 20,000 attachments and never
  read; when the daemon hangs up on one, it asks again after 0.5 s;
- `listing-100`: the same with 100 clients at 5,000 attachments;
- `gc-1`: one client posting 30 MiB GC bodies back to back (entries the daemon does not
  hold, so each is parsed whole and removes nothing);
- `gc-4`: four such clients at once.

The goal from the issue: a PUT's p50 during each attack within 3x its quiet value.
"""

from __future__ import annotations

import functools
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import daemon, plotting
from bench.addresses import attachment, attachments
from bench.harness import Progress, Result, ms, percentile

NAME = "hostile"
RATIO_GOAL = 3.0
RECONNECT_AFTER = 0.5  # seconds a cut-off listing client waits before asking again
TIMED_BASE = 120_000  # timed attachments' indices, beyond any fill


def _listing_attack(path: str, clients: int, stop: threading.Event) -> None:
    """`clients` connections that ask for the listing and never read it (one thread)."""
    request = b"GET /v1/attachments HTTP/1.1\r\nHost: masqd\r\n\r\n"
    poller = select.poll()
    socks: dict[int, socket.socket] = {}
    retry_at: list[float] = [0.0] * clients

    def connect() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            sock.sendall(request)
        except OSError:
            sock.close()
            retry_at.append(time.monotonic() + RECONNECT_AFTER)
            return
        socks[sock.fileno()] = sock
        poller.register(sock, select.POLLHUP | select.POLLERR)

    try:
        while not stop.is_set():
            now = time.monotonic()
            due = [t for t in retry_at if t <= now]
            retry_at[:] = [t for t in retry_at if t > now]
            for _ in due:
                connect()
            for fd, _event in poller.poll(50):
                poller.unregister(fd)
                socks.pop(fd).close()
                retry_at.append(time.monotonic() + RECONNECT_AFTER)
    finally:
        for sock in socks.values():
            sock.close()


def gc_body(size: int) -> bytes:
    """A GC body of about `size` bytes listing attachments the daemon does not hold."""
    count = size // 72
    valid = [{"container_id": f"gone{i:028d}", "ifname": "eth0"} for i in range(count)]
    return json.dumps({"valid_attachments": valid}).encode()


def _gc_attack(path: str, body: bytes, answers: list[int], stop: threading.Event) -> None:
    """GC requests with `body`, back to back, until `stop`; each status in `answers`."""
    head = (
        f"POST /v1/networks/hostile/gc HTTP/1.1\r\nHost: masqd\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(120)
            try:
                sock.connect(path)
                sock.sendall(head + body)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                answers.append(int(answer.split(b" ", 2)[1]))
            except (OSError, IndexError, ValueError):
                answers.append(0)


@contextmanager
def _attack(target: Callable[[threading.Event], None], threads: int) -> Iterator[None]:
    stop = threading.Event()
    workers = [threading.Thread(target=target, args=(stop,), daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        stop.set()
        for w in workers:
            w.join(180)


def _reset_peak(d: daemon.Daemon) -> None:
    Path(f"/proc/{d.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _time_puts(d: daemon.Daemon, samples: int, pause: float) -> list[float]:
    puts = []
    for k in range(samples):
        a = attachment(TIMED_BASE + k, prefix="h")
        elapsed, status = d.timed("PUT", a)
        if not 200 <= status < 300:
            raise daemon.DaemonError(f"timed PUT answered {status}")
        puts.append(elapsed)
        time.sleep(pause)
        d.delete(a)
        time.sleep(pause)
    return puts


def _row(
    d: daemon.Daemon, attack: str, size: int, samples: int, pause: float, quiet_p50: float | None
) -> dict[str, Any]:
    rss = d.rss_mib()
    puts = _time_puts(d, samples, pause)
    p50 = percentile(puts, 50)
    return {
        "attack": attack,
        "attachments": size,
        "put_p50_ms": ms(p50),
        "put_p99_ms": ms(percentile(puts, 99)),
        "put_max_ms": ms(max(puts)),
        "vs_quiet": round(p50 / quiet_p50, 2) if quiet_p50 else 1.0,
        "rss_before_mib": round(rss, 1),
        "peak_rss_mib": round(d.peak_rss_mib(), 1),
    }


def run(*, quick: bool, progress: Progress) -> Result:
    small, large = (200, 500) if quick else (5_000, 20_000)
    clients_small, clients_large = (10, 5) if quick else (100, 30)
    body_size = (1 << 20) if quick else 30 << 20
    samples, pause = (10, 0.01) if quick else (60, 0.02)
    settle = 0.2 if quick else 2.0
    body = gc_body(body_size)
    rows: list[dict[str, Any]] = []
    gc_answers: dict[str, list[int]] = {}

    def measure(d: daemon.Daemon, name: str, size: int, quiet: float | None) -> float:
        time.sleep(settle)  # let the attack reach its steady state
        row = _row(d, name, size, samples, pause, quiet)
        rows.append(row)
        progress(name, f"PUT p50 {row['put_p50_ms']:.2f} ms, peak RSS {row['peak_rss_mib']} MiB")
        return float(row["put_p50_ms"]) / 1000

    for size, clients in ((large, clients_large), (small, clients_small)):
        with daemon.running() as d:
            d.fill(list(attachments(0, size)), progress=progress)
            _reset_peak(d)
            quiet = measure(d, "quiet", size, None)
            _reset_peak(d)
            with _attack(functools.partial(_listing_attack, d.socket, clients), 1):
                measure(d, f"listing-{clients}", size, quiet)
            if size != large:
                continue
            for gcs in (1, 4):
                time.sleep(settle)
                _reset_peak(d)
                answers: list[int] = []
                gc_answers[f"gc-{gcs}"] = answers
                with _attack(functools.partial(_gc_attack, d.socket, body, answers), gcs):
                    measure(d, f"gc-{gcs}", size, quiet)
    result = Result(
        benchmark=NAME,
        quick=quick,
        params={
            "gc_body_bytes": len(body),
            "samples": samples,
            "pause_s": pause,
            "reconnect_after_s": RECONNECT_AFTER,
            "gc_answers": {k: sorted(set(v)) for k, v in gc_answers.items()},
            "gc_requests": {k: len(v) for k, v in gc_answers.items()},
        },
        columns=[
            "attack",
            "attachments",
            "put_p50_ms",
            "put_p99_ms",
            "put_max_ms",
            "vs_quiet",
            "rss_before_mib",
            "peak_rss_mib",
        ],
        rows=rows,
        summary={
            "peak RSS over every attack (MiB)": max(r["peak_rss_mib"] for r in rows),
            "worst PUT p50 vs quiet": max(r["vs_quiet"] for r in rows),
        },
    )
    for r in rows:
        if r["attack"] != "quiet":
            name = f"PUT p50 during {r['attack']} at {r['attachments']:,} vs quiet"
            result.goal(name, r["vs_quiet"], RATIO_GOAL, "x")
    return result


def plot(result: Result, path: Path) -> None:
    fig, (ax, ax2) = plotting.figure(ncols=2, width=10.0)
    labels = [f"{r['attack']}\n@{r['attachments']:,}" for r in result.rows]
    xs = range(len(labels))
    p50 = plotting.column(result.rows, "put_p50_ms")
    bars = ax.bar(xs, p50, color="tab:green")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in p50], fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("PUT p50, ms")
    ax.set_title(f"goal: within {RATIO_GOAL:g}x the quiet p50", fontsize=9)
    peak = plotting.column(result.rows, "peak_rss_mib")
    bars2 = ax2.bar(xs, peak, color="tab:purple")
    ax2.bar_label(bars2, labels=[f"{v:.0f}" for v in peak], fontsize=7)
    ax2.set_xticks(list(xs), labels, fontsize=7)
    ax2.set_ylabel("daemon peak RSS (VmHWM), MiB")
    plotting.save(fig, result, path, "A setup during hostile API clients")

"""`python -m bench.profile SCENARIO`: where a masqd daemon spends its time, by function.

Not a benchmark: a tool for the step after one, when a figure misses its goal. It fills a
daemon to --attachments, attaches py-spy (`pip install py-spy`; not a project dependency) to
the daemon's pid for one scenario, and prints wall time per operation, per thread and per
function (inclusive and self), with py-spy's idle samples (a thread pool waiting for work,
the event loop in epoll) left out:

  put      sequential PUTs of new attachments, each on a fresh connection
  burst    --ops new attachments from 64 concurrent clients (as `bench burst`)
  delete   sequential DELETEs of attachments added (unprofiled) for the purpose
  startup  SIGTERM, restart, profile from spawn until /readyz answers 200
  repair   `nft delete table inet masqd`, profile until the table is whole again
  idle     the filled daemon left alone

The raw py-spy output (one collapsed stack per line) is kept with --raw PATH.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import daemon
from bench.addresses import MAX_ATTACHMENTS, attachment, attachments
from bench.harness import REPO_ROOT, Progress, clean_up_on_sigterm
from bench.startup import wait_repaired
from tests.netns import nft

PY_SPY = REPO_ROOT / ".venv" / "bin" / "py-spy"
DAEMON_ARGS = ("--max-attachments", "200000")
# Leaf frames that mean "waiting for work", not "working".
_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)", "select (selectors.py:")


def py_spy() -> str:
    found = shutil.which("py-spy") or (str(PY_SPY) if PY_SPY.exists() else None)
    if found is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


class Recorder:
    """py-spy attached to a pid, writing collapsed stacks; stopped with SIGINT."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        cmd = [py_spy(), "record", "--threads", "-f", "raw", "-r", str(rate), "-o", str(out)]
        self.proc = subprocess.Popen(
            [*cmd, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.out = out
        time.sleep(0.3)  # let it attach

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def summarize(raw: Path, operations: int, rate: int, top: int = 25) -> str:
    """Per-thread and per-function milliseconds per operation, idle samples left out."""
    per_sample_ms = 1000.0 / rate
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in _IDLE_LEAVES):
            continue
        n = int(count)
        total += n
        threads[frames[0].split(":")[-1].strip() or frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n

    def fmt(n: int) -> str:
        return f"{n * per_sample_ms / operations:8.2f} ms {100.0 * n / max(total, 1):5.1f}%"

    lines = [f"active samples: {total} ({total * per_sample_ms / operations:.2f} ms per operation)"]
    lines += [f"  thread {fmt(n)}  {name}" for name, n in threads.most_common()]
    lines.append("inclusive (masqd and aiohttp frames):")
    ours = [(f, n) for f, n in inclusive.most_common() if "masqd/" in f or "aiohttp/web" in f]
    lines += [f"  {fmt(n)}  {f}" for f, n in ours[:top]]
    lines.append("self:")
    lines += [f"  {fmt(n)}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def run(scenario: str, n: int, ops: int, rate: int, raw: Path, progress: Progress) -> str:
    with daemon.running(DAEMON_ARGS) as d:
        d.fill(list(attachments(0, n)), progress=progress)
        progress("filled", f"{n:,} attachments")
        # The profiled operations' attachments follow the fill's: new ones, none shared.
        timed = [attachment(n + k, prefix="p") for k in range(ops)]
        if scenario == "delete":
            d.fill(timed)
        time.sleep(2.0)
        operations, note, note_cpu = ops, "", ""
        if scenario == "startup":
            d.stop()
            operations = 1
            t0 = time.perf_counter()
            d.start_detached()
            rec = Recorder(d.pid, raw, rate)
            d.wait_ready(t0)
            note = (
                f"ready after {time.perf_counter() - t0:.2f} s (py-spy attached ~0.3 s after spawn)"
            )
            rec.stop()
        else:
            rec = Recorder(d.pid, raw, rate)
            t0 = time.perf_counter()
            if scenario == "put":
                lat = [d.put(a) for a in timed]
            elif scenario == "burst":
                cpu0 = d.cpu_seconds()
                wall_s, lat = daemon.burst(d, timed, 64)
                note_cpu = f"; daemon CPU {100 * (d.cpu_seconds() - cpu0) / wall_s:.0f}% of a core"
            elif scenario == "delete":
                lat = [d.delete(a) for a in timed]
            elif scenario == "repair":
                before = d.syncs()["total"]
                nft(d.ns, "delete", "table", "inet", daemon.TABLE)
                lat = [wait_repaired(d, before, n)]
                operations = 1
            else:  # idle
                time.sleep(ops)
                lat, operations = [float(ops)], 1
            wall = time.perf_counter() - t0
            rec.stop()
            lat.sort()
            note = (
                f"{len(lat)} operation(s) in {wall:.2f} s; p50 {lat[len(lat) // 2] * 1e3:.2f} ms,"
                f" max {lat[-1] * 1e3:.2f} ms{note_cpu} (py-spy slows the daemon down)"
            )
    return f"{scenario} at {n:,} attachments: {note}\n" + summarize(raw, operations, rate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("scenario", choices=["put", "burst", "delete", "startup", "repair", "idle"])
    parser.add_argument("--attachments", type=int, default=100_000)
    parser.add_argument("--ops", type=int, default=200, help="operations (idle: seconds)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    py_spy()
    if args.attachments + args.ops > MAX_ATTACHMENTS:
        parser.error(f"--attachments + --ops must stay within {MAX_ATTACHMENTS:,}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "profile.txt"
        report = run(args.scenario, args.attachments, args.ops, args.rate, raw, Progress("profile"))
    print(report)
    return 0


if __name__ == "__main__":
    clean_up_on_sigterm()
    sys.exit(main())

"""Rate-limiting of repeated identical log lines.

A fault that repeats (a sync failing for want of descriptors, a listener that cannot accept)
must not fill the disk: once, on a node flooded with connections, the log grew by a million
lines in 45 s. `RepeatFilter` sits on the log handler, so it sees every logger's records
(masqd's, asyncio's, aiohttp's). The first occurrence of a line goes through; the same line
(same logger, level and text) again within `window` seconds is counted, not written. When
the window is over, the next record of any kind first brings out a summary of what was held
back ("repeated 41,327 times in the last 10s: <the line>"), and the line, if it comes again,
goes through and starts a new window. At most `max_lines` distinct lines are tracked; the
oldest is summarised and forgotten beyond that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 10.0  # seconds
MAX_LINES = 256
SUMMARY_TEXT = 200  # characters of the repeated line quoted in its summary
# `log.info(..., extra=ALWAYS)`: a line an operator acted for (a reload applied), never held
# back however often it comes; it cannot flood, since each one answers an operator's change.
ALWAYS = {"masqd_always": True}


@dataclass
class _Seen:
    since: float  # start of the line's window
    held: int  # occurrences not written in it
    record: logging.LogRecord  # the first one, for the summary's logger and level


class RepeatFilter(logging.Filter):
    def __init__(
        self,
        handler: logging.Handler,
        *,
        window: float = WINDOW,
        max_lines: int = MAX_LINES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self.max_lines = max_lines
        self.clock = clock
        self._seen: OrderedDict[tuple[str, int, str], _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "masqd_summary", False) or getattr(record, "masqd_always", False):
            return True
        now = self.clock()
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            due = self._take_due(now)
            seen = self._seen.get(key)
            if seen is not None and now - seen.since < self.window:
                seen.held += 1
                passes = False
            else:
                if seen is not None:
                    del self._seen[key]
                    if seen.held:
                        due.append(seen)
                self._seen[key] = _Seen(now, 0, record)
                while len(self._seen) > self.max_lines:
                    _, oldest = self._seen.popitem(last=False)
                    if oldest.held:
                        due.append(oldest)
                passes = True
        for seen in due:
            self.handler.handle(self._summary(seen, now))
        return passes

    def _take_due(self, now: float) -> list[_Seen]:
        """Lines whose window is over: summaries to write, if anything was held back."""
        due: list[_Seen] = []
        for key in [k for k, s in self._seen.items() if now - s.since >= self.window]:
            seen = self._seen.pop(key)
            if seen.held:
                due.append(seen)
        return due

    def _summary(self, seen: _Seen, now: float) -> logging.LogRecord:
        first = seen.record
        text = first.getMessage()
        if len(text) > SUMMARY_TEXT:
            text = text[:SUMMARY_TEXT] + "..."
        summary = logging.LogRecord(
            first.name,
            first.levelno,
            first.pathname,
            first.lineno,
            "repeated %d more times in the last %.0fs: %s",
            (seen.held, now - seen.since, text),
            None,
        )
        summary.masqd_summary = True
        return summary


def install(handlers: list[logging.Handler] | None = None, *, window: float = WINDOW) -> None:
    """Put a RepeatFilter on each handler (the root logger's, by default)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        handler.addFilter(RepeatFilter(handler, window=window))

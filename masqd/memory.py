"""Giving freed heap memory back to the system after the daemon's few big allocations.

A whole-table transaction (libnftables parses the batch into a JSON tree and its own objects:
hundreds of MiB for 400,000 elements) and the journal replay at start-up free everything they
allocate, but glibc keeps the pages: without a trim the daemon's RSS stayed near 1 GiB after
one repair at 100,000 attachments.
"""

from __future__ import annotations

import contextlib
import ctypes


def release_heap() -> None:
    """malloc_trim(0): return free pages at the top and inside the C heap (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)

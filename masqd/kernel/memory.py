"""Giving freed heap memory back to the system after the daemon's few big allocations.

A whole-table transaction (libnftables parses the batch into a JSON tree and its own objects:
hundreds of MiB for 400,000 elements) and the journal replay at start-up free everything they
allocate, but glibc keeps the pages: without a trim the daemon's RSS stayed near 1 GiB after
one repair at 100,000 attachments.

glibc also raises its mmap threshold to the size of the largest block freed (up to 32 MiB):
after the 30 MiB batch of a whole-table transaction, the mirror's dict tables (a few MiB
each) came from the main heap instead, and freeing them left 35 MiB that no trim gave back.
`tune_allocator` fixes the thresholds, which turns that adjustment off.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # blocks this large get pages of their own, unmapped when freed
TRIM_THRESHOLD = 1024 * 1024  # free memory at the heap's top beyond this goes back at once


def tune_allocator() -> None:
    """Fixed mmap and trim thresholds (glibc only; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_heap() -> None:
    """malloc_trim(0): return free pages at the top and inside the C heap (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)

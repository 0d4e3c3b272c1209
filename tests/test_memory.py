"""The allocator tuning that keeps the daemon's RSS down after a whole-table transaction."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A 16 MiB block freed (the batch of a whole-table transaction), then 30 MiB of 1 MiB blocks
# allocated and freed (the mirror's dict tables): the RSS they leave behind, in MiB.
_PROGRAM = """
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
if sys.argv[1] == 'tuned':
    from masqd.kernel.memory import tune_allocator
    tune_allocator()
big = b'x' * (16 << 20)
del big
start = rss()
blocks = [b'x' * (1 << 20) for _ in range(30)]
del blocks
print(rss() - start)
"""


def _left_behind(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_go_back_to_the_system_once_tuned() -> None:
    # Untuned, glibc raised its thresholds after the big block and kept the 30 MiB.
    assert _left_behind("plain") >= 20
    assert _left_behind("tuned") <= 4

"""Write DEL spool entries as docs/cni.md specifies them, for tests of the daemon's reading side.

masqd-cni (Go, cni/spool.go) is the real writer; tests/test_cni.py checks that what it
writes is what `masqd.state.spool` reads. Daemon-side tests use this to put entries in place
without running the plugin, and test_cni uses it to check the other direction: an entry
written by the format alone is one the plugin finds by its key.
"""

from __future__ import annotations

import json
import os
import time

from masqd.state import spool


def write_entry(
    spool_dir: str, network: str, container_id: str, ifname: str, *, now: float | None = None
) -> str:
    """One entry, atomically (temporary dot-file, rename), in a 0700 directory; its path."""
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    record = {
        "version": spool.FORMAT_VERSION,
        "network": network,
        "container_id": container_id,
        "ifname": ifname,
        "spooled_at": time.time() if now is None else now,
    }
    path = os.path.join(spool_dir, spool.entry_name(network, container_id, ifname))
    tmp = os.path.join(spool_dir, f"{spool.TEMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(record).encode())
    os.replace(tmp, path)
    return path

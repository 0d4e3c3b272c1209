"""The body of `GET /v1/attachments`, in slices.

At 20,000 attachments the listing is about 3 MB of JSON; built whole, it held the event loop
for as long as it took and stayed in memory until the client read it, for every client at
once (30 clients that never read took the daemon from 97 to 294 MiB and held a setup for
7 s). Here the listing is made `SLICE` records at a time: the API writes each slice with
backpressure and yields to the loop between slices, so a setup waits at most one slice, and
a client that does not read holds at most one slice and its socket buffer.

The keys are copied when the listing starts (a list of references, about 8 bytes each) and
each record is looked up when its slice is made: an attachment deleted meanwhile is left
out, one added meanwhile is not listed, and `count` is the number listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from masqd.models import AttachmentKeyT
from masqd.planning.records import AttachmentRecord
from masqd.state.desired import DesiredState

SLICE = 250  # records: about 40 KB of JSON and well under a millisecond to make


def attachment_json(key: AttachmentKeyT, record: AttachmentRecord) -> dict[str, Any]:
    return {"network": key[0], "container_id": key[1], "ifname": key[2], "ips": record.cidrs()}


def slices(state: DesiredState, network: str | None, size: int = SLICE) -> Iterator[bytes]:
    """`{"attachments": [...], "count": N}` as successive pieces of bytes."""
    keys = list(state.attachments)
    yield b'{"attachments": ['
    count = 0
    for start in range(0, len(keys), size):
        items = []
        for key in keys[start : start + size]:
            record = state.get(key)
            if record is not None and (network is None or key[0] == network):
                items.append(attachment_json(key, record))
        if items:
            text = json.dumps(items)[1:-1]
            yield (", " + text if count else text).encode()
            count += len(items)
    yield f'], "count": {count}}}'.encode()

"""Bounded concurrency without a queue: a request that finds every slot taken is refused.

The API admits at most a few of its expensive requests (listings, big GC bodies) at once.
Waiting for a slot would keep the connection, and its unread request, for as long as the
others take; refusing at once (503 with Retry-After) costs nothing and tells a well-behaved
client when to come back.
"""

from __future__ import annotations


class Slots:
    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0

    def take(self) -> bool:
        """Take a slot if one is free; give it back with `give_back`."""
        if self.used >= self.size:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        self.used -= 1

"""A cap on the rate at which a server sends, shared by all of its transfers and streams.

Serving peers must leave room for the instance's own traffic (inference requests, its other
peers). Each chunk is given a start time on one shared clock, ``nbytes / rate`` after the one
before, and waits for it: over any stretch longer than a chunk the server sends at most
``rate`` bytes per second, whatever the number of clients. Clients that need more take chunks
from several sources at once.
"""

from __future__ import annotations

import threading
import time


class Pacer:
    def __init__(self, rate: float):
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        """Block until ``nbytes`` more may go out."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)

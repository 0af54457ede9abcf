"""Transfer slots: at most ``max_clients`` transfers at once, and a bounded queue of clients
waiting for one until their handshake deadline; beyond that, clients are refused as busy, with
the reason."""

from __future__ import annotations

import threading
import time

from netloader import events
from netloader.errors import Code, Refusal
from netloader.options import Limits


class Admission:
    def __init__(self, limits: Limits, closing: threading.Event):
        self.limits = limits
        self.closing = closing
        self._slots = threading.BoundedSemaphore(limits.max_clients)
        self._waiting = (
            threading.BoundedSemaphore(limits.max_waiting) if limits.max_waiting else None
        )
        self._queued = events.Count()

    @property
    def queued(self) -> int:
        """Clients waiting for a slot now."""
        return self._queued.value

    def admit(self, peer: str, deadline: float, patience: float) -> None:
        """Take a transfer slot for ``peer``, queueing until ``deadline`` if all are in use;
        give it back with ``release()``. Refusal (busy) if none came; ``patience`` is the whole
        wait allowed, for the reason."""
        if self._slots.acquire(blocking=False):
            return
        full = f"all {self.limits.max_clients} transfer slots"
        if self._waiting is None or not self._waiting.acquire(blocking=False):
            raise _busy(f"{full} and the waiting queue are full")
        events.emit(events.Queued(peer, self.limits.max_clients))
        self._queued.add(1)
        admitted = False
        try:
            while not self.closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._slots.acquire(timeout=min(left, 0.5)):
                    admitted = True
                    return
            raise _busy(f"{full} stayed in use for {patience:g} s")
        finally:
            self._waiting.release()
            self._queued.add(-1)
            events.emit(events.QueueLeft(peer, admitted))

    def release(self) -> None:
        self._slots.release()


def _busy(why: str) -> Refusal:
    return Refusal(Code.BUSY, f"server is busy: {why}; retry later")

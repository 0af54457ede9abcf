"""Transfer slots: at most ``max_clients`` transfers at once, and a bounded queue of clients
waiting for one until their handshake deadline; beyond that, clients are told the server is
busy, with the reason."""

from __future__ import annotations

import logging
import threading
import time

from netloader.options import Limits

log = logging.getLogger("netloader.server")


class Admission:
    def __init__(self, limits: Limits, closing: threading.Event):
        self.limits = limits
        self.closing = closing
        self._slots = threading.BoundedSemaphore(limits.max_clients)
        self._waiting = (
            threading.BoundedSemaphore(limits.max_waiting) if limits.max_waiting else None
        )

    def admit(self, deadline: float, patience: float) -> str | None:
        """Take a transfer slot, queueing until ``deadline`` if all are in use. None once one
        is held (give it back with ``release()``); otherwise why not. ``patience`` is the
        whole wait allowed, for the reason."""
        if self._slots.acquire(blocking=False):
            return None
        full = f"all {self.limits.max_clients} transfer slots"
        if self._waiting is None or not self._waiting.acquire(blocking=False):
            return f"{full} and the waiting queue are full"
        log.info("a client waits for a transfer slot: all %d in use", self.limits.max_clients)
        try:
            while not self.closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._slots.acquire(timeout=min(left, 0.5)):
                    return None
            return f"{full} stayed in use for {patience:g} s"
        finally:
            self._waiting.release()

    def release(self) -> None:
        self._slots.release()

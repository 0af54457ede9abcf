"""Whether a server may still serve, and what it does when a client reports corrupt bytes.

A server never sends what it cannot vouch for: once its tensors are known to differ from what
it captured (caught while sending, or found when it re-hashes itself after a client reported a
digest mismatch), it refuses every later pull with the reason.
"""

from __future__ import annotations

import logging

from netloader.errors import Code
from netloader.protocol import Done
from netloader.snapshot import Snapshot, describe_changed

log = logging.getLogger("netloader.server")


class Integrity:
    def __init__(self, snapshot: Snapshot | None, model: str):
        self.snapshot = snapshot
        self.model = model
        #: When set, every pull is refused with this reason.
        self.unavailable: str | None = None

    def stop_serving(self, reason: str) -> None:
        if self.unavailable == reason:
            return
        self.unavailable = reason
        log.error("refusing further pulls of %s: %s", self.model, reason)

    def client_failed(self, peer: str, done: Done) -> None:
        log.warning("client %s reported a failed transfer: %s", peer, done.reason)
        if done.code == Code.INTEGRITY:
            self.recheck()

    def recheck(self) -> None:
        """Hash every served tensor again; if any changed since capture, stop serving."""
        changed = self.snapshot.changed() if self.snapshot is not None else []
        if changed:
            self.stop_serving(describe_changed(changed))
        else:
            log.warning("served tensors still match their digests: the corruption was in transit")

"""The models one server serves, each under its own name.

A worker may hold several models (a speculative-decoding target and its draft): one listener
serves them all, and a client's request names the one it wants (its identity's model). Each
model keeps its own snapshot, integrity verdict and relays (discovery), so withdrawing or
refusing one leaves the others served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from netloader.errors import Code
from netloader.identity import Identity
from netloader.protocol import PullRequest
from netloader.server.handshake import Refusal
from netloader.server.integrity import Integrity
from netloader.server.peers import Peers
from netloader.snapshot import Snapshot

log = logging.getLogger("netloader.server")


class Served:
    """One model of a server: its identity, the snapshot it serves (once provided), whether it
    may still serve it (``integrity``), and the relays pulling or holding it (``peers``)."""

    def __init__(
        self,
        identity: Identity,
        snapshot: Snapshot | None,
        on_provide: Callable[[Served], None] = lambda served: None,
    ):
        self.identity = identity
        self.snapshot: Snapshot | None = None
        self.integrity = Integrity(None, identity.model)
        self.peers = Peers()
        self.served = 0  # completed transfers of this model
        self._settled = threading.Event()  # provided, or withdrawn before it was
        self._on_provide = on_provide
        if snapshot is not None:
            self._install(snapshot)

    @property
    def model(self) -> str:
        return self.identity.model

    def provide(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (a relay: as its chunks become ready)."""
        self.integrity.unavailable = None
        self._install(snapshot)
        self._on_provide(self)

    def withdraw(self, reason: str) -> None:
        """Stop serving (a relay whose own pull failed): refuse new pulls with ``reason``; the
        pulls running are refused at their next chunk, with the same reason, whether it had
        arrived or not (and peers waiting for a chunk that will not come are woken)."""
        self.integrity.unavailable = reason
        if self.snapshot is not None and self.snapshot.ready is not None:
            self.snapshot.ready.withdraw(reason)
        self._settled.set()  # peers waiting for a first snapshot get the reason
        log.warning("stopped serving %s: %s", self.model, reason)

    @property
    def unavailable(self) -> str | None:
        """When set, every pull of this model is refused with this reason."""
        return self.integrity.unavailable

    @unavailable.setter
    def unavailable(self, reason: str | None) -> None:
        self.integrity.unavailable = reason

    def wait(self, deadline: float) -> Snapshot | Refusal:
        """The snapshot, once there is one (a relay's may still be waiting for its own source's
        answer, a few milliseconds after it started)."""
        if not self._settled.wait(max(0.0, deadline - time.monotonic())):
            return Refusal(
                Code.UNAVAILABLE,
                f"this relay has no weights of {self.model!r} yet: its own pull has not started",
            )
        snapshot = self.snapshot
        if snapshot is None:
            return Refusal(Code.UNAVAILABLE, self.unavailable or "withdrawn")
        return snapshot

    def check(self, request: PullRequest, snapshot: Snapshot) -> Refusal | None:
        """Whether ``request`` (already matched to this model) may have ``snapshot``."""
        if request.manifest is not None:
            reason = snapshot.manifest.mismatch(request.manifest, "server", "client")
            if reason:
                return Refusal(Code.MANIFEST, f"tensor manifest differs: {reason}")
        if self.unavailable:
            return Refusal(Code.UNAVAILABLE, self.unavailable)
        return None

    def _install(self, snapshot: Snapshot) -> None:
        self.snapshot = self.integrity.snapshot = snapshot
        self._settled.set()


class Catalog:
    """The models of one server by name, in the order they were added."""

    def __init__(self) -> None:
        self._models: dict[str, Served] = {}
        self._lock = threading.Lock()

    def add(self, served: Served) -> Served:
        with self._lock:
            if served.model in self._models:
                raise ValueError(f"this server already serves a model named {served.model!r}")
            self._models[served.model] = served
        return served

    def get(self, model: str) -> Served:
        with self._lock:
            if model not in self._models:
                raise KeyError(f"this server serves no model named {model!r}")
            return self._models[model]

    def __contains__(self, model: object) -> bool:
        with self._lock:
            return model in self._models

    def __iter__(self) -> Iterator[Served]:
        with self._lock:
            return iter(list(self._models.values()))

    def pick(self, wanted: Identity) -> Served | Refusal:
        """The model ``wanted`` names, if it matches in layout and rank; else the refusal
        for the closest one (the model of that name, or else every name held)."""
        with self._lock:
            served = self._models.get(wanted.model)
            held = ", ".join(repr(name) for name in self._models)
        if served is None:
            return Refusal(
                Code.MODEL, f"model differs: server has {held}, client wants {wanted.model!r}"
            )
        mismatch = served.identity.mismatch(wanted, "server", "client")
        return Refusal(*mismatch) if mismatch else served

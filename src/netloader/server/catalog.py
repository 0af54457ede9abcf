"""The models one server serves, each under its own name.

A worker may hold several models (a speculative-decoding target and its draft): one listener
serves them all, and a client's request names the one it wants (its identity's model). Each
model keeps its own snapshot, integrity verdict and relays (their placement), so withdrawing or
refusing one leaves the others served. Every check raises ``errors.Refusal``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from netloader.errors import Code, Refusal
from netloader.events import Count
from netloader.identity import Identity
from netloader.protocol import PullRequest
from netloader.server.integrity import Integrity
from netloader.server.relays import Relays
from netloader.snapshot import Snapshot

log = logging.getLogger("netloader.server")


class ServedModel:
    """One model of a server: its identity, the snapshot it serves (once provided), whether it
    may still serve it (``integrity``), and the relays pulling or holding it (``relays``)."""

    def __init__(
        self,
        identity: Identity,
        snapshot: Snapshot | None,
        on_provide: Callable[[ServedModel], None] = lambda entry: None,
    ):
        self.identity = identity
        self.snapshot: Snapshot | None = None
        self.integrity = Integrity(None, identity.model)
        self.relays = Relays(identity.model)
        #: Transfers of this model that the client verified.
        self.transfers = Count()
        self._settled = threading.Event()  # provided, or withdrawn before it was
        self._on_provide = on_provide
        if snapshot is not None:
            self._install(snapshot)

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def peers(self) -> Relays:
        """The old name of ``relays``."""
        return self.relays

    @property
    def served(self) -> int:
        """Transfers of this model that the client verified."""
        return self.transfers.value

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

    def wait(self, deadline: float) -> Snapshot:
        """The snapshot, once there is one (a relay's may still be waiting for its own source's
        answer, a few milliseconds after it started)."""
        if not self._settled.wait(max(0.0, deadline - time.monotonic())):
            raise Refusal(
                Code.UNAVAILABLE,
                f"this relay has no weights of {self.model!r} yet: its own pull has not started",
            )
        snapshot = self.snapshot
        if snapshot is None:
            raise Refusal(Code.UNAVAILABLE, self.unavailable or "withdrawn")
        return snapshot

    def check(self, request: PullRequest, snapshot: Snapshot) -> None:
        """Whether ``request`` (already matched to this model) may have ``snapshot``."""
        if request.manifest is not None:
            reason = snapshot.manifest.mismatch(request.manifest, "server", "client")
            if reason:
                raise Refusal(Code.MANIFEST, f"tensor manifest differs: {reason}")
        if self.unavailable:
            raise Refusal(Code.UNAVAILABLE, self.unavailable)

    def _install(self, snapshot: Snapshot) -> None:
        self.snapshot = self.integrity.snapshot = snapshot
        self.relays.serves(snapshot.plan.chunk_size, snapshot.plan.num_chunks)
        self._settled.set()


class Catalog:
    """The models of one server by name, in the order they were added."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def add(self, entry: ServedModel) -> ServedModel:
        with self._lock:
            if entry.model in self._models:
                raise ValueError(f"this server already serves a model named {entry.model!r}")
            self._models[entry.model] = entry
        return entry

    def get(self, model: str) -> ServedModel:
        with self._lock:
            if model not in self._models:
                raise KeyError(f"this server serves no model named {model!r}")
            return self._models[model]

    def __contains__(self, model: object) -> bool:
        with self._lock:
            return model in self._models

    def __iter__(self) -> Iterator[ServedModel]:
        with self._lock:
            return iter(list(self._models.values()))

    def pick(self, wanted: Identity) -> ServedModel:
        """The model ``wanted`` names, if it matches in layout and rank; else the refusal
        for the closest one (the model of that name, or else every name held)."""
        with self._lock:
            entry = self._models.get(wanted.model)
            held = ", ".join(repr(name) for name in self._models)
        if entry is None:
            raise Refusal(
                Code.MODEL, f"model differs: server has {held}, client wants {wanted.model!r}"
            )
        mismatch = entry.identity.mismatch(wanted, "server", "client")
        if mismatch:
            raise Refusal(*mismatch)
        return entry


#: The old name of ``ServedModel``.
Served = ServedModel

"""The data-plane interface: a transport moves the chunks of one accepted pull.

The control connection (``protocol``) decides *whether* weights move; the client decides which
chunk comes from which source (its ``Board``); a transport decides *how* they move. Each
transport is one module with an ``Engine``: one long-lived object per process, registered once
in ``transport/__init__.py``. It says what it can carry (``supports``), to whom (``reaches``),
whether a server's options enable it, and whether a client proposes it unasked. For each
accepted transfer the server asks it for a ``Sending`` (``offer`` for the Accept, ``attach``
for data connections that reach the server's port, ``send`` in the session's thread, ``close``
however it ended); the client calls ``receive`` once per source. Both sides see the same
``Plan``; ``Outgoing`` and ``Incoming`` are what each side knows of the transfer.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from netloader import events
from netloader.board import Board
from netloader.digest import XXH3, chunk_digest
from netloader.errors import IntegrityError, TensorsChanged
from netloader.pacing import Pacer
from netloader.plan import Plan
from netloader.protocol import MAX_TEXT, Message
from netloader.snapshot import Snapshot, describe_changed

if TYPE_CHECKING:
    from netloader.options import PullOptions, ServeOptions


@dataclass
class Outgoing:
    """The server side of one transfer."""

    snapshot: Snapshot
    session: str
    streams: int
    host: str
    idle: float
    #: Re-hash each chunk just before sending it and refuse if it changed since capture.
    verify: bool = False
    #: True once the client went away (its control connection closed), checked without blocking.
    client_gone: Callable[[], bool] = lambda: False
    #: The server's upload cap, shared by all its transfers (None: uncapped).
    pacer: Pacer | None = None
    #: Told the reason when a chunk about to go out differs from capture, before any peer
    #: hears of it: the server refuses every later pull from that moment on.
    on_changed: Callable[[str], None] = lambda reason: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: The model's name, for the events this transfer emits.
    model: str = ""
    #: Bytes sent in this transfer so far.
    sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, index: int, views: list[memoryview] | None = None) -> None:
        """With ``verify``: refuse to send chunk ``index`` if it differs from capture
        (``views``: its bytes in host memory, when the caller has them)."""
        expected = self.snapshot.digests
        if (
            self.verify
            and expected is not None
            and self.snapshot.chunk_digest(index, views) != expected[index]
        ):
            reason = describe_changed(self.snapshot.names_in(index))
            self.on_changed(reason)
            raise TensorsChanged(reason)

    def pace(self, index: int) -> None:
        """Wait until chunk ``index`` may go out under the server's upload cap."""
        if self.pacer is not None:
            self.pacer.wait(self.snapshot.plan.chunk_bytes(index))

    def count(self, index: int) -> None:
        """Chunk ``index`` went out."""
        nbytes = self.snapshot.plan.chunk_bytes(index)
        with self._lock:
            self.sent += nbytes
        events.emit(events.ChunkSent(self.model, nbytes))


@dataclass
class Incoming:
    """The client side of one source's share of a transfer: where each slot's bytes land, and
    the board that says which chunks to ask this source for."""

    host: str
    port: int
    session: str
    streams: int
    plan: Plan
    #: One flat uint8 destination per slot (an empty tensor for aliases), any device.
    buffers: list[torch.Tensor]
    #: The digest of every chunk, or None to skip verification.
    digests: list[int] | None
    idle: float
    board: Board
    #: This source's name on the board.
    source: str
    #: Transport-specific facts from the server's Accept (e.g. a rendezvous port).
    offer: dict[str, Any] = field(default_factory=dict)
    #: Set once the first byte from this source was written into a destination.
    wrote: bool = False
    #: Which function made ``digests`` (the Accept's ``digest``).
    digest_kind: str = XXH3
    #: The transport that really moved the bytes (one may fall back to another, e.g. CUDA IPC
    #: to TCP); set by the client from the Accept.
    transport: str = ""
    #: The client's settings, for transports that have their own (mooncake's protocol).
    options: PullOptions | None = None
    #: The server's own address from the Accept, when it differs from the one dialled
    #: (``host``, ``port``): data connections that the dialled address sends to another server
    #: (a balancing address) go there instead.
    data: tuple[str, int] | None = None

    @property
    def server_host(self) -> str:
        """The host of the very server that accepted (for a transport's own rendezvous)."""
        return self.data[0] if self.data is not None else self.host

    def verify(self, index: int, views: list[memoryview] | None = None) -> None:
        """Check chunk ``index``, now in place, against its digest, computed where it landed
        (``views``: its bytes in host memory, when the caller has them)."""
        if self.digests is not None:
            self.expect(
                index, chunk_digest(self.digest_kind, self.plan, self.buffers, index, views)
            )

    def expect(self, index: int, got: int) -> None:
        """Raise IntegrityError unless ``got`` is chunk ``index``'s digest."""
        if self.digests is not None and got != self.digests[index]:
            start, stop = self.plan.chunk_range(index)
            raise IntegrityError(
                f"chunk {index} (bytes {start}..{stop}) does not match the server's digest",
                partial=True,
            )


class Sending(ABC):
    """The server's side of one transfer on an engine: what the Accept offers, the data
    connections that reach the server's port for it, and the sending itself."""

    def __init__(self, out: Outgoing):
        self.out = out

    def offer(self) -> dict[str, Any]:
        """Extra facts the client needs (sent in Accept), e.g. a rendezvous port."""
        return {}

    def attach(self, sock: socket.socket, index: int) -> bool:
        """Take data connection ``index`` that arrived at the server's port for this transfer;
        False if this transfer takes none (or no more), and the server closes it."""
        return False

    @abstractmethod
    def send(self) -> None:
        """Answer the client's chunk requests until it is done; raises on failure. Runs in the
        session's thread."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most transfers hold nothing
        """Release what ``offer`` and ``attach`` took; the server calls it however the transfer
        ended (and from another thread, to stop one). Safe to call more than once."""


class Engine(ABC):
    """One transport of this process: long-lived (one per process, made when it is
    registered), it knows what it can carry and to whom, and starts each transfer.

    Per-process state (a registered memory region, an RDMA context) lives here; per-transfer
    state lives in the ``Sending`` it makes (server side) or in ``receive`` (client side).
    """

    name: ClassVar[str]
    #: The most streams this transport runs for one transfer (the server caps it further).
    max_streams: ClassVar[int] = 1
    #: Messages of its own, on its data connections (decoded like every other kind).
    messages: ClassVar[tuple[type[Message], ...]] = ()
    #: The most characters of JSON its facts in an Accept's ``offer`` may take.
    offer_limit: ClassVar[int] = MAX_TEXT

    @abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can travel on this transport from this process."""

    def absent(self) -> str | None:
        """Why this transport cannot run in this process (a package missing), or None."""
        return None

    def reaches(self, peer_host: str) -> bool:
        """Whether a server may use this transport with a client at ``peer_host``."""
        return True

    def enabled(self, options: ServeOptions) -> bool:
        """Whether a server with ``options`` offers this transport at all."""
        return True

    def proposes(self, device: torch.device, source_host: str | None) -> bool:
        """Whether a client with tensors on ``device`` proposes this transport unasked to a
        source at ``source_host`` (None: not known yet); the registry's order is the order of
        preference."""
        return False

    def register(self, snapshot: Snapshot) -> None:  # noqa: B027 - most engines keep nothing
        """A server serves ``snapshot`` from now on (once per served model): the moment to
        prepare it for this transport, e.g. register its memory."""

    # --- server side ---
    @abstractmethod
    def sending(self, out: Outgoing) -> Sending:
        """The server's side of one transfer of ``out``."""

    # --- client side ---
    @abstractmethod
    def receive(self, inc: Incoming) -> None:
        """Fetch the chunks ``inc.board`` hands this source into ``inc.buffers`` until the board
        has none left. Raises a PullError, or a builtin TimeoutError / OSError /
        ProtocolError that the client maps to one."""

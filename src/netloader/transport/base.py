"""The data-plane interface: a transport moves the chunks of one accepted pull.

The control connection (``protocol``) decides *whether* weights move; the client decides which
chunk comes from which source (its ``Board``); a transport decides *how* they move. Each
transport is one module with one class and declares what it needs from the server: how many
streams it can use, and whether data connections reach it through the server's listening port
(``attach``). The server calls ``offer`` then ``send`` (which answers the client's chunk
requests) in the session's thread; the client calls ``receive`` once per source. Both sides
see the same ``Plan``.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from netloader.board import Board
from netloader.digest import XXH3, chunk_digest
from netloader.errors import IntegrityError, TensorsChanged
from netloader.pacing import Pacer
from netloader.plan import Plan
from netloader.snapshot import Snapshot, describe_changed


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
        with self._lock:
            self.sent += self.snapshot.plan.chunk_bytes(index)


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


class Transport(ABC):
    name: ClassVar[str]
    #: The most streams this transport runs for one transfer (the server caps it further).
    max_streams: ClassVar[int] = 1

    @classmethod
    @abstractmethod
    def supports(cls, device: torch.device) -> bool:
        """Whether tensors on ``device`` can travel on this transport from this process."""

    @classmethod
    def reaches(cls, peer_host: str) -> bool:
        """Whether a server may use this transport with a client at ``peer_host``."""
        return True

    # --- server side ---
    def offer(self, out: Outgoing) -> dict[str, Any]:
        """Extra facts the client needs (sent in Accept), e.g. a rendezvous port."""
        return {}

    def attach(self, sock: socket.socket, index: int) -> bool:
        """Take data connection ``index`` that arrived at the server's port for this transfer;
        False if this transport takes none (or no more), and the server closes it."""
        return False

    @abstractmethod
    def send(self, out: Outgoing) -> None:
        """Send every chunk of ``out``; raises on failure. Runs in the session's thread."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most transports hold nothing
        """Release what ``offer`` and ``attach`` took; the server calls it however the transfer
        ended (and from another thread, to stop one). Safe to call more than once."""

    # --- client side ---
    @abstractmethod
    def receive(self, inc: Incoming) -> None:
        """Fetch the chunks ``inc.board`` hands this source into ``inc.buffers`` until the board
        has none left. Raises a PullError, or a builtin TimeoutError / OSError /
        ProtocolError that the client maps to one."""

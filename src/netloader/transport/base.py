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
from netloader.digest import digest
from netloader.errors import IntegrityError, TensorsChanged
from netloader.pacing import Pacer
from netloader.plan import Plan
from netloader.snapshot import Snapshot, describe_changed
from netloader.tensors import host_view


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

    def check(self, index: int, views: list[memoryview]) -> None:
        expected = self.snapshot.digests
        if self.verify and expected is not None and digest(views) != expected[index]:
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

    def verify(self, index: int, views: list[memoryview]) -> None:
        if self.digests is not None and digest(views) != self.digests[index]:
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


class Staging:
    """Host views of a chunk's pieces, through a bounce buffer for tensors not in host memory.

    Host tensors are read and written in place (a memoryview per tensor is made once, pieces
    are slices of it); device pieces are copied through one reusable chunk-sized host buffer
    (pinned when CUDA is present), so no full-size host copy exists.
    """

    def __init__(self, plan: Plan, buffers: list[torch.Tensor]):
        self.plan = plan
        self.buffers = buffers
        self.host = [host_view(b) if b.device.type == "cpu" else None for b in buffers]
        self.on_device = any(h is None for h in self.host)
        self.bounce: torch.Tensor | None = None

    def _bounce(self) -> torch.Tensor:
        if self.bounce is None:
            pin = torch.cuda.is_available()
            self.bounce = torch.empty(self.plan.chunk_size, dtype=torch.uint8, pin_memory=pin)
        return self.bounce

    def views(self, index: int, *, load: bool) -> list[memoryview]:
        """Views for chunk ``index``; ``load`` fills bounce space from the device first."""
        out = []
        offset = 0
        for slot, start, stop in self.plan.pieces(index):
            view = self.host[slot]
            if view is not None:
                out.append(view[start:stop])
            else:
                part = self._bounce()[offset : offset + stop - start]
                if load:
                    part.copy_(self.buffers[slot][start:stop])
                out.append(host_view(part))
            offset += stop - start
        return out

    def store(self, index: int) -> None:
        """After a receive: copy bounce space of chunk ``index`` to its device pieces."""
        if not self.on_device:
            return
        offset = 0
        for slot, start, stop in self.plan.pieces(index):
            if self.host[slot] is None:
                self.buffers[slot][start:stop].copy_(self._bounce()[offset : offset + stop - start])
            offset += stop - start

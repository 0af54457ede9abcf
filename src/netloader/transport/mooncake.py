"""One-sided reads through Mooncake TransferEngine: the client reads the served memory itself.

When to use it. Where Mooncake is installed (``pip install 'netloader[mooncake]'``), a client
with host-memory destinations proposes ``mooncake`` before TCP; a server offers it only when
its setting says so (``MooncakeOptions.offer``: ``auto`` = only with a token and the ``rdma``
protocol, where one-sided reads pay; over Mooncake's ``tcp`` protocol netloader's own TCP
transport was twice as fast on loopback, so there it takes ``on``). Otherwise the
next transport the client named is used, so mixed sources (one with Mooncake, one without) just
work. Protocols: ``tcp`` (any host) and ``rdma`` (RDMA NICs), the same at both ends.

What moves where. The server registers the storages holding each served model's tensors with
this process's engine (``register``; a relay's are its destination buffers, which it serves
from) and, in the Accept of a client that passed the handshake, offers the engine's segment
name, protocol and each slot's address and length. The client registers its destination
buffers, attaches one data connection to the server's port (the session id is its ticket, as
on TCP) and asks for chunks by index on it. The server answers each with the index alone once
the chunk may be read: a relay's only once it landed and was verified, ``verify_before_send``
re-hashes it first, a withdrawn model or changed tensors answer a refusal instead, and the
upload cap paces the answers. The client reads the answered chunks one-sided, in one batch per
round, straight into its buffers, verifies each against its digest, and marks it done. The
server counts what it granted, sees the stream end, and hears the client's verdict (``Done``)
on the control connection as on every transport.

What protects the weights. The engine's own port has no authentication: anyone who can reach
it and knows addresses inside the registered memory can read it (Mooncake refuses addresses
outside it). Netloader tells the addresses only to clients that passed the handshake, but the
pacing, withdrawal and readiness above bind only clients that follow the protocol: on this
path the weights are as safe as the network that reaches the engine (an isolated RDMA fabric).
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from netloader.errors import Code, ProtocolError, Refused
from netloader.mooncake_options import PROTOCOLS, MooncakeOptions
from netloader.plan import Plan
from netloader.protocol import MAX_FRAME
from netloader.protocol.fields import text, typed
from netloader.snapshot import Snapshot
from netloader.sockets import advertised, kernel_timeouts, split_address
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.chunks import Mark, request_chunks
from netloader.transport.cuda_ipc import answers
from netloader.transport.mooncake_te import ProcessEngine, route_address
from netloader.transport.streams import AttachedSending, Streams
from netloader.transport.tcp import SocketAsking, open_stream, serve_stream

if TYPE_CHECKING:
    from netloader.options import ServeOptions

log = logging.getLogger("netloader.transport")

#: Chunk requests a client keeps outstanding (32 MiB of 4 MiB chunks): an answer carries no
#: bytes, and every answer already in when a round starts is read in that round's one batch;
#: few enough that striping still shares the chunks out among sources.
WINDOW = 8
_OFFER_KEYS = {"segment", "protocol", "regions"}


class MooncakeEngine(Engine):
    name = "mooncake"
    max_streams = 1
    offer_limit = MAX_FRAME  # an address and a length per tensor

    def __init__(self) -> None:
        self.te = ProcessEngine()
        #: The address and settings a server of this process starts the engine with.
        self.serving: tuple[str, MooncakeOptions] = ("127.0.0.1", MooncakeOptions())

    def absent(self) -> str | None:
        return self.te.absent()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.te.absent() is None

    def enabled(self, options: ServeOptions) -> bool:
        mode = options.mooncake.offer
        auto_ok = options.token is not None and options.mooncake.protocol != "tcp"
        if mode == "off" or (mode == "auto" and not auto_ok):
            return False
        reason = self.te.absent()
        if reason is not None:
            if mode == "on":
                log.warning("not offering the mooncake transport: %s", reason)
            return False
        self.serving = (advertised(options.host).strip("[]"), options.mooncake)
        return True

    def proposes(self, device: torch.device, source_host: str | None) -> bool:
        return self.supports(device)

    def register(self, snapshot: Snapshot) -> None:
        try:
            self.serve_from(snapshot)
        except (OSError, RuntimeError, ValueError) as exc:  # its clients use other sources
            log.error("cannot offer %s tensors over mooncake: %s", len(snapshot.buffers), exc)

    def serve_from(self, snapshot: Snapshot) -> None:
        """Start the engine (once) and register the storages of ``snapshot`` (again only if
        its buffers were swapped)."""
        host, settings = self.serving
        self.te.start(host, settings.protocol, settings.devices)
        self.te.hold_for(snapshot, snapshot.buffers)

    def sending(self, out: Outgoing) -> Sending:
        return MooncakeSending(out, self)

    def receive(self, inc: Incoming) -> None:
        offer = parse_offer(inc.offer, inc.plan)
        settings = inc.options.mooncake if inc.options is not None else MooncakeOptions()
        if offer.protocol != settings.protocol:
            raise Refused(
                f"the server's mooncake engine speaks {offer.protocol}, this client's "
                f"{settings.protocol} (set --mooncake-protocol / MOONCAKE_PROTOCOL)",
                code=Code.TRANSPORT,
            )
        self.te.start(route_address(inc.host), settings.protocol, settings.devices)
        keys = self.te.hold(inc.buffers)
        try:
            reader = Reader(self.te, offer, inc)
            Streams(1, inc.idle, threading.Event()).run(
                lambda index: open_stream(inc, index), lambda s, mark: _fetch(s, reader, mark)
            )
        finally:
            self.te.release(keys)


class MooncakeSending(AttachedSending):
    """One data connection, on which the server answers chunk requests with the index alone,
    once the client may read the chunk (see the module's text)."""

    def __init__(self, out: Outgoing, engine: MooncakeEngine):
        super().__init__(out)
        self.engine = engine

    def offer(self) -> dict[str, Any]:
        facts = dict(super().offer())
        snapshot = self.out.snapshot
        self.engine.serve_from(snapshot)  # once; again only if its buffers were swapped
        te = self.engine.te
        regions = [[b.data_ptr(), b.numel()] if b.numel() else None for b in snapshot.buffers]
        return facts | {"segment": te.segment, "protocol": te.protocol, "regions": regions}

    def send(self) -> None:
        self.run_streams(
            lambda sock, mark: serve_stream(sock, self.out, mark, payload=False, paced=True)
        )


@dataclass(frozen=True)
class ReadOffer:
    """What a client needs to read a server's memory: the engine's segment name ("IP:PORT"),
    its protocol, and where each slot's bytes are (None: a slot without bytes)."""

    segment: str
    protocol: str
    addresses: list[int | None]


def parse_offer(offer: dict[str, Any], plan: Plan) -> ReadOffer:
    """The Accept's mooncake offer, checked against the client's own ``plan``."""
    if set(offer) != _OFFER_KEYS:
        raise ProtocolError(f"a mooncake offer must hold {sorted(_OFFER_KEYS)}")
    segment = text(offer, "segment", 300)
    try:
        split_address(segment)
    except ValueError:
        raise ProtocolError(f"mooncake segment {segment[:80]!r} is not IP:PORT") from None
    protocol = text(offer, "protocol", 16)
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"mooncake protocol {protocol!r} is not one of {PROTOCOLS}")
    regions = typed(offer, "regions", list)
    if len(regions) != len(plan.sizes):
        raise ProtocolError(f"the mooncake offer has {len(regions)} regions for {len(plan.sizes)}")
    pairs = enumerate(zip(regions, plan.sizes, strict=True))
    return ReadOffer(segment, protocol, [_address(region, n, k) for k, (region, n) in pairs])


def _address(region: Any, size: int, slot: int) -> int | None:
    if size == 0 and region is None:
        return None
    if not (
        isinstance(region, list)
        and len(region) == 2
        and all(type(x) is int for x in region)
        and 0 < region[0] < 1 << 64
        and region[1] == size
    ):
        raise ProtocolError(f"mooncake region of slot {slot} must be [address, {size}]")
    return region[0]


class Reader:
    """Reads answered chunks one-sided, one batch per round, and verifies them in place."""

    def __init__(self, te: ProcessEngine, offer: ReadOffer, inc: Incoming):
        self.te = te
        self.offer = offer
        self.inc = inc

    def read(self, indices: list[int]) -> list[int]:
        inc = self.inc
        local: list[int] = []
        remote: list[int] = []
        lengths: list[int] = []
        for piece in inc.plan.joined(indices):
            base = self.offer.addresses[piece.slot]
            assert base is not None  # the offer places every slot with bytes
            local.append(inc.buffers[piece.slot].data_ptr() + piece.start)
            remote.append(base + piece.start)
            lengths.append(piece.stop - piece.start)
        inc.wrote = True
        self.te.read(self.offer.segment, local, remote, lengths)
        for index in indices:
            inc.verify(index)
        return indices


def _fetch(sock: socket.socket, reader: Reader, mark: Mark) -> None:
    """Ask for chunks on the data connection; read each round's answered chunks in a batch."""
    inc = reader.inc
    kernel_timeouts(sock, inc.idle)
    stream = SocketAsking(sock, lambda asked: reader.read(answers(sock, inc, asked)))
    request_chunks(stream, inc, mark, WINDOW)
    stream.end()

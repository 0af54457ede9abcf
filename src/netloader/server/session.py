"""One accepted pull: the Accept, the data plane (unless the client was sent to other peers),
and the client's verdict (its Done).

A session runs in the thread of the control connection that asked for it; its data streams run
in the transport. However it ends, the transport is closed and the session forgotten.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass

from netloader import events
from netloader.errors import Code, NetloaderError, ProtocolError, TensorsChanged, Withdrawn
from netloader.events import Count
from netloader.options import Timeouts
from netloader.pacing import Pacer
from netloader.protocol import SESSION_BYTES, Accept, Channel, Done, Hello, PullRequest, Refuse
from netloader.protocol.fanout import Moved, Progress
from netloader.server.catalog import ServedModel
from netloader.server.handshake import Gate
from netloader.server.relays import Placement
from netloader.snapshot import Snapshot
from netloader.sockets import keepalive, local_address
from netloader.transport import Engine, Outgoing

log = logging.getLogger("netloader.server")


@dataclass
class Conversation:
    """One control connection: its channel, the peer, the server's greeting, and the
    handshake's deadline."""

    channel: Channel
    peer: str
    hello: Hello
    deadline: float


@dataclass(frozen=True)
class SessionContext:
    """What a session needs of its server: where it listens, its limits, its proof of the
    token, and the count of its transfers."""

    host: str
    timeouts: Timeouts
    max_streams: int
    verify_before_send: bool
    pacer: Pacer | None
    gate: Gate
    closing: threading.Event
    #: Transfers of every model this server served that the client verified.
    transfers: Count


@dataclass(frozen=True)
class Offered:
    """What a pull that passed every check gets: the model's entry, its snapshot as it is
    now, and the transport that will carry it."""

    entry: ServedModel
    snapshot: Snapshot
    engine: Engine


class Session:
    """One transfer of ``offered``'s snapshot to the peer of ``conv``."""

    def __init__(self, context: SessionContext, conv: Conversation, offered: Offered):
        self.context = context
        self.conv = conv
        self.entry = offered.entry
        self.snapshot = offered.snapshot
        self.id = os.urandom(SESSION_BYTES).hex()
        self.out = Outgoing(
            snapshot=offered.snapshot,
            session=self.id,
            streams=1,
            host=context.host,
            idle=context.timeouts.idle,
            verify=context.verify_before_send,
            client_gone=lambda: _closed(conv.channel.sock),
            pacer=context.pacer,
            on_changed=offered.entry.integrity.stop_serving,
            model=offered.entry.model,
        )
        self.transport = offered.engine.sending(self.out)
        self.engine = offered.engine

    def run(self, request: PullRequest, placement: Placement) -> Done | None:
        """Accept ``request`` and serve it (or, placed elsewhere, only name the peers); the
        client's verdict, or None if the transfer broke."""
        if not placement.here:
            self.conv.channel.send(self._accept(request, placement), self.conv.deadline)
            return self._verdict_of_a_relay(request.advertise or "")
        self.out.streams = min(
            request.streams,
            self.context.max_streams,
            self.engine.max_streams,
            max(1, self.snapshot.plan.num_chunks),
        )
        start = time.perf_counter()
        done: Done | None = None
        try:
            self.conv.channel.send(self._accept(request, placement), self.conv.deadline)
            start = time.perf_counter()
            if self._send():
                done = self._conclude()
            return done
        finally:
            # However it ended (the Accept or the verdict lost too): one TransferDone.
            self._emit_done(time.perf_counter() - start, ok=done is not None and done.ok)
            self.abort()

    def abort(self) -> None:
        """Stop the data plane (from any thread); safe to call more than once."""
        self.out.cancelled.set()
        self.transport.close()

    def _accept(self, request: PullRequest, placement: Placement) -> Accept:
        snapshot = self.snapshot
        offer = self.transport.offer() if placement.here else {}
        return Accept(
            session=self.id,
            identity=self.entry.identity,
            manifest=snapshot.manifest,
            aliases=snapshot.aliases,
            transport=self.engine.name,
            streams=self.out.streams,
            chunk_size=snapshot.plan.chunk_size,
            digests=snapshot.digests,
            offer=offer,
            mac=self.context.gate.proof("pull", request.nonce, self.conv.hello.nonce, self.id),
            peers=list(placement.peers),
            delivers=placement.here,
            digest=snapshot.digest_kind,
            data=local_address(self.conv.channel.sock) if placement.here else None,
        )

    def _send(self) -> bool:
        """Run the data plane; True when it completed and the client's verdict is due."""
        try:
            self.transport.send()
            return True
        except TensorsChanged as exc:
            log.error("stopped sending to %s: %s", self.conv.peer, exc)
            self.entry.integrity.stop_serving(str(exc))
            # Tell the client why on the control connection too, whichever stream it notices.
            self.conv.channel.send_if_open(Refuse(Code.CHANGED, str(exc)))
        except Withdrawn as exc:
            self.conv.channel.send_if_open(Refuse(Code.UNAVAILABLE, str(exc)))
        except (OSError, NetloaderError) as exc:
            if not self.context.closing.is_set():
                log.warning("transfer to %s failed: %s", self.conv.peer, exc or type(exc).__name__)
                self._hear_why()
        return False

    def _conclude(self) -> Done:
        done = self.conv.channel.recv(Done, deadline=time.monotonic() + self.out.idle)
        if done.ok:
            self.context.transfers.add()
            self.entry.transfers.add()
        else:
            self.entry.integrity.client_failed(self.conv.peer, done)
        return done

    def _emit_done(self, seconds: float, *, ok: bool) -> None:
        """The transfer ended: verified by the client (``ok``), or failed or broken."""
        ident = self.entry.identity
        events.emit(
            events.TransferDone(
                *(ident.model, ident.rank, self.conv.peer, self.out.sent, seconds),
                *(self.engine.name, self.out.streams, ok),
            )
        )

    def _verdict_of_a_relay(self, address: str) -> Done | None:
        """A relay sent to other peers pulls for as long as it takes: its verdict is awaited
        without a time limit, with TCP keepalive to notice a host that vanished. Meanwhile it
        reports its progress, and may be told to take chunks from more peers."""
        sock = self.conv.channel.sock
        keepalive(sock, self.context.timeouts.idle)
        channel = Channel(sock, None)
        sending = threading.Lock()  # moves are told from the threads that read other reports

        def notify(placement: Placement) -> None:
            with sending:
                channel.send_if_open(
                    Moved(placement.here, list(placement.peers), list(placement.drop))
                )

        relays = self.entry.relays
        relays.watch(address, notify=notify)
        try:
            while True:
                msg = channel.recv_any(Done, Progress)
                if isinstance(msg, Done):
                    return msg
                relays.progress(address, msg.held)
        except (OSError, ProtocolError):
            return None
        finally:
            relays.watch(address)

    def _hear_why(self) -> None:
        """After a broken transfer the client may still say why (e.g. a digest mismatch)."""
        try:
            done = self.conv.channel.recv(Done, deadline=time.monotonic() + 2.0)
        except (OSError, ProtocolError):
            return
        self.entry.integrity.client_failed(self.conv.peer, done)


def hold_membership(channel: Channel, idle: float) -> None:
    """Keep a relay's control connection until it closes (its server stopped) or its host
    vanishes (TCP keepalive); the relay sends nothing more on it."""
    keepalive(channel.sock, idle)
    channel.sock.settimeout(None)
    try:
        while channel.sock.recv(4096):
            pass
    except OSError:
        pass


def _closed(sock: socket.socket) -> bool:
    """True once the peer closed ``sock`` (checked without blocking or consuming data)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True

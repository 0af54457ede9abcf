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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netloader.errors import Code, NetloaderError, ProtocolError, TensorsChanged, Withdrawn
from netloader.protocol import SESSION_BYTES, Accept, Channel, Done, Hello, PullRequest, Refuse
from netloader.server.peers import Placement
from netloader.snapshot import Snapshot
from netloader.sockets import keepalive
from netloader.transport import TRANSPORTS, Outgoing

if TYPE_CHECKING:
    from netloader.server import Server
    from netloader.server.catalog import Served

log = logging.getLogger("netloader.server")


@dataclass
class Conversation:
    """One control connection: its channel, the peer, the server's greeting, and the
    handshake's deadline."""

    channel: Channel
    peer: str
    hello: Hello
    deadline: float


class Session:
    """One transfer of ``served``'s ``snapshot`` (one of the ``server``'s models)."""

    def __init__(
        self,
        server: Server,
        conv: Conversation,
        served: Served,
        snapshot: Snapshot,
        transport: str,
    ):
        self.server = server
        self.conv = conv
        self.served = served
        self.snapshot = snapshot
        self.transport = TRANSPORTS[transport]()
        self.id = os.urandom(SESSION_BYTES).hex()
        self.out = Outgoing(
            snapshot=snapshot,
            session=self.id,
            streams=1,
            host=server.options.host,
            idle=server.options.timeouts.idle,
            verify=server.options.verify_before_send,
            client_gone=lambda: _closed(conv.channel.sock),
            pacer=server.pacer,
            on_changed=served.integrity.stop_serving,
        )

    def run(self, request: PullRequest, placement: Placement) -> Done | None:
        """Accept ``request`` and serve it (or, placed elsewhere, only name the peers); the
        client's verdict, or None if the transfer broke."""
        if not placement.stay:
            self.conv.channel.send(self._accept(request, placement), self.conv.deadline)
            return self._verdict_of_a_relay()
        limits = self.server.options.limits
        self.out.streams = min(
            request.streams,
            limits.max_streams,
            self.transport.max_streams,
            max(1, self.snapshot.plan.num_chunks),
        )
        try:
            self.conv.channel.send(self._accept(request, placement), self.conv.deadline)
            start = time.perf_counter()
            if self._send():
                return self._conclude(time.perf_counter() - start)
            return None
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the data plane (from any thread); safe to call more than once."""
        self.out.cancelled.set()
        self.transport.close()

    def _accept(self, request: PullRequest, placement: Placement) -> Accept:
        snapshot = self.snapshot
        offer = self.transport.offer(self.out) if placement.stay else {}
        return Accept(
            session=self.id,
            identity=self.served.identity,
            manifest=snapshot.manifest,
            aliases=snapshot.aliases,
            transport=self.transport.name,
            streams=self.out.streams,
            chunk_size=snapshot.plan.chunk_size,
            digests=snapshot.digests,
            offer=offer,
            mac=self.server.gate.proof("pull", request.nonce, self.conv.hello.nonce, self.id),
            peers=list(placement.peers),
            stay=placement.stay,
            digest=snapshot.digest_kind,
        )

    def _send(self) -> bool:
        """Run the data plane; True when it completed and the client's verdict is due."""
        try:
            self.transport.send(self.out)
            return True
        except TensorsChanged as exc:
            log.error("stopped sending to %s: %s", self.conv.peer, exc)
            self.served.integrity.stop_serving(str(exc))
            # Tell the client why on the control connection too, whichever stream it notices.
            self.conv.channel.send_if_open(Refuse(Code.CHANGED, str(exc)))
        except Withdrawn as exc:
            self.conv.channel.send_if_open(Refuse(Code.UNAVAILABLE, str(exc)))
        except (OSError, NetloaderError) as exc:
            if not self.server.closing.is_set():
                log.warning("transfer to %s failed: %s", self.conv.peer, exc or type(exc).__name__)
                self._hear_why()
        return False

    def _conclude(self, seconds: float) -> Done:
        done = self.conv.channel.recv(Done, deadline=time.monotonic() + self.out.idle)
        if not done.ok:
            self.served.integrity.client_failed(self.conv.peer, done)
            return done
        self.server.served += 1
        self.served.served += 1
        sent = self.out.sent
        log.info(
            "served %s rank %d to %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
            *(self.served.identity.model, self.served.identity.rank, self.conv.peer),
            *(sent / 1e9, seconds, sent / 1e9 / max(seconds, 1e-9)),
            *(self.transport.name, self.out.streams),
        )
        return done

    def _verdict_of_a_relay(self) -> Done | None:
        """A relay sent to other peers pulls for as long as it takes: its verdict is awaited
        without a time limit, with TCP keepalive to notice a host that vanished."""
        sock = self.conv.channel.sock
        keepalive(sock, self.server.options.timeouts.idle)
        try:
            return Channel(sock, None).recv(Done)
        except (OSError, ProtocolError):
            return None

    def _hear_why(self) -> None:
        """After a broken transfer the client may still say why (e.g. a digest mismatch)."""
        try:
            done = self.conv.channel.recv(Done, deadline=time.monotonic() + 2.0)
        except (OSError, ProtocolError):
            return
        self.served.integrity.client_failed(self.conv.peer, done)


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

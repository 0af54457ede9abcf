"""One accepted transfer: the Accept, the data plane, and the client's Done.

A session runs in the thread of the control connection that asked for it; its data streams run
in the transport. However it ends, the transport is closed and the session forgotten.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from typing import TYPE_CHECKING

from netloader.errors import Code, NetloaderError, ProtocolError, TensorsChanged
from netloader.protocol import SESSION_BYTES, Accept, Channel, Done, Hello, PullRequest, Refuse
from netloader.transport import TRANSPORTS, Outgoing

if TYPE_CHECKING:
    from netloader.server import Server

log = logging.getLogger("netloader.server")


class Session:
    def __init__(self, server: Server, channel: Channel, peer: str, transport: str):
        self.server = server
        self.channel = channel
        self.peer = peer
        self.transport = TRANSPORTS[transport]()
        plan = server.snapshot.plan
        self.id = os.urandom(SESSION_BYTES).hex()
        self.out = Outgoing(
            snapshot=server.snapshot,
            session=self.id,
            streams=1,
            host=server.options.host,
            idle=server.options.timeouts.idle,
            verify=server.options.verify_before_send,
            client_gone=lambda: _closed(channel.sock),
            pacer=server.pacer,
        )
        self._num_chunks = plan.num_chunks

    def run(self, hello: Hello, request: PullRequest, deadline: float) -> None:
        """Accept ``request``, move the weights, and log how it ended."""
        limits = self.server.options.limits
        self.out.streams = min(
            request.streams,
            limits.max_streams,
            self.transport.max_streams,
            max(1, self._num_chunks),
        )
        try:
            self.channel.send(self._accept(hello, request), deadline)
            start = time.perf_counter()
            if self._send():
                self._conclude(time.perf_counter() - start)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the data plane (from any thread); safe to call more than once."""
        self.out.cancelled.set()
        self.transport.close()

    def _accept(self, hello: Hello, request: PullRequest) -> Accept:
        snapshot = self.server.snapshot
        return Accept(
            session=self.id,
            identity=self.server.identity,
            manifest=snapshot.manifest,
            aliases=snapshot.aliases,
            transport=self.transport.name,
            streams=self.out.streams,
            chunk_size=snapshot.plan.chunk_size,
            digests=snapshot.digests,
            offer=self.transport.offer(self.out),
            mac=self.server.gate.proof("pull", request.nonce, hello.nonce, self.id),
        )

    def _send(self) -> bool:
        """Run the data plane; True when it completed and the client's verdict is due."""
        try:
            self.transport.send(self.out)
            return True
        except TensorsChanged as exc:
            log.error("stopped sending to %s: %s", self.peer, exc)
            self.server.integrity.stop_serving(str(exc))
            # Tell the client why on the control connection too, whichever stream it notices.
            self.channel.send_if_open(Refuse(Code.CHANGED, str(exc)))
        except (OSError, NetloaderError) as exc:
            if not self.server.closing.is_set():
                log.warning("transfer to %s failed: %s", self.peer, exc or type(exc).__name__)
                self._hear_why()
        return False

    def _conclude(self, seconds: float) -> None:
        done = self.channel.recv(Done, deadline=time.monotonic() + self.out.idle)
        if not done.ok:
            self.server.integrity.client_failed(self.peer, done)
            return
        self.server.served += 1
        total = self.out.sent
        log.info(
            "served %s rank %d to %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
            self.server.identity.model,
            self.server.identity.rank,
            self.peer,
            total / 1e9,
            seconds,
            total / 1e9 / max(seconds, 1e-9),
            self.transport.name,
            self.out.streams,
        )

    def _hear_why(self) -> None:
        """After a broken transfer the client may still say why (e.g. a digest mismatch)."""
        try:
            done = self.channel.recv(Done, deadline=time.monotonic() + 2.0)
        except (OSError, ProtocolError):
            return
        self.server.integrity.client_failed(self.peer, done)


def _closed(sock: socket.socket) -> bool:
    """True once the peer closed ``sock`` (checked without blocking or consuming data)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True

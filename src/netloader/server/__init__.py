"""The server: serves one rank's tensors from background threads of a process that keeps working.

Its parts, along a connection's way:

- ``listener``: one listening socket per rank; every connection gets a short-lived thread;
- ``handshake``: the checks (protocol, token, identity, manifest, transport) before anything
  is served, each a refusal with a reason or nothing;
- ``admission``: transfer slots and the queue of clients waiting for one;
- ``session``: one accepted transfer, run by its transport;
- ``peers``: discovery, the relays pulling or holding this model and where each should pull;
- ``integrity``: whether the server may still serve what it captured.

A connection's first message decides what it is: a ``PullRequest`` (checked, placed, admitted,
then the thread runs the session; a relay's connection then stays open as its membership), a
``StreamAttach`` (a data connection of a session, handed to its transport) or an
``InfoRequest`` (answered at once). Every wait has a bound, every refusal is logged with its
reason and sent to the peer, and ``close()`` stops everything.

A relay's server starts before it holds anything (``tensors=None``): it listens at once, and
serves from ``provide(snapshot)`` on, each chunk as soon as it landed and was verified.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from netloader.errors import Code, ProtocolError
from netloader.identity import Identity
from netloader.options import ServeOptions, with_keywords
from netloader.pacing import Pacer
from netloader.protocol import (
    PROTOCOL_VERSION,
    Channel,
    Done,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    StreamAttach,
)
from netloader.server.admission import Admission
from netloader.server.handshake import Gate, Refusal
from netloader.server.integrity import Integrity
from netloader.server.listener import Connection, Listener
from netloader.server.peers import Peers, Placement
from netloader.server.session import Conversation, Session, hold_membership
from netloader.snapshot import Snapshot
from netloader.sockets import advertised

log = logging.getLogger("netloader.server")

PORT_RANGE = range(1024, 65536)

__all__ = ["PORT_RANGE", "Server", "write_address"]


class Server:
    """Serves ``tensors`` (one rank of ``identity``) to netloader clients.

    ``options`` says where to listen and what to allow (see ``ServeOptions``); keyword
    arguments set single fields of it (``listen_port=7000``, ``max_clients=2``,
    ``idle_timeout=10``). The server listens on ``listen_port + identity.rank``; a port outside
    1024..65535 means no listener (a warning is logged and ``address`` stays None).
    ``tensors=None`` makes a server that waits for ``provide()`` (a relay).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | Snapshot | None,
        identity: Identity,
        options: ServeOptions | None = None,
        **keywords: Any,
    ):
        self.options = with_keywords(options or ServeOptions(), keywords)
        self.identity = identity
        self.snapshot: Snapshot | None = None
        self.gate = Gate(identity, None, self.options.token, self.options.cuda_ipc)
        self.integrity = Integrity(None)
        self.peers = Peers()
        self.closing = threading.Event()
        self.admission = Admission(self.options.limits, self.closing)
        rate = self.options.max_upload_rate
        #: The upload cap, shared by every transfer of this server.
        self.pacer = Pacer(rate) if rate else None
        self.address: str | None = None
        self.served = 0  # completed transfers, for tests and logs
        self._provided = threading.Event()
        self._listener: Listener | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._kept: list[socket.socket] = []
        if tensors is not None:
            snapshot = (
                tensors
                if isinstance(tensors, Snapshot)
                else Snapshot(tensors, chunk_size=self.options.chunk_size)
            )
            self._install(snapshot)

    def provide(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (a relay: as its chunks become ready)."""
        self.integrity.unavailable = None
        self._install(snapshot)
        if self.address:
            self._announce()

    def withdraw(self, reason: str) -> None:
        """Stop serving (a relay whose own pull failed): refuse new pulls with ``reason``; the
        pulls running are refused at their next chunk, with the same reason, whether it had
        arrived or not (and peers waiting for a chunk that will not come are woken)."""
        self.integrity.unavailable = reason
        if self.snapshot is not None and self.snapshot.ready is not None:
            self.snapshot.ready.withdraw(reason)
        log.warning("stopped serving %s: %s", self.identity.model, reason)

    def keep(self, sock: socket.socket) -> None:
        """Hold ``sock`` open until this server closes: a relay's membership at its source,
        which forgets the relay when it closes."""
        with self._lock:
            self._kept.append(sock)

    def _install(self, snapshot: Snapshot) -> None:
        self.snapshot = self.gate.snapshot = self.integrity.snapshot = snapshot
        self._provided.set()

    @property
    def unavailable(self) -> str | None:
        """When set, every pull is refused with this reason (e.g. weights changed)."""
        return self.integrity.unavailable

    @unavailable.setter
    def unavailable(self, reason: str | None) -> None:
        self.integrity.unavailable = reason

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Server:
        if self._listener is not None:
            raise RuntimeError("server already started")
        base, rank = self.options.listen_port, self.identity.rank
        port = 0 if base is None else base + rank
        if base is not None and port not in PORT_RANGE:
            log.warning(
                "not listening: port %d (listen_port %d + rank %d) is outside %d..%d",
                *(port, base, rank, PORT_RANGE.start, PORT_RANGE.stop - 1),
            )
            return self
        self._listener = Listener.bind(self.options.host, port, self._handle, self.closing)
        self.address = f"{advertised(self.options.host)}:{self._listener.port}"
        self._listener.start()
        if self.snapshot is not None:
            self._announce()
        if self.options.output_prefix:
            write_address(self.options.output_prefix, rank, self.address)
        return self

    def close(self) -> None:
        """Stop listening, drop every connection and wait for the server's threads."""
        self.closing.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.abort()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            kept, self._kept = self._kept, []
        for sock in kept:
            sock.close()

    def __enter__(self) -> Server:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _announce(self) -> None:
        assert self.snapshot is not None
        ident = self.identity
        if self.options.token is None:
            log.warning(
                "serving %s rank %d on %s without a token: anyone who can reach this port can "
                "read the weights",
                *(ident.model, ident.rank, self.address),
            )
        log.info(
            "serving %s (%s, rank %d: %d tensors, %.3f GB) on %s",
            *(ident.model, ident.layout, ident.rank, len(self.snapshot.manifest)),
            *(self.snapshot.plan.total_bytes / 1e9, self.address),
        )

    # --- one connection -------------------------------------------------------------------

    def _handle(self, conn: Connection) -> bool:
        """Greet the peer and dispatch on its first message; True when the socket was handed
        to a session's transport."""
        channel = Channel(conn.sock, self.options.timeouts.idle)
        handshake = self.options.timeouts.handshake
        conv = Conversation(channel, conn.peer, self.gate.greeting(), time.monotonic() + handshake)
        try:
            channel.send(conv.hello, conv.deadline)
            request = channel.recv_any(
                PullRequest, InfoRequest, StreamAttach, deadline=conv.deadline
            )
            match request:
                case StreamAttach():
                    return self._attach(conn, request)
                case InfoRequest():
                    self._info(conv, request)
                case PullRequest():
                    conn.handshake_over()
                    self._pull(conv, request)
        except ProtocolError as exc:
            log.warning("dropping %s: %s", conn.peer, exc)
            channel.send_if_open(Refuse(Code.PROTOCOL, str(exc)))
        except TimeoutError:
            log.warning("dropping %s: handshake not finished within %g s", conn.peer, handshake)
        except OSError as exc:
            if not self.closing.is_set():
                log.warning("connection from %s failed: %s", conn.peer, exc)
        except Exception:
            log.exception("unexpected error while serving %s", conn.peer)
        return False

    def _refuse(self, conv: Conversation, refusal: Refusal) -> None:
        log.warning("refused %s: %s", conv.peer, refusal.reason)
        conv.channel.send_if_open(Refuse(refusal.code, refusal.reason))

    def _serving(self, conv: Conversation) -> Snapshot | Refusal:
        """What this server serves, once it has it (a relay's server may still be waiting for
        its own source's answer, a few milliseconds after it started)."""
        if self._provided.wait(max(0.0, conv.deadline - time.monotonic())):
            assert self.snapshot is not None
            return self.snapshot
        return Refusal(
            Code.UNAVAILABLE, "this relay has no weights yet: its own pull has not started"
        )

    def _info(self, conv: Conversation, request: InfoRequest) -> None:
        refusal = self.gate.authenticate(conv.hello, request)
        snapshot = refusal or self._serving(conv)
        if isinstance(snapshot, Refusal):
            self._refuse(conv, snapshot)
            return
        reply = InfoReply(
            PROTOCOL_VERSION,
            self.identity,
            len(snapshot.manifest),
            snapshot.plan.total_bytes,
            self.gate.proof("info", request.nonce, conv.hello.nonce),
        )
        conv.channel.send(reply, conv.deadline)

    def _attach(self, conn: Connection, request: StreamAttach) -> bool:
        with self._lock:
            session = self._sessions.get(request.session)
        if session is None or not session.transport.attach(conn.sock, request.index):
            log.warning("dropping %s: data connection for no open stream of a session", conn.peer)
            return False
        return True

    def _pull(self, conv: Conversation, request: PullRequest) -> None:
        """Check, place and serve one pull; a relay's connection then stays as its membership."""
        snapshot = self._serving(conv)
        if isinstance(snapshot, Refusal):
            self._refuse(conv, snapshot)
            return
        refusal = self.gate.check_pull(conv.hello, request)
        if refusal is None and self.unavailable:
            refusal = Refusal(Code.UNAVAILABLE, self.unavailable)
        peer_host = conv.peer.rpartition(":")[0].strip("[]")
        transport = self.gate.transport_for(request, peer_host) if refusal is None else refusal
        if isinstance(transport, Refusal):
            self._refuse(conv, transport)
            return
        relay = request.advertise if request.discover else None
        placement = self.peers.join(relay, request.avoid) if relay else Placement(stay=True)
        try:
            done = self._place(conv, request, Session(self, conv, snapshot, transport), placement)
            if relay and done is not None and done.ok:
                self.peers.holds(relay)
                hold_membership(conv.channel, self.options.timeouts.idle)
        finally:
            if relay:
                self.peers.leave(relay)

    def _place(
        self, conv: Conversation, request: PullRequest, session: Session, placement: Placement
    ) -> Done | None:
        """Serve ``request`` here (a transfer slot first) or send it to its peers."""
        if placement.peers:
            log.info("sending %s to pull from %s", conv.peer, ", ".join(placement.peers))
        if not placement.stay:
            return session.run(request, placement)
        busy = self.admission.admit(conv.deadline, self.options.timeouts.handshake)
        if busy:
            self._refuse(conv, Refusal(Code.BUSY, f"server is busy: {busy}; retry later"))
            return None
        with self._lock:
            self._sessions[session.id] = session
        try:
            return session.run(request, placement)
        finally:
            with self._lock:
                self._sessions.pop(session.id, None)
            self.admission.release()


def write_address(prefix: str, rank: int, address: str) -> Path:
    """Atomically write ``address`` to ``{prefix}{rank}.txt`` (temp file, then rename)."""
    path = Path(f"{prefix}{rank}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

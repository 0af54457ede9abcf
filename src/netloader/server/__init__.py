"""The server: serves one rank's tensors from background threads of a process that keeps working.

One server (one listener) serves every model its process holds for that rank, e.g. a
speculative-decoding target and its draft: each under its own name, picked by the identity a
client asks for.

Its parts, along a connection's way:

- ``listener``: one listening socket per rank; every connection gets a short-lived thread;
- ``handshake``: the checks every model shares (protocol, token, transport), each a refusal
  with a reason or nothing;
- ``catalog``: the models served, by name; the identity, manifest and availability checks of
  each (``Served``);
- ``admission``: transfer slots and the queue of clients waiting for one (shared by all models);
- ``session``: one accepted transfer, run by its transport;
- ``peers``: discovery, the relays pulling or holding a model and where each should pull;
- ``integrity``: whether the server may still serve what it captured of a model.

A connection's first message decides what it is: a ``PullRequest`` (checked, placed, admitted,
then the thread runs the session; a relay's connection then stays open as its membership), a
``StreamAttach`` (a data connection of a session, handed to its transport) or an
``InfoRequest`` (answered at once). Every wait has a bound, every refusal is logged with its
reason and sent to the peer, and ``close()`` stops everything.

A relay's server starts before it holds anything (``tensors=None``): it listens at once, and
serves from ``provide(snapshot)`` on, each chunk as soon as it landed and was verified. Every
model is such an entry (``Served``): ``add(None, identity)`` makes another one wait for its
``provide``, and ``withdraw`` stops one model without touching the others.
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
from netloader.server.catalog import Catalog, Served
from netloader.server.handshake import Gate, Refusal
from netloader.server.integrity import Integrity
from netloader.server.listener import Connection, Listener
from netloader.server.peers import Peers, Placement
from netloader.server.session import Conversation, Session, hold_membership
from netloader.snapshot import Snapshot
from netloader.sockets import advertised

log = logging.getLogger("netloader.server")

PORT_RANGE = range(1024, 65536)

__all__ = ["PORT_RANGE", "Served", "Server", "write_address"]


class Server:
    """Serves ``tensors`` (one rank of ``identity``) to netloader clients, and any further
    models given to ``add()`` on the same port.

    ``options`` says where to listen and what to allow (see ``ServeOptions``); keyword
    arguments set single fields of it (``listen_port=7000``, ``max_clients=2``,
    ``idle_timeout=10``). The server listens on ``listen_port + identity.rank``; a port outside
    1024..65535 means no listener (a warning is logged and ``address`` stays None).
    ``tensors=None`` makes a server that waits for ``provide()`` (a relay).

    ``identity``, ``snapshot``, ``peers``, ``unavailable``, ``provide()`` and ``withdraw()``
    speak of the first model; ``model(name)`` gives any model's own ``Served``.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | Snapshot | None,
        identity: Identity,
        options: ServeOptions | None = None,
        **keywords: Any,
    ):
        self.options = with_keywords(options or ServeOptions(), keywords)
        self.catalog = Catalog()
        self.gate = Gate(self.options.token, self.options.cuda_ipc)
        self.closing = threading.Event()
        self.admission = Admission(self.options.limits, self.closing)
        rate = self.options.max_upload_rate
        #: The upload cap, shared by every transfer of this server.
        self.pacer = Pacer(rate) if rate else None
        self.address: str | None = None
        self.served = 0  # completed transfers of every model, for tests and logs
        self._listener: Listener | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._kept: list[socket.socket] = []
        self._first = self.add(tensors, identity)

    def add(
        self, tensors: Mapping[str, torch.Tensor] | Snapshot | None, identity: Identity
    ) -> Served:
        """Serve ``tensors`` as ``identity`` too, on the same port (``None``: wait for the
        entry's ``provide()``, a relay). ValueError if a model of that name is served already."""
        snapshot = (
            tensors
            if tensors is None or isinstance(tensors, Snapshot)
            else Snapshot(tensors, chunk_size=self.options.chunk_size)
        )
        served = self.catalog.add(Served(identity, snapshot, self._on_provide))
        if snapshot is not None and self.address:
            self._announce(served)
        return served

    def model(self, name: str | None = None) -> Served:
        """The entry of the model called ``name`` (KeyError if none); None: the first model."""
        return self._first if name is None else self.catalog.get(name)

    # --- the first model (what a one-model server serves) --------------------------------

    @property
    def identity(self) -> Identity:
        return self._first.identity

    @property
    def snapshot(self) -> Snapshot | None:
        return self._first.snapshot

    @property
    def peers(self) -> Peers:
        return self._first.peers

    @property
    def integrity(self) -> Integrity:
        return self._first.integrity

    def provide(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` as the first model from now on (see ``Served.provide``)."""
        self._first.provide(snapshot)

    def withdraw(self, reason: str) -> None:
        """Stop serving the first model (see ``Served.withdraw``)."""
        self._first.withdraw(reason)

    @property
    def unavailable(self) -> str | None:
        """When set, every pull of the first model is refused with this reason."""
        return self._first.unavailable

    @unavailable.setter
    def unavailable(self, reason: str | None) -> None:
        self._first.unavailable = reason

    def keep(self, sock: socket.socket) -> None:
        """Hold ``sock`` open until this server closes: a relay's membership at its source,
        which forgets the relay when it closes."""
        with self._lock:
            self._kept.append(sock)

    def _on_provide(self, served: Served) -> None:
        if self.address:
            self._announce(served)

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
        for served in self.catalog:
            if served.snapshot is not None:
                self._announce(served)
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

    def _announce(self, served: Served) -> None:
        assert served.snapshot is not None
        ident = served.identity
        if self.options.token is None:
            log.warning(
                "serving %s rank %d on %s without a token: anyone who can reach this port can "
                "read the weights",
                *(ident.model, ident.rank, self.address),
            )
        log.info(
            "serving %s (%s, rank %d: %d tensors, %.3f GB) on %s",
            *(ident.model, ident.layout, ident.rank, len(served.snapshot.manifest)),
            *(served.snapshot.plan.total_bytes / 1e9, self.address),
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

    def _info(self, conv: Conversation, request: InfoRequest) -> None:
        """What the first model is (the protocol's info request names no model)."""
        refusal = self.gate.authenticate(conv.hello, request)
        snapshot = refusal or self._first.wait(conv.deadline)
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
        accepted = self._check_pull(conv, request)
        if isinstance(accepted, Refusal):
            self._refuse(conv, accepted)
            return
        served, snapshot, transport = accepted
        relay = request.advertise if request.discover else None
        placement = served.peers.join(relay, request.avoid) if relay else Placement(stay=True)
        session = Session(self, conv, served, snapshot, transport)
        try:
            done = self._place(conv, request, session, placement)
            if relay and done is not None and done.ok:
                served.peers.holds(relay)
                hold_membership(conv.channel, self.options.timeouts.idle)
        finally:
            if relay:
                served.peers.leave(relay)

    def _check_pull(
        self, conv: Conversation, request: PullRequest
    ) -> tuple[Served, Snapshot, str] | Refusal:
        """The checks, in the order a client can act on: protocol and token, the model asked
        for (by identity), its snapshot, manifest and availability, then a transport."""
        refusal = self.gate.check_pull(conv.hello, request)
        served = refusal or self.catalog.pick(request.identity)
        if isinstance(served, Refusal):
            return served
        snapshot = served.wait(conv.deadline)
        if isinstance(snapshot, Refusal):
            return snapshot
        refusal = served.check(request, snapshot)
        peer_host = conv.peer.rpartition(":")[0].strip("[]")
        transport = refusal or self.gate.transport_for(request, snapshot, peer_host)
        if isinstance(transport, Refusal):
            return transport
        return served, snapshot, transport

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

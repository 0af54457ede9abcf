"""The server: serves one rank's tensors from background threads of a process that keeps working.

Its parts, along a connection's way:

- ``listener``: one listening socket per rank; every connection gets a short-lived thread;
- ``handshake``: the checks (protocol, token, identity, manifest, transport) before anything
  is served, each a refusal with a reason or nothing;
- ``admission``: transfer slots and the queue of clients waiting for one;
- ``session``: one accepted transfer, run by its transport;
- ``integrity``: whether the server may still serve what it captured.

A connection's first message decides what it is: a ``PullRequest`` (checked, admitted, then the
thread runs the session), a ``StreamAttach`` (a data connection of a session, handed to its
transport) or an ``InfoRequest`` (answered at once). Every wait has a bound, every refusal is
logged with its reason and sent to the peer, and ``close()`` stops everything.
"""

from __future__ import annotations

import logging
import os
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
    Hello,
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
from netloader.server.session import Session
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
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | Snapshot,
        identity: Identity,
        options: ServeOptions | None = None,
        **keywords: Any,
    ):
        self.options = with_keywords(options or ServeOptions(), keywords)
        self.snapshot = (
            tensors
            if isinstance(tensors, Snapshot)
            else Snapshot(tensors, chunk_size=self.options.chunk_size)
        )
        self.identity = identity
        self.gate = Gate(identity, self.snapshot, self.options.token)
        self.integrity = Integrity(self.snapshot)
        self.closing = threading.Event()
        self.admission = Admission(self.options.limits, self.closing)
        rate = self.options.max_upload_rate
        #: The upload cap, shared by every transfer of this server.
        self.pacer = Pacer(rate) if rate else None
        self.address: str | None = None
        self.served = 0  # completed transfers, for tests and logs
        self._listener: Listener | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

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

    def __enter__(self) -> Server:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _announce(self) -> None:
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
        deadline = time.monotonic() + handshake
        try:
            hello = self.gate.greeting()
            channel.send(hello, deadline)
            request = channel.recv_any(PullRequest, InfoRequest, StreamAttach, deadline=deadline)
            match request:
                case StreamAttach():
                    return self._attach(conn, request)
                case InfoRequest():
                    self._info(channel, conn.peer, hello, request, deadline)
                case PullRequest():
                    conn.handshake_over()
                    self._pull(channel, conn.peer, hello, request, deadline)
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

    def _refuse(self, channel: Channel, peer: str, refusal: Refusal) -> None:
        log.warning("refused %s: %s", peer, refusal.reason)
        channel.send_if_open(Refuse(refusal.code, refusal.reason))

    def _info(
        self, channel: Channel, peer: str, hello: Hello, request: InfoRequest, deadline: float
    ) -> None:
        refusal = self.gate.authenticate(hello, request)
        if refusal is not None:
            self._refuse(channel, peer, refusal)
            return
        reply = InfoReply(
            PROTOCOL_VERSION,
            self.identity,
            len(self.snapshot.manifest),
            self.snapshot.plan.total_bytes,
            self.gate.proof("info", request.nonce, hello.nonce),
        )
        channel.send(reply, deadline)

    def _attach(self, conn: Connection, request: StreamAttach) -> bool:
        with self._lock:
            session = self._sessions.get(request.session)
        if session is None or not session.transport.attach(conn.sock, request.index):
            log.warning("dropping %s: data connection for no open stream of a session", conn.peer)
            return False
        return True

    def _pull(
        self, channel: Channel, peer: str, hello: Hello, request: PullRequest, deadline: float
    ) -> None:
        refusal = self.gate.check_pull(hello, request)
        if refusal is None and self.unavailable:
            refusal = Refusal(Code.UNAVAILABLE, self.unavailable)
        transport = self.gate.transport_for(request) if refusal is None else refusal
        if isinstance(transport, Refusal):
            self._refuse(channel, peer, transport)
            return
        busy = self.admission.admit(deadline, self.options.timeouts.handshake)
        if busy:
            self._refuse(channel, peer, Refusal(Code.BUSY, f"server is busy: {busy}; retry later"))
            return
        session = Session(self, channel, peer, transport)
        with self._lock:
            self._sessions[session.id] = session
        try:
            session.run(hello, request, deadline)
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

"""The server: serves one rank's tensors from background threads of a process that keeps working.

One listening socket per rank. Every accepted connection gets a short-lived thread that greets
the peer and reads its first message within the handshake deadline:

- ``PullRequest``: checked (protocol, token, identity, manifest, capacity); on acceptance the
  thread becomes the session's control thread and runs the transport;
- ``StreamAttach``: a data connection of an accepted session, handed to that session;
- ``InfoRequest``: answered at once.

Every wait has a bound, every refusal is logged with its reason and sent to the peer, and
``close()`` stops the listener and every connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from netloader import auth
from netloader.errors import ConfigError, NetloaderError, ProtocolError, check_seconds
from netloader.identity import Identity
from netloader.protocol import (
    PROTOCOL_VERSION,
    SESSION_BYTES,
    Accept,
    Channel,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    StreamAttach,
)
from netloader.tensors import DEFAULT_CHUNK, Snapshot, describe_changed
from netloader.transport import TRANSPORTS, Outgoing, TensorsChanged
from netloader.transport.tcp import shutdown, tune

log = logging.getLogger("netloader.server")

PORT_RANGE = range(1024, 65536)
DEFAULT_MAX_CLIENTS = 4
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_STREAMS = 8
DEFAULT_MAX_WAITING = 32  # clients queued for a transfer slot; more are refused as busy
MAX_PENDING = 64  # connections still in their handshake; more are turned away at once


class Server:
    """Serves ``tensors`` (one rank of ``identity``) to netloader clients.

    ``listen_port`` is a base port: the server listens on ``listen_port + identity.rank``; None
    lets the OS choose a free port at bind time. A port outside 1024..65535 means no listener
    (a warning is logged and ``address`` stays None). After ``start()`` the address is written
    to ``{output_prefix}{rank}.txt`` when ``output_prefix`` is set.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | Snapshot,
        identity: Identity,
        *,
        host: str = "127.0.0.1",
        listen_port: int | None = None,
        output_prefix: str | None = None,
        token: bytes | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_waiting: int = DEFAULT_MAX_WAITING,
        max_streams: int = DEFAULT_MAX_STREAMS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK,
        verify_before_send: bool = False,
    ):
        for name, value, low in (
            ("max_clients", max_clients, 1),
            ("max_streams", max_streams, 1),
            ("max_waiting", max_waiting, 0),
        ):
            if type(value) is not int or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        check_seconds(handshake_timeout=handshake_timeout, idle_timeout=idle_timeout)
        self.snapshot = (
            tensors if isinstance(tensors, Snapshot) else Snapshot(tensors, chunk_size=chunk_size)
        )
        self.identity = identity
        self.host = host
        self.listen_port = listen_port
        self.output_prefix = output_prefix
        self.token = token
        self.max_streams = max_streams
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.verify_before_send = verify_before_send
        #: When set, every pull is refused with this reason (e.g. weights changed after capture).
        self.unavailable: str | None = None
        self.address: str | None = None
        self.served = 0  # completed transfers, for tests and logs

        self.max_clients = max_clients
        self._slots = threading.BoundedSemaphore(max_clients)
        self._waiting = threading.BoundedSemaphore(max_waiting) if max_waiting else None
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Outgoing] = {}
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Server:
        if self._listener is not None:
            raise RuntimeError("server already started")
        port = 0 if self.listen_port is None else self.listen_port + self.identity.rank
        if self.listen_port is not None and port not in PORT_RANGE:
            log.warning(
                "not listening: port %d (listen_port %d + rank %d) is outside %d..%d",
                port,
                self.listen_port,
                self.identity.rank,
                PORT_RANGE.start,
                PORT_RANGE.stop - 1,
            )
            return self
        try:
            self._listener = socket.create_server((self.host, port), backlog=128)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {self.host}:{port}: {exc.strerror}"
            ) from None
        bound_port = self._listener.getsockname()[1]
        self.address = f"{_advertised(self.host)}:{bound_port}"
        self._spawn(self._accept_loop, "netloader-accept")
        if self.token is None:
            log.warning(
                "serving %s rank %d on %s without a token: anyone who can reach this port can read "
                "the weights",
                self.identity.model,
                self.identity.rank,
                self.address,
            )
        log.info(
            "serving %s (%s, rank %d: %d tensors, %.3f GB) on %s",
            self.identity.model,
            self.identity.layout,
            self.identity.rank,
            len(self.snapshot.manifest),
            self.snapshot.plan.total_bytes / 1e9,
            self.address,
        )
        if self.output_prefix:
            write_address(self.output_prefix, self.identity.rank, self.address)
        return self

    def close(self) -> None:
        """Stop listening, drop every connection and wait for the server's threads."""
        self._closing.set()
        if self._listener is not None:
            shutdown(self._listener)
            self._listener.close()
        with self._lock:
            for out in self._sessions.values():
                out.cancelled.set()
            conns = list(self._conns)
        for conn in conns:
            shutdown(conn)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=5)

    def __enter__(self) -> Server:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connections ----------------------------------------------------------------------

    def _spawn(self, target, name: str, *args) -> None:  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, args=(), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            if not self._pending.acquire(blocking=False):
                log.warning(
                    "turning away %s: %d handshakes already in progress", _fmt(peer), MAX_PENDING
                )
                conn.close()
                continue
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._handle, "netloader-conn", conn, _fmt(peer))

    def _handle(self, conn: socket.socket, peer: str) -> None:
        keep_open = False
        pending = True
        try:
            tune(conn)
            channel = Channel(conn, self.idle_timeout)
            deadline = time.monotonic() + self.handshake_timeout
            hello = Hello(PROTOCOL_VERSION, auth.new_nonce(), self.token is not None)
            channel.send(hello, deadline)
            request = channel.recv(PullRequest, InfoRequest, StreamAttach, deadline=deadline)
            if isinstance(request, StreamAttach):
                keep_open = self._attach(conn, peer, request)
            elif isinstance(request, InfoRequest):
                self._info(channel, peer, hello, request, deadline)
            else:
                assert isinstance(request, PullRequest)
                self._pending.release()
                pending = False
                self._pull(channel, peer, hello, request, deadline)
        except ProtocolError as exc:
            log.warning("dropping %s: %s", peer, exc)
            _try_send(conn, Refuse("protocol", str(exc)))
        except TimeoutError:
            log.warning(
                "dropping %s: handshake not finished within %g s", peer, self.handshake_timeout
            )
        except OSError as exc:
            if not self._closing.is_set():
                log.warning("connection from %s failed: %s", peer, exc)
        except Exception:
            log.exception("unexpected error while serving %s", peer)
        finally:
            if pending:
                self._pending.release()
            if not keep_open:
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    def _refuse(self, channel: Channel, peer: str, code: str, reason: str) -> None:
        log.warning("refused %s: %s", peer, reason)
        _try_send(channel.sock, Refuse(code, reason))

    def _authenticated(
        self, channel: Channel, peer: str, hello: Hello, request: PullRequest | InfoRequest
    ) -> bool:
        if self.token is None:
            return True
        if auth.check(self.token, request.mac, "client", request.kind, hello.nonce, request.nonce):
            return True
        self._refuse(
            channel,
            peer,
            "auth",
            "authentication failed: this server requires the shared token "
            "(--token-file, NETLOADER_TOKEN or TOKEN_FILE)"
            if request.mac is None
            else "authentication failed: wrong token",
        )
        return False

    def _info(
        self, channel: Channel, peer: str, hello: Hello, request: InfoRequest, deadline: float
    ) -> None:
        if not self._authenticated(channel, peer, hello, request):
            return
        proof = (
            None
            if self.token is None
            else auth.mac(self.token, "server", "info", request.nonce, hello.nonce)
        )
        reply = InfoReply(
            PROTOCOL_VERSION,
            self.identity,
            len(self.snapshot.manifest),
            self.snapshot.plan.total_bytes,
            proof,
        )
        channel.send(reply, deadline)

    def _attach(self, conn: socket.socket, peer: str, request: StreamAttach) -> bool:
        with self._lock:
            out = self._sessions.get(request.session)
            if out is None or request.index >= out.streams or len(out.attached) >= out.streams:
                log.warning("dropping %s: data connection for no open stream of a session", peer)
                return False
            out.attached.append(conn)
        out.sockets.put(conn)
        return True

    def _pull(
        self, channel: Channel, peer: str, hello: Hello, request: PullRequest, deadline: float
    ) -> None:
        if request.protocol != PROTOCOL_VERSION:
            self._refuse(
                channel,
                peer,
                "protocol",
                f"protocol version {request.protocol} is not supported; this server speaks {PROTOCOL_VERSION}",
            )
            return
        if not self._authenticated(channel, peer, hello, request):
            return
        mismatch = self.identity.mismatch(request.identity, "server", "client")
        if mismatch:
            code, reason = mismatch
            self._refuse(channel, peer, code, reason)
            return
        if request.manifest is not None:
            reason = self.snapshot.manifest.mismatch(request.manifest, "server", "client")
            if reason:
                self._refuse(channel, peer, "manifest", f"tensor manifest differs: {reason}")
                return
        if self.unavailable:
            self._refuse(channel, peer, "unavailable", self.unavailable)
            return
        name = next(
            (
                t
                for t in request.transports
                if t in TRANSPORTS and TRANSPORTS[t].supports(self.snapshot.device)
            ),
            None,
        )
        if name is None:
            self._refuse(
                channel,
                peer,
                "transport",
                f"none of the transports {request.transports} can serve {self.snapshot.device} tensors here",
            )
            return
        if not self._slots.acquire(blocking=False):
            busy = self._wait_for_slot(deadline)
            if busy:
                self._refuse(channel, peer, "busy", f"server is busy: {busy}; retry later")
                return
        try:
            self._transfer(channel, peer, hello, request, name, deadline)
        finally:
            self._slots.release()

    def _hear_why(self, channel: Channel, peer: str) -> None:
        """After a broken transfer the client may still say why (e.g. a digest mismatch)."""
        try:
            done = channel.recv(Done, deadline=time.monotonic() + 2.0)
        except (OSError, ProtocolError):
            return
        assert isinstance(done, Done)
        self._failed(peer, done)

    def _failed(self, peer: str, done: Done) -> None:
        log.warning("client %s reported a failed transfer: %s", peer, done.reason)
        if done.code == "integrity":
            self._recheck()

    def _recheck(self) -> None:
        """A client received bytes that do not match the digests: hash every served tensor
        again; if any changed since capture, refuse every later pull."""
        changed = self.snapshot.changed()
        if changed:
            self.unavailable = describe_changed(changed)
            log.error("refusing all further pulls: %s", self.unavailable)
        else:
            log.warning("served tensors still match their digests: the corruption was in transit")

    def _wait_for_slot(self, deadline: float) -> str | None:
        """Queue for a transfer slot until the handshake deadline; None once one is held,
        otherwise why not."""
        if self._waiting is None or not self._waiting.acquire(blocking=False):
            return f"all {self.max_clients} transfer slots and the waiting queue are full"
        log.info("a client waits for a transfer slot: all %d in use", self.max_clients)
        try:
            while not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._slots.acquire(timeout=min(left, 0.5)):
                    return None
            return f"all {self.max_clients} transfer slots stayed in use for {self.handshake_timeout:g} s"
        finally:
            self._waiting.release()

    def _transfer(
        self,
        channel: Channel,
        peer: str,
        hello: Hello,
        request: PullRequest,
        name: str,
        deadline: float,
    ) -> None:
        transport = TRANSPORTS[name]()
        plan = self.snapshot.plan
        streams = (
            min(request.streams, self.max_streams, max(1, plan.num_chunks)) if name == "tcp" else 1
        )
        session = os.urandom(SESSION_BYTES).hex()
        out = Outgoing(
            self.snapshot,
            session,
            streams,
            self.host,
            self.idle_timeout,
            verify=self.verify_before_send,
            control=channel.sock,
        )
        with self._lock:
            self._sessions[session] = out
        try:
            proof = (
                None
                if self.token is None
                else auth.mac(self.token, "server", "pull", request.nonce, hello.nonce, session)
            )
            accept = Accept(
                session=session,
                identity=self.identity,
                manifest=self.snapshot.manifest,
                aliases=self.snapshot.aliases,
                transport=name,
                streams=streams,
                chunk_size=plan.chunk_size,
                digests=self.snapshot.digests,
                offer=transport.offer(out),
                mac=proof,
            )
            channel.send(accept, deadline)
            start = time.perf_counter()
            try:
                transport.send(out)
            except TensorsChanged as exc:
                self.unavailable = str(exc)
                log.error("stopped sending to %s and refusing further pulls: %s", peer, exc)
                _try_send(channel.sock, Refuse("changed", str(exc)))  # the why, whichever
                return  # stream the client notices first
            except (OSError, RuntimeError, NetloaderError) as exc:
                if not self._closing.is_set():
                    log.warning("transfer to %s failed: %s", peer, exc or type(exc).__name__)
                    self._hear_why(channel, peer)
                return
            done = channel.recv(Done, deadline=time.monotonic() + self.idle_timeout)
            assert isinstance(done, Done)
            seconds = time.perf_counter() - start
            if done.ok:
                self.served += 1
                log.info(
                    "served %s rank %d to %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
                    self.identity.model,
                    self.identity.rank,
                    peer,
                    plan.total_bytes / 1e9,
                    seconds,
                    plan.total_bytes / 1e9 / max(seconds, 1e-9),
                    name,
                    streams,
                )
            else:
                self._failed(peer, done)
        finally:
            out.cancelled.set()
            with self._lock:
                self._sessions.pop(session, None)
                for conn in out.attached:
                    self._conns.discard(conn)
                    conn.close()


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


def _advertised(host: str) -> str:
    """The address peers should dial: the bound one, or this host's name for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _fmt(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _try_send(sock: socket.socket, msg: Refuse) -> None:
    with contextlib.suppress(OSError):
        Channel(sock, 1.0).send(msg)

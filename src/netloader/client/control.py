"""The client's control connection to one source: connect, greet, ask, check the answer, and
say how it ended. Every answer is checked here again, never trusting the server's own check."""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass

from netloader import auth
from netloader.artifacts.wire import ArtifactsOffer, ArtifactsRequest
from netloader.errors import (
    Code,
    ConfigError,
    IntegrityError,
    ProtocolError,
    PullError,
    Refused,
    SourceUnreachable,
    TransferTimeout,
    as_pull_error,
)
from netloader.manifest import Manifest
from netloader.options import Timeouts
from netloader.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Channel,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    M,
    Message,
    PullRequest,
    Refuse,
    StatusReply,
    StatusRequest,
)
from netloader.sockets import connect, split_address


@dataclass(frozen=True)
class Endpoint:
    """A source as given (``text``) and as dialled."""

    text: str
    host: str
    port: int

    @classmethod
    def parse(cls, source: str) -> Endpoint:
        """``"host:port"`` or ``"[v6]:port"``; ConfigError names the bad value."""
        if not isinstance(source, str):
            raise ConfigError(f"a source must be a 'host:port' string, got {source!r}")
        try:
            host, port = split_address(source)
        except ValueError:
            raise ConfigError(
                f"source {source!r} is not 'host:port' with a port in 1..65535"
            ) from None
        return cls(source, host, port)


class Control:
    """An open, greeted control connection (``open()``), with the handshake deadline running."""

    def __init__(
        self, endpoint: Endpoint, channel: Channel, timeouts: Timeouts, token: bytes | None
    ):
        self.endpoint = endpoint
        self.channel = channel
        self.token = token
        self.limit = timeouts.handshake
        self.deadline = time.monotonic() + timeouts.handshake
        self.hello = Hello(PROTOCOL_VERSION, "", False)  # until the server's arrives
        self._detached = False

    @classmethod
    def open(cls, endpoint: Endpoint, timeouts: Timeouts, token: bytes | None) -> Control:
        try:
            sock = connect(endpoint.host, endpoint.port, timeouts.connect)
        except OSError as exc:
            raise SourceUnreachable(f"cannot connect: {exc.strerror or exc}") from None
        control = cls(endpoint, Channel(sock, timeouts.idle), timeouts, token)
        try:
            control.hello = control.answer(Hello)
            control._check_hello()
        except BaseException:
            sock.close()
            raise
        return control

    def close(self) -> None:
        if not self._detached:
            self.channel.sock.close()

    def detach(self) -> socket.socket:
        """The connection's socket, to keep open beyond this object (a relay's membership)."""
        self._detached = True
        return self.channel.sock

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, kind: type[M]) -> M:
        """The server's next message, a ``kind`` or a refusal (raised as Refused)."""
        try:
            return self.channel.recv(kind, deadline=self.deadline, refusal=True)
        except TimeoutError:
            raise TransferTimeout(
                f"no answer within the handshake limit ({self.limit:g} s)"
            ) from None
        except Refused:
            raise
        except Exception as exc:
            raise as_pull_error(exc, "handshake") from None

    def _check_hello(self) -> None:
        hello = self.hello
        if hello.protocol != PROTOCOL_VERSION:
            raise Refused(
                f"server speaks protocol {hello.protocol}, this client {PROTOCOL_VERSION}",
                code=Code.PROTOCOL,
            )
        if hello.auth and self.token is None:
            raise Refused(
                "server requires a shared token; give one with --token-file, NETLOADER_TOKEN or TOKEN_FILE",
                code=Code.AUTH,
            )
        if self.token is not None and not hello.auth:
            raise Refused(
                "a token was given but the server does not authenticate; refusing to trust it",
                code=Code.AUTH,
            )

    def _proof(self, *parts: str) -> str | None:
        return None if self.token is None else auth.mac(self.token, "client", *parts)

    def _check_proof(self, proof: str | None, *parts: str) -> None:
        if self.token is not None and not auth.check(self.token, proof, "server", *parts):
            raise Refused(
                "server failed to prove it knows the token; not trusting it", code=Code.AUTH
            )

    # --- questions ------------------------------------------------------------------------

    def ask_info(self) -> InfoReply:
        nonce = auth.new_nonce()
        proof = self._proof("info", self.hello.nonce, nonce)
        self._send(InfoRequest(PROTOCOL_VERSION, nonce, proof))
        reply = self.answer(InfoReply)
        self._check_proof(reply.mac, "info", nonce, self.hello.nonce)
        return reply

    def ask_status(self) -> StatusReply:
        nonce = auth.new_nonce()
        self._send(
            StatusRequest(PROTOCOL_VERSION, nonce, self._proof("status", self.hello.nonce, nonce))
        )
        reply = self.answer(StatusReply)
        self._check_proof(reply.mac, "status", nonce, self.hello.nonce)
        return reply

    def ask_pull(self, request: PullRequest) -> Accept:
        """Send ``request`` (its nonce and proof filled in here) and check the Accept."""
        request.nonce = auth.new_nonce()
        request.mac = self._proof("pull", self.hello.nonce, request.nonce)
        self._send(request)
        accept = self.answer(Accept)
        self._check_proof(accept.mac, "pull", request.nonce, self.hello.nonce, accept.session)
        _check_accept(accept, request)
        return accept

    def ask_artifacts(self, request: ArtifactsRequest) -> ArtifactsOffer:
        """Ask for a cache entry; the offer's files are checked against the server's proof."""
        request.nonce = auth.new_nonce()
        request.mac = self._proof("artifacts", self.hello.nonce, request.nonce)
        self._send(request)
        offer = self.answer(ArtifactsOffer)
        self._check_proof(offer.mac, "artifacts", request.nonce, self.hello.nonce, offer.digest())
        return offer

    def _send(self, msg: Message) -> None:
        try:
            self.channel.send(msg, self.deadline)
        except Exception as exc:
            raise as_pull_error(exc, "handshake") from None

    # --- after the data plane -------------------------------------------------------------

    def done(self, error: PullError | None = None) -> None:
        """Tell the server how the transfer ended. After an integrity failure, wait (briefly)
        until it closed the connection: it re-checks itself before anyone pulls again."""
        if error is None:
            self.channel.send_if_open(Done(True))
            return
        code = Code.INTEGRITY if isinstance(error, IntegrityError) else ""
        self.channel.send_if_open(Done(False, str(error)[:1000], code))
        if code:
            self._wait_closed(10.0)

    def explain(self, exc: PullError) -> PullError:
        """When the data plane broke, the server may have said why on this connection."""
        try:
            msg = self.channel.recv(Refuse, deadline=time.monotonic() + 1.0)
        except (OSError, ProtocolError):
            return exc
        return Refused(f"refused: {msg.reason}", code=msg.code, partial=exc.partial)

    def _wait_closed(self, limit: float) -> None:
        sock = self.channel.sock
        sock.settimeout(limit)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass


def _check_accept(accept: Accept, request: PullRequest) -> None:
    problem = request.identity.mismatch(accept.identity, "client", "server")
    want: Manifest | None = request.manifest
    if problem is None and want is not None:
        reason = want.mismatch(accept.manifest, "client", "server")
        problem = (Code.MANIFEST, f"tensor manifest differs: {reason}") if reason else None
    if problem is None and accept.transport not in request.transports:
        problem = (
            Code.TRANSPORT,
            f"server chose transport {accept.transport!r}, not one offered",
        )
    if problem is not None:
        raise Refused(f"server accepted a request it does not match: {problem[1]}", code=problem[0])

"""What a server checks before it serves: protocol version, the shared token and a common
transport (the model asked for, its manifest and availability are checked by the server's
``Catalog`` and ``ServedModel``). A failed check raises ``errors.Refusal`` (a code and a reason
for people); nothing here touches a socket."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from netloader import auth
from netloader.errors import Code, Refusal
from netloader.protocol import PROTOCOL_VERSION, Hello, InfoRequest, PullRequest
from netloader.snapshot import Snapshot
from netloader.transport import ENGINES, Engine

if TYPE_CHECKING:
    from netloader.artifacts.wire import ArtifactsRequest


class Gate:
    """The checks of one server that every model it serves shares. ``engines``: the
    transports this server offers (default: every registered one)."""

    def __init__(self, token: bytes | None, engines: Iterable[Engine] | None = None):
        self.token = token
        self.engines = {e.name: e for e in (ENGINES.values() if engines is None else engines)}

    def greeting(self) -> Hello:
        return Hello(PROTOCOL_VERSION, auth.new_nonce(), self.token is not None)

    def authenticate(
        self, hello: Hello, request: PullRequest | InfoRequest | ArtifactsRequest
    ) -> None:
        if self.token is None:
            return
        if auth.check(self.token, request.mac, "client", request.kind, hello.nonce, request.nonce):
            return
        if request.mac is None:
            reason = (
                "authentication failed: this server requires the shared token "
                "(--token-file, NETLOADER_TOKEN or TOKEN_FILE)"
            )
        else:
            reason = "authentication failed: wrong token"
        raise Refusal(Code.AUTH, reason)

    def proof(self, *parts: str) -> str | None:
        """This server's proof that it knows the token, over the conversation's ``parts``."""
        return None if self.token is None else auth.mac(self.token, "server", *parts)

    def check_pull(self, hello: Hello, request: PullRequest) -> None:
        """Whether ``request`` may be heard at all: protocol version, then the token."""
        if request.protocol != PROTOCOL_VERSION:
            raise Refusal(
                Code.PROTOCOL,
                f"protocol version {request.protocol} is not supported; "
                f"this server speaks {PROTOCOL_VERSION}",
            )
        self.authenticate(hello, request)

    def transport_for(self, request: PullRequest, snapshot: Snapshot, peer_host: str) -> Engine:
        """The first transport the client (at ``peer_host``) offers that this server offers and
        that can carry ``snapshot``'s tensors to it."""
        device = snapshot.device
        for name in request.transports:
            engine = self.engines.get(name)
            if engine is not None and engine.supports(device) and engine.reaches(peer_host):
                return engine
        raise Refusal(
            Code.TRANSPORT,
            f"none of the transports {request.transports} can serve {device} tensors here",
        )

"""What a server checks before it serves: protocol version, the shared token and a common
transport (the model asked for, its manifest and availability are checked by the server's
``Catalog`` and ``Served``). Each check answers with a refusal (a code and a reason for people)
or None; nothing here touches a socket."""

from __future__ import annotations

from dataclasses import dataclass

from netloader import auth
from netloader.errors import Code
from netloader.protocol import PROTOCOL_VERSION, Hello, InfoRequest, PullRequest
from netloader.snapshot import Snapshot
from netloader.transport import TRANSPORTS
from netloader.transport.cuda_ipc import CudaIpcTransport


@dataclass(frozen=True)
class Refusal:
    code: Code | str
    reason: str


class Gate:
    """The checks of one server that every model it serves shares."""

    def __init__(self, token: bytes | None, cuda_ipc: bool = True):
        self.token = token
        #: Whether clients on this host may map the served tensors (the ``cuda_ipc`` transport).
        self.cuda_ipc = cuda_ipc

    def greeting(self) -> Hello:
        return Hello(PROTOCOL_VERSION, auth.new_nonce(), self.token is not None)

    def authenticate(self, hello: Hello, request: PullRequest | InfoRequest) -> Refusal | None:
        if self.token is None:
            return None
        if auth.check(self.token, request.mac, "client", request.kind, hello.nonce, request.nonce):
            return None
        if request.mac is None:
            reason = (
                "authentication failed: this server requires the shared token "
                "(--token-file, NETLOADER_TOKEN or TOKEN_FILE)"
            )
        else:
            reason = "authentication failed: wrong token"
        return Refusal(Code.AUTH, reason)

    def proof(self, *parts: str) -> str | None:
        """This server's proof that it knows the token, over the conversation's ``parts``."""
        return None if self.token is None else auth.mac(self.token, "server", *parts)

    def check_pull(self, hello: Hello, request: PullRequest) -> Refusal | None:
        """Whether ``request`` may be heard at all: protocol version, then the token."""
        if request.protocol != PROTOCOL_VERSION:
            return Refusal(
                Code.PROTOCOL,
                f"protocol version {request.protocol} is not supported; "
                f"this server speaks {PROTOCOL_VERSION}",
            )
        return self.authenticate(hello, request)

    def transport_for(
        self, request: PullRequest, snapshot: Snapshot, peer_host: str
    ) -> str | Refusal:
        """The first transport the client (at ``peer_host``) offers that can carry
        ``snapshot``'s tensors to it."""
        device = snapshot.device
        for name in request.transports:
            if name == CudaIpcTransport.name and not self.cuda_ipc:
                continue
            kind = TRANSPORTS.get(name)
            if kind is not None and kind.supports(device) and kind.reaches(peer_host):
                return name
        return Refusal(
            Code.TRANSPORT,
            f"none of the transports {request.transports} can serve {device} tensors here",
        )

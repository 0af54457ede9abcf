"""The control protocol's messages: each kind a dataclass whose ``from_json`` checks every field.

A conversation (the server speaks first):

    server: Hello(protocol, nonce, auth)
    client: PullRequest | InfoRequest            on a control connection, or
            StreamAttach                         as the first frame of a data connection
    server: Accept | Refuse | InfoReply          (Attached | Refuse, if the attach asks to confirm)
    ... weights move on the data plane ...
    client: Done

``MESSAGES`` knows every kind by name. A transport may bring kinds of its own for its data
connections (``register``) and a bound of its own for the facts it puts in an Accept's
``offer`` (``allow_offer``); the transport registry does both when it registers an engine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from netloader.digest import DIGEST_KINDS, XXH3
from netloader.errors import ProtocolError
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.plan import MAX_CHUNK, MIN_CHUNK
from netloader.protocol.fields import (
    MAX_STREAMS,
    MAX_TEXT,
    address,
    addresses,
    bounded,
    hex_field,
    optional_hex,
    text,
    typed,
)

PROTOCOL_VERSION = 2  # 2: the client asks for each chunk (several sources at once)
MAX_FRAME = 64 << 20  # a manifest of ~400k tensors fits
SMALL_FRAME = 64 << 10  # anything but a manifest-bearing message

NONCE_BYTES = 16
MAC_BYTES = 32
SESSION_BYTES = 16


class Message:
    kind: ClassVar[str]
    limit: ClassVar[int] = SMALL_FRAME

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class Hello(Message):
    """Server -> client on every new connection."""

    kind: ClassVar[str] = "hello"
    protocol: int
    nonce: str
    auth: bool

    @classmethod
    def from_json(cls, o: dict) -> Hello:
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            hex_field(o, "nonce", NONCE_BYTES),
            typed(o, "auth", bool),
        )


@dataclass
class PullRequest(Message):
    """Client -> server: what the client wants, and (optionally) the manifest it must match."""

    kind: ClassVar[str] = "pull"
    limit: ClassVar[int] = MAX_FRAME
    protocol: int
    identity: Identity
    manifest: Manifest | None
    transports: list[str]
    streams: int
    nonce: str
    mac: str | None = None
    #: Where the client's own server listens (it relays what it receives), if it has one.
    advertise: str | None = None
    #: Whether the client wants to be told which peers to pull from (relay placement); on the
    #: wire its key is still ``discover``, as in every protocol-2 peer.
    placement: bool = False
    #: Peers that failed this client: not to be suggested again.
    avoid: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "protocol": self.protocol,
            "identity": self.identity.to_json(),
            "manifest": None if self.manifest is None else self.manifest.to_json(),
            "transports": self.transports,
            "streams": self.streams,
            "nonce": self.nonce,
            "mac": self.mac,
            "advertise": self.advertise,
            "discover": self.placement,
            "avoid": self.avoid,
        }

    @classmethod
    def from_json(cls, o: dict) -> PullRequest:
        transports = typed(o, "transports", list)
        if not 0 < len(transports) <= 8 or not all(
            isinstance(t, str) and 0 < len(t) <= 32 for t in transports
        ):
            raise ProtocolError("field 'transports' must list 1..8 transport names")
        return cls(
            protocol=bounded(o, "protocol", 0, 1 << 31),
            identity=Identity.from_json(o.get("identity")),
            manifest=None if o.get("manifest") is None else Manifest.from_json(o["manifest"]),
            transports=transports,
            streams=bounded(o, "streams", 1, MAX_STREAMS),
            nonce=hex_field(o, "nonce", NONCE_BYTES),
            mac=optional_hex(o, "mac", MAC_BYTES),
            advertise=None if o.get("advertise") is None else address(o["advertise"]),
            placement=typed(o, "discover", bool),
            avoid=addresses(o, "avoid"),
        )


@dataclass
class InfoRequest(Message):
    kind: ClassVar[str] = "info"
    protocol: int
    nonce: str
    mac: str | None = None

    @classmethod
    def from_json(cls, o: dict) -> InfoRequest:
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            hex_field(o, "nonce", NONCE_BYTES),
            optional_hex(o, "mac", MAC_BYTES),
        )


@dataclass
class StreamAttach(Message):
    """First frame of a data connection: which accepted session it carries, and its index."""

    kind: ClassVar[str] = "stream"
    session: str
    index: int
    #: Ask the server to answer ``Attached`` (or ``Refuse``: no such session here) before the
    #: stream starts: the client reached it by a name or a balancing address, which may have
    #: picked another server than the one that accepted. Absent: false.
    confirm: bool = False

    @classmethod
    def from_json(cls, o: dict) -> StreamAttach:
        return cls(
            hex_field(o, "session", SESSION_BYTES),
            bounded(o, "index", 0, MAX_STREAMS - 1),
            o.get("confirm") is not None and typed(o, "confirm", bool),
        )


@dataclass
class Attached(Message):
    """Server -> client on a data connection that asked to ``confirm``: the session is here."""

    kind: ClassVar[str] = "attached"

    @classmethod
    def from_json(cls, o: dict) -> Attached:
        return cls()


@dataclass
class Accept(Message):
    """Server -> client: the request matches; here is the manifest and how the bytes will move."""

    kind: ClassVar[str] = "accept"
    limit: ClassVar[int] = MAX_FRAME
    session: str
    identity: Identity
    manifest: Manifest
    aliases: dict[int, int]
    transport: str
    streams: int
    chunk_size: int
    digests: list[int] | None
    offer: dict[str, Any] = field(default_factory=dict)
    mac: str | None = None
    #: Peers the client should pull from (relay placement): relays ahead of it that hold the
    #: model or are receiving it.
    peers: list[str] = field(default_factory=list)
    #: Whether this server itself delivers chunks; False: take them from ``peers``, and keep
    #: this connection open until done (this server then counts the client as a relay). On the
    #: wire its key is still ``stay``, as in every protocol-2 peer.
    delivers: bool = True
    #: Which function made ``digests`` (``digest.DIGEST_KINDS``); absent means XXH3.
    digest: str = XXH3
    #: The server's own address (the one this connection reached): where the client takes
    #: data connections that the address it dialled sent to another server (a balancing
    #: address, as a Kubernetes Service's). Absent: the address dialled is the only one.
    data: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "session": self.session,
            "identity": self.identity.to_json(),
            "manifest": self.manifest.to_json(),
            "aliases": [[k, v] for k, v in self.aliases.items()],
            "transport": self.transport,
            "streams": self.streams,
            "chunk_size": self.chunk_size,
            "digests": self.digests,
            "offer": self.offer,
            "mac": self.mac,
            "peers": self.peers,
            "stay": self.delivers,
            "digest": self.digest,
            "data": self.data,
        }

    @classmethod
    def from_json(cls, o: dict) -> Accept:
        manifest = Manifest.from_json(o.get("manifest"))
        n = len(manifest)
        aliases = {}
        for pair in typed(o, "aliases", list):
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(type(x) is int for x in pair)
                and 0 <= pair[1] < pair[0] < n
            ):
                raise ProtocolError("each alias must be [index, earlier index] within the manifest")
            spec, target = manifest.specs[pair[0]], manifest.specs[pair[1]]
            if (spec.dtype, spec.shape) != (target.dtype, target.shape):
                raise ProtocolError(
                    f"alias {spec.name!r} -> {target.name!r} joins tensors of different dtype or shape"
                )
            aliases[pair[0]] = pair[1]
        if any(target in aliases for target in aliases.values()):
            raise ProtocolError("an alias must point at a tensor that is not itself an alias")
        digests = o.get("digests")
        if digests is not None and not (
            isinstance(digests, list) and all(type(d) is int and 0 <= d < 1 << 64 for d in digests)
        ):
            raise ProtocolError("field 'digests' must be a list of 64-bit unsigned ints")
        transport = text(o, "transport", 32)
        offer = typed(o, "offer", dict)
        if len(json.dumps(offer)) > OFFER_LIMITS.get(transport, MAX_TEXT):
            raise ProtocolError(f"field 'offer' is too large for transport {transport!r}")
        kind = XXH3 if o.get("digest") is None else text(o, "digest", 32)
        if kind not in DIGEST_KINDS:
            raise ProtocolError(f"unknown digest kind {kind!r}; known: {', '.join(DIGEST_KINDS)}")
        return cls(
            session=hex_field(o, "session", SESSION_BYTES),
            identity=Identity.from_json(o.get("identity")),
            manifest=manifest,
            aliases=aliases,
            transport=transport,
            streams=bounded(o, "streams", 1, MAX_STREAMS),
            chunk_size=bounded(o, "chunk_size", MIN_CHUNK, MAX_CHUNK),
            digests=digests,
            offer=offer,
            mac=optional_hex(o, "mac", MAC_BYTES),
            peers=addresses(o, "peers"),
            delivers=typed(o, "stay", bool),
            digest=kind,
            data=None if o.get("data") is None else address(o["data"]),
        )


@dataclass
class Refuse(Message):
    """Server -> client: no, and why. ``code`` is an ``errors.Code``."""

    kind: ClassVar[str] = "refuse"
    code: str
    reason: str

    @classmethod
    def from_json(cls, o: dict) -> Refuse:
        return cls(text(o, "code", 64), text(o, "reason"))


@dataclass
class InfoReply(Message):
    kind: ClassVar[str] = "info_reply"
    protocol: int
    identity: Identity
    tensors: int
    total_bytes: int
    mac: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "identity": self.identity.to_json()}

    @classmethod
    def from_json(cls, o: dict) -> InfoReply:
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            Identity.from_json(o.get("identity")),
            bounded(o, "tensors", 0, 1 << 40),
            bounded(o, "total_bytes", 0, 1 << 62),
            optional_hex(o, "mac", MAC_BYTES),
        )


@dataclass
class Done(Message):
    """Client -> server after the data plane finished, successfully or not."""

    kind: ClassVar[str] = "done"
    ok: bool
    reason: str = ""
    #: Code.INTEGRITY when received bytes did not match the digests: the server re-checks itself.
    code: str = ""

    @classmethod
    def from_json(cls, o: dict) -> Done:
        return cls(typed(o, "ok", bool), text(o, "reason"), text(o, "code", 64))


MESSAGES: dict[str, type[Message]] = {}
#: The most characters of JSON an Accept's ``offer`` may hold, by transport (else MAX_TEXT).
OFFER_LIMITS: dict[str, int] = {}


def register(*kinds: type[Message]) -> None:
    """Let ``kinds`` be decoded (a transport's own messages); a name taken by another kind is
    a programming error."""
    for kind in kinds:
        known = MESSAGES.setdefault(kind.kind, kind)
        if known is not kind:
            raise ValueError(f"message kind {kind.kind!r} is taken by {known.__name__}")


def allow_offer(transport: str, limit: int) -> None:
    """Let an Accept for ``transport`` carry an offer of up to ``limit`` characters of JSON."""
    OFFER_LIMITS[transport] = min(limit, MAX_FRAME)


register(Hello, PullRequest, InfoRequest, StreamAttach, Attached, Accept, Refuse, InfoReply, Done)

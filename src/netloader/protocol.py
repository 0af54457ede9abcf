"""The control protocol: versioned, length-prefixed, size-bounded JSON messages.

A frame is ``b"NLDR"`` + a 4-byte big-endian body length + a UTF-8 JSON object with a ``kind``.
The body is read only as fast as it arrives and never beyond ``max_bytes``, so a hostile length
prefix costs nothing. Each message kind is a dataclass whose ``from_json`` checks every field.

A conversation (the server speaks first):

    server: Hello(protocol, nonce, auth)
    client: PullRequest | InfoRequest            on a control connection, or
            StreamAttach                         as the first frame of a data connection
    server: Accept | Refuse | InfoReply
    ... weights move on the data plane ...
    client: Done

On a ``cuda_ipc`` data connection the server first sends an IpcOffer (CUDA IPC handles, plain
JSON) and the client answers IpcReply before any chunk is asked for.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar, cast

from netloader.digest import DIGEST_KINDS, XXH3
from netloader.errors import ProtocolError, Refused
from netloader.identity import Identity
from netloader.manifest import MAX_TENSORS, Manifest
from netloader.plan import MAX_CHUNK, MIN_CHUNK

PROTOCOL_VERSION = 2  # 2: the client asks for each chunk (several sources at once)
MAGIC = b"NLDR"
HEADER = struct.Struct("!4sI")
MAX_FRAME = 64 << 20  # a manifest of ~400k tensors fits
SMALL_FRAME = 64 << 10  # anything but a manifest-bearing message
MAX_STREAMS = 64
MAX_TEXT = 4096


# --- field checks -------------------------------------------------------------------------


def _field(obj: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    # bool is an int subclass in Python; JSON true must not pass for a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(f"field {key!r} must be {_names(kind)}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _text(obj: dict, key: str, limit: int = MAX_TEXT) -> str:
    value = _field(obj, key, str)
    if len(value) > limit:
        raise ProtocolError(f"field {key!r} is longer than {limit} characters")
    return value


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    value = _field(obj, key, int)
    if not lo <= value <= hi:
        raise ProtocolError(f"field {key!r} = {value} is outside {lo}..{hi}")
    return value


def _hex(obj: dict, key: str, nbytes: int) -> str:
    value = _text(obj, key, 2 * nbytes)
    try:
        if len(bytes.fromhex(value)) != nbytes:
            raise ValueError
    except ValueError:
        raise ProtocolError(f"field {key!r} must be {nbytes} bytes of hex") from None
    return value


def _optional_hex(obj: dict, key: str, nbytes: int) -> str | None:
    return None if obj.get(key) is None else _hex(obj, key, nbytes)


MAX_PEERS = 64
MAX_ADDRESS = 300


def _address(value: Any) -> str:
    """A peer address ``host:port`` (host non-empty, port 1..65535)."""
    if isinstance(value, str) and len(value) <= MAX_ADDRESS:
        host, sep, port = value.rpartition(":")
        if sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return value
    raise ProtocolError(f"{str(value)[:60]!r} is not a host:port address")


def _addresses(obj: dict, key: str) -> list[str]:
    value = _field(obj, key, list)
    if len(value) > MAX_PEERS:
        raise ProtocolError(f"field {key!r} lists more than {MAX_PEERS} addresses")
    return [_address(v) for v in value]


# --- messages -----------------------------------------------------------------------------

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
            _int(o, "protocol", 0, 1 << 31), _hex(o, "nonce", NONCE_BYTES), _field(o, "auth", bool)
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
    #: Whether the client wants to be told which peers to pull from (discovery).
    discover: bool = False
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
            "discover": self.discover,
            "avoid": self.avoid,
        }

    @classmethod
    def from_json(cls, o: dict) -> PullRequest:
        transports = _field(o, "transports", list)
        if not 0 < len(transports) <= 8 or not all(
            isinstance(t, str) and 0 < len(t) <= 32 for t in transports
        ):
            raise ProtocolError("field 'transports' must list 1..8 transport names")
        return cls(
            protocol=_int(o, "protocol", 0, 1 << 31),
            identity=Identity.from_json(o.get("identity")),
            manifest=None if o.get("manifest") is None else Manifest.from_json(o["manifest"]),
            transports=transports,
            streams=_int(o, "streams", 1, MAX_STREAMS),
            nonce=_hex(o, "nonce", NONCE_BYTES),
            mac=_optional_hex(o, "mac", MAC_BYTES),
            advertise=None if o.get("advertise") is None else _address(o["advertise"]),
            discover=_field(o, "discover", bool),
            avoid=_addresses(o, "avoid"),
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
            _int(o, "protocol", 0, 1 << 31),
            _hex(o, "nonce", NONCE_BYTES),
            _optional_hex(o, "mac", MAC_BYTES),
        )


@dataclass
class StreamAttach(Message):
    """First frame of a data connection: which accepted session it carries, and its index."""

    kind: ClassVar[str] = "stream"
    session: str
    index: int

    @classmethod
    def from_json(cls, o: dict) -> StreamAttach:
        return cls(_hex(o, "session", SESSION_BYTES), _int(o, "index", 0, MAX_STREAMS - 1))


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
    #: Peers the client should pull from (discovery): relays ahead of it that hold the model or
    #: are receiving it.
    peers: list[str] = field(default_factory=list)
    #: Whether this server itself delivers chunks; False: take them from ``peers``, and keep
    #: this connection open until done (this server then counts the client as a relay).
    stay: bool = True
    #: Which function made ``digests`` (``digest.DIGEST_KINDS``); absent means XXH3.
    digest: str = XXH3

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
            "stay": self.stay,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, o: dict) -> Accept:
        manifest = Manifest.from_json(o.get("manifest"))
        n = len(manifest)
        aliases = {}
        for pair in _field(o, "aliases", list):
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
        offer = _field(o, "offer", dict)
        if len(json.dumps(offer)) > MAX_TEXT:
            raise ProtocolError("field 'offer' is too large")
        kind = XXH3 if o.get("digest") is None else _text(o, "digest", 32)
        if kind not in DIGEST_KINDS:
            raise ProtocolError(f"unknown digest kind {kind!r}; known: {', '.join(DIGEST_KINDS)}")
        return cls(
            session=_hex(o, "session", SESSION_BYTES),
            identity=Identity.from_json(o.get("identity")),
            manifest=manifest,
            aliases=aliases,
            transport=_text(o, "transport", 32),
            streams=_int(o, "streams", 1, MAX_STREAMS),
            chunk_size=_int(o, "chunk_size", MIN_CHUNK, MAX_CHUNK),
            digests=digests,
            offer=offer,
            mac=_optional_hex(o, "mac", MAC_BYTES),
            peers=_addresses(o, "peers"),
            stay=_field(o, "stay", bool),
            digest=kind,
        )


@dataclass
class Refuse(Message):
    """Server -> client: no, and why. ``code`` is an ``errors.Code``."""

    kind: ClassVar[str] = "refuse"
    code: str
    reason: str

    @classmethod
    def from_json(cls, o: dict) -> Refuse:
        return cls(_text(o, "code", 64), _text(o, "reason"))


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
            _int(o, "protocol", 0, 1 << 31),
            Identity.from_json(o.get("identity")),
            _int(o, "tensors", 0, 1 << 40),
            _int(o, "total_bytes", 0, 1 << 62),
            _optional_hex(o, "mac", MAC_BYTES),
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
        return cls(_field(o, "ok", bool), _text(o, "reason"), _text(o, "code", 64))


# --- CUDA IPC: on the cuda_ipc transport's data connection, once its session attached -------

IPC_HANDLE_BYTES = 64  # a cudaIpcMemHandle_t or cudaIpcEventHandle_t
#: torch's shareable-handle prefix: format version 2, memory from cudaMalloc (torch before 2.3
#: sent the bare 64-byte handle). Expandable segments ('e') are not accepted.
IPC_HANDLE_PREFIX = b"\x02c"
IPC_REF_SLOTS = 10_000  # counters in one of torch's IPC reference-counter files
MAX_STORAGE_BYTES = 1 << 48
_SHM_NAME = re.compile(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_GPU_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def ipc_handle_ok(raw: bytes) -> bool:
    """Whether ``raw`` is a CUDA IPC memory handle in a format the client opens."""
    return len(raw) == IPC_HANDLE_BYTES or (
        len(raw) == IPC_HANDLE_BYTES + len(IPC_HANDLE_PREFIX) and raw.startswith(IPC_HANDLE_PREFIX)
    )


@dataclass
class IpcStorage:
    """One CUDA storage a server shares, as torch's ``_share_cuda_`` describes it: the IPC
    handle of the allocation that holds it (hex), the storage's size and offset in that
    allocation, torch's reference counter for it (a shared-memory name and a slot) and the
    event (hex) to wait on before reading."""

    handle: str
    size: int
    offset: int
    ref: str
    ref_offset: int
    event: str
    sync: bool

    @classmethod
    def from_json(cls, o: Any) -> IpcStorage:
        if not isinstance(o, dict) or set(o) != _STORAGE_FIELDS:
            raise ProtocolError(
                f"each IPC storage must be an object with {sorted(_STORAGE_FIELDS)}"
            )
        handle = _hex_text(o, "handle")
        if not ipc_handle_ok(bytes.fromhex(handle)):
            raise ProtocolError("field 'handle' is not a CUDA IPC memory handle this client opens")
        ref = _text(o, "ref", 200)
        if not _SHM_NAME.fullmatch(ref):
            raise ProtocolError("field 'ref' is not a shared-memory name")
        return cls(
            handle=handle,
            size=_int(o, "size", 1, MAX_STORAGE_BYTES),
            offset=_int(o, "offset", 0, MAX_STORAGE_BYTES),
            ref=ref,
            ref_offset=_int(o, "ref_offset", 0, IPC_REF_SLOTS - 1),
            event=_hex(o, "event", IPC_HANDLE_BYTES),
            sync=_field(o, "sync", bool),
        )


_STORAGE_FIELDS = {"handle", "size", "offset", "ref", "ref_offset", "event", "sync"}


def _hex_text(o: dict, key: str) -> str:
    """Field ``key``: an even-length hex string of at most an IPC handle's size."""
    value = _text(o, key, 2 * (IPC_HANDLE_BYTES + len(IPC_HANDLE_PREFIX)))
    if len(value) % 2 or not all(c in "0123456789abcdefABCDEF" for c in value):
        raise ProtocolError(f"field {key!r} must be hex")
    return value


@dataclass
class IpcOffer(Message):
    """Server -> client: the storages holding the served tensors and, per slot of the plan,
    ``[storage, byte offset]`` where its bytes start (None: a slot without bytes); or, with a
    ``reason``, why the server cannot share them (the connection then carries the chunks over
    TCP). ``gpu`` is the UUID of the server's GPU."""

    kind: ClassVar[str] = "ipc_offer"
    limit: ClassVar[int] = MAX_FRAME
    gpu: str
    storages: list[IpcStorage]
    slots: list[list[int] | None]
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "gpu": self.gpu,
            "storages": [asdict(s) for s in self.storages],
            "slots": self.slots,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, o: dict) -> IpcOffer:
        reason = _text(o, "reason")
        gpu = _text(o, "gpu", 64)
        if not reason and not _GPU_ID.fullmatch(gpu):
            raise ProtocolError("field 'gpu' must be a GPU UUID")
        storages = _field(o, "storages", list)
        slots = _field(o, "slots", list)
        if max(len(storages), len(slots)) > MAX_TENSORS:
            raise ProtocolError(f"an IPC offer lists more than {MAX_TENSORS} storages or slots")
        return cls(
            gpu, [IpcStorage.from_json(s) for s in storages], _slots(slots, storages), reason
        )


def _slots(slots: list, storages: list) -> list[list[int] | None]:
    for slot in slots:
        if slot is not None and not (
            isinstance(slot, list)
            and len(slot) == 2
            and all(type(x) is int for x in slot)
            and 0 <= slot[0] < len(storages)
            and 0 <= slot[1] < MAX_STORAGE_BYTES
        ):
            raise ProtocolError("each IPC slot must be null or [storage index, byte offset]")
    return slots


@dataclass
class IpcReply(Message):
    """Client -> server: whether it mapped the offered storages; if not (``reason``), the
    chunks travel over this connection as on the TCP transport."""

    kind: ClassVar[str] = "ipc_reply"
    ok: bool
    reason: str = ""

    @classmethod
    def from_json(cls, o: dict) -> IpcReply:
        return cls(_field(o, "ok", bool), _text(o, "reason"))


MESSAGES: dict[str, type[Message]] = {
    m.kind: m
    for m in (
        Hello,
        PullRequest,
        InfoRequest,
        StreamAttach,
        Accept,
        Refuse,
        InfoReply,
        Done,
        IpcOffer,
        IpcReply,
    )
}


M = TypeVar("M", bound=Message)


def encode(msg: Message) -> bytes:
    body = json.dumps(msg.to_json(), separators=(",", ":")).encode()
    if len(body) > msg.limit:
        raise ProtocolError(f"{msg.kind} message of {len(body)} bytes exceeds {msg.limit}")
    return HEADER.pack(MAGIC, len(body)) + body


def decode(body: bytes | bytearray, expected: tuple[type[Message], ...]) -> Message:
    """Decode one frame body that must be one of the ``expected`` message kinds."""
    with gc_paused():
        return _decode(body, expected)


def _decode(body: bytes | bytearray, expected: tuple[type[Message], ...]) -> Message:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("frame body is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame body must be a JSON object")
    kind = obj.get("kind")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {str(kind)[:40]!r}")
    if cls not in expected:
        wanted = " or ".join(e.kind for e in expected)
        raise ProtocolError(f"unexpected {kind!r} message (expected {wanted})")
    if len(body) > cls.limit:
        raise ProtocolError(f"{kind} message of {len(body)} bytes exceeds {cls.limit}")
    return cls.from_json(obj)  # type: ignore[attr-defined]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a short, allocation-heavy stretch.

    A manifest decodes into thousands of small lists; in a process holding a large heap (torch,
    vLLM) that can trigger a full collection costing ~55 ms (measured on the development
    machine) in the middle of a handshake. Nothing allocated there forms cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- framing over a socket ----------------------------------------------------------------


class Channel:
    """Sends and receives frames on a blocking socket, with an idle bound and a deadline.

    ``idle`` bounds each wait for the peer; ``deadline`` (a ``time.monotonic()`` value) bounds a
    whole exchange, so a peer that trickles one byte at a time cannot hold a slot forever.
    ``idle=None`` waits without a bound (for a relay's verdict: see ``server.session``).
    """

    def __init__(self, sock: socket.socket, idle: float | None):
        self.sock = sock
        self.idle = idle

    def send(self, msg: Message, deadline: float | None = None) -> None:
        self.sock.settimeout(self._wait(deadline))
        self.sock.sendall(encode(msg))

    def send_if_open(self, msg: Message, within: float = 1.0) -> None:
        """Send ``msg`` if the connection still takes it within ``within`` seconds; a last word
        (a refusal, a verdict) that the peer may no longer be there to read."""
        with contextlib.suppress(OSError):
            self.send(msg, time.monotonic() + within)

    def recv(self, kind: type[M], *, deadline: float | None = None, refusal: bool = False) -> M:
        """The next message, which must be a ``kind``; anything else is a ProtocolError.

        With ``refusal=True`` the peer may answer with a ``Refuse`` instead, raised here as
        :class:`Refused` (for a client, whose every question may be refused).
        """
        kinds = (kind, Refuse) if refusal else (kind,)
        msg = self.recv_any(*kinds, deadline=deadline)
        if isinstance(msg, Refuse) and kind is not Refuse:
            raise Refused(f"refused: {msg.reason}", code=msg.code)
        return cast(M, msg)

    def recv_any(self, *kinds: type[Message], deadline: float | None = None) -> Message:
        """The next message, which must be one of ``kinds``; the caller dispatches on its type."""
        limit = max(m.limit for m in kinds)
        header = self.recv_exact(HEADER.size, deadline)
        magic, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError("not a netloader peer (bad frame magic)")
        if length > limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
        return decode(self.recv_exact(length, deadline), kinds)

    def recv_exact(self, n: int, deadline: float | None = None) -> bytearray:
        """Read exactly ``n`` bytes, growing the buffer only as bytes arrive."""
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(self._wait(deadline))
            piece = self.sock.recv(min(n - len(buf), 1 << 20))
            if not piece:
                raise ConnectionResetError("peer closed the connection")
            buf += piece
        return buf

    def _wait(self, deadline: float | None) -> float | None:
        if deadline is None:
            return self.idle
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left if self.idle is None else min(self.idle, left)

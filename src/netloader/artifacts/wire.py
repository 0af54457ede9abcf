"""The artifact messages of a control connection (plain JSON, every field bounded).

Client -> server ``ArtifactsRequest``: the kind, the key the client will use itself and the
factors it was computed from, with the client's proof of the token. Server -> client
``ArtifactsOffer``: the entry's files (path, size, SHA-256) or, if none, the reason, with the
server's proof over the offer itself, so that the digests a client checks the files against
come from a peer that knows the token. The files' bytes follow the offer, in its order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from netloader.artifacts.entry import FileDigest
from netloader.artifacts.kinds import KEY
from netloader.errors import ProtocolError
from netloader.protocol import Message, register
from netloader.protocol.fields import bounded, hex_field, optional_hex, text, typed
from netloader.protocol.messages import MAC_BYTES, NONCE_BYTES

MAX_FACTORS = 32
MAX_PATH = 1024
#: An offer of 100,000 files fits.
OFFER_FRAME = 24 << 20
MAX_FILE_BYTES = 1 << 44


@dataclass
class ArtifactsRequest(Message):
    kind: ClassVar[str] = "artifacts"
    protocol: int
    artifact: str
    key: str
    factors: dict[str, str]
    nonce: str
    mac: str | None = None

    @classmethod
    def from_json(cls, o: dict) -> ArtifactsRequest:
        key = text(o, "key", 128)
        if not KEY.fullmatch(key):
            raise ProtocolError("field 'key' is not a plain name")
        factors = typed(o, "factors", dict)
        if len(factors) > MAX_FACTORS or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 4096
            for k, v in factors.items()
        ):
            raise ProtocolError(f"field 'factors' must map at most {MAX_FACTORS} names to text")
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            text(o, "artifact", 64),
            key,
            factors,
            hex_field(o, "nonce", NONCE_BYTES),
            optional_hex(o, "mac", MAC_BYTES),
        )


@dataclass
class ArtifactsOffer(Message):
    kind: ClassVar[str] = "artifacts_offer"
    limit: ClassVar[int] = OFFER_FRAME
    files: list[FileDigest] = field(default_factory=list)
    #: Why nothing is offered (empty when files are).
    reason: str = ""
    #: The name the entry is installed under (vLLM's key for it), when files are offered.
    key: str = ""
    mac: str | None = None

    def digest(self) -> str:
        """SHA-256 over what the offer says: the server's proof covers it."""
        body = json.dumps(
            [[f.path, f.size, f.sha256] for f in self.files] + [self.reason, self.key]
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        files = [[f.path, f.size, f.sha256] for f in self.files]
        body = {"kind": self.kind, "files": files, "reason": self.reason, "key": self.key}
        return {**body, "mac": self.mac}

    @classmethod
    def from_json(cls, o: dict) -> ArtifactsOffer:
        files = typed(o, "files", list)
        key = text(o, "key", 128)
        if key and not KEY.fullmatch(key):
            raise ProtocolError("field 'key' is not a plain name")
        return cls(
            [_file(item) for item in files],
            text(o, "reason"),
            key,
            optional_hex(o, "mac", MAC_BYTES),
        )


def _file(item: Any) -> FileDigest:
    if not (isinstance(item, list) and len(item) == 3):
        raise ProtocolError("each offered file must be [path, size, sha256]")
    path, size, sha256 = item
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise ProtocolError(f"an offered path must be text of 1..{MAX_PATH} characters")
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
        raise ProtocolError(f"offered file {path[:80]!r} has an impossible size")
    return FileDigest(path, size, hex_field({"sha256": sha256}, "sha256", 32))


register(ArtifactsRequest, ArtifactsOffer)

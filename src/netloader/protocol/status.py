"""The status request and its reply (``netloader status``): what a live server is doing.

The reply's ``status`` is one JSON object (``server.status.report`` makes it), bounded by the
reply's frame limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from netloader.protocol.fields import bounded, hex_field, optional_hex, typed
from netloader.protocol.messages import MAC_BYTES, NONCE_BYTES, Message, register


@dataclass
class StatusRequest(Message):
    """Client -> server: what are you doing?"""

    kind: ClassVar[str] = "status"
    protocol: int
    nonce: str
    mac: str | None = None

    @classmethod
    def from_json(cls, o: dict) -> StatusRequest:
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            hex_field(o, "nonce", NONCE_BYTES),
            optional_hex(o, "mac", MAC_BYTES),
        )


@dataclass
class StatusReply(Message):
    """Server -> client: the status object (its own JSON; see ``report``)."""

    kind: ClassVar[str] = "status_reply"
    limit: ClassVar[int] = 1 << 20  # relay addresses of several models
    protocol: int
    status: dict[str, Any]
    mac: str | None = None

    @classmethod
    def from_json(cls, o: dict) -> StatusReply:
        return cls(
            bounded(o, "protocol", 0, 1 << 31),
            typed(o, "status", dict),
            optional_hex(o, "mac", MAC_BYTES),
        )


register(StatusRequest, StatusReply)

"""The control protocol: versioned, length-prefixed, size-bounded JSON messages, never pickle.

``messages`` holds the kinds (and the registry transports add theirs to), ``framing`` puts them
on a socket (``Channel``), ``fields`` checks each field of what arrives.
"""

from netloader.protocol.fields import MAX_STREAMS, MAX_TEXT
from netloader.protocol.framing import HEADER, MAGIC, Channel, M, decode, encode, gc_paused
from netloader.protocol.messages import (
    MAC_BYTES,
    MAX_FRAME,
    MESSAGES,
    NONCE_BYTES,
    OFFER_LIMITS,
    PROTOCOL_VERSION,
    SESSION_BYTES,
    SMALL_FRAME,
    Accept,
    Attached,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    Message,
    PullRequest,
    Refuse,
    StreamAttach,
    allow_offer,
    register,
)
from netloader.protocol.status import StatusReply, StatusRequest

__all__ = [
    "HEADER",
    "MAC_BYTES",
    "MAGIC",
    "MAX_FRAME",
    "MAX_STREAMS",
    "MAX_TEXT",
    "MESSAGES",
    "NONCE_BYTES",
    "OFFER_LIMITS",
    "PROTOCOL_VERSION",
    "SESSION_BYTES",
    "SMALL_FRAME",
    "Accept",
    "Attached",
    "Channel",
    "Done",
    "Hello",
    "InfoReply",
    "InfoRequest",
    "M",
    "Message",
    "PullRequest",
    "Refuse",
    "StatusReply",
    "StatusRequest",
    "StreamAttach",
    "allow_offer",
    "decode",
    "encode",
    "gc_paused",
    "register",
]

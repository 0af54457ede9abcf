"""Framing: versioned, length-prefixed, size-bounded JSON frames over a blocking socket.

A frame is ``b"NLDR"`` + a 4-byte big-endian body length + a UTF-8 JSON object with a ``kind``
(one of ``messages.MESSAGES``). The body is read only as fast as it arrives and never beyond the
expected kinds' bound, so a hostile length prefix costs nothing. Never pickle.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import TypeVar, cast

from netloader.errors import ProtocolError, Refused
from netloader.protocol.messages import MESSAGES, Message, Refuse

MAGIC = b"NLDR"
HEADER = struct.Struct("!4sI")

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

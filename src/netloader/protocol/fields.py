"""Field checks for the control protocol's messages: each reads one field of a decoded JSON
object, checks its type and bounds, and raises ProtocolError naming the field otherwise.

Transports that bring their own messages (``Engine.messages``) check their fields with these too.
"""

from __future__ import annotations

import contextlib
from typing import Any

from netloader.errors import ProtocolError
from netloader.sockets import split_address

MAX_TEXT = 4096
#: Parallel data streams of one transfer, at most (a wire bound: the options cap it further).
MAX_STREAMS = 64
MAX_PEERS = 64
MAX_ADDRESS = 300


def typed(obj: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    # bool is an int subclass in Python; JSON true must not pass for a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(f"field {key!r} must be {_names(kind)}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def text(obj: dict, key: str, limit: int = MAX_TEXT) -> str:
    value = typed(obj, key, str)
    if len(value) > limit:
        raise ProtocolError(f"field {key!r} is longer than {limit} characters")
    return value


def bounded(obj: dict, key: str, lo: int, hi: int) -> int:
    value = typed(obj, key, int)
    if not lo <= value <= hi:
        raise ProtocolError(f"field {key!r} = {value} is outside {lo}..{hi}")
    return value


def hex_field(obj: dict, key: str, nbytes: int) -> str:
    value = text(obj, key, 2 * nbytes)
    try:
        if len(bytes.fromhex(value)) != nbytes:
            raise ValueError
    except ValueError:
        raise ProtocolError(f"field {key!r} must be {nbytes} bytes of hex") from None
    return value


def optional_hex(obj: dict, key: str, nbytes: int) -> str | None:
    return None if obj.get(key) is None else hex_field(obj, key, nbytes)


def address(value: Any) -> str:
    """A peer address ``host:port`` (host non-empty, port 1..65535)."""
    if isinstance(value, str) and len(value) <= MAX_ADDRESS:
        with contextlib.suppress(ValueError):
            split_address(value)
            return value
    raise ProtocolError(f"{str(value)[:60]!r} is not a host:port address")


def addresses(obj: dict, key: str) -> list[str]:
    value = typed(obj, key, list)
    if len(value) > MAX_PEERS:
        raise ProtocolError(f"field {key!r} lists more than {MAX_PEERS} addresses")
    return [address(v) for v in value]

"""Messages on a relay's membership connection while it pulls from peers (relay placement):
it reports how much it holds, and its source may send it to more peers.

They travel only after an Accept that sent the client elsewhere (``delivers`` false), on the
connection the client keeps open until its verdict (``Done``), so the handshake is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from netloader.protocol.fields import addresses, bounded, typed
from netloader.protocol.messages import Message, register


@dataclass
class Progress(Message):
    """Relay -> source: the verified bytes it holds now."""

    kind: ClassVar[str] = "progress"
    held: int

    @classmethod
    def from_json(cls, o: dict) -> Progress:
        return cls(bounded(o, "held", 0, 1 << 62))


@dataclass
class Moved(Message):
    """Source -> relay: take chunks from ``peers`` too (and from this source itself, ``here``),
    and no more from the sources in ``drop`` (slow ones; absent: keep every source)."""

    kind: ClassVar[str] = "moved"
    here: bool
    peers: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, o: dict) -> Moved:
        drop = addresses(o, "drop") if o.get("drop") is not None else []
        return cls(typed(o, "here", bool), addresses(o, "peers"), drop)


register(Progress, Moved)

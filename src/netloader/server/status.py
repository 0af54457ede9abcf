"""A live server's status (``netloader status SOURCE``): its models, transfers, relays, bytes
served and refusals, as one JSON object, behind the token like every request.

The request and its reply are two message kinds of their own (``protocol.status``); the
dispatcher answers a ``StatusRequest`` with ``answer``. ``Tally`` counts what the status reports that no
other part keeps: bytes served per model and refusals per code, for this server alone.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netloader.protocol import PROTOCOL_VERSION
from netloader.protocol.status import StatusReply, StatusRequest

if TYPE_CHECKING:
    from netloader.server.catalog import Catalog
    from netloader.server.session import Conversation, SessionContext

#: Relay addresses listed per model, at most (the count is always whole).
MAX_LISTED_RELAYS = 64


class Tally:
    """Bytes this server sent per model, and its refusals per code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: Counter[str] = Counter()
        self._refusals: Counter[str] = Counter()

    def served(self, model: str, nbytes: int) -> None:
        with self._lock:
            self._served[model] += nbytes

    def refused(self, code: str) -> None:
        with self._lock:
            self._refusals[code] += 1

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self._served), dict(self._refusals)


@dataclass(frozen=True)
class Live:
    """What the status reads of its server."""

    catalog: Catalog
    tally: Tally
    active: int
    queued: int


def report(live: Live) -> dict[str, Any]:
    """The status object."""
    served, refusals = live.tally.counts()
    models = []
    for entry in live.catalog:
        relays = entry.relays.members()
        snapshot = entry.snapshot
        models.append(
            {
                "model": entry.model,
                "rank": entry.identity.rank,
                "ready": snapshot is not None and entry.unavailable is None,
                "unavailable": entry.unavailable,
                "bytes": None if snapshot is None else snapshot.plan.total_bytes,
                "transfers_verified": entry.served,
                "bytes_served": served.get(entry.model, 0),
                "relays": len(relays),
                "relay_addresses": [m.address for m in relays[:MAX_LISTED_RELAYS]],
            }
        )
    return {
        "models": models,
        "transfers_active": live.active,
        "transfers_queued": live.queued,
        "bytes_served": sum(served.values()),
        "refusals": refusals,
    }


def answer(context: SessionContext, conv: Conversation, request: StatusRequest, live: Live) -> None:
    """Check the token, then send the status."""
    context.gate.authenticate(conv.hello, request)
    proof = context.gate.proof("status", request.nonce, conv.hello.nonce)
    conv.channel.send(StatusReply(PROTOCOL_VERSION, report(live), proof), conv.deadline)

"""What happens in netloader, as events: the seam for observing it.

Servers, clients and the vLLM loader ``emit`` an event at each step that an operator may want
to see or count (a pull accepted or refused, a client queued, a chunk sent or received, a
transfer done, a relay joining or leaving, a model falling back to storage). Subscribers get
every event in the thread that emitted it, and must be quick and must not raise (a subscriber
that raises is logged and kept). The first subscriber, ``log_event``, writes netloader's log
lines; metrics can be another (``subscribe``).

Events hold only bounded facts (a model name, a refusal code, byte counts) besides the peer's
address, which a subscriber may log but should not use as a metric label.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """Base of every event."""


@dataclass(frozen=True)
class PullAccepted(Event):
    """A server accepted a pull of ``model`` from ``peer``; it serves it itself (``delivers``)
    or has named other peers to pull from."""

    model: str
    peer: str
    transport: str
    delivers: bool


@dataclass(frozen=True)
class PullRefused(Event):
    """A server refused ``peer`` (``model``: what it asked for, when known), with an
    ``errors.Code`` and the reason it was told."""

    model: str
    peer: str
    code: str
    reason: str


@dataclass(frozen=True)
class Queued(Event):
    """A client waits for one of a server's ``slots`` transfer slots, all in use."""

    peer: str
    slots: int


@dataclass(frozen=True)
class QueueLeft(Event):
    """A client that waited for a transfer slot stops waiting: ``admitted``, or refused."""

    peer: str
    admitted: bool


@dataclass(frozen=True)
class Placed(Event):
    """A server sent ``peer`` to pull ``model`` from ``upstream`` peers (relays)."""

    model: str
    peer: str
    upstream: tuple[str, ...]


@dataclass(frozen=True)
class ChunkSent(Event):
    model: str
    nbytes: int


@dataclass(frozen=True)
class ChunkReceived(Event):
    model: str
    nbytes: int


@dataclass(frozen=True)
class TransferDone(Event):
    """A server's transfer of ``model`` to ``peer`` ended; ``ok``: the client verified it
    (False: the client reported a failure, or the transfer broke; ``nbytes`` were sent)."""

    model: str
    rank: int
    peer: str
    nbytes: int
    seconds: float
    transport: str
    streams: int
    ok: bool


@dataclass(frozen=True)
class RelayJoined(Event):
    """A relay (a client that serves what it receives) became a member of a model's server."""

    model: str
    address: str


@dataclass(frozen=True)
class RelayLeft(Event):
    model: str
    address: str


@dataclass(frozen=True)
class Pulled(Event):
    """A client pulled ``model``: ``nbytes`` verified in ``seconds``; ``refetched`` bytes asked
    again after a source failed."""

    model: str
    nbytes: int
    seconds: float
    refetched: int


@dataclass(frozen=True)
class WeightsLoaded(Event):
    """A model's weights phase ended (vLLM loader): ``path`` is ``peer`` or ``storage``."""

    model: str
    rank: int
    path: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class FellBack(Event):
    """A model's weights came from storage after a peer could not deliver them (``reason``)."""

    model: str
    rank: int
    reason: str


Subscriber = Callable[[Event], None]

_subscribers: list[Subscriber] = []
_lock = threading.Lock()
log = logging.getLogger("netloader.events")


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Call ``subscriber(event)`` for every event from now on; returns the unsubscribe call."""
    with _lock:
        _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with _lock:
            if subscriber in _subscribers:
                _subscribers.remove(subscriber)

    return unsubscribe


def emit(event: Event) -> None:
    """Hand ``event`` to every subscriber, in the order they subscribed."""
    for subscriber in tuple(_subscribers):
        try:
            subscriber(event)
        except Exception:
            log.exception("event subscriber %r failed on %r", subscriber, event)


# --- the first subscriber: netloader's log lines ------------------------------------------

_server_log = logging.getLogger("netloader.server")


def log_event(event: Event) -> None:
    """The log lines a server writes for what happens to its peers."""
    match event:
        case PullRefused(peer=peer, reason=reason):
            _server_log.warning("refused %s: %s", peer, reason)
        case Queued(slots=slots):
            _server_log.info("a client waits for a transfer slot: all %d in use", slots)
        case Placed(peer=peer, upstream=upstream):
            _server_log.info("sending %s to pull from %s", peer, ", ".join(upstream))
        case TransferDone(ok=True) as done:
            gbps = done.nbytes / 1e9 / max(done.seconds, 1e-9)
            _server_log.info(
                "served %s rank %d to %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
                *(done.model, done.rank, done.peer, done.nbytes / 1e9, done.seconds, gbps),
                *(done.transport, done.streams),
            )


subscribe(log_event)


class Count:
    """A counter that several threads add to."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, amount: int = 1) -> None:
        with self._lock:
            self._value += amount

    @property
    def value(self) -> int:
        return self._value

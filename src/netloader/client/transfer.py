"""What the runs of one pull share, in the order it becomes known.

Before any source answered: the ``Job`` (how to ask a source, ``Requests``; the settings; the
caller's hooks; where the bytes will land). Once the first source accepted: the ``Transfer``,
fixed from then on (the content that source defined, where the bytes land, the board of
chunks, the relay wiring, and the queue through which each run ``Report``s to the scheduler).
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netloader.board import Board
from netloader.client.control import Endpoint
from netloader.client.destination import Destination, Landing
from netloader.client.relay import Relaying
from netloader.client.transports import Offer
from netloader.errors import PullError
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.options import PullHooks, PullOptions
from netloader.protocol import PROTOCOL_VERSION, Accept, PullRequest

if TYPE_CHECKING:
    from netloader.client.source import SourceRun


@dataclass(frozen=True)
class Requests:
    """How to ask a source: the same identity and stream count for every source, the
    transports offered to its host, and, in a member request (to the first source, or asking
    it again), where this client's relay listens (``advertise``, None: it does not relay or
    placement is off) and the peers to avoid."""

    identity: Identity
    #: The caller's manifest (``into``), which the first source must match.
    manifest: Manifest | None
    streams: int
    offer: Offer
    advertise: str | None

    def to(
        self,
        endpoint: Endpoint,
        manifest: Manifest | None,
        *,
        member: bool,
        avoid: Sequence[str] = (),
    ) -> PullRequest:
        placed = member and self.advertise is not None  # asks to be placed behind peers
        return PullRequest(
            protocol=PROTOCOL_VERSION,
            identity=self.identity,
            manifest=manifest,
            transports=self.offer.to(endpoint.host),
            streams=self.streams,
            nonce="",
            advertise=self.advertise if placed else None,
            placement=placed,
            avoid=list(avoid) if placed else [],
        )


@dataclass(frozen=True)
class Job:
    """What one pull needs, whichever sources deliver it (set up by ``netloader.pull``)."""

    requests: Requests
    options: PullOptions
    hooks: PullHooks
    landing: Landing


@dataclass(frozen=True)
class Transfer:
    """What every source's run shares once the first source accepted: its Accept
    (``reference``: the manifest, chunk plan and digests every other source must match), the
    destination, the board of chunks, the settings, how to ask a source, the relay wiring, and
    where runs report to."""

    reference: Accept
    dest: Destination
    board: Board
    options: PullOptions
    requests: Requests
    relaying: Relaying
    reports: queue.Queue[Report]


@dataclass(frozen=True)
class Report:
    """What a run tells the scheduler: the peers its source sent this client to (``peers``,
    a membership, told before it waits for the board), or that it is ``over``, with its
    ``error`` and whether it was a ``member`` (sent elsewhere, so it delivered nothing)."""

    run: SourceRun
    peers: list[Endpoint] | None = None
    over: bool = False
    error: PullError | None = None
    member: bool = False

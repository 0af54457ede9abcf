"""Relay wiring: what a pull does for this client's own server, when it relays.

Along the pull: its requests to the first source advertise where that server listens (with
relay placement); once the first source accepted, the server's entry for the model serves every
chunk onwards as soon as it landed and was verified; a source that sends this client to other
peers (``accept.delivers`` false) is followed: its connection is held as the membership until the
pull ends; at the end the membership is kept for as long as the server runs, or, if the pull
failed, the entry is withdrawn.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from netloader.board import Board
from netloader.client.control import Control, Endpoint
from netloader.client.destination import Destination
from netloader.errors import ProtocolError, PullError
from netloader.protocol import Accept
from netloader.protocol.fanout import Moved, Progress
from netloader.snapshot import Snapshot

if TYPE_CHECKING:
    from netloader.server import Served, Server

log = logging.getLogger("netloader.client")

REPORT_EVERY = 0.5  # seconds between a relay's progress reports to the source that placed it


class Relaying:
    """This client's relay server (``server``, None when it does not relay or does not listen)
    and its entry for the model pulled (``entry``), which serves what arrives."""

    def __init__(self, server: Server | None, model: str, placement: bool):
        self.server = server if server is not None and server.address else None
        self.entry: Served | None = self.server.model(model) if self.server is not None else None
        self.placement = placement

    @property
    def advertise(self) -> str | None:
        """The address a member request names, so that the source may send peers here and
        may send this client to peers ahead of it (None: no relay, or no placement)."""
        if self.server is None or not self.placement:
            return None
        return self.server.address

    def serve_arrivals(self, accept: Accept, dest: Destination, board: Board, verify: bool) -> None:
        """Serve every chunk onwards as soon as it landed and was verified."""
        if self.entry is None:
            return
        if accept.digests is None or not verify:
            self.entry.withdraw("cannot relay chunks it cannot verify (the source sent no digests)")
            return
        snapshot = Snapshot.receiving(
            accept.manifest, accept.aliases, dest.buffers, dest.plan, accept.digests, accept.digest
        )
        assert snapshot.ready is not None
        board.on_done.append(snapshot.ready.mark)
        self.entry.provide(snapshot)

    def withdraw(self, error: PullError) -> None:
        """The pull failed: peers are refused at their next chunk, with the reason."""
        if self.entry is not None:
            self.entry.withdraw(f"its own pull failed: {error}")

    def keep_or_close(self, control: Control, *, member: bool, ok: bool) -> None:
        """A relay keeps its membership at a source that registered it (a ``member`` request
        with placement), once the pull succeeded (``ok``), for as long as its own server runs;
        every other connection closes now."""
        if member and ok and self.server is not None and self.placement:
            self.server.keep(control.detach())
        else:
            control.close()


def follow(
    endpoint: Endpoint,
    accept: Accept,
    control: Control,
    board: Board,
    report: Callable[[list[Endpoint]], None],
) -> None:
    """The source at ``endpoint`` sent this client to ``accept.peers``: ``report`` them to the
    scheduler (which waits for that to start them), stay connected until the pull ends, telling
    the source how much this client holds every ``REPORT_EVERY`` s and reporting the peers it
    moves this client to, then say how it went."""
    log.info("%s sends this client to %s", endpoint.text, ", ".join(accept.peers))
    report([Endpoint.parse(p) for p in accept.peers])
    listening = True  # until the source is gone: the peers it named may still deliver
    while listening and not board.wait_finished(REPORT_EVERY):
        try:
            for moved in _moves(control):
                _move(endpoint, moved, board, report)
            control.channel.send(Progress(board.held()), time.monotonic() + REPORT_EVERY)
        except (OSError, ProtocolError) as exc:
            log.info("%s no longer hears this client's progress: %s", endpoint.text, exc)
            listening = False
    board.wait_finished()
    control.done(None if board.complete else PullError("the pull failed"))


def _move(
    endpoint: Endpoint, moved: Moved, board: Board, report: Callable[[list[Endpoint]], None]
) -> None:
    """Start the sources ``moved`` names, and retire those it drops (their chunks in flight
    go to the others)."""
    new = [*moved.peers, *([endpoint.text] if moved.here else [])]
    log.info(
        "%s moves this client to %s%s",
        endpoint.text,
        ", ".join(new),
        f" instead of {', '.join(moved.drop)}" if moved.drop else " too",
    )
    report([Endpoint.parse(p) for p in moved.peers] + [endpoint] * moved.here)
    for peer in moved.drop:
        board.retire(peer)


def _moves(control: Control) -> list[Moved]:
    """The moves the source sent so far (without waiting for one)."""
    sock = control.channel.sock
    moves = []
    while select.select([sock], [], [], 0)[0]:
        moves.append(control.channel.recv(Moved, deadline=time.monotonic() + REPORT_EVERY))
    return moves

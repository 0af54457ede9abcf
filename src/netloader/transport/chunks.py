"""The chunk-request loop every transport runs, and its wire constants (one place for both).

The client decides which chunk comes next: on each stream it asks for chunks by index, keeping
up to ``window`` requests outstanding so the link never idles, and takes the next index from
the board it shares with its other sources. The server answers each request in order. What a
request and an answer look like on the wire is the transport's business (an 8-byte header on a
socket, an int64 tensor on a process group); the loop, the sentinels and the checks are here.

Requests: a chunk index, ``END`` (no more on this stream) or ``PING`` (still here, nothing to
ask yet: the client waits for chunks other sources have in flight). Answers: the chunk, or
``ERROR`` followed by a Refuse frame when the server stopped for a reason the client should know.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from typing import Protocol

from netloader.errors import ProtocolError
from netloader.transport.base import Incoming, Outgoing

CHUNK_HEADER = struct.Struct("!q")
END = -1  # request: this stream asks for no more chunks
ERROR = -2  # answer: a Refuse frame follows
PING = -3  # request: nothing to ask yet, keep the stream open
WINDOW = 2  # requests a client keeps outstanding per stream on a byte-carrying transport

Mark = Callable[[], None]


class Asking(Protocol):
    """The client's side of one stream, as the request loop sees it."""

    def ask(self, indices: list[int]) -> None:
        """Send requests for ``indices``, in order."""

    def ping(self) -> None:
        """Tell the server this stream is still here with nothing to ask yet."""

    def land(self, asked: collections.deque[int]) -> list[int]:
        """Take the next answers (popping them from ``asked``); return the chunks now in place
        and verified."""


def lands_copies(stream: Asking) -> bool:
    """Whether ``stream`` lands through the board's claims (``Board.claim``/``commit``), so
    that it may be given endgame copies of chunks in flight elsewhere."""
    return bool(getattr(stream, "copies", False))


def request_chunks(stream: Asking, inc: Incoming, mark: Mark, window: int) -> None:
    """Keep up to ``window`` requests outstanding on ``stream`` until the board has no chunk
    left for this source. The caller ends the stream (``END``)."""
    asked: collections.deque[int] = collections.deque()
    copies = lands_copies(stream)
    while True:
        fresh: list[int] = []
        while (
            len(asked) + len(fresh) < window
            and (index := inc.board.take(inc.source, copies)) is not None
        ):
            fresh.append(index)
        if fresh:
            stream.ask(fresh)
            asked.extend(fresh)
        if not asked:
            if inc.board.finished or inc.board.retired(inc.source):
                return
            inc.board.wait_for_work(
                inc.idle / 3, inc.source if copies else None
            )  # chunks in flight elsewhere may come back
            stream.ping()
            mark()  # waiting for work is not a stall
            continue
        for index in stream.land(asked):
            inc.board.done(index, inc.source)
        mark()


def answer_requests(
    next_request: Callable[[], int], out: Outgoing, mark: Mark, answer: Callable[[int], None]
) -> None:
    """The server's side: ``answer(index)`` every chunk the client asks for (``next_request()``
    blocks for the next request) until it says END or the transfer is cancelled."""
    chunks = out.snapshot.plan.num_chunks
    while not out.cancelled.is_set():
        index = next_request()
        mark()
        if index == END:
            return
        if index == PING:
            continue
        if not 0 <= index < chunks:
            raise ProtocolError(f"client asked for chunk {index} of {chunks}")
        answer(index)
        out.count(index)
        mark()

"""Which chunks a pull still needs, and which source is fetching which.

Every stream of every source asks the board for its next chunk when it has room, so a fast
source simply asks more often and carries a larger share (work stealing, no fixed split). A
chunk counts as done only once it landed and was verified. When a source fails, the chunks it
had in flight go back to the front of the queue for the others; nothing else is fetched twice.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable


class Board:
    def __init__(self, num_chunks: int, chunk_bytes: Callable[[int], int]):
        self.num_chunks = num_chunks
        self._chunk_bytes = chunk_bytes
        self._pending: deque[int] = deque(range(num_chunks))
        self._owner: dict[int, str] = {}
        self._done = bytearray(num_chunks)
        self._left = num_chunks
        self._stopped = False
        self._cond = threading.Condition()
        #: Verified bytes delivered by each source.
        self.delivered: Counter[str] = Counter()
        #: Bytes of chunks handed back by failed sources, to be fetched again.
        self.refetched = 0
        #: Called with each chunk index once it is verified and in place (e.g. to relay it).
        self.on_done: list[Callable[[int], None]] = []

    @property
    def finished(self) -> bool:
        """Every chunk is done, or the pull was stopped."""
        return self._left == 0 or self._stopped

    @property
    def complete(self) -> bool:
        return self._left == 0

    def missing(self) -> int:
        return self._left

    def take(self, source: str) -> int | None:
        """The next chunk for ``source`` to fetch, or None if none is waiting right now."""
        with self._cond:
            if self._stopped or not self._pending:
                return None
            index = self._pending.popleft()
            self._owner[index] = source
            return index

    def wait_for_work(self, timeout: float) -> None:
        """Block until a chunk waits to be fetched, the pull finished, or ``timeout`` passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self.finished, timeout)

    def wait_finished(self) -> None:
        """Block until every chunk is done or the pull was stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished)

    def done(self, index: int) -> None:
        """Chunk ``index`` landed and was verified."""
        with self._cond:
            source = self._owner.pop(index)
            if self._done[index]:
                return
            self._done[index] = 1
            self._left -= 1
            self.delivered[source] += self._chunk_bytes(index)
            self._cond.notify_all()
        for hook in self.on_done:
            hook(index)

    def release(self, source: str) -> list[int]:
        """``source`` stopped (its streams have all ended): its chunks in flight go back to the
        front of the queue, in order. Returns them."""
        with self._cond:
            back = sorted(i for i, s in self._owner.items() if s == source)
            for index in back:
                del self._owner[index]
                self.refetched += self._chunk_bytes(index)
            self._pending.extendleft(reversed(back))
            self._cond.notify_all()
        return back

    def stop(self) -> None:
        """Give up: every waiting stream is told there is nothing more to fetch."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

"""Which chunks a pull still needs, and which source is fetching which.

Every stream of every source asks the board for its next chunk when it has room, so a fast
source simply asks more often and carries a larger share (work stealing, no fixed split). A
chunk counts as done only once it landed and was verified. When a source fails, the chunks it
had in flight go back to the front of the queue for the others.

Late chunks (``copies=True``): before any chunk still waiting, a stream with room is given a
chunk in flight at another source whose answer has not started (say, a relay that does not hold it
yet, or a stalled link) and that has waited there well beyond the usual time from asking to
landing (``PATIENCE`` times it), so no chunk waits for the slowest source (a relay's own
downstream asks for chunks in order, so one stuck chunk would hold it back), while sources
that keep pace are never copied. At the end of a pull this is the endgame. A chunk asked
twice lands where it belongs only through ``claim``/``commit``: the first answer of a chunk
nobody else was asked for lands in place (``claim`` True); every other answer lands aside,
and the first verified copy is committed, the others dropped. Only sources that land through
claims (``take(..., copies=True)``) are given copies, or have theirs copied.

A source can be *retired* (``retire``: its own source found it slow and sent this client
elsewhere): it is given no more chunks, and whatever runs its streams is told (``when_retired``)
so that it can cut them; once they ended, ``release`` hands its chunks in flight to the others.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

MAX_COPIES = 2  # sources asked for one chunk at once, at most
PATIENCE = 3.0  # a chunk in flight this many times the usual time from asking to landing is late
RECENT = 32  # landings the usual time is the median of (a slow source's few barely move it)


class Board:
    def __init__(
        self,
        num_chunks: int,
        chunk_bytes: Callable[[int], int],
        endgame: bool = True,
        clock: Callable[[], float] = time.monotonic,  # the fleet simulator brings its own
    ):
        self._clock = clock
        self.num_chunks = num_chunks
        self._chunk_bytes = chunk_bytes
        self._pending: deque[int] = deque(range(num_chunks))
        self._owners: dict[int, list[str]] = {}  # chunk -> sources it is in flight at
        self._asked_at: dict[int, float] = {}  # chunk -> when it was first asked for
        self._took: deque[float] = deque(maxlen=RECENT)  # recent times from asking to landing
        self._landing: set[int] = set()  # chunks whose one answer is landing in place
        self._claiming: set[str] = set()  # sources that land through claims
        self._retired: set[str] = set()  # sources given no more chunks
        self._on_retire: dict[str, list[Callable[[], None]]] = {}
        self._done = bytearray(num_chunks)
        self._left = num_chunks
        self._stopped = False
        self._endgame = endgame
        self._cond = threading.Condition()
        #: Verified bytes delivered by each source.
        self.delivered: Counter[str] = Counter()
        #: Bytes asked again: chunks handed back by failed sources, and late chunks' copies.
        self.refetched = 0
        #: Of ``refetched``, the late chunks' copies.
        self.copied = 0
        #: Called with each chunk index once it is verified and in place (e.g. to relay it).
        self.on_done: list[Callable[[int], None]] = []
        self._on_complete: list[Callable[[], None]] = []

    @property
    def finished(self) -> bool:
        """Every chunk is done, or the pull was stopped."""
        return self._left == 0 or self._stopped

    @property
    def complete(self) -> bool:
        return self._left == 0

    def missing(self) -> int:
        return self._left

    def take(self, source: str, copies: bool = False) -> int | None:
        """The next chunk for ``source`` to fetch, or None if none is waiting right now.
        ``copies``: ``source`` lands through ``claim``/``commit``, and may be given an endgame
        copy of a chunk in flight elsewhere."""
        with self._cond:
            if self._stopped or source in self._retired:
                return None
            if copies:
                self._claiming.add(source)
            late = self._copy_for(source) if copies and self._endgame else None
            if late is not None:
                index = late
                self.refetched += self._chunk_bytes(index)
                self.copied += self._chunk_bytes(index)
            elif self._pending:
                index = self._pending.popleft()
                self._asked_at[index] = self._clock()
            else:
                return None
            self._owners.setdefault(index, []).append(source)
            return index

    def _copy_for(self, source: str) -> int | None:
        """The chunk in flight longest elsewhere, late, not landing, that ``source`` may copy."""
        late = self._late_since()
        return next((i for i in self._copyable(source) if self._asked_at[i] <= late), None)

    def _copyable(self, source: str) -> list[int]:
        """Chunks ``source`` could be given a copy of once they are late, oldest first."""
        if not self._endgame or source not in self._claiming:
            return []
        return [
            index
            for index, owners in self._owners.items()
            if source not in owners
            and len(owners) < MAX_COPIES
            and index not in self._landing
            and all(o in self._claiming for o in owners)
        ]

    def _late_since(self) -> float:
        """Chunks asked for before this moment are late (none before one chunk landed)."""
        if not self._took:
            return float("-inf")
        return self._clock() - PATIENCE * statistics.median(self._took)

    def claim(self, index: int, source: str) -> bool:
        """The answer for ``index`` from ``source`` begins: True if it may land in place (no
        other source was asked for it); False: land it aside, then ``commit`` (or drop it)."""
        with self._cond:
            if self._done[index] or self._owners.get(index, []) != [source]:
                return False
            self._landing.add(index)
            return True

    def commit(self, index: int, source: str, put: Callable[[], None]) -> bool:
        """A verified copy of ``index`` from ``source``, landed aside: ``put`` puts it in place
        unless another copy won already. True if this one did."""
        with self._cond:
            won = not self._done[index] and not self._stopped
            if won:
                put()
            self._settle(index, source)
        if won:
            self._after(index)
        return won

    def when_complete(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once every chunk is done (at once if they are): a stream still waiting
        for an answer then waits for nothing anyone needs."""
        with self._cond:
            if self._left:
                self._on_complete.append(hook)
                return
        hook()

    def retire(self, source: str) -> None:
        """Give ``source`` no more chunks, and tell whoever runs its streams."""
        with self._cond:
            if source in self._retired:
                return
            self._retired.add(source)
            hooks = self._on_retire.pop(source, [])
            self._cond.notify_all()
        for hook in hooks:
            hook()

    def retired(self, source: str) -> bool:
        return source in self._retired

    def when_retired(self, source: str, hook: Callable[[], None]) -> None:
        """Call ``hook`` once ``source`` is retired (at once if it is)."""
        with self._cond:
            if source not in self._retired:
                self._on_retire.setdefault(source, []).append(hook)
                return
        hook()

    def wait_for_work(self, timeout: float, source: str | None = None) -> None:
        """Block until a chunk waits to be fetched, the pull finished, ``timeout`` passed, or
        (for ``source``, if it lands copies) a chunk in flight elsewhere became late."""
        end = time.monotonic() + timeout
        with self._cond:
            while not (self._pending or self.finished):
                left = end - time.monotonic()
                due = self._next_late(source)
                if left <= 0 or (due is not None and due <= 0):
                    return
                self._cond.wait(left if due is None else min(left, due))

    def _next_late(self, source: str | None) -> float | None:
        """Seconds until ``source`` may copy a chunk in flight elsewhere (None: never)."""
        candidates = self._copyable(source) if source is not None else []
        if not self._took or not candidates:
            return None
        return min(self._asked_at[i] for i in candidates) - self._late_since()

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until every chunk is done or the pull was stopped (True), or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def held(self) -> int:
        """Verified bytes in place so far."""
        with self._cond:
            return sum(self.delivered.values())

    def done(self, index: int, source: str) -> None:
        """Chunk ``index`` landed from ``source`` and was verified (a late copy is dropped)."""
        with self._cond:
            first = self._settle(index, source)
        if first:
            self._after(index)

    def _after(self, index: int) -> None:
        """The hooks for chunk ``index``, just done, and for the board if it is complete."""
        for hook in self.on_done:
            hook(index)
        if self._left == 0:
            hooks, self._on_complete = self._on_complete, []
            for complete in hooks:
                complete()

    def _settle(self, index: int, source: str) -> bool:
        """Record that ``source`` delivered ``index``; False if a copy was done before."""
        if self._done[index]:
            self._drop(index, source)
            return False
        self._done[index] = 1
        self._left -= 1
        self._owners.pop(index, None)
        self._landing.discard(index)
        self._took.append(self._clock() - self._asked_at.pop(index))
        self.delivered[source] += self._chunk_bytes(index)
        self._cond.notify_all()
        return True

    def _drop(self, index: int, source: str) -> None:
        owners = self._owners.get(index)
        if owners is not None and source in owners:
            owners.remove(source)

    def release(self, source: str) -> list[int]:
        """``source`` stopped (its streams have all ended): the chunks only it had in flight go
        back to the front of the queue, in order. Returns them."""
        with self._cond:
            back = []
            for index, owners in list(self._owners.items()):
                if source in owners:
                    owners.remove(source)
                    self._landing.discard(index)
                    if not owners:
                        del self._owners[index]
                        del self._asked_at[index]
                        back.append(index)
            back.sort()
            self.refetched += sum(self._chunk_bytes(i) for i in back)
            self._pending.extendleft(reversed(back))
            self._cond.notify_all()
        return back

    def stop(self) -> None:
        """Give up: every waiting stream is told there is nothing more to fetch."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

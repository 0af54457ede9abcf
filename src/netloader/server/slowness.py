"""Which members of a relay placement are slow: the judgement ``server.relays`` places and
moves members by (see there for the policy as a whole).

A member is slow when it receives at under ``SLOW`` times the pace of what feeds it (its
fastest upstream; for the seed, the median of the other members pulling) and does not merely
wait for an upstream still pulling: relative to the others, never by a fixed rate.
"""

from __future__ import annotations

import statistics

from netloader.server.members import Member

#: A member receiving at under this fraction of the pace of what feeds it is slow.
SLOW = 0.5
#: A member within this many seconds (at its upstream's rate) of an upstream's progress, or
#: within ``WINDOW_CHUNKS`` chunks of it (what its streams have asked for: a relay deep in a
#: chain that is just starting has a low rate and holds little), is waiting for it, not slow.
LAG = 1.0
WINDOW_CHUNKS = 4


class Slowness:
    """Judges the ``members`` (the placement's own dict, read under its lock)."""

    def __init__(self, members: dict[str, Member]) -> None:
        self.members = members
        self.chunk_bytes = 0  # of the model served, once known
        self._seed_pace: dict[int, float | None] = {}  # per judgement: member seq -> pace

    def reset(self) -> None:
        """A new judgement: the paces cached for the last one are stale."""
        self._seed_pace.clear()

    def pace(self, node: str, besides: Member) -> float | None:
        """How fast ``node`` can feed: a member, the rate it received at (while it pulled);
        this server, the median rate of the members pulling, other than ``besides``."""
        member = self.members.get(node)
        if member is not None:
            return member.rate
        if besides.seq not in self._seed_pace:  # once per member and judgement
            self._seed_pace[besides.seq] = self._median_besides(besides)
        return self._seed_pace[besides.seq]

    def _median_besides(self, besides: Member) -> float | None:
        rates = [m.rate for m in self.members.values() if m is not besides and m.measured]
        return statistics.median(rates) if rates else None  # type: ignore[type-var]

    def is_slow(self, member: Member) -> bool:
        """Receiving at under SLOW times the pace of what feeds it, and not merely waiting for
        an upstream member it keeps up with (within LAG s of that one's progress, as when
        the upstream has just sped up)."""
        if member.aside and not member.holds:
            # Against every member's rate, those that hold the model included (their rate
            # while they pulled): at the end, the members still pulling are the slow ones.
            rates = [m.rate for m in self.members.values() if m is not member and m.rate]
            median = statistics.median(rates) if rates else None
            return median is None or member.rate is None or member.rate < SLOW * median
        if not member.measured:
            return False
        paces = [p for u in member.upstreams if (p := self.pace(u, member)) is not None]
        if not paces or member.rate >= SLOW * max(paces):  # type: ignore[operator]
            return False
        ahead = [self.members[u] for u in member.upstreams if u in self.members]
        when, window = member.reports[-1][0], WINDOW_CHUNKS * self.chunk_bytes
        return not any(
            u.rate is not None and u.held_when(when) - member.held < max(LAG * u.rate, window)
            for u in ahead
            if not u.holds
        )

    def starved(self, member: Member) -> bool:
        """Every upstream of ``member`` is a slow member."""
        return all(u in self.members and self.is_slow(self.members[u]) for u in member.upstreams)

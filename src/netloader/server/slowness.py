"""Which relay members are slow: relative to what feeds each, never by a fixed rate.

Members report how much they hold (``progress``), so each has a smoothed receiving rate,
counted from its first report (one that has received nothing for ``MIN_SPAN`` s of reports
while its upstream did is the clearest case of slow). A member is *slow* when it receives at
under ``SLOW`` times its share of what feeds it, and does not merely wait for an upstream
still pulling (it is within ``LAG`` s of that one's rate of it, or within its request
window); a member that keeps pace with a slow upstream is not slow itself. Its share:

- of a member, that member's rate over the members it feeds (two relays behind one uplink
  get half of it each, and neither is slow for that);
- of the seed, the median rate of the other members, those that hold the model at their
  last (once most of a fleet holds it, the few still pulling are mostly the slow ones), and
  leaving out those that received nothing yet (deep in a chain that is starting, they wait;
  they say nothing of what the seed can give).

Progress comes in whole chunks, so a member is not judged before ``SLOW`` times its share
would have brought one in. ``server.relays`` acts on the answers.
"""

from __future__ import annotations

import statistics
from collections import Counter

from netloader.server.members import Member

#: A member receiving at under this fraction of the pace of what feeds it is slow.
SLOW = 0.5
#: A member within this many seconds (at its upstream's rate) of an upstream's progress, or
#: within ``WINDOW_CHUNKS`` chunks of it (what its streams have asked for: a relay deep in a
#: chain that is just starting has a low rate and holds little), is waiting for it, not slow.
LAG = 1.0
WINDOW_CHUNKS = 4


class Judge:
    """Judges the members of one model (the dict ``Relays`` keeps, under its lock). The
    seed's pace is computed once per member and judgement: call ``afresh`` between two."""

    def __init__(self, members: dict[str, Member]) -> None:
        self.members = members
        self.chunk_bytes = 0  # of the model served (set once it is)
        self._seed_pace: dict[int, float | None] = {}  # member seq -> the seed's pace for it
        self._fed: Counter[str] = Counter()  # node -> members pulling from it

    def afresh(self) -> None:
        """A new judgement: rates or upstreams have changed since the last."""
        self._seed_pace.clear()
        self._fed.clear()

    def is_slow(self, member: Member) -> bool:
        """Receiving at under SLOW times the pace of what feeds it, and not merely waiting for
        an upstream member it keeps up with (within LAG s of that one's progress, as when
        the upstream has just sped up). A member set aside is judged against the median."""
        if member.aside and not member.holds:
            median = self._seed(member)
            return median is None or member.rate is None or member.rate < SLOW * median
        if not member.measured:
            return False
        paces = [p for u in member.upstreams if (p := self.share(u, member)) is not None]
        if not paces or member.rate >= SLOW * max(paces):  # type: ignore[operator]
            return False
        # Progress comes in whole chunks: a share of a busy uplink takes a while per chunk.
        span = member.reports[-1][0] - member.reports[0][0]
        if span * SLOW * max(paces) < self.chunk_bytes:
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

    def share(self, node: str, member: Member) -> float | None:
        """What ``member`` may expect of ``node``: a member's pace split among the members it
        feeds (two relays behind one uplink get half of it each, and neither is slow for it);
        the seed's pace, the median of the others, holds their sharing already."""
        pace = self.pace(node, member)
        if pace is None or node not in self.members:
            return pace
        if not self._fed:
            for m in self.members.values():
                if not m.holds:
                    self._fed.update(m.upstreams)
        return pace / max(1, self._fed[node])

    def pace(self, node: str, besides: Member) -> float | None:
        """How fast ``node`` can feed: a member, the rate it received at (while it pulled);
        the seed (any other name), the median rate of the members but ``besides``."""
        member = self.members.get(node)
        return member.rate if member is not None else self._seed(besides)

    def _seed(self, besides: Member) -> float | None:
        if besides.seq not in self._seed_pace:
            # Truthy: neither unmeasured (None) nor waiting (0.0).
            rates = [m.rate for m in self.members.values() if m is not besides and m.rate]
            median = statistics.median(rates) if rates else None  # type: ignore[type-var]
            self._seed_pace[besides.seq] = median
        return self._seed_pace[besides.seq]

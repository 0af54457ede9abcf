"""What a relay placement server knows of each member: where it pulls from, how much it held
at each report, its receiving rate (``server.relays`` judges them by it), and where a client is
told to pull from (``Placement``).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SELF = ""  # a member's upstream when it pulls from the server that placed it
#: A member's rate is its progress over the last ``RATE_WINDOW`` s of reports, and counts once
#: they span ``MIN_SPAN`` s while it receives (report times jitter on a loaded host).
RATE_WINDOW = 3.0
MIN_SPAN = 0.5


@dataclass(frozen=True)
class Placement:
    """Where a client should pull from: this server (``here``), and/or ``peers``; a move also
    names the upstreams to ``drop``."""

    here: bool
    peers: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass
class Member:
    address: str
    #: Its place in the order members pull along: from lower ones only (no cycle). It joined
    #: later: a greater one; a slow member set aside (``_set_aside``) gets a new, last one.
    seq: int
    upstreams: list[str] = field(default_factory=lambda: [SELF])
    holds: bool = False
    connections: int = 0
    #: Bytes it held at its last report; its reports (time, bytes) since its first (or since
    #: it was judged afresh and received again).
    held: int = 0
    reports: deque[tuple[float, int]] = field(default_factory=deque)
    ramping: bool = False  # its rate was forgotten and it has received nothing since
    moves: int = 0
    #: Set aside for being slow: judged against the others' median from then on (its
    #: upstream now is merely somewhere it takes little from).
    aside: bool = False
    #: Upstreams it was moved away from: never given again (its board retired them).
    dropped: set[str] = field(default_factory=set)
    #: Tells the member where else to pull from (a member placed behind peers); None: cannot.
    notify: Callable[[Placement], None] | None = None
    #: Bytes sent to it so far, read by this server itself (a member it serves directly).
    meter: Callable[[], int] | None = None

    @property
    def upstream(self) -> str:
        """The upstream it was placed behind first."""
        return self.upstreams[0]

    def sample(self, held: int, now: float) -> None:
        """It holds ``held`` bytes at ``now``."""
        if self.ramping and held == self.held:
            return  # just moved: it has received nothing from its new upstream yet
        self.ramping = False
        self.held = held
        self.reports.append((now, held))
        while len(self.reports) > 2 and self.reports[1][0] <= now - RATE_WINDOW:
            self.reports.popleft()

    def forget_rate(self) -> None:
        """Judge it afresh from its next report that shows it receiving (a move, or being
        placed again, takes a moment before the first chunk comes)."""
        self.reports.clear()
        self.ramping = True

    def held_when(self, when: float) -> float:
        """What it held at ``when``: between two of its reports, read off the line joining
        them; after its last, going on at its rate. Reports arrive at their own moments, so a
        member is compared with its upstream at the moment of the member's own last report."""
        reports = self.reports
        if not reports or when <= reports[0][0]:
            return self.held
        for (t0, h0), (t1, h1) in itertools.pairwise(reports):
            if t0 <= when <= t1:
                return h0 + (h1 - h0) * (when - t0) / (t1 - t0) if t1 > t0 else h1
        return self.held + (self.rate or 0.0) * (when - reports[-1][0])

    @property
    def rate(self) -> float | None:
        """Bytes per second over its recent reports, once they span MIN_SPAN s."""
        if len(self.reports) < 2:
            return None
        (t0, h0), (t1, h1) = self.reports[0], self.reports[-1]
        return (h1 - h0) / (t1 - t0) if t1 - t0 >= MIN_SPAN else None

    @property
    def measured(self) -> bool:
        return not self.holds and self.rate is not None

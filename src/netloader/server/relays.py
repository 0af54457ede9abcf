"""Relay placement: the relays pulling this server's model or holding it, and where a new one
should pull from.

A client that runs a server of its own (a relay) tells this server its address. While its
control connection here stays open it is a *member*: pulling, then holding the weights. A new
relay is sent to the most recent member that feeds nobody yet, so relays started together form
a chain (seed -> r1 -> r2 -> ...) in which every host's uplink carries the model about once,
and each relay forwards every chunk as soon as it has verified it. When every member already
feeds one, the oldest that feeds fewer than ``FANOUT`` takes it (a tree). A chain grows no
deeper than ``max_depth`` hops below a node that holds the model, half the model's chunks: each
hop delays what follows it by about two chunks' time, so a deeper chain would cost more than
the model takes to send; beyond it the next relay branches off nearer the top (a tree).
Members only ever pull from nodes before them in an order (the order they joined, but for
members set aside), so no cycle can form; a member that goes away is forgotten, and whoever
pulled from it comes back and is placed again.

Members report how much they hold (``progress``); ``server.slowness`` judges from it which
are *slow*, relative to what feeds each, never by a fixed rate. What follows from it:

- nobody is placed behind a slow member, or behind one fed only by slow members;
- a member whose every upstream is slow is *moved* (``Placement``, told through its
  ``notify``) to a node chosen by the same rule among those before it, dropping the slow ones
  (it hands their chunks in flight to the new one at once); slow members do not count as load,
  so this is usually the slow one's own upstream, whose uplink it then has nearly to itself;
- a slow member that feeds nobody, but shares an uplink with one that is not slow, is *set
  aside*: moved to the end of the order, behind the newest node that feeds nobody, so the
  little it takes costs the others nothing (from then on it is judged against the median).

A member placed again (its upstreams failed) is judged afresh, as is whoever it feeds. The
policy judges at most every ``JUDGE_EVERY`` s, holds no sockets and reads no clock of its own
(``clock``), so the fleet simulator (``benchmarks/fleet_sim.py``) runs this very class.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from netloader import events
from netloader.server.members import SELF, Member, Placement
from netloader.server.slowness import Judge

log = logging.getLogger("netloader.server")

#: Relays one node feeds at most while another node has room: 2 keeps every uplink at about
#: twice the model, at most.
FANOUT = 2
#: Members this server tracks; beyond it, clients are served directly, not placed. Each is an
#: open connection and a few hundred bytes here.
MAX_MEMBERS = 4096
#: Times one member is moved at most.
MAX_MOVES = 3
#: The least ``max_depth``, whatever the model's chunks (a chain of relays that small costs
#: little even for a model of few chunks).
MIN_DEPTH = 16
#: Seconds between two judgements of who is slow (reports in between only update rates).
JUDGE_EVERY = 0.25


class Relays:
    """The members of one served model, and the placement of each new one."""

    def __init__(self, model: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.clock = clock
        self._members: dict[str, Member] = {}
        self.judge = Judge(self._members)
        self.max_depth: int | None = None  # hops below a holder; None: not served yet
        self._metered: dict[str, Member] = {}  # members served here, whose meter it reads
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on every change
        self._judged = float("-inf")  # when slowness was last judged

    def serves(self, chunk_bytes: int, chunks: int) -> None:
        """The model's chunk size and count, once it is served: slowness and depth use them."""
        with self._lock:
            self.judge.chunk_bytes = chunk_bytes
            self.max_depth = max(MIN_DEPTH, chunks // 2)

    def join(self, address: str, avoid: list[str]) -> Placement:
        """Register the relay at ``address`` (again, if it comes back) and place it."""
        with self._lock:
            member = self._members.get(address)
            if member is None:
                if len(self._members) >= MAX_MEMBERS:
                    return Placement(here=True)
                member = self._members[address] = Member(address, next(self._seq))
                events.emit(events.RelayJoined(self.model, address))
            elif member.connections:
                self._judged_afresh(member)  # placed again: its upstreams failed
            member.connections += 1
            self._changed.notify_all()
            self.judge.afresh()
            member.upstreams = [self._choose(member, set(avoid) | member.dropped)]
            return _placement(member.upstream)

    def watch(
        self,
        address: str,
        *,
        notify: Callable[[Placement], None] | None = None,
        meter: Callable[[], int] | None = None,
    ) -> None:
        """How to tell the member at ``address`` to move, or how to read its progress here."""
        with self._lock:
            member = self._members.get(address)
            if member is not None:
                member.notify, member.meter = notify, meter
                self._metered.pop(address, None)
                if meter is not None and not member.held:  # one that holds some reports it
                    self._metered[address] = member

    def progress(self, address: str, held: int) -> list[tuple[str, Placement]]:
        """The member at ``address`` holds ``held`` bytes. Moves every member whose upstreams
        are all slow now (telling each through its ``notify``); returns the moves made."""
        with self._lock:
            now = self.clock()
            if address in self._members:  # its reports alone measure it: a meter counts
                self._members[address].sample(held, now)  # from 0 in a later session
                self._metered.pop(address, None)
            for m in self._metered.values():  # usually a few: not O(members) per report
                m.sample(m.meter(), now)
            if now - self._judged < JUDGE_EVERY:
                return []
            self._judged = now
            self.judge.afresh()
            moves = self._moves()
        for member, placement in moves:
            if member.notify is not None:
                member.notify(placement)
        return [(m.address, p) for m, p in moves]

    def holds(self, address: str) -> None:
        """The member at ``address`` now holds every verified chunk."""
        with self._lock:
            if address in self._members:
                self._members[address].holds = True
                self._changed.notify_all()

    def leave(self, address: str) -> None:
        """One of the member's connections closed; the member goes with its last one."""
        with self._lock:
            member = self._members.get(address)
            if member is not None:
                member.connections -= 1
                if member.connections <= 0:
                    del self._members[address]
                    self._metered.pop(address, None)
                    events.emit(events.RelayLeft(self.model, address))
                self._changed.notify_all()

    def members(self) -> list[Member]:
        with self._lock:
            return self._sorted()

    def slow(self) -> list[str]:
        """The members slow right now, in the order they joined."""
        with self._lock:
            self.judge.afresh()
            return [m.address for m in self._sorted() if self.judge.is_slow(m)]

    def wait_for(self, settled: Callable[[list[Member]], bool], timeout: float) -> list[Member]:
        """The members once ``settled(members)`` holds, or as they are after ``timeout`` s.
        A client's pull ends when it has sent its verdict; the server marks it as holding
        the model when that verdict arrives, a moment later."""
        with self._changed:
            self._changed.wait_for(lambda: settled(self._sorted()), timeout)
            return self._sorted()

    def _sorted(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.seq)

    # --- the policy (under the lock) ------------------------------------------------------

    def _moves(self) -> list[tuple[Member, Placement]]:
        """A new upstream, instead of its slow ones, for each member (that can be told) whose
        upstreams are all slow."""
        moves = []
        for member in self._sorted():
            if member.holds or member.notify is None or member.moves >= MAX_MOVES:
                continue
            if not self.judge.starved(member):
                continue
            choice = self._choose(member, set(member.upstreams) | member.dropped, newest=True)
            if choice in member.upstreams:
                continue
            dropped = tuple(u for u in member.upstreams if u != SELF)
            member.dropped.update(dropped)
            member.upstreams = [choice]
            member.moves += 1
            self._judged_afresh(member)
            log.info(
                "moving %s to pull from %s instead of %s",
                member.address,
                choice or "here",
                ", ".join(dropped),
            )
            moves.append((member, replace(_placement(choice), drop=dropped)))
        return moves + self._set_aside()

    def _set_aside(self) -> list[tuple[Member, Placement]]:
        """Each slow member that feeds nobody (any more) but shares an uplink with a member
        that is not slow is moved to the end of the order, behind a node whose uplink nobody
        else needs (the newest one feeding nobody that is not slow): the little it takes
        then costs the others nothing. Never to this server."""
        moves = []
        for member in self._sorted():
            if member.holds or member.notify is None or member.moves >= MAX_MOVES:
                continue
            if member.aside or not self.judge.is_slow(member):
                continue
            if self._feeds(member.address) or not any(
                self._feeds(u, member) for u in member.upstreams
            ):
                continue
            member.seq = next(self._seq)
            avoid = set(member.upstreams) | member.dropped
            choice = self._choose(member, avoid, newest=True)
            if choice == SELF or self._feeds(choice, besides=member):
                continue  # no uplink free enough: it stays (its new place harms nobody)
            dropped = tuple(u for u in member.upstreams if u != SELF)
            member.dropped.update(dropped)
            member.upstreams = [choice]
            member.moves += 1
            member.aside = True
            log.info("setting slow %s aside: it pulls from %s now", member.address, choice)
            moves.append((member, Placement(here=False, peers=(choice,), drop=dropped)))
        return moves

    def _feeds(self, node: str, besides: Member | None = None) -> bool:
        """Whether a member still pulling, and not slow, pulls from ``node``."""
        return any(
            node in m.upstreams and not m.holds and not self.judge.is_slow(m)
            for m in self._members.values()
            if m is not besides and m.address != node
        )

    def _judged_afresh(self, member: Member) -> None:
        """``member``, and whoever it feeds, are judged afresh: their pace is about to change."""
        for m in self._members.values():
            if m is member or member.address in m.upstreams:
                m.forget_rate()

    def _choose(self, member: Member, avoid: set[str], newest: bool = False) -> str:
        """The upstream for ``member``: the newest earlier node feeding nobody, else the oldest
        (``newest``: the newest, for a move) feeding fewer than FANOUT, else this server; never
        a slow member or one fed only by slow ones. Only members still pulling, and not slow,
        count as load: a node's uplink is free again once its downstream holds the model, and
        mostly free while it feeds only slow ones (so a member moved off a slow one goes to
        that one's upstream, whose uplink it then has nearly to itself, and no fast flow is
        halved by the move)."""
        depth, deepest = self._depths(), self.max_depth or math.inf
        ahead = [
            m.address
            for m in self._sorted()
            if m.seq < member.seq
            and depth[m.address] < deepest
            and m.address not in avoid
            and not self.judge.is_slow(m)
            and not self.judge.starved(m)
        ]
        nodes = [SELF, *ahead]
        load = Counter(
            u
            for m in self._members.values()
            if m is not member and not m.holds and not self.judge.is_slow(m)
            for u in m.upstreams
            if u in nodes
        )
        idle = [n for n in nodes if load[n] == 0]
        if idle:
            return idle[-1]
        roomy = [n for n in nodes if load[n] < FANOUT]
        if not roomy:
            return SELF
        return roomy[-1] if newest else roomy[0]

    def _depths(self) -> dict[str, int]:
        """Hops from a node that holds the model (this server, or a member that holds it) to
        each member, along its nearest upstream (an upstream always comes earlier)."""
        depth = {SELF: 0}
        for m in self._sorted():
            depth[m.address] = 0 if m.holds else 1 + min(depth.get(u, 0) for u in m.upstreams)
        return depth


def _placement(upstream: str) -> Placement:
    return Placement(here=True) if upstream == SELF else Placement(here=False, peers=(upstream,))

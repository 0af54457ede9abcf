"""Relay placement: the relays pulling this server's model or holding it, and where a new one
should pull from.

A client that runs a server of its own (a relay) tells this server its address. While its
control connection here stays open it is a *member*: pulling, then holding the weights. A new
relay is sent to the most recent member that feeds nobody yet, so relays started together form
a chain (seed -> r1 -> r2 -> ...) in which every host's uplink carries the model about once,
and each relay forwards every chunk as soon as it has verified it. When every member already
feeds one, the oldest that feeds fewer than ``FANOUT`` takes it (a tree). Members only ever
pull from nodes that joined before them, so no cycle can form; a member that goes away is
forgotten, and whoever pulled from it comes back and is placed again.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from netloader import events

#: Relays one node feeds at most while another node has room: 2 keeps every uplink at about
#: twice the model, at most.
FANOUT = 2
#: Members this server tracks; beyond it, clients are served directly, not placed.
MAX_MEMBERS = 256
SELF = ""  # a member's upstream when it pulls from this server itself


@dataclass
class Member:
    address: str
    seq: int
    upstream: str = SELF
    holds: bool = False
    connections: int = 0


@dataclass(frozen=True)
class Placement:
    """Where a client should pull from: this server (``here``), and/or ``peers``."""

    here: bool
    peers: tuple[str, ...] = ()


class Relays:
    """The members of one served model, and the placement of each new one."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self._members: dict[str, Member] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on every change

    def join(self, address: str, avoid: list[str]) -> Placement:
        """Register the relay at ``address`` (again, if it comes back) and place it."""
        with self._lock:
            member = self._members.get(address)
            if member is None:
                if len(self._members) >= MAX_MEMBERS:
                    return Placement(here=True)
                member = self._members[address] = Member(address, next(self._seq))
                events.emit(events.RelayJoined(self.model, address))
            member.connections += 1
            self._changed.notify_all()
            member.upstream = self._choose(member, set(avoid))
            if member.upstream == SELF:
                return Placement(here=True)
            return Placement(here=False, peers=(member.upstream,))

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
                    events.emit(events.RelayLeft(self.model, address))
                self._changed.notify_all()

    def members(self) -> list[Member]:
        with self._lock:
            return self._sorted()

    def wait_for(self, settled: Callable[[list[Member]], bool], timeout: float) -> list[Member]:
        """The members once ``settled(members)`` holds, or as they are after ``timeout`` s.
        A client's pull ends when it has sent its verdict; the server marks it as holding
        the model when that verdict arrives, a moment later."""
        with self._changed:
            self._changed.wait_for(lambda: settled(self._sorted()), timeout)
            return self._sorted()

    def _sorted(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.seq)

    def _choose(self, member: Member, avoid: set[str]) -> str:
        """The upstream for ``member``: the newest earlier node feeding nobody, else the oldest
        feeding fewer than FANOUT, else this server. Only members still pulling count as
        load: a node's uplink is free again once its downstream holds the model."""
        ahead = [
            m.address
            for m in sorted(self._members.values(), key=lambda m: m.seq)
            if m.seq < member.seq and m.address not in avoid
        ]
        nodes = [SELF, *ahead]
        load = Counter(
            m.upstream
            for m in self._members.values()
            if m is not member and not m.holds and m.upstream in nodes
        )
        idle = [n for n in nodes if load[n] == 0]
        if idle:
            return idle[-1]
        roomy = [n for n in nodes if load[n] < FANOUT]
        return roomy[0] if roomy else SELF

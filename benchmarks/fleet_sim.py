"""A discrete-time model of fan-out over a fleet: placement, boards, links; no sockets.

    .venv/bin/python benchmarks/fleet_sim.py [--size 256MiB] [--rate 25e6] [--n 64,256,1024]
        [--json docs/bench-fleet.json] [--svg docs/bench-fleet.svg]

It runs the package's own policy, so the model and the code cannot drift: the placement is
``netloader.server.relays.Relays`` (with the simulated clock), every replica's chunks are
scheduled by ``netloader.board.Board`` (work stealing, endgame copies, retired sources). What
it models itself: each host's symmetric link (uplink and downlink shared equally by the flows
using it at that moment), a one-way latency before a relay may forward a chunk it verified,
``STREAMS`` streams per source each with ``WINDOW`` requests outstanding and answered in order
(a stream whose first request names a chunk its relay does not hold yet waits, as the real
server does), relays reporting progress every 0.5 s, moves (new sources, and the slow ones
dropped: their chunks in flight go back to the board), relays joining over time, slow hosts
and hosts dying mid-transfer (whoever pulled from a dead one releases its chunks, and with no
source left asks to be placed again, avoiding it). Not modelled: TCP dynamics, CPU, process
start-up.

Two policies, side by side: ``old`` (one upstream, no progress reports, no endgame copies: the
code before issue 18) and ``new`` (progress reports, moves, endgame copies, chains of bounded
depth).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from netloader.board import Board
from netloader.cli import parse_size
from netloader.server import relays as relays_module
from netloader.server.relays import Placement, Relays

SEED = "seed"
STREAMS = 2  # streams per source (the default), each bringing one chunk at a time
WINDOW = 2  # requests outstanding per stream (transport.chunks.WINDOW), answered in order
REPORT_EVERY = 0.5  # client.relay.REPORT_EVERY
CHUNK = 4 << 20  # the default; --chunk-size
FILL_ROUNDS = 3  # rounds of water filling per step
PULL_SECONDS = re.compile(r"pulled \d+ bytes in ([\d.]+) s")


@dataclass
class Host:
    name: str
    rate: float  # bytes/s, each way
    joins: float = 0.0
    dies: float | None = None
    board: Board | None = None
    sources: list[str] = field(default_factory=list)
    #: source -> its streams' requests, each stream's in the order they are answered
    asked: dict[str, list[list[int]]] = field(default_factory=dict)
    got: dict[tuple[str, int], float] = field(default_factory=dict)  # bytes of a chunk so far
    ready_at: float | None = None
    dead: bool = False
    done_at: dict[int, float] = field(default_factory=dict)  # chunk -> when verified


@dataclass
class Fleet:
    hosts: dict[str, Host]
    size: int
    latency: float
    new: bool
    chunk: int = CHUNK
    now: float = 0.0
    seed_sent: float = 0.0
    relays: Relays = field(init=False)

    def __post_init__(self) -> None:
        self.relays = Relays("sim", clock=lambda: self.now)
        self.chunks = -(-self.size // self.chunk)
        if self.new:  # the old policy knew no chunk size, nor bounded a chain's depth
            self.relays.serves(self.chunk, self.chunks)

    def chunk_bytes(self, index: int) -> int:
        return min(self.chunk, self.size - index * self.chunk)


def place(fleet: Fleet, host: Host, avoid: list[str]) -> None:
    """Ask the seed where to pull from (``Relays.join``), and follow its moves."""
    placement = fleet.relays.join(host.name, avoid)
    if fleet.new:
        fleet.relays.watch(host.name, notify=lambda p: add_sources(host, p))
    add_sources(host, placement)


def add_sources(host: Host, placement: Placement) -> None:
    """Start the sources ``placement`` names; retire those it drops (as ``client.relay``)."""
    for peer in [*placement.peers, *([SEED] if placement.here else [])]:
        if peer not in host.sources:
            host.sources.append(peer)
            host.asked[peer] = [[] for _ in range(STREAMS)]
    for peer in placement.drop:
        if peer in host.sources and host.board is not None:
            host.board.retire(peer)
            drop_source(host, peer)


def drop_source(host: Host, source: str) -> None:
    """``host`` stops using ``source``: what it had in flight there goes back to the board."""
    host.sources.remove(source)
    for stream in host.asked.pop(source):
        for index in stream:
            host.got.pop((source, index), None)
    host.board.release(source)  # type: ignore[union-attr]


def holds(fleet: Fleet, source: str, index: int) -> bool:
    """Whether ``source`` may send chunk ``index`` now (a relay: verified, latency passed)."""
    if source == SEED:
        return True
    at = fleet.hosts[source].done_at.get(index)
    return at is not None and at + fleet.latency <= fleet.now


def flows(fleet: Fleet) -> list[tuple[Host, str, int]]:
    """Every (receiver, source, chunk) moving bytes now: each stream's first request, once its
    source holds that chunk; each stream a flow of its own on the links."""
    moving = []
    for host in fleet.hosts.values():
        if host.board is None or host.dead or host.ready_at is not None:
            continue
        for source in host.sources:
            for stream in host.asked[source]:
                if stream and holds(fleet, source, stream[0]):
                    moving.append((host, source, stream[0]))
    return moving


def step(fleet: Fleet, dt: float) -> None:
    """Move ``dt`` seconds of bytes at the rates ``share`` gives the flows."""
    moving = flows(fleet)
    rates = share(fleet, [(source, host.name) for host, source, _ in moving])
    for (host, source, index), rate in zip(moving, rates, strict=True):
        key = (source, index)
        if key not in host.got:
            host.got[key] = 0.0
            host.board.claim(index, source)  # type: ignore[union-attr]
        moved = min(rate * dt, fleet.chunk_bytes(index) - host.got[key])
        host.got[key] += moved
        if source == SEED:
            fleet.seed_sent += moved
        if host.got[key] >= fleet.chunk_bytes(index):
            land(fleet, host, source, index)


def share(fleet: Fleet, pairs: list[tuple[str, str]]) -> list[float]:
    """Max-min fair rates of flows (uplink host, downlink host), as TCP flows sharing links
    roughly get: a link's capacity is split equally among its flows that are not held back
    elsewhere, and what a flow held back elsewhere leaves is shared by the others (water
    filling, a few rounds: close enough at the scale of a step)."""
    rates = [0.0] * len(pairs)
    links = [((0, up), (1, down)) for up, down in pairs]  # (0, h): h's uplink; (1, h): downlink
    left = {link: fleet.hosts[link[1]].rate for pair in links for link in pair}
    open_ = set(range(len(pairs)))
    for _ in range(FILL_ROUNDS):
        count: dict[tuple[int, str], int] = {}
        for i in open_:
            for link in links[i]:
                count[link] = count.get(link, 0) + 1
        grant = {i: min(left[link] / count[link] for link in links[i]) for i in open_}
        for i, g in grant.items():
            rates[i] += g
            for link in links[i]:
                left[link] -= g
        # A flow stays open while both its links have room left.
        open_ = {i for i in open_ if all(left[link] > 1e-6 for link in links[i])}
        if not open_:
            break
    return rates


def land(fleet: Fleet, host: Host, source: str, index: int) -> None:
    board = host.board
    assert board is not None
    del host.got[(source, index)]
    next(s for s in host.asked[source] if s and s[0] == index).pop(0)
    board.commit(index, source, lambda: None)
    host.done_at.setdefault(index, fleet.now)
    if board.complete and host.ready_at is None:
        host.ready_at = fleet.now
        fleet.relays.holds(host.name)


def ask(fleet: Fleet, host: Host) -> None:
    """Each stream of each source of ``host`` keeps WINDOW chunks asked (``Board.take``)."""
    board = host.board
    assert board is not None
    for source in host.sources:
        for stream in host.asked[source]:
            while len(stream) < WINDOW:
                index = board.take(source, copies=fleet.new)
                if index is None:
                    break
                stream.append(index)


def die(fleet: Fleet, host: Host) -> None:
    """``host`` vanishes: it leaves the seed's members; whoever pulled from it releases the
    chunks it had in flight there, and is placed again if no source is left."""
    host.dead = True
    fleet.relays.leave(host.name)
    for other in fleet.hosts.values():
        if host.name in other.sources and other.board is not None:
            drop_source(other, host.name)
            if not other.sources and not other.dead:
                place(fleet, other, [host.name])


def run(fleet: Fleet, dt: float, limit: float) -> Fleet:
    """Step until every live replica holds the model or ``limit`` s. Each relay reports every
    REPORT_EVERY s from REPORT_EVERY after it joined, at a phase of its own (the real reports
    arrive in no set order)."""
    phase = {n: REPORT_EVERY * (1 + i % 7 / 7) for i, n in enumerate(fleet.hosts)}
    next_report = {n: h.joins + phase[n] for n, h in fleet.hosts.items()}
    while fleet.now < limit:
        for host in fleet.hosts.values():
            if host.board is None and host.joins <= fleet.now:
                host.board = Board(fleet.chunks, fleet.chunk_bytes, fleet.new, lambda: fleet.now)
                place(fleet, host, [])
            if host.dies is not None and not host.dead and host.dies <= fleet.now:
                die(fleet, host)
        alive = [h for h in fleet.hosts.values() if not h.dead]
        if all(h.ready_at is not None for h in alive):
            break
        for host in alive:
            if host.board is not None and host.ready_at is None:
                ask(fleet, host)
        if fleet.new:
            for host in alive:
                due = fleet.now >= next_report[host.name]
                if due and host.board is not None and host.ready_at is None:
                    fleet.relays.progress(host.name, host.board.held())
                    next_report[host.name] += REPORT_EVERY
        step(fleet, dt)
        fleet.now += dt
    return fleet


def fleet_of(n: int, rate: float, chance: random.Random, args: argparse.Namespace) -> dict:
    """``n`` hosts: ``args.slow_share`` of them at a tenth of ``rate``, ``args.die_share``
    dying at a random point of their transfer, joining over ``args.spread`` seconds."""
    names = [f"r{i}" for i in range(n)]
    slow = set(chance.sample(names, round(n * args.slow_share)))
    dying = set(chance.sample(names, max(1, round(n * args.die_share)) if args.die_share else 0))
    alone = args.size / rate
    hosts = {}
    for name in names:
        joins = chance.uniform(0, args.spread)
        dies = joins + chance.uniform(0.1, 0.8) * alone if name in dying else None
        hosts[name] = Host(name, rate / 10 if name in slow else rate, joins, dies)
    return hosts


def simulate(hosts: dict, args: argparse.Namespace, new: bool, rate: float) -> dict:
    fresh = {h.name: Host(h.name, h.rate, h.joins, h.dies) for h in hosts.values()}
    fresh[SEED] = Host(SEED, rate, float("inf"))
    fresh[SEED].ready_at = 0.0
    fleet = run(Fleet(fresh, args.size, args.latency, new, args.chunk_size), args.dt, args.limit)
    alone = args.size / rate
    eligible = [h for h in fresh.values() if h.name != SEED and h.dies is None]
    fast = [h for h in eligible if h.rate == rate]
    times = sorted(
        (h.ready_at - h.joins) if h.ready_at is not None else float("inf") for h in eligible
    )
    ends = sorted(h.ready_at if h.ready_at is not None else float("inf") for h in eligible)
    fast_ends = [h.ready_at if h.ready_at is not None else float("inf") for h in fast]

    def share(p: float) -> float:
        return ends[max(0, round(p * len(ends)) - 1)] / alone

    return {
        "policy": "new" if new else "old",
        "replicas": len(eligible),
        "ready_50": share(0.5),
        "ready_90": share(0.9),
        "ready_100": share(1.0),
        "fast_all": max(fast_ends) / alone if fast_ends else None,
        "worst_own": times[-1] / alone,
        "seed_uplink_models": fleet.seed_sent / args.size,
        "curve": [round(t / alone, 3) for t in ends],
    }


def check_bed(path: str, args: argparse.Namespace) -> None:
    """Predict the bed runs of ``benchmarks/fanout.py --resilience`` (its JSON): the link rate
    from the run of one client alone, each run's join times from its clients' own pull
    times; the predicted and measured pull phases (first join to the last non-slow replica
    ready), over the one-alone pull."""
    bed = json.loads(Path(path).read_text())
    size = bed["payload_bytes"]
    runs = {r["case"].split(" (")[0].split(" at ")[0]: r for r in bed["runs"]}
    one = runs["one alone"]["pull_phase_s"]
    rate = size / one
    args.size = size
    for case in ("equal links", "one slow", "one relay killed"):
        run = runs[case]
        args.chunk_size = parse_size(run.get("chunk", "4MiB"))
        own = [float(PULL_SECONDS.search(line)[1]) for line in run["lines"]]
        starts = sorted(end - s for end, s in zip(sorted(run["each_s"]), sorted(own), strict=True))
        starts = [t - starts[0] for t in starts]
        hosts = {f"r{i}": Host(f"r{i}", rate, t) for i, t in enumerate(starts)}
        if run.get("killed_after_fraction"):  # the bench kills the first relay that feeds one
            dies = run["killed_after_fraction"] * size / rate
            hosts = {"killed": Host("killed", rate, 0.0, dies), **hosts}
        if run.get("slow"):
            at = run["slow"]["joined"] - 1
            joins = starts[max(0, at - 1)]
            hosts = dict(sorted({**hosts, "slow": Host("slow", rate / 10, joins)}.items()))
            order = sorted(hosts.values(), key=lambda h: (h.joins, h.name == "slow"))
            hosts = {h.name: h for h in order}
        r = simulate(hosts, args, True, rate)
        predicted = r["fast_all"] * size / rate / one
        measured = run["pull_phase_s"] / one
        print(
            f"{case}: predicted {predicted:.2f}x one alone, measured {measured:.2f}x "
            f"({(predicted - measured) / measured:+.0%})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20)
    parser.add_argument("--chunk-size", type=parse_size, default=CHUNK)
    parser.add_argument("--rate", type=float, default=25e6, help="bytes/s of a normal host")
    parser.add_argument("--latency", type=float, default=0.001, help="one-way, seconds")
    parser.add_argument("--n", default="64,256,1024")
    parser.add_argument("--slow-share", type=float, default=0.1)
    parser.add_argument("--die-share", type=float, default=0.01)
    parser.add_argument("--spread", type=float, default=0.0, help="joins over this many s")
    parser.add_argument("--dt", type=float, default=0.02)
    parser.add_argument("--limit", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", default=None)
    parser.add_argument("--bed", default=None, help="check against this fanout.py JSON")
    parser.add_argument("--plot", default=None, help="a PNG of replicas ready over time")
    parser.add_argument(
        "--max-members",
        type=int,
        default=None,
        help="what if the seed tracked this many members (relays.MAX_MEMBERS; beyond it the "
        "seed serves clients itself)",
    )
    args = parser.parse_args(argv)
    if args.max_members is not None:
        relays_module.MAX_MEMBERS = args.max_members
    if args.bed:
        check_bed(args.bed, args)
        return
    results = []
    for n in [int(x) for x in args.n.split(",")]:
        hosts = fleet_of(n, args.rate, random.Random(args.seed + n), args)
        for new in (False, True):
            r = simulate(hosts, args, new, args.rate)
            r["n"] = n
            results.append(r)
            print(_row(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    """Share of replicas ready over time (in units of one replica alone), per N and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for r in (r for r in results if r["n"] == n):
            done = [t for t in r["curve"] if t != float("inf")]
            ys = [(i + 1) / len(r["curve"]) for i in range(len(done))]
            ax.step(done, ys, where="post", label=f"{r['policy']} policy")
        ax.set_title(f"N = {n}")
        ax.set_xlabel("time / one replica alone")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of replicas ready")
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _row(r: dict) -> str:
    fast = "-" if r["fast_all"] is None else f"{r['fast_all']:.2f}x"
    return (
        f"N={r['n']:5} {r['policy']}: 50% ready at {r['ready_50']:.2f}x one alone, 90% at "
        f"{r['ready_90']:.2f}x, 100% at {r['ready_100']:.2f}x (every fast one: {fast}); "
        f"seed uplink {r['seed_uplink_models']:.2f}x the model"
    )


if __name__ == "__main__":
    sys.exit(main())

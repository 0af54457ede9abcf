"""Fan-out over real, shaped links: one seed, N new instances started together.

    .venv/bin/python benchmarks/fanout.py [--size 128MiB] [--rate 100mbit] [--clients 1,2,4,8]
        [--json docs/bench-fanout.json] [--plot docs/bench-fanout.png]

Needs root (network namespaces, see docs/netbed.md). Every host, the seed's included, has the
same symmetric link. The seed runs ``netloader serve CHECKPOINT``; each client host runs
``netloader serve --from SEED`` (a replica that relays while it receives), all launched at the
same moment. A run's time is from that moment to the last client printing its ``pulled`` line:
process start-up included, as when a service scales out. Two modes, side by side:

- seed only: ``--no-discovery``, every client takes the whole model from the seed (what an
  instance did before fan-out): the seed's uplink carries the model N times (the seed runs
  ``--max-clients N``, so that all N transfers share its uplink instead of queueing);
- fan-out: discovery on; the seed sends each new client to the one ahead of it, and every
  client forwards each chunk as soon as it has verified it;
- fan-out with 1 MiB chunks (``serve --chunk-size 1MiB`` on the seed): each relay hop waits for
  a whole chunk to arrive and be verified before forwarding it, so smaller chunks shorten every
  hop on slow links.

Two times per run: from the launch to the last client's ``pulled`` line (start-up included), and
the pull phase, from the first client's accepted handshake to the same end: on this 2-core
machine N Python processes importing torch at once take several seconds of CPU before the first
pull starts, which a cluster (one machine per instance) does not pay.

Then, with 4 clients in fan-out mode, a client that feeds another is killed (SIGKILL) once it
has received a random part (10 % to 80 %) of the model: every other client must still finish
(each verifies every chunk); the extra time and the bytes fetched twice are reported.

``--resilience`` runs instead, side by side: one client alone, then N (the largest of
``--clients``) with equal links, with one client (a random one) at a tenth of the rate, and
with a relay killed at a random point; each time of the clients that are not slow over the time
of one alone, where the slow one joined the chain, and the seed's moves (``--chunk-size``: the
seed's chunks, 4 MiB unless told).

Reported per run: the time, the seed's uplink bytes over the model's size, and the cores used
by all netloader processes (median of 0.5 s slices), to show the links are the limit.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from netloader.bench import machine_description
from netloader.cli import parse_size
from netloader.synthetic import llm_like

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.cpu import CpuSampler
from netloader_testing.netbed import NetBed, available, parse_rate

PULLED = re.compile(r"pulled (\d+) bytes in ([\d.]+) s .* from (.*) over ")
AGAIN = re.compile(r"(\d+) bytes fetched again")
FEEDER = re.compile(r"to pull from ([\d.]+):\d+")
# The seed's placements ("sending A to pull from B") and moves ("moving A to pull from B instead of C").
PLACED = re.compile(r"(?:sending|moving) (\S+) to pull from (\S+?)( too| instead of .*)?$", re.M)


class Client:
    """``netloader serve --from SEED`` on one host; records when its ``pulled`` line came."""

    def __init__(self, host, seed: str, discovery: bool, start: float):
        cmd = [sys.executable, "-m", "netloader", "serve", "--from", seed, "--host", host.address]
        if not discovery:
            cmd.append("--no-discovery")
        self.host = host
        self.start = start
        self.proc = host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.rx_before = host.rx_bytes()
        self.pulled_at: float | None = None
        self.line = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("pulled "):
                self.pulled_at = time.monotonic() - self.start
                self.line = line.strip()
                return

    def received(self) -> int:
        return self.host.rx_bytes() - self.rx_before


@dataclass(frozen=True)
class Mode:
    name: str
    discovery: bool
    chunk: str = "4MiB"


SEED_ONLY = Mode("seed only", discovery=False)
FAN_OUT = Mode("fan-out", discovery=True)
FAN_OUT_1MIB = Mode("fan-out, 1 MiB chunks", discovery=True, chunk="1MiB")


def one_run(
    checkpoint: Path,
    rate: str,
    count: int,
    mode: Mode,
    kill_at: float | None = None,
    slow: tuple[str, str] | None = None,
) -> dict:
    """``slow``: (host, rate) for one client host whose link is slower than ``rate``; the run
    ends when every other client holds the model (the slow one's time, if it finished)."""
    names = [f"c{i}" for i in range(count)]
    size = checkpoint.stat().st_size
    rates = dict.fromkeys(["seed", *names], rate)
    if slow is not None:
        rates[slow[0]] = slow[1]
    with NetBed(rates) as bed, tempfile.TemporaryFile("w+") as log:
        seed_host = bed["seed"]
        serve = ["serve", checkpoint.parent, "--host", seed_host.address, "--model", "bench"]
        serve += ["--max-clients", str(max(4, count))]  # seed only: all N at once, no queue
        serve += ["--chunk-size", mode.chunk]
        seed = seed_host.popen(
            [sys.executable, "-m", "netloader", *serve],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        address = seed.stdout.readline().split()[-1]
        sent_before = seed_host.tx_bytes()
        start = time.monotonic()
        clients = [Client(bed[n], address, mode.discovery, start) for n in names]
        sampler = CpuSampler([seed.pid, *(c.proc.pid for c in clients)])
        killed = _kill_a_feeder(bed, clients, log, size, kill_at) if kill_at is not None else None
        slow_client = next((c for c in clients if slow and c.host is bed[slow[0]]), None)
        for c in clients:
            if c is not killed and c is not slow_client:
                c.reader.join(900)
                assert c.pulled_at is not None, c.proc.stderr.read()
        cores = sampler.stop()
        seed_sent = seed_host.tx_bytes() - sent_before
        log.seek(0)
        placements = PLACED.findall(log.read())
        chain = _chain_position(bed, names, slow[0], placements) if slow else None
    slow_s = slow_client.pulled_at if slow_client else None
    done = [c for c in clients if c is not killed and c is not slow_client]
    again = sum(int(m[1]) for c in done if (m := AGAIN.search(c.line)))
    ends = [c.pulled_at for c in done]
    starts = [end - float(PULLED.search(c.line)[2]) for end, c in zip(ends, done, strict=True)]
    return {
        "clients": count,
        "mode": mode.name,
        "seconds": max(ends),  # type: ignore[type-var]
        # From the first pull's handshake to the last client holding the model: what remains
        # when the N processes' start-up (which contend for this machine's 2 cores) is left out.
        "pull_phase_s": max(ends) - min(starts),  # type: ignore[type-var]
        "each_s": sorted(round(c.pulled_at, 2) for c in done),  # type: ignore[arg-type]
        "seed_uplink_models": seed_sent / size,
        "cores": cores,
        "fetched_again": again,
        "killed_after_fraction": kill_at,
        "slow": None if slow is None else {"rate": slow[1], "seconds": slow_s, "joined": chain},
        "moves": [m for m in placements if m[2]],
        "lines": [c.line for c in done],
    }


def _chain_position(bed, names: list[str], slow: str, placements: list) -> int | None:
    """Where the slow host joined: 1 for the first relay placed (fed by the seed)."""
    order = []
    for peer, _upstream, moved in placements:
        host = peer.rsplit(":", 1)[0]
        if not moved and host not in order:
            order.append(host)
    address = bed[slow].address
    return order.index(address) + 2 if address in order else 1  # the first is served directly


def _kill_a_feeder(bed, clients, log, size: int, fraction: float) -> Client:
    """SIGKILL a client that feeds another (read off the seed's log) once it has received
    ``fraction`` of the model."""
    by_address = {c.host.address: c for c in clients}
    while True:
        log.seek(0)
        feeders = FEEDER.findall(log.read())
        if feeders:
            break
        time.sleep(0.01)
    victim = by_address[feeders[0]]
    while victim.received() < fraction * size and victim.proc.poll() is None:
        time.sleep(0.005)
    victim.proc.kill()
    return victim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=128 << 20)
    parser.add_argument("--rate", default="100mbit", help="every host's link")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seed", type=int, default=0, help="for the random kill point")
    parser.add_argument(
        "--chunk-size",
        default=FAN_OUT.chunk,
        help="the seed's chunk size in --resilience runs (every relay hop waits for one chunk)",
    )
    parser.add_argument(
        "--resilience",
        action="store_true",
        help="instead: 1 client, then N (the largest of --clients) with equal links, with one "
        "slow client (a tenth of the rate, a random one), and with a relay killed at a random point",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    ok, reason = available()
    if not ok:
        raise SystemExit(f"needs network namespaces: {reason}")
    counts = [int(n) for n in args.clients.split(",")]
    if args.resilience:
        resilience(args, max(counts))
        return
    with tempfile.TemporaryDirectory(prefix="netloader-fanout-") as tmp:
        checkpoint = Path(tmp) / "bench" / "model.safetensors"
        checkpoint.parent.mkdir()
        save_file(llm_like(args.size, seed=2), checkpoint)
        runs = []
        for mode in (SEED_ONLY, FAN_OUT, FAN_OUT_1MIB):
            for count in counts:
                runs.append(one_run(checkpoint, args.rate, count, mode))
                print(_row(runs[-1]), file=sys.stderr, flush=True)
        fraction = random.Random(args.seed).uniform(0.1, 0.8)
        runs.append(one_run(checkpoint, args.rate, 4, FAN_OUT, kill_at=fraction))
        size = checkpoint.stat().st_size
    report = {
        "machine": machine_description(),
        "payload_bytes": size,
        "rate": args.rate,
        "runs": runs,
    }
    print(
        f"{size / 2**20:.0f} MiB, every link {args.rate}; machine: {report['machine']}\n"
        + "\n".join(_row(r) for r in runs)
    )
    for mode in (SEED_ONLY, FAN_OUT, FAN_OUT_1MIB):
        mine = [r for r in runs if r["mode"] == mode.name and not r["killed_after_fraction"]]
        one = next(r for r in mine if r["clients"] == 1)
        for r in mine:
            print(
                f"{mode.name}, {r['clients']} clients: {r['seconds'] / one['seconds']:.2f}x the "
                f"time of 1 from launch, {r['pull_phase_s'] / one['pull_phase_s']:.2f}x its "
                "pull phase"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)


def resilience(args: argparse.Namespace, count: int) -> None:
    """One client alone, then ``count`` clients: equal links, one slow, one relay killed; each
    time of the clients that are not slow, over the time of one alone."""
    chance = random.Random(args.seed)
    slow = (f"c{chance.randrange(count)}", f"{parse_rate(args.rate) // 10}bit")
    fraction = chance.uniform(0.1, 0.8)
    with tempfile.TemporaryDirectory(prefix="netloader-fanout-") as tmp:
        checkpoint = Path(tmp) / "bench" / "model.safetensors"
        checkpoint.parent.mkdir()
        save_file(llm_like(args.size, seed=2), checkpoint)
        size = checkpoint.stat().st_size
        runs = []
        for label, kwargs in [
            ("one alone", {"count": 1}),
            ("equal links", {"count": count}),
            (f"one slow ({slow[1]})", {"count": count, "slow": slow}),
            (f"one relay killed at {fraction:.0%}", {"count": count, "kill_at": fraction}),
        ]:
            count_ = kwargs.pop("count")
            mode = Mode(FAN_OUT.name, discovery=True, chunk=args.chunk_size)
            run = one_run(checkpoint, args.rate, count_, mode, **kwargs)
            run["chunk"] = args.chunk_size
            run["case"] = label
            runs.append(run)
            print(f"{label}: {_row(run)}", file=sys.stderr, flush=True)
    one = runs[0]
    report = {"machine": machine_description(), "payload_bytes": size, "rate": args.rate}
    report["runs"] = runs
    print(f"{size / 2**20:.0f} MiB, every link {args.rate}; machine: {report['machine']}")
    for r in runs:
        slow_note = ""
        if r["slow"]:
            took = r["slow"]["seconds"]
            slow_note = (
                f"; the slow one joined {r['slow']['joined']}th, "
                + (f"done at {took:.1f} s" if took else "still pulling")
                + f"; moves: {len(r['moves'])}"
            )
        print(
            f"{r['case']:28} slowest non-slow replica {r['seconds']:6.2f} s from launch = "
            f"{r['seconds'] / one['seconds']:.2f}x one alone (pull phase "
            f"{r['pull_phase_s'] / one['pull_phase_s']:.2f}x); seed uplink "
            f"{r['seed_uplink_models']:.2f}x the model; fetched again {r['fetched_again']} B"
            f"{slow_note}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _row(r: dict) -> str:
    kill = (
        f", one killed at {r['killed_after_fraction']:.0%}, {r['fetched_again']} bytes fetched again"
        if r["killed_after_fraction"]
        else ""
    )
    return (
        f"{r['mode']:21} {r['clients']} clients: {r['seconds']:6.2f} s from launch, pull phase "
        f"{r['pull_phase_s']:6.2f} s (each done at {r['each_s']}), seed uplink "
        f"{r['seed_uplink_models']:.2f}x the model, {r['cores']:.2f} cores{kill}"
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if not r["killed_after_fraction"]]
    counts = sorted({r["clients"] for r in runs})
    fig, ax = plt.subplots(figsize=(8, 4))
    modes = [SEED_ONLY.name, FAN_OUT.name, FAN_OUT_1MIB.name]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [
            statistics.mean(r["seconds"] for r in runs if r["mode"] == mode and r["clients"] == n)
            for n in counts
        ]
        offsets = [x + (i - (len(modes) - 1) / 2) * width for x in range(len(counts))]
        ax.bar(offsets, values, width, label=mode)
    ax.set_xticks(range(len(counts)), [f"{n} client{'s' * (n > 1)}" for n in counts])
    ax.set_ylabel("seconds until the last client holds the model")
    ax.set_title(f"{report['payload_bytes'] / 2**20:.0f} MiB, every link {report['rate']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

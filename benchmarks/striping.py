"""Striped pulls over real, shaped links: one client, 1, 2 or 4 sources, each on its own host.

    .venv/bin/python benchmarks/striping.py [--size 256MiB] [--rate 200mbit] [--repeats 3]
        [--json docs/bench-striping.json] [--plot docs/bench-striping.png]

Needs root (network namespaces, see docs/netbed.md). Every row runs on a fresh NetBed: each
source host serves the same generated checkpoint with ``netloader serve``; the client host runs
``netloader pull`` and the row's time is the one the command reports (first accepted handshake to
the last verified byte). Rows, side by side in one run:

1. raw TCP: one Python stream between two hosts over links at RATE (the practical limit);
2. netloader, 1 source at RATE -> client at RATE;
3. netloader, 2 and 4 sources at RATE each -> client at 5x RATE (the sources' uplinks are the
   limit, as when they also serve other clients or their own traffic);
4. netloader, 2 sources at RATE -> client at RATE (equal links: the client's downlink is the
   limit, striping cannot help);
5. netloader, 2 sources -> client at 5x RATE, one source killed (SIGKILL) at a random point:
   the pull must complete, bit-exact (the client writes the file and it is compared), and the
   bytes fetched twice are reported.

CPU use of the whole machine during each pull is reported, to show that the links, not the two
cores, are the limit.
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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from netloader.bench import machine_description
from netloader.cli import parse_size
from netloader.synthetic import llm_like

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.cpu import CpuSampler
from netloader_testing.netbed import Host, NetBed, available, parse_rate, stream

PORT = 7000
LINE = re.compile(r"pulled (\d+) bytes in ([\d.]+) s \(([\d.]+) GB/s\) from (.*?) over ")
SHARE = re.compile(r"(\S+:\d+) \((\d+) bytes\)")
REFETCHED = re.compile(r"(\d+) bytes fetched again")


class Sources:
    """``netloader serve CHECKPOINT`` on each of ``hosts``."""

    def __init__(self, bed: NetBed, hosts: list[str], checkpoint: Path):
        self.procs = []
        self.addresses = []
        for name in hosts:
            host = bed[name]
            serve = ["serve", checkpoint, "--host", host.address, "--listen-port", str(PORT)]
            proc = host.popen(
                [sys.executable, "-m", "netloader", *serve, "--model", "bench"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"netloader serve on {name} did not start: {line!r}")
            self.procs.append(proc)
            self.addresses.append(line.split()[-1])


def pull(
    bed: NetBed,
    client: str,
    sources: Sources,
    out: Path | None = None,
    kill: Callable[[], None] | None = None,
) -> dict:
    """Run ``netloader pull`` on ``client``; ``kill()`` runs meanwhile, if given."""
    cmd = [sys.executable, "-m", "netloader", "pull", *sources.addresses]
    if out is not None:
        cmd += ["--out", str(out)]
    proc = bed[client].popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler([proc.pid, *(p.pid for p in sources.procs)])
    killer = threading.Thread(target=kill) if kill else None
    if killer:
        killer.start()
    stdout, stderr = proc.communicate(timeout=900)
    if killer:
        killer.join()
    cpu = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"pull failed: {stderr.strip()}")
    match = LINE.search(stdout)
    assert match, stdout
    shares = {a: int(n) for a, n in SHARE.findall(match[4])} or {match[4]: int(match[1])}
    refetched = REFETCHED.search(stdout)
    return {
        "bytes": int(match[1]),
        "seconds": float(match[2]),
        "shares": shares,
        "refetched": int(refetched[1]) if refetched else 0,
        "cpu": cpu,
    }


def netloader_row(checkpoint: Path, rate: str, client_rate: str, sources: int, repeats: int):
    hosts = {f"s{i}": rate for i in range(sources)} | {"client": client_rate}
    runs = []
    for _ in range(repeats):
        with NetBed(hosts) as bed:
            srv = Sources(bed, [f"s{i}" for i in range(sources)], checkpoint)
            runs.append(pull(bed, "client", srv))
    return runs


def killed_row(
    checkpoint: Path, rate: str, client_rate: str, repeats: int, expected: dict, seed: int
) -> list[dict]:
    """2 sources; source 0 is killed once it has sent a random part (10 % to 80 %) of the half
    it would carry, read off its link's counter."""
    rng = random.Random(seed)
    nbytes = sum(t.nbytes for t in expected.values())
    runs = []
    for _ in range(repeats):
        hosts = {"s0": rate, "s1": rate, "client": client_rate}
        with NetBed(hosts) as bed, tempfile.TemporaryDirectory() as tmp:
            srv = Sources(bed, ["s0", "s1"], checkpoint)
            point = int(rng.uniform(0.1, 0.8) * nbytes / 2)
            sent = bed["s0"].tx_bytes()
            kill = _killer(bed["s0"], srv.procs[0], sent + point)
            run = pull(bed, "client", srv, out=Path(tmp) / "out", kill=kill)
            got = load_file(Path(tmp) / "out" / "model.safetensors")
            run["bit_exact"] = set(got) == set(expected) and all(
                torch.equal(_bytes(got[n]), _bytes(expected[n])) for n in expected
            )
            run["killed_after_bytes"] = point
            runs.append(run)
    return runs


def _killer(host: Host, proc: subprocess.Popen, at: int) -> Callable[[], None]:
    """SIGKILL ``proc`` once ``host`` has sent ``at`` bytes on its link."""

    def kill() -> None:
        while proc.poll() is None and host.tx_bytes() < at:
            time.sleep(0.01)
        proc.kill()

    return kill


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def summary(name: str, runs: list[dict], nbytes: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "name": name,
        "median_s": seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20)
    parser.add_argument("--rate", default="200mbit", help="each source host's link")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="for the random kill points")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    ok, reason = available()
    if not ok:
        raise SystemExit(f"needs network namespaces: {reason}")
    rate = args.rate
    fast = f"{parse_rate(rate) * 5 // 10**6}mbit"
    with tempfile.TemporaryDirectory(prefix="netloader-striping-") as tmp:
        checkpoint = Path(tmp) / "bench" / "model.safetensors"
        checkpoint.parent.mkdir()
        tensors = llm_like(args.size, seed=1)
        save_file(tensors, checkpoint)
        nbytes = sum(t.nbytes for t in tensors.values())
        rows = []
        raw = []
        for _ in range(args.repeats):
            with NetBed({"src": rate, "dst": rate}) as bed:
                raw.append({"seconds": stream(bed["src"], bed["dst"], nbytes)})
        rows.append(summary(f"raw TCP, 1 stream, {rate} link", raw, nbytes))
        for label, count, client in (
            (f"netloader, 1 source -> client at {rate}", 1, rate),
            (f"netloader, 2 sources -> client at {fast}", 2, fast),
            (f"netloader, 4 sources -> client at {fast}", 4, fast),
            (f"netloader, 2 sources -> client at {rate}", 2, rate),
        ):
            runs = netloader_row(Path(tmp) / "bench", rate, client, count, args.repeats)
            rows.append(summary(label, runs, nbytes))
            print(f"{label}: {rows[-1]['median_s']:.2f} s", file=sys.stderr, flush=True)
        killed = killed_row(Path(tmp) / "bench", rate, fast, args.repeats, tensors, args.seed)
        rows.append(summary(f"netloader, 2 sources -> {fast}, one killed", killed, nbytes))
    report = {
        "machine": machine_description(),
        "payload_bytes": nbytes,
        "source_rate": rate,
        "fast_client_rate": fast,
        "repeats": args.repeats,
        "rows": rows,
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)


def print_table(report: dict) -> None:
    rows = report["rows"]
    one = rows[1]["median_s"]
    print(
        f"payload {report['payload_bytes'] / 2**20:.0f} MiB, source links {report['source_rate']}, "
        f"median of {report['repeats']}; machine: {report['machine']}"
    )
    print(f"{'row':48} {'seconds':>8} {'MB/s':>7} {'vs 1 src':>9} {'cores':>5}")
    for row in rows:
        cpu = [r["cpu"] for r in row["runs"] if "cpu" in r]
        cpu_text = f"{statistics.median(cpu):5.2f}" if cpu else f"{'-':>5}"
        print(
            f"{row['name']:48} {row['median_s']:8.2f} {row['mb_per_s']:7.1f} "
            f"{one / row['median_s']:8.2f}x {cpu_text}"
        )
    for run in rows[-1]["runs"]:
        print(
            f"  killed after {run['killed_after_bytes']} bytes: bit-exact {run['bit_exact']}, "
            f"fetched again {run['refetched']} bytes, shares {run['shares']}"
        )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["name"] for r in rows]
    ax.barh(names[::-1], [r["mb_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("MB/s (median)")
    ax.set_title(
        f"{report['payload_bytes'] / 2**20:.0f} MiB over shaped links "
        f"(sources at {report['source_rate']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

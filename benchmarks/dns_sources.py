"""A pull by DNS name: a name with 3 A records against a name with one, side by side.

    .venv/bin/python benchmarks/dns_sources.py [--size 64MiB] [--rate 100mbit] [--repeats 2]

Needs root (network namespaces, see docs/netbed.md) and dnsmasq. One NetBed: three seed hosts
at RATE, each serving the same generated checkpoint with ``netloader serve`` on one port, and a
client at 10x RATE (the seeds' uplinks are the limit) whose resolver is a real dnsmasq that
answers ``seeds.test`` with the three seeds' addresses and ``one.test`` with the first seed's.
The client runs ``netloader pull NAME:PORT``; a row's time is the one the command reports. The
two names alternate, ``repeats`` times each; the median of each and their ratio are printed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from netloader.bench import machine_description
from netloader.cli import parse_size
from netloader.synthetic import llm_like

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.dns import NameServer
from netloader_testing.netbed import NetBed, available, parse_rate

PORT = 9100
NETLOADER = [sys.executable, "-m", "netloader"]
LINE = re.compile(r"pulled (\d+) bytes in ([\d.]+) s \(([\d.]+) GB/s\) from (.*?) over ")


def pull(bed: NetBed, source: str, out: Path) -> tuple[float, int, str]:
    proc = bed["client"].run(
        [*NETLOADER, "pull", source, "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    match = LINE.search(proc.stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"pull {source} failed: {proc.stderr.strip()}")
    return float(match[2]), int(match[1]), match[4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="64MiB", help="checkpoint size (generated)")
    parser.add_argument("--rate", default="100mbit", help="each seed's link (tc rate)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ok, why = available()
    if not ok:
        raise SystemExit(f"no network namespaces: {why}")
    client_rate = f"{parse_rate(args.rate) * 10}bit"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        save_file(llm_like(parse_size(args.size), seed=1), folder / "model.safetensors")
        hosts = {"a": args.rate, "b": args.rate, "c": args.rate, "client": client_rate}
        with NetBed(hosts) as bed:
            for name in "abc":
                host = bed[name]
                proc = host.popen(
                    [
                        *NETLOADER,
                        "serve",
                        folder,
                        "--host",
                        host.address,
                        "--listen-port",
                        str(PORT),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                assert proc.stdout.readline().startswith("listening on ")
            records = {
                "seeds.test": [bed[n].address for n in "abc"],
                "one.test": [bed["a"].address],
            }
            times: dict[str, list[float]] = {"one.test": [], "seeds.test": []}
            with NameServer(bed["client"], records):
                for i in range(args.repeats):
                    for name in times:
                        seconds, nbytes, used = pull(bed, f"{name}:{PORT}", Path(tmp) / f"o{i}")
                        times[name].append(seconds)
                        print(f"{name}:{PORT}: {nbytes} bytes in {seconds:.3f} s from {used}")
    one, three = (statistics.median(times[n]) for n in ("one.test", "seeds.test"))
    print(f"machine: {machine_description()}")
    print(f"seeds at {args.rate}, client at {client_rate}, {args.size}, {args.repeats} repeats")
    print(f"median: one address {one:.3f} s, 3 A records {three:.3f} s: {one / three:.2f}x")


if __name__ == "__main__":
    main()

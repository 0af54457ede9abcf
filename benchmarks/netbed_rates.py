"""How close one Python TCP stream gets to a NetBed link's shaped rate (needs root).

    sudo .venv/bin/python benchmarks/netbed_rates.py [--rates 50mbit,400mbit,2gbit] [--seconds 2]

For each rate: a bed of two hosts, and two cases, each timed ``--repeats`` times with
``netbed.stream`` (from the connection being up to the last byte acknowledged):
- "both ends": sender and receiver both at the rate (the sender's uplink is the limit);
- "downlink": a 10 Gbit/s sender into a receiver at the rate (the receiver's downlink is).
Goodput is payload bits per second. With a 1500-byte MTU and TCP timestamps each 1514-byte
frame carries 1448 payload bytes, so a link full to its rate gives 95.6 % of it as goodput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from netloader.bench import machine_description

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.netbed import NetBed, available, parse_rate, stream

CEILING = 1448 / 1514


def goodputs(hosts: dict[str, str], nbytes: int, repeats: int) -> list[float]:
    with NetBed(hosts) as bed:
        return [nbytes * 8 / stream(bed["src"], bed["dst"], nbytes) for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50mbit,400mbit,1gbit,2gbit")
    parser.add_argument("--seconds", type=float, default=2.0, help="transfer size, in link time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ok, reason = available()
    if not ok:
        raise SystemExit(f"no network namespaces: {reason}")
    print(machine_description())
    print("| rate | case | median goodput Mbit/s | of the rate | of the 95.6 % ceiling |")
    print("|---|---|---|---|---|")
    for rate in args.rates.split(","):
        bits = parse_rate(rate)
        nbytes = int(bits / 8 * args.seconds)
        cases = {
            "both ends": {"src": rate, "dst": rate},
            "downlink": {"src": "10gbit", "dst": rate},
        }
        for case, hosts in cases.items():
            median = statistics.median(goodputs(hosts, nbytes, args.repeats))
            print(
                f"| {rate} | {case} | {median / 1e6:.1f} | {median / bits:.1%} "
                f"| {median / bits / CEILING:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

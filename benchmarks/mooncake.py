"""The mooncake transport against TCP, side by side in one run (needs root and Mooncake).

    sudo .venv/bin/python benchmarks/mooncake.py [--bed-size 256MiB] [--loop-size 1GiB]
        [--repeats 3] [--rate 400mbit]

Two cases, each a seed (``netloader serve`` with a token and ``--mooncake on``, so that it
offers mooncake) and
``netloader pull`` processes that alternate ``--transport mooncake`` and ``--transport tcp``:
- "bed": seed and client on two network-namespace hosts with ``--rate`` links (the link is
  the limit; the goal is mooncake >= 0.95x TCP);
- "loopback": both on 127.0.0.1, nothing shaped.
One warm-up pull over each transport comes first (the seed's memory-mapped checkpoint is read
in, each engine started) and is not reported. Each pull reports its own seconds (the ``pulled ...`` line: from the first connection to the
last verified chunk); the seed's CPU time (user + system, from /proc) is taken around each
pull, so it is the seed's cost of serving that one pull.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from netloader.bench import machine_description
from netloader.rules import parse_size
from netloader.synthetic import llm_like

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.netbed import NetBed, available

PULLED = re.compile(r"pulled (\d+) bytes in ([\d.]+) s .* over (\S+) x")
TRANSPORTS = ("mooncake", "tcp")
Popen = Callable[..., subprocess.Popen]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(popen: Popen, folder: Path, host: str, token: Path) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "netloader", "serve", folder, "--host", host]
    # --mooncake on: over its tcp protocol (no RDMA here) the default, auto, would not offer it
    proc = popen(
        [*argv, "--token-file", token, "--mooncake", "on"], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        raise SystemExit(f"the seed did not start: {line!r}")
    return proc, line.split()[-1]


def one_pull(popen: Popen, seed: subprocess.Popen, address: str, token: Path, transport: str):
    """(seconds, transport used, seed CPU seconds) of one pull."""
    argv = [sys.executable, "-m", "netloader", "pull", address, "--token-file", token]
    before = cpu_seconds(seed.pid)
    proc = popen([*argv, "--transport", transport], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=900)
    used = cpu_seconds(seed.pid) - before
    match = PULLED.search(out)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"pull over {transport} failed: {out!r}")
    return float(match[2]), match[3], used


def run_case(
    popen_seed: Popen, popen_client: Popen, folder: Path, host: str, token: Path, repeats: int
) -> dict[str, list[tuple[float, str, float]]]:
    seed, address = serve(popen_seed, folder, host, token)
    try:
        runs: dict[str, list[tuple[float, str, float]]] = {t: [] for t in TRANSPORTS}
        for transport in TRANSPORTS:  # warm-up, not reported: the seed's pages, each engine
            one_pull(popen_client, seed, address, token, transport)
        for _ in range(repeats):
            for transport in TRANSPORTS:  # alternated, so drift hits both alike
                runs[transport].append(one_pull(popen_client, seed, address, token, transport))
        return runs
    finally:
        seed.kill()
        seed.wait()


def report(case: str, size: int, runs: dict[str, list[tuple[float, str, float]]]) -> None:
    medians = {t: statistics.median(r[0] for r in runs[t]) for t in TRANSPORTS}
    for transport in TRANSPORTS:
        seconds = [r[0] for r in runs[transport]]
        cpu = [r[2] for r in runs[transport]]
        used = {r[1] for r in runs[transport]}
        print(
            f"| {case} | {transport} (used: {', '.join(sorted(used))}) | {size / 2**20:.0f} MiB "
            f"| {', '.join(f'{s:.2f}' for s in seconds)} | {size / medians[transport] / 1e6:.1f} "
            f"| {statistics.median(cpu):.2f} |",
            flush=True,
        )
    ratio = medians["tcp"] / medians["mooncake"]
    print(f"| {case} | mooncake / tcp throughput | | | {ratio:.3f}x | |", flush=True)


def checkpoint(root: Path, size: int, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    save_file(llm_like(size, seed=7), folder / "model.safetensors")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bed-size", default="256MiB")
    parser.add_argument("--loop-size", default="1GiB")
    parser.add_argument("--rate", default="400mbit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ok, reason = available()
    if not ok:
        raise SystemExit(f"no network namespaces: {reason}")
    print(machine_description())
    print("| case | transport | size | seconds per pull | median MB/s | seed CPU s (median) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        token = root / "token"
        token.write_bytes(os.urandom(32))
        bed_size, loop_size = parse_size(args.bed_size), parse_size(args.loop_size)
        folder = checkpoint(root, bed_size, "bed")
        with NetBed({"seed": args.rate, "client": args.rate}) as bed:
            seed_host = bed["seed"]
            runs = run_case(
                seed_host.popen,
                bed["client"].popen,
                folder,
                seed_host.address,
                token,
                args.repeats,
            )
        report(f"bed {args.rate}", bed_size, runs)
        folder = checkpoint(root, loop_size, "loop")
        runs = run_case(
            subprocess.Popen, subprocess.Popen, folder, "127.0.0.1", token, args.repeats
        )
        report("loopback", loop_size, runs)


if __name__ == "__main__":
    main()

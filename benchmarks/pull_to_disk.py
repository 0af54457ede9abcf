"""`netloader pull --out` against the plain way to save a pulled model, side by side.

    .venv/bin/python benchmarks/pull_to_disk.py [--size 1GiB] [--rounds 3] [--json FILE]

One `netloader serve` process serves a generated LLM-shaped checkpoint. Each round then runs,
each in a fresh process, alternating:
- "pull --out": the command line, receiving straight into a memory-mapped safetensors file;
- "pull, then save_file": ``netloader.pull`` into fresh memory, then ``safetensors`` writing the
  tensors to a temporary file that is renamed into place.
Reported per method: the median wall time of the whole process (Python start-up included, the
same for both) and its peak resident memory, then whether both files hold the served bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from netloader.bench import machine_description
from netloader.cli import parse_size
from netloader.synthetic import llm_like

BIN = Path(sys.executable).parent
PLAIN = """
import os, sys
from safetensors.torch import save_file
from netloader import pull
from netloader.client import info
source, out = sys.argv[1], sys.argv[2]
result = pull(source, info(source).identity)
os.makedirs(out, exist_ok=True)
save_file(result.tensors, out + "/.model.safetensors.tmp")
os.replace(out + "/.model.safetensors.tmp", out + "/model.safetensors")
"""


def timed(cmd: list[str], work: Path) -> tuple[float, float | None]:
    """Wall seconds and peak resident MiB of one child process.

    The peak comes from GNU time: a child forked straight from this process would report this
    process's own resident size as its peak (Linux carries the high-water mark across exec).
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    report = work / "maxrss"
    wrapped = [gnu_time, "-f", "%M", "-o", str(report), *cmd] if gnu_time else cmd
    start = time.perf_counter()
    proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    return seconds, int(report.read_text().split()[-1]) / 1024 if gnu_time else None


def same(expected: dict[str, torch.Tensor], path: Path) -> bool:
    got = load_file(path)
    return set(got) == set(expected) and all(
        torch.equal(expected[n].view(torch.uint8), got[n].view(torch.uint8)) for n in expected
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="payload (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="netloader-pull-to-disk-"))
    server = None
    try:
        tensors = llm_like(args.size, seed=1)
        (work / "ckpt").mkdir()
        save_file(tensors, work / "ckpt" / "model.safetensors")
        count, payload = len(tensors), sum(t.nbytes for t in tensors.values())
        del tensors  # keep this process small while the children run
        server = subprocess.Popen(
            [BIN / "netloader", "serve", work / "ckpt"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert server.stdout is not None
        match = re.fullmatch(r"listening on (\S+)\n", server.stdout.readline())
        if not match:
            sys.exit("netloader serve did not start")
        source = match.group(1)
        methods = {
            "pull --out": lambda out: [BIN / "netloader", "pull", source, "--out", out],
            "pull, then save_file": lambda out: [BIN / "python", "-c", PLAIN, source, out],
        }
        results: dict[str, dict[str, list]] = {m: {"s": [], "mib": []} for m in methods}
        for r in range(args.rounds):
            for name, cmd in methods.items():
                out = work / re.sub(r"\W+", "-", name)
                shutil.rmtree(out, ignore_errors=True)
                seconds, mib = timed([str(c) for c in cmd(out)], work)
                results[name]["s"].append(seconds)
                results[name]["mib"].append(mib)
                print(f"round {r + 1}/{args.rounds} {name}: {seconds:.2f} s, peak {mib} MiB")
        served = load_file(work / "ckpt" / "model.safetensors")
        exact = {
            n: same(served, work / re.sub(r"\W+", "-", n) / "model.safetensors") for n in methods
        }
        print(
            f"payload {payload / 2**30:.2f} GiB in {count} tensors, median of {args.rounds}, "
            f"machine: {machine_description()}"
        )
        print(f"{'method':24} {'wall s':>7} {'peak MiB':>9}  bit-exact")
        rows = {}
        for name, res in results.items():
            rows[name] = {
                "median_s": statistics.median(res["s"]),
                "seconds": res["s"],
                "peak_mib": None if None in res["mib"] else max(res["mib"]),
                "bit_exact": exact[name],
            }
            peak = rows[name]["peak_mib"]
            shown = f"{peak:9.0f}" if peak is not None else f"{'n/a':>9}"
            print(f"{name:24} {rows[name]['median_s']:7.2f} {shown}  {exact[name]}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"machine": machine_description(), "payload_bytes": payload, "rows": rows},
                    indent=2,
                )
            )
        return 0 if all(exact.values()) else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Launch to ready of a vLLM CPU instance in compile mode: with and without the seed's compile
artifacts, side by side in one run, interleaved.

    .venv/bin/python benchmarks/compile_ready.py [--repeats 3] [--json FILE]

Each repeat starts a fresh seed with an empty VLLM_CACHE_ROOT (row "seed cold start": it loads
from storage and compiles), then, while the seed serves, three new instances in a rotating order,
all taking their weights from the seed:
- "replica, no artifacts": an empty cache, ARTIFACTS off, so it compiles from scratch;
- "replica, artifacts from the seed": an empty cache, the seed's entry fetched beside the weights;
- "warm restart, compile cache only": a copy of the seed's compile cache alone
  (``torch_compile_cache/``), what artifacts can bring;
- "warm restart": a copy of the seed's whole VLLM_CACHE_ROOT, as when an instance restarts on
  its node (it also holds vLLM's ``modelinfos/``, which spares vLLM a subprocess that inspects
  the model's class before any worker, or netloader, runs).
Ready is the time from launching the process until ``LLM(...)`` returned (the harness reports
the wall clock then). The goal (issue 17): artifacts within 1.1x the warm restart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from netloader.bench import machine_description

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.harness import OfflineInstance, Run
from netloader_testing.models import tiny_llama

TOKEN = "compile-ready-benchmark-secret-0123"
ROWS = (
    "replica, no artifacts",
    "replica, artifacts from the seed",
    "warm restart, compile cache only",
    "warm restart",
)


def ready(model: Path, work: Path, name: str, extra: dict, cache: Path, hold: bool = False):
    run = Run(["hello world"], extra=extra, compile=True, hold=hold)
    inst = OfflineInstance(model, work / f"{name}.log", run, cache_root=cache)
    try:
        return inst, inst.ready_seconds()
    except BaseException:
        inst.stop()  # an instance that failed must not outlive the benchmark
        raise


def one_repeat(model: Path, work: Path, repeat: int) -> dict[str, float]:
    token_file = work / "token"
    token_file.write_text(TOKEN)
    prefix = work / f"seed{repeat}_"
    seed_cache = work / f"seed{repeat}-cache"
    extra = {"OUTPUT_PREFIX": str(prefix), "TOKEN_FILE": str(token_file)}
    seed, cold = ready(model, work, f"seed{repeat}", extra, seed_cache, hold=True)
    times = {"seed cold start": cold}
    try:
        address = Path(f"{prefix}0.txt").read_text().strip()
        pull = {"SOURCE": [{"device_id": 0, "sources": [address]}], "TOKEN_FILE": str(token_file)}
        order = ROWS[repeat % len(ROWS) :] + ROWS[: repeat % len(ROWS)]
        for row in order:
            cache = work / f"cache{repeat}-{ROWS.index(row)}"
            if row == "warm restart":
                shutil.copytree(seed_cache, cache)
            elif row == "warm restart, compile cache only":
                shutil.copytree(seed_cache / "torch_compile_cache", cache / "torch_compile_cache")
            extra = {**pull, "ARTIFACTS": "off"} if row == ROWS[0] else pull
            inst, seconds = ready(model, work, f"{ROWS.index(row)}-{repeat}", extra, cache)
            inst.stop()
            log = inst.log()
            if row == ROWS[1] and "compile artifacts from peer" not in log:
                raise RuntimeError(f"no artifacts came:\n{log[-3000:]}")
            if "weights phase from peer" not in log:
                raise RuntimeError(f"{row}: weights did not come from the seed:\n{log[-3000:]}")
            times[row] = seconds
            [phase] = inst.weights_phases()
            times[f"{row}: weights phase"] = phase.seconds
            print(
                f"  repeat {repeat + 1}: {row}: {seconds:.1f} s, weights {phase.seconds:.2f} s",
                flush=True,
            )
    finally:
        seed.stop()
    print(f"  repeat {repeat + 1}: seed cold start: {cold:.1f} s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(machine_description(), flush=True)
    with tempfile.TemporaryDirectory(prefix="compile-ready-") as tmp:
        work = Path(tmp)
        model = tiny_llama(work / "model")
        runs = [one_repeat(model, work, r) for r in range(args.repeats)]
    rows = ("seed cold start", *ROWS)
    medians = {row: statistics.median(run[row] for run in runs) for row in rows}
    warm, compiled = medians["warm restart"], medians["warm restart, compile cache only"]
    print(
        f"\nmedians of {args.repeats}, launch to ready (x the warm restart, x its compile cache only):"
    )
    for row in rows:
        print(
            f"  {row:34s} {medians[row]:6.1f} s  {medians[row] / warm:5.2f}x  "
            f"{medians[row] / compiled:5.2f}x"
        )
    for row in ROWS:
        phases = [run[f"{row}: weights phase"] for run in runs]
        print(f"  weights phase, {row}: median {statistics.median(phases):.2f} s")
    if args.json:
        report = {"machine": machine_description(), "runs": runs, "medians": medians}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
